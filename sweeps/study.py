"""Optuna studies for ``lia sweep``: samplers, pruners, storage, and trials a dead driver left.

The sweep driver owns its study through ask-and-tell. This module builds what it needs from
plain settings (names, seeds, a storage string), so the config layer can change without it:

- :data:`SAMPLERS` / :data:`PRUNERS`: name -> factory registries, and :func:`build_sampler`,
  :func:`build_pruner`, which refuse what Optuna cannot do (a pruner or CMA-ES on a
  multi-objective study) with one :class:`learners.ConfigError`. Optuna stores neither, so a
  resumed study gets them rebuilt from the config.
- Storage: :func:`storage_url` (default ``sqlite:///optuna.db``), :func:`check_storage` (a
  preflight check that writes nothing) and :func:`open_storage` (an SQLite or PostgreSQL /
  MySQL URL, or a journal file path ending in ``.log`` / ``.journal``).
- :func:`open_study` creates or resumes a study by name; :func:`record_settings` keeps the
  sweep's settings as study user attributes and returns what changed since the last run.
- Ownership: ask-and-tell has no heartbeat (Optuna's only works with ``optimize()``), so the
  driver :func:`claim` s each trial it asks for with :func:`orchestrator.liveness.owner_record`
  and refreshes it with :func:`heartbeat`; on start :func:`recover_orphans` fails the RUNNING
  trials whose driver is dead and re-enqueues their parameters. :func:`decided` and
  :func:`remaining` count the trials the sweep decided itself, so a sweep ends with exactly
  ``n_trials`` of them however often its driver was killed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.pruners import BasePruner
from optuna.samplers import BaseSampler
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, Trial, TrialState

from learners import ConfigError
from orchestrator.liveness import owner_alive, owner_record
from orchestrator.net import database_address, probe_tcp, redact
from orchestrator.preflight import check_creatable
from orchestrator.tracking import sqlite_path

__all__ = [
    "DEFAULT_STORAGE",
    "PRUNERS",
    "SAMPLERS",
    "build_pruner",
    "build_sampler",
    "check_storage",
    "claim",
    "decided",
    "heartbeat",
    "open_storage",
    "open_study",
    "record_settings",
    "recover_orphans",
    "remaining",
    "storage_url",
    "unstarted",
]

log = logging.getLogger(__name__)

PREFIX = "lia."
"""prefix of the user attributes this module writes on trials and studies"""
OWNER_KEYS = ("host", "pid", "pid_started", "heartbeat")
"""the keys of :func:`orchestrator.liveness.owner_record`, stored as ``lia.<key>``"""
HEARTBEAT = PREFIX + "heartbeat"
ORPHANED = PREFIX + "orphaned"
"""user attribute of a trial failed because its driver died: the reason"""
RETRY_OF = PREFIX + "retry_of"
"""user attribute of a trial enqueued to retry an orphaned one: the orphan's number"""
SETTINGS_CHANGES = PREFIX + "settings_changes"
"""study user attribute: the settings that changed between runs of the study"""

DEFAULT_STORAGE = "sqlite:///optuna.db"
TCP_TIMEOUT_S = 3.0
JOURNAL_SUFFIXES = (".log", ".journal")
SERVER_BACKENDS = ("postgresql", "mysql")
_ACCEPTED_STORAGE = (
    "sqlite:///path/optuna.db (one driver), a journal file path ending in .log or .journal "
    "(several drivers on one host), postgresql://user:password@host:port/db or "
    "mysql://... (several hosts)"
)
# SQLAlchemy driver name -> (module it imports, what to pip install)
_DB_DRIVERS = {
    "psycopg": ("psycopg", "'psycopg[binary]'"),
    "psycopg2": ("psycopg2", "psycopg2-binary"),
    "pg8000": ("pg8000", "pg8000"),
    "mysqldb": ("MySQLdb", "mysqlclient"),
    "pymysql": ("pymysql", "pymysql"),
    "mysqlconnector": ("mysql.connector", "mysql-connector-python"),
}


# ---------------------------------------------------------------------------- samplers
SamplerFactory = Callable[[int, Mapping[str, Sequence[Any]] | None, int], BaseSampler]


def _tpe(seed: int, grid: Mapping[str, Sequence[Any]] | None, n_objectives: int) -> BaseSampler:
    # multivariate: EWC's lambda and the learning rate interact; constant_liar (Optuna 5's
    # default) keeps parallel trials from sampling the same point
    return optuna.samplers.TPESampler(seed=seed, multivariate=True)


def _random(seed: int, grid: Mapping[str, Sequence[Any]] | None, n_objectives: int) -> BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


def _grid(seed: int, grid: Mapping[str, Sequence[Any]] | None, n_objectives: int) -> BaseSampler:
    if not grid:
        raise ConfigError(
            "sweep.sampler=grid needs a search space of finite values (categorical, or int "
            "ranges small enough to list); the space given has none"
        )
    empty = sorted(key for key, values in grid.items() if len(values) == 0)
    if empty:
        raise ConfigError(f"sweep.sampler=grid: sweep.space.{empty[0]} lists no values")
    return _AskAndTellGrid(search_space=dict(grid), seed=seed)


class _AskAndTellGrid(optuna.samplers.GridSampler):
    """GridSampler whose ``after_trial`` does not call ``study.stop()``.

    Optuna's grid stops the study once every point was tried, which raises outside
    ``optimize()``; the driver counts trials itself (and refuses more trials than points).
    """

    def after_trial(self, study, trial, state, values) -> None:  # noqa: D102
        return None


def _cmaes(seed: int, grid: Mapping[str, Sequence[Any]] | None, n_objectives: int) -> BaseSampler:
    if n_objectives > 1:
        raise ConfigError(
            f"sweep.sampler=cmaes optimises one objective and this study has {n_objectives}; "
            "use sweep.sampler=tpe, random or grid, or one objective"
        )
    if importlib.util.find_spec("cmaes") is None:
        raise ConfigError(
            "sweep.sampler=cmaes needs the cmaes package, which is not installed "
            "(pip install cmaes); or use sweep.sampler=tpe"
        )
    return optuna.samplers.CmaEsSampler(seed=seed)


SAMPLERS: dict[str, SamplerFactory] = {
    "tpe": _tpe,
    "random": _random,
    "grid": _grid,
    "cmaes": _cmaes,
}
"""sampler name -> factory(seed, grid values or None, number of objectives)"""


def build_sampler(
    name: str,
    seed: int,
    grid: Mapping[str, Sequence[Any]] | None = None,
    n_objectives: int = 1,
) -> BaseSampler:
    """The sampler ``sweep.sampler=name`` names, seeded; ``grid`` (name -> values) for grid.

    Raises ConfigError for an unknown name, grid without values, or CMA-ES with several
    objectives.
    """
    factory = SAMPLERS.get(name)
    if factory is None:
        raise ConfigError(
            f"sweep.sampler={name!r} is not accepted; expected one of: {', '.join(SAMPLERS)}"
        )
    return factory(seed, grid, n_objectives)


# ---------------------------------------------------------------------------- pruners
# Steps are task indices. Nothing is pruned on the first task (step 0): forgetting, what a
# continual-learning method trades against plasticity, shows from the second task on. Four
# finished trials make the reference (a sweep of 8 trials prunes in the last 4).
N_STARTUP_TRIALS = 4
N_WARMUP_STEPS = 1


def _wilcoxon() -> BasePruner:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return optuna.pruners.WilcoxonPruner(p_threshold=0.1)


PRUNERS: dict[str, Callable[[int], BasePruner]] = {
    "median": lambda warmup: optuna.pruners.MedianPruner(
        n_startup_trials=N_STARTUP_TRIALS, n_warmup_steps=warmup
    ),
    "percentile": lambda warmup: optuna.pruners.PercentilePruner(
        25.0, n_startup_trials=N_STARTUP_TRIALS, n_warmup_steps=warmup
    ),
    "successive_halving": lambda warmup: optuna.pruners.SuccessiveHalvingPruner(),
    "hyperband": lambda warmup: optuna.pruners.HyperbandPruner(min_resource=1),
    "wilcoxon": lambda warmup: _wilcoxon(),
    "none": lambda warmup: optuna.pruners.NopPruner(),
}
"""pruner name -> factory(warmup: the first task index median/percentile may prune at)"""


def build_pruner(name: str, n_objectives: int = 1, warmup: int = N_WARMUP_STEPS) -> BasePruner:
    """The pruner ``sweep.pruner=name`` names (median and percentile prune from task
    ``warmup`` on). Raises ConfigError for an unknown name, or for a pruner other than
    ``none`` on a multi-objective study (Optuna cannot prune those)."""
    factory = PRUNERS.get(name)
    if factory is None:
        raise ConfigError(
            f"sweep.pruner={name!r} is not accepted; expected one of: {', '.join(PRUNERS)}"
        )
    if n_objectives > 1 and name != "none":
        raise ConfigError(
            f"sweep.pruner={name} cannot prune a multi-objective study (Optuna does not "
            "support it); use sweep.pruner=none or one objective"
        )
    return factory(warmup)


# ---------------------------------------------------------------------------- storage
def storage_url(storage: str | None) -> str:
    """The storage a sweep uses: ``storage`` as given, or ``sqlite:///optuna.db`` (a file in
    the working directory) when it is None or blank."""
    if storage is None or not storage.strip():
        return DEFAULT_STORAGE
    return storage.strip()


def _is_journal(storage: str) -> bool:
    return "://" not in storage and storage.lower().endswith(JOURNAL_SUFFIXES)


def _backend(url: str) -> str:
    """``sqlite``, ``postgresql``, ``mysql``... (the part before ``+driver``); '' if none."""
    if "://" not in url:
        return ""
    return url.split("://", 1)[0].split("+", 1)[0].lower()


def check_storage(storage: str | None) -> None:
    """Refuse (one ConfigError naming ``sweep.storage``) a storage the sweep cannot use.

    Accepted: an SQLite URL whose folder exists and is writable; a journal file path ending
    in ``.log`` or ``.journal`` in such a folder; a PostgreSQL or MySQL URL whose SQLAlchemy
    driver is installed and whose server accepts a TCP connection within a few seconds.
    Writes nothing: no file, no database, no study.
    """
    url = storage_url(storage)
    key = f"sweep.storage={redact(url)!r}"
    if _is_journal(url):
        check_creatable(
            Path(url).expanduser(), key, "journal file", "give a journal file in an existing folder"
        )
        return
    backend = _backend(url)
    if backend == "sqlite":
        path = sqlite_path(url)
        if path is None:
            raise ConfigError(
                f"{key} is an in-memory database: a sweep could not resume from it; "
                "give sqlite:///path/optuna.db"
            )
        check_creatable(path, key, "database file", "give a database file in an existing folder")
    elif backend in SERVER_BACKENDS:
        _check_server(url, key, backend)
    elif backend == "postgres":
        raise ConfigError(f"{key}: SQLAlchemy needs postgresql://, not postgres://")
    else:
        raise ConfigError(f"{key} is not a storage a sweep can use; accepted: {_ACCEPTED_STORAGE}")


def _check_server(url: str, key: str, backend: str) -> None:
    """The server's port answers; the Python driver SQLAlchemy picks for the URL is installed."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        driver = make_url(url).get_dialect().driver
    except (ArgumentError, NoSuchModuleError, ValueError) as err:
        raise ConfigError(f"{key} is not a valid database URL ({err})") from None
    try:
        address = database_address(url)
    except ValueError:  # a port that is not a number
        raise ConfigError(f"{key} has an invalid port") from None
    reason = probe_tcp(*address, TCP_TIMEOUT_S) if address else None
    if reason is not None:  # (no host: a local socket, left to the driver)
        host, port = address
        raise ConfigError(
            f"{key} is unreachable ({host}:{port}: {reason}); start the database or point "
            "sweep.storage at a reachable one"
        )
    module, package = _DB_DRIVERS.get(driver, (None, None))
    if module is not None and importlib.util.find_spec(module.split(".")[0]) is None:
        raise ConfigError(
            f"{key} needs the Python driver {module} ({backend}+{driver}), which is not "
            f"installed: pip install {package}"
        )


def open_storage(storage: str | None) -> BaseStorage:
    """The Optuna storage ``storage`` names (see :func:`check_storage` for the forms).

    A journal file path -> ``JournalStorage(JournalFileBackend(path))``; an SQLite URL ->
    ``RDBStorage`` (waiting up to 30 s for a lock a reader such as optuna-dashboard holds);
    a server URL -> ``RDBStorage`` whose pool checks connections before use
    (``pool_pre_ping``: a driver outlives a database restart or an idle timeout).
    """
    url = storage_url(storage)
    if _is_journal(url):
        return JournalStorage(JournalFileBackend(str(Path(url).expanduser())))
    if _backend(url) == "sqlite":
        return RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 30}})
    return RDBStorage(url, engine_kwargs={"pool_pre_ping": True})


# ---------------------------------------------------------------------------- studies
def open_study(
    storage: str | BaseStorage | None,
    study_name: str,
    directions: Sequence[str],
    sampler: BaseSampler,
    pruner: BasePruner,
) -> optuna.Study:
    """Create the study ``study_name`` in ``storage``, or resume it if it exists.

    ``directions``: ``maximize`` / ``minimize``, one per objective. A study that exists with
    other directions is refused (ConfigError naming it and both directions).
    """
    if not study_name or not study_name.strip():
        raise ConfigError("sweep.study_name is empty; give the study a name to resume it by")
    wanted = [str(d).lower() for d in directions]
    if not wanted or any(d not in ("maximize", "minimize") for d in wanted):
        raise ConfigError(
            f"study directions {list(directions)!r} are not accepted; expected one or more of "
            "'maximize', 'minimize' (one per sweep.objective)"
        )
    store = storage if isinstance(storage, BaseStorage) else open_storage(storage)
    study = optuna.create_study(
        storage=store,
        sampler=sampler,
        pruner=pruner,
        study_name=study_name,
        directions=wanted,
        load_if_exists=True,
    )
    have = [d.name.lower() for d in study.directions]
    if have != wanted:
        where = "" if isinstance(storage, BaseStorage) else f" in {redact(storage_url(storage))}"
        raise ConfigError(
            f"study {study_name!r}{where} exists with directions {have}, and this sweep asks "
            f"for {wanted} (sweep.objective); give another sweep.study_name, or the objectives "
            "the study was created with"
        )
    return study


def _jsonable(value: Any) -> Any:
    """``value`` as the storage gives it back (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value))


def record_settings(study: optuna.Study, settings: Mapping[str, Any]) -> dict[str, tuple]:
    """Store the sweep's settings (sampler, pruner, protocol, objective...) as study user
    attributes; return ``{key: (previous, now)}`` for those a previous run recorded otherwise.

    A change is allowed (a resumed study may get another sampler) but never silent: it is
    returned for the driver to print, and appended to the study's ``lia.settings_changes``
    with the number of trials the study held when it happened.
    """
    before = study.user_attrs
    changes: dict[str, tuple] = {}
    for key, value in settings.items():
        now = _jsonable(value)
        if key in before and before[key] != now:
            changes[key] = (before[key], now)
    if changes:
        history = list(before.get(SETTINGS_CHANGES, []))
        n_trials = len(study.get_trials(deepcopy=False))
        for key, (old, new) in changes.items():
            history.append({"key": key, "old": old, "new": new, "after_trials": n_trials})
        study.set_user_attr(SETTINGS_CHANGES, history)
    for key, value in settings.items():
        if key not in before or key in changes:
            study.set_user_attr(key, _jsonable(value))
    return changes


# ---------------------------------------------------------------------------- trials
def _set_trial_attr(study: optuna.Study, trial: Trial | FrozenTrial, key: str, value: Any) -> None:
    """Set a user attribute on a RUNNING trial.

    A :class:`Trial` (what ``ask()`` returns) has the public ``set_user_attr``. A
    :class:`FrozenTrial` (what ``get_trials()`` returns, e.g. a trial another process asked
    for) has none that writes to storage in Optuna 5 (its ``set_user_attr`` changes the copy
    only), so the study's storage is written through its public ``BaseStorage`` method.
    """
    if isinstance(trial, Trial):
        trial.set_user_attr(key, value)
    else:
        study._storage.set_trial_user_attr(trial._trial_id, key, value)


def claim(trial: Trial, record: Mapping[str, str] | None = None) -> None:
    """Mark ``trial`` as this process's: :func:`orchestrator.liveness.owner_record` (or
    ``record``) stored as user attributes ``lia.host``, ``lia.pid``, ``lia.pid_started``,
    ``lia.heartbeat``. Call it right after ``study.ask()``: until then the trial counts as
    orphaned for :func:`recover_orphans`."""
    for key, value in (record if record is not None else owner_record()).items():
        trial.set_user_attr(PREFIX + key, value)


def heartbeat(study: optuna.Study, trials: Iterable[Trial | FrozenTrial]) -> None:
    """Refresh ``lia.heartbeat`` of the trials this driver holds (every
    :data:`orchestrator.liveness.HEARTBEAT_S` or so): a driver on another host whose
    heartbeat is older than ``STALE_AFTER_S`` is taken for dead. Finished trials are skipped."""
    now = f"{time.time():.0f}"
    for trial in trials:
        try:
            _set_trial_attr(study, trial, HEARTBEAT, now)
        except UpdateFinishedTrialError:
            continue


def _owner(trial: FrozenTrial) -> dict[str, str]:
    """The liveness record :func:`claim` stored on ``trial`` (empty if none)."""
    attrs = trial.user_attrs
    return {key: str(attrs[PREFIX + key]) for key in OWNER_KEYS if PREFIX + key in attrs}


def recover_orphans(study: optuna.Study) -> list[int]:
    """Fail the RUNNING trials whose driver is dead and re-enqueue their parameters.

    A trial is orphaned when its owner (see :func:`claim`) no longer runs
    (:func:`orchestrator.liveness.owner_alive`), or when it has no owner record. It gets
    ``lia.orphaned=<reason>``, is told FAIL, and its parameters are enqueued with
    ``lia.retry_of=<its number>``, so the next ``ask()`` gets the same parameters (a trial
    that had none is replaced by a fresh one). Safe to repeat after a crash half-way: a
    trial already retried is not enqueued twice. Returns the orphans' numbers.
    """
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs[RETRY_OF] for t in trials if RETRY_OF in t.user_attrs}
    orphans = []
    for trial in trials:
        if trial.state != TrialState.RUNNING:
            continue
        alive, reason = owner_alive(_owner(trial), f"the driver of trial {trial.number}")
        if alive:
            continue
        if trial.params and trial.number not in retried:
            study.enqueue_trial(
                params=dict(trial.params),
                user_attrs={RETRY_OF: trial.number},
                skip_if_exists=False,
            )
        try:
            _set_trial_attr(study, trial, ORPHANED, reason)
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        except UpdateFinishedTrialError:
            continue  # its driver finished it after all
        log.warning("trial %d failed: %s; its parameters are enqueued again", trial.number, reason)
        orphans.append(trial.number)
    return orphans


_DECIDED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def decided(study: optuna.Study) -> int:
    """Trials the sweep decided: COMPLETE, PRUNED, or FAIL for a reason of their own (not
    those failed by :func:`recover_orphans` because their driver died)."""
    return sum(
        1
        for trial in study.get_trials(deepcopy=False, states=_DECIDED)
        if ORPHANED not in trial.user_attrs
    )


def remaining(study: optuna.Study, n_trials: int) -> int:
    """Trials still to decide before the study holds ``n_trials`` decided ones; the RUNNING
    and WAITING (enqueued) ones count among them."""
    return max(0, n_trials - decided(study))


def unstarted(study: optuna.Study, n_trials: int) -> int:
    """Trials still to ask for: :func:`remaining` less the RUNNING ones (in this driver or,
    with a shared storage, in another). WAITING trials count here: ``ask()`` starts them."""
    running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
    return max(0, remaining(study, n_trials) - running)
