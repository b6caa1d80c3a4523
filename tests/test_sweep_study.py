"""sweeps.study: sampler / pruner registries, storage forms, studies, and orphaned trials."""

from __future__ import annotations

import importlib
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from learners import ConfigError
from sweeps.study import (
    DEFAULT_STORAGE,
    ORPHANED,
    PRUNERS,
    RETRY_OF,
    SAMPLERS,
    SETTINGS_CHANGES,
    build_pruner,
    build_sampler,
    check_storage,
    claim,
    decided,
    heartbeat,
    open_storage,
    open_study,
    record_settings,
    recover_orphans,
    remaining,
    storage_url,
    unstarted,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _dead_owner() -> dict[str, str]:
    """A liveness record of a process that has exited (a `python -c pass` this test ran)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    started = time.time()
    child.wait()
    return {
        "host": socket.gethostname(),
        "pid": str(child.pid),
        "pid_started": f"{started:.3f}",
        "heartbeat": f"{started:.0f}",
    }


def _study(storage, name="s", directions=("maximize",), sampler="random", pruner="none"):
    n = len(directions)
    return open_study(
        storage,
        name,
        list(directions),
        build_sampler(sampler, 0, None, n),
        build_pruner(pruner, n),
    )


# ---------------------------------------------------------------------------- registries
def test_every_sampler_builds():
    grid = {"lr": [0.01, 0.1], "buffer_size": [50, 100]}
    expected = {
        "tpe": optuna.samplers.TPESampler,
        "random": optuna.samplers.RandomSampler,
        "grid": optuna.samplers.GridSampler,
        "cmaes": optuna.samplers.CmaEsSampler,
    }
    assert set(SAMPLERS) == set(expected)
    for name, cls in expected.items():
        if name == "cmaes" and importlib.util.find_spec("cmaes") is None:
            with pytest.raises(ConfigError, match="pip install cmaes"):
                build_sampler(name, 0, grid, 1)
            continue
        assert isinstance(build_sampler(name, 0, grid, 1), cls)
    for name in ("tpe", "random", "grid"):  # two objectives
        assert isinstance(build_sampler(name, 0, grid, 2), expected[name])


def test_every_pruner_builds_without_warnings():
    expected = {
        "median": optuna.pruners.MedianPruner,
        "percentile": optuna.pruners.PercentilePruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "wilcoxon": optuna.pruners.WilcoxonPruner,
        "none": optuna.pruners.NopPruner,
    }
    assert set(PRUNERS) == set(expected)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, cls in expected.items():
            assert isinstance(build_pruner(name, 1), cls)
    assert not caught, [str(w.message) for w in caught]


def test_multi_objective_refusals_and_unknown_names():
    with pytest.raises(ConfigError) as err:
        build_pruner("median", 2)
    assert str(err.value) == (
        "sweep.pruner=median cannot prune a multi-objective study (Optuna does not support "
        "it); use sweep.pruner=none or one objective"
    )
    for name in PRUNERS:
        if name != "none":
            with pytest.raises(ConfigError, match=f"sweep.pruner={name} cannot prune"):
                build_pruner(name, 2)
    assert isinstance(build_pruner("none", 2), optuna.pruners.NopPruner)
    with pytest.raises(ConfigError, match="sweep.sampler=cmaes optimises one objective"):
        build_sampler("cmaes", 0, None, 2)
    with pytest.raises(ConfigError, match="'bayes'.*tpe, random, grid, cmaes"):
        build_sampler("bayes", 0, None, 1)
    with pytest.raises(ConfigError, match="'asha'.*median, percentile, .*wilcoxon, none"):
        build_pruner("asha", 1)
    with pytest.raises(ConfigError, match="sweep.sampler=grid needs a search space"):
        build_sampler("grid", 0, None, 1)
    with pytest.raises(ConfigError, match="sweep.space.lr lists no values"):
        build_sampler("grid", 0, {"lr": []}, 1)


# ---------------------------------------------------------------------------- storage
def test_storage_url_default():
    assert storage_url(None) == DEFAULT_STORAGE == "sqlite:///optuna.db"
    assert storage_url("  ") == DEFAULT_STORAGE
    assert storage_url("runs/sweep.journal") == "runs/sweep.journal"


@pytest.mark.parametrize("form", ["sqlite", "journal"])
def test_storage_forms_persist_a_study(tmp_path, form):
    storage = (
        f"sqlite:///{tmp_path}/optuna.db" if form == "sqlite" else str(tmp_path / "study.journal")
    )
    check_storage(storage)
    assert list(tmp_path.iterdir()) == []  # the check wrote nothing
    kind = optuna.storages.RDBStorage if form == "sqlite" else optuna.storages.JournalStorage
    assert isinstance(open_storage(storage), kind)

    study = _study(storage, "persist")
    trial = study.ask()
    trial.suggest_float("lr", 1e-3, 1.0, log=True)
    study.tell(trial, 0.5)
    again = _study(storage, "persist")
    assert again._study_id == study._study_id
    assert [(t.number, t.state, t.value) for t in again.trials] == [(0, TrialState.COMPLETE, 0.5)]
    check_storage(storage)  # an existing store passes too


def test_check_storage_refuses_without_writing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError, match=r"sweep.storage=.*the folder .*missing does not exist"):
        check_storage(f"sqlite:///{missing}/optuna.db")
    with pytest.raises(ConfigError, match=r"sweep.storage=.*missing does not exist"):
        check_storage(str(missing / "sweep.journal"))
    (tmp_path / "folder.journal").mkdir()
    with pytest.raises(ConfigError, match="is a folder"):
        check_storage(str(tmp_path / "folder.journal"))
    port = _free_port()  # nothing listens there
    url = f"postgresql://lia:secret@127.0.0.1:{port}/sweeps"
    with pytest.raises(ConfigError, match=r"sweep.storage=.*unreachable") as err:
        check_storage(url)
    assert "secret" not in str(err.value) and "***" in str(err.value)
    with pytest.raises(ConfigError, match="in-memory"):
        check_storage("sqlite://")
    with pytest.raises(ConfigError, match=r"sweep.storage='runs/sweep.txt'.*accepted: sqlite"):
        check_storage("runs/sweep.txt")
    with pytest.raises(ConfigError, match="postgresql://, not postgres://"):
        check_storage(f"postgres://127.0.0.1:{port}/x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.journal"]


def test_check_storage_names_a_missing_database_driver(monkeypatch):
    with socket.socket() as listener:  # a port that answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        real = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util,
            "find_spec",
            lambda name, *a: None if name == "pymysql" else real(name, *a),
        )
        with pytest.raises(ConfigError, match="driver pymysql .*pip install pymysql"):
            check_storage(f"mysql+pymysql://u@127.0.0.1:{port}/db")


# ---------------------------------------------------------------------------- studies
def test_open_study_refuses_other_directions(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    _study(storage, "replay", ["maximize"])
    with pytest.raises(ConfigError) as err:
        _study(storage, "replay", ["maximize", "minimize"])
    message = str(err.value)
    assert "'replay'" in message
    assert "['maximize']" in message and "['maximize', 'minimize']" in message
    with pytest.raises(ConfigError, match="expected one or more of 'maximize', 'minimize'"):
        _study(storage, "other", ["up"])
    with pytest.raises(ConfigError, match="sweep.study_name is empty"):
        _study(storage, "")


def test_record_settings_notes_changes(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    settings = {"sampler": "tpe", "pruner": "median", "protocol": "full", "objective": ["ACC"]}
    assert record_settings(_study(storage), settings) == {}
    study = _study(storage)
    assert {k: study.user_attrs[k] for k in settings} == settings
    assert record_settings(study, settings) == {}  # the same settings: nothing to note
    changed = record_settings(study, {**settings, "sampler": "random", "n_trials": 8})
    assert changed == {"sampler": ("tpe", "random")}
    study = _study(storage)
    assert study.user_attrs["sampler"] == "random" and study.user_attrs["n_trials"] == 8
    assert study.user_attrs[SETTINGS_CHANGES] == [
        {"key": "sampler", "old": "tpe", "new": "random", "after_trials": 0}
    ]


# ---------------------------------------------------------------------------- trials
def _ask(study, lr=None):
    trial = study.ask()
    values = (
        trial.suggest_float("lr", 1e-4, 1.0, log=True),
        trial.suggest_int("buffer_size", 10, 500),
        trial.suggest_categorical("mode", ["a", "b"]),
    )
    return trial, values


def test_orphans_of_a_dead_driver_are_failed_and_retried(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = _study(storage, "ewc")
    dead, dead_values = _ask(study)
    claim(dead, _dead_owner())
    live, _ = _ask(study)
    claim(live)
    unclaimed, unclaimed_values = _ask(study)  # asked, never claimed: counts as dead
    done, _ = _ask(study)
    study.tell(done, 0.7)
    failed, _ = _ask(study)
    claim(failed)
    study.tell(failed, state=TrialState.FAIL)  # failed for a reason of its own
    assert decided(study) == 2 and remaining(study, 6) == 4

    resumed = _study(storage, "ewc")  # the next driver
    assert recover_orphans(resumed) == [dead.number, unclaimed.number]
    by_number = {t.number: t for t in resumed.get_trials()}
    assert by_number[dead.number].state == TrialState.FAIL
    assert "no longer running" in by_number[dead.number].user_attrs[ORPHANED]
    assert "left no liveness record" in by_number[unclaimed.number].user_attrs[ORPHANED]
    assert by_number[live.number].state == TrialState.RUNNING
    assert ORPHANED not in by_number[live.number].user_attrs
    waiting = resumed.get_trials(states=(TrialState.WAITING,))
    assert [t.user_attrs[RETRY_OF] for t in waiting] == [dead.number, unclaimed.number]
    # orphaned FAILs are not decided; enqueued trials are still to decide
    assert decided(resumed) == 2
    assert remaining(resumed, 6) == 4
    assert unstarted(resumed, 6) == 3  # the live trial is running
    assert recover_orphans(resumed) == []  # nothing new: no second enqueue

    retry, retry_values = _ask(resumed)
    assert retry_values == dead_values
    assert retry.params == by_number[dead.number].params
    assert retry.user_attrs[RETRY_OF] == dead.number
    claim(retry)
    second, second_values = _ask(resumed)
    assert second_values == unclaimed_values
    claim(second)
    assert recover_orphans(resumed) == []
    for trial in (live, retry, second):
        resumed.tell(trial.number, 0.5)
    assert decided(resumed) == 5 and remaining(resumed, 5) == 0
    assert not resumed.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))


def test_recover_orphans_after_a_crash_half_way(tmp_path):
    """A driver killed after enqueueing a retry but before failing the orphan: the next run
    fails it without enqueueing its parameters again."""
    study = _study(f"sqlite:///{tmp_path}/optuna.db")
    orphan, _ = _ask(study)
    claim(orphan, _dead_owner())
    study.enqueue_trial(orphan.params, user_attrs={RETRY_OF: orphan.number})
    assert recover_orphans(study) == [orphan.number]
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 1


def test_heartbeat_refreshes_running_trials_only(tmp_path):
    study = _study(f"sqlite:///{tmp_path}/optuna.db")
    trial, _ = _ask(study)
    claim(trial, {**_dead_owner(), "host": "elsewhere", "heartbeat": "0"})
    other, _ = _ask(study)
    claim(other)
    study.tell(other, 0.1)
    frozen = study.get_trials()[0]
    heartbeat(study, [frozen, other])  # a FrozenTrial, and a finished Trial (skipped)
    beat = float(study.get_trials()[0].user_attrs["lia.heartbeat"])
    assert time.time() - beat < 5
    assert recover_orphans(study) == []  # a recent heartbeat from another host: alive
    heartbeat(study, [trial])


def test_pruned_trials_are_pruned_never_complete(tmp_path):
    study = _study(f"sqlite:///{tmp_path}/optuna.db", pruner="median")
    for _ in range(4):  # the start-up trials: the median's reference
        trial, _ = _ask(study)
        for task in range(3):
            trial.report(0.9, step=task)
        study.tell(trial, 0.9)
    trial, _ = _ask(study)
    trial.report(0.2, step=0)
    assert not trial.should_prune()  # no pruning on the first task
    trial.report(0.1, step=1)
    with pytest.warns(UserWarning, match="already reported"):
        trial.report(0.95, step=1)  # a second value for a step is ignored
    assert trial.should_prune()
    frozen = study.tell(trial, state=TrialState.PRUNED)
    assert frozen.state == TrialState.PRUNED
    assert frozen.intermediate_values == {0: 0.2, 1: 0.1}
    stored = study.get_trials()[-1]
    assert stored.state == TrialState.PRUNED and stored.value == 0.1
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 4
    assert decided(study) == 5


# ---------------------------------------------------------------------------- PostgreSQL
def _pg_bindir() -> Path | None:
    """The folder of initdb / pg_ctl / createdb: on PATH, or Debian's newest version."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return Path(initdb).resolve().parent
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return found[-1].parent if found else None


def _apt_install_postgresql() -> str | None:
    """Install Debian's ``postgresql`` with apt-get; None when done, else why not."""
    if shutil.which("apt-get") is None:
        return "apt-get is not available (not a Debian/Ubuntu machine)"
    if os.geteuid() == 0:
        prefix = ["env", "DEBIAN_FRONTEND=noninteractive"]
    elif shutil.which("sudo"):
        prefix = ["sudo", "-n", "env", "DEBIAN_FRONTEND=noninteractive"]
    else:
        return "not root, and no sudo to run apt-get with"
    install = [*prefix, "apt-get", "install", "-y", "-qq", "--no-install-recommends", "postgresql"]
    if subprocess.run(install, capture_output=True, timeout=900).returncode == 0:
        return None
    # stale or missing package lists (a fresh machine): update, then try again
    update = subprocess.run(
        [*prefix, "apt-get", "update", "-qq"], capture_output=True, text=True, timeout=600
    )
    if update.returncode != 0:
        return f"apt-get update failed (no network to Debian?): {update.stderr.strip()[-400:]}"
    done = subprocess.run(install, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        return f"apt-get install postgresql failed: {done.stderr.strip()[-400:]}"
    return None


def _ensure_driver() -> str | None:
    """Install the Python driver SQLAlchemy uses for postgresql:// if missing; None when
    importable, else why not."""
    from sqlalchemy.engine import make_url

    driver = make_url("postgresql://").get_dialect().driver
    module, package = {"psycopg": ("psycopg", "psycopg[binary]")}.get(
        driver, ("psycopg2", "psycopg2-binary")
    )
    if importlib.util.find_spec(module) is not None:
        return None
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", package],
        capture_output=True,
        text=True,
        timeout=600,
    )
    importlib.invalidate_caches()
    if done.returncode != 0 or importlib.util.find_spec(module) is None:
        return f"pip install {package} failed: {done.stderr.strip()[-400:]}"
    return None


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server of this module's own on 127.0.0.1 (installed with apt-get if it
    is missing), with a database ``lia_sweeps``; stopped and deleted afterwards."""
    timings: dict[str, float] = {}
    start = time.monotonic()
    bindir = _pg_bindir()
    if bindir is None:
        why = _apt_install_postgresql()
        if why is not None:
            pytest.skip(f"PostgreSQL cannot be installed here: {why}")
        bindir = _pg_bindir()
        assert bindir is not None, "apt-get installed postgresql but initdb is not found"
    timings["install postgresql"] = time.monotonic() - start
    start = time.monotonic()
    why = _ensure_driver()
    if why is not None:
        pytest.skip(f"the PostgreSQL driver cannot be installed here: {why}")
    timings["install driver"] = time.monotonic() - start

    start = time.monotonic()
    # not under pytest's tmp folder: the postgres user must be able to reach it
    folder = Path(tempfile.mkdtemp(prefix="lia-pg-"))
    as_server = []
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        user = pwd.getpwnam("postgres")
        os.chown(folder, user.pw_uid, user.pw_gid)
        as_server = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", _free_port()
    subprocess.run(
        [*as_server, str(bindir / "initdb"), "-D", str(data), "-U", "lia", "--auth=trust"]
        + ["--no-sync", "-E", "UTF8", "--locale=C"],
        check=True,
        capture_output=True,
    )
    options = f"-h 127.0.0.1 -p {port} -k {folder} -F -c full_page_writes=off"
    pg_ctl = [*as_server, str(bindir / "pg_ctl"), "-D", str(data)]
    started = subprocess.run(
        [*pg_ctl, "-l", str(folder / "server.log"), "-o", options, "-w", "-t", "60", "start"],
        capture_output=True,
        text=True,
    )
    try:
        assert started.returncode == 0, (
            started.stderr + (folder / "server.log").read_text(errors="replace")[-2000:]
        )
        subprocess.run(
            [str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "lia"]
            + ["lia_sweeps"],
            check=True,
            capture_output=True,
        )
        timings["initdb + start + createdb"] = time.monotonic() - start
        print(
            "\nPostgreSQL for tests: "
            + ", ".join(f"{what} {seconds:.1f} s" for what, seconds in timings.items()),
            file=sys.stderr,
        )
        yield f"postgresql://lia@127.0.0.1:{port}/lia_sweeps"
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def test_postgresql_backed_study(postgres_url):
    check_storage(postgres_url)
    assert isinstance(open_storage(postgres_url), optuna.storages.RDBStorage)
    study = _study(postgres_url, "pg", sampler="tpe", pruner="median")
    record_settings(study, {"sampler": "tpe", "pruner": "median", "storage": "postgresql"})
    values = []
    for value in (0.3, 0.6):
        trial, suggested = _ask(study)
        claim(trial)
        trial.report(value, step=0)
        study.tell(trial, value)
        values.append(suggested)
    pruned, _ = _ask(study)
    pruned.report(0.1, step=0)
    study.tell(pruned, state=TrialState.PRUNED)
    orphan, orphan_values = _ask(study)
    claim(orphan, _dead_owner())

    again = _study(postgres_url, "pg", sampler="tpe", pruner="median")  # a new connection pool
    assert [t.state for t in again.get_trials()] == [
        TrialState.COMPLETE,
        TrialState.COMPLETE,
        TrialState.PRUNED,
        TrialState.RUNNING,
    ]
    assert again.best_value == 0.6
    assert again.user_attrs["sampler"] == "tpe"
    assert recover_orphans(again) == [orphan.number]
    retry, retry_values = _ask(again)
    assert retry_values == orphan_values and retry.user_attrs[RETRY_OF] == orphan.number
    again.tell(retry, 0.5)
    assert decided(again) == 4 and remaining(again, 4) == 0


@pytest.mark.parametrize(("warmup", "pruned_at_task_0"), [(0, True), (1, False)])
def test_median_prunes_from_the_task_prune_from_task_names(warmup, pruned_at_task_0):
    study = optuna.create_study(direction="maximize", pruner=build_pruner("median", 1, warmup))
    for value in (0.8, 0.85, 0.9, 0.82):  # four finished trials make the reference
        trial = study.ask()
        trial.report(value, 0)
        study.tell(trial, value)
    poor = study.ask()
    poor.report(0.1, 0)
    assert bool(poor.should_prune()) is pruned_at_task_0


@pytest.mark.usefixtures("ray_local")
def test_lia_sweep_end_to_end_on_postgresql(postgres_url, tmp_path):
    """`lia sweep` with sweep.storage a postgresql:// URL: the study lives in the server,
    and the same command again finds it decided and runs nothing more."""
    import yaml
    from conftest import tiny_config

    from orchestrator.cli import main

    config = tiny_config(tmp_path, name="pgsweep", methods={"finetune": {}}, seeds=[0])
    config["stream"]["num_tasks"] = 2
    config["sweep"] = {
        "n_trials": 3,
        "space": {"train.lr": {"type": "categorical", "choices": [0.05, 0.1, 0.2]}},
        "sampler": "grid",
        "pruner": "none",
        "storage": postgres_url,
    }
    path = tmp_path / "pgsweep.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["sweep", str(path), "--no-progress"]) == 0
    assert not list(tmp_path.glob("optuna*.db"))  # nothing fell back to a local file
    study = optuna.load_study(study_name="pgsweep-finetune", storage=postgres_url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert sorted(t.params["train.lr"] for t in study.trials) == [0.05, 0.1, 0.2]
    assert study.user_attrs["protocol"] == "full" and study.user_attrs["sampler"] == "grid"
    assert main(["sweep", str(path), "--no-progress"]) == 0  # resumes: already decided
    assert len(optuna.load_study(study_name="pgsweep-finetune", storage=postgres_url).trials) == 3
