"""``lia sweep``: one Optuna study per tuned method, its trials run on the orchestrator's pool.

The driver owns each study (ask-and-tell) and is its only writer, as it is MLflow's. It keeps
as many trials in flight as the cluster holds. A trial is one run per seed (the first
``seeds_per_trial`` seeds) of the config with the trial's values; after each task every run
reports, and once every seed of the trial has finished task k the trial reports the mean
``avg_acc_seen`` at step k. When the pruner says so, the trial's runs are stopped within a
batch or two and the trial is told PRUNED: a pruned trial is never COMPLETE. A run that fails
(a diverging loss, say) makes its trial FAIL, with the reason as a user attribute.

Protocols: ``full`` tunes on the evaluation stream itself; ``first_tasks`` on the stream's
first ``first_tasks`` tasks; ``heldout`` on a validation stream: the same builder with other
seeds (seeds + 10,000: other permutations, sample draws and initialisations), trained on part
of the source's training pool and tested on the rest (``stream.evaluate_on=validation``), so
tuning never reads the test images the best configuration is then evaluated on.
"""

from __future__ import annotations

import io
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import optuna
from omegaconf import OmegaConf
from rich.console import Console
from rich.markup import escape

from cluster import ensure_ray, plan_actors
from learners import ConfigError
from orchestrator import preflight
from orchestrator.config import ExperimentConfig, RunSpec, expand_runs, load_config, to_yaml
from orchestrator.driver import interrupt_on_signals, stop_ray
from orchestrator.liveness import HEARTBEAT_S
from orchestrator.net import redact
from orchestrator.results import RunResult
from orchestrator.session import RunObserver, RunSession, code_version
from orchestrator.tracking import Tracker, resolve_tracking_uri
from sweeps import study as studies
from sweeps.config import (
    HELDOUT_SEED_OFFSET,
    OBJECTIVES,
    SweepExperimentConfig,
    sweep_spaces,
    tuned_labels,
)
from sweeps.space import SECTIONS, Dimension, grid_values, suggest, to_overrides

log = logging.getLogger(__name__)

optuna.logging.set_verbosity(optuna.logging.WARNING)  # the driver prints what matters


@dataclass
class StudyResult:
    """What one study of a sweep ended with."""

    label: str
    study_name: str
    storage: str
    parent_run_id: str
    counts: dict[str, int]
    best_params: dict[str, Any] | None
    best_values: list[float] | None
    pareto: list[dict[str, Any]] = field(default_factory=list)
    evaluation: Any = None
    """heldout protocol: the summary (DataFrame) of the best configuration run on the
    evaluation stream with the config's own seeds, as a ``lia run`` experiment"""


@dataclass
class _Trial:
    trial: optuna.Trial
    params: dict[str, Any]
    specs: list[RunSpec]
    rows: dict[str, dict[int, float]] = field(default_factory=dict)
    last: dict[str, dict[str, Any]] = field(default_factory=dict)
    results: dict[str, RunResult] = field(default_factory=dict)
    pruned_at: int | None = None
    reported: set[int] = field(default_factory=set)


def trial_config(
    config: SweepExperimentConfig, label: str, params: dict[str, Any]
) -> ExperimentConfig:
    """The plain config a trial runs: one method with the trial's values, the protocol's stream."""
    base = OmegaConf.to_container(OmegaConf.structured(config), resolve=True)
    sweep = base.pop("sweep")
    base["methods"] = {label: base["methods"][label]}
    seeds = list(config.seeds)[: config.sweep.seeds_per_trial]
    if sweep["protocol"] == "heldout":
        seeds = [seed + HELDOUT_SEED_OFFSET for seed in seeds]
        base["stream"]["evaluate_on"] = "validation"
    if sweep["protocol"] == "first_tasks":
        base["stream"]["num_tasks"] = sweep["first_tasks"]
        if base["stream"].get("domains"):  # a domains stream has one task per entry
            base["stream"]["domains"] = list(base["stream"]["domains"])[: sweep["first_tasks"]]
    base["seeds"] = seeds
    base["task_orders"] = None
    return load_config(base, to_overrides(label, params))


class _StudyObserver(RunObserver):
    """Asks trials when actors are free, reports per-task values, prunes, tells outcomes."""

    def __init__(
        self,
        config: SweepExperimentConfig,
        label: str,
        study: optuna.Study,
        space: dict[str, Dimension],
        console: Console,
    ):
        self.config = config
        self.label = label
        self.study = study
        self.space = space
        self.console = console
        self.objectives = list(config.sweep.objective)
        self.multi = len(self.objectives) > 1
        self.trials: dict[int, _Trial] = {}
        self.by_run: dict[str, int] = {}
        self.counts = {"complete": 0, "pruned": 0, "failed": 0}
        self._last_heartbeat = self.started = time.monotonic()
        self.runs_per_trial = config.sweep.seeds_per_trial
        self._session: RunSession | None = None

    # ------------------------------------------------------------------ asking
    def wants_more(self) -> bool:
        return bool(self.trials) or studies.unstarted(self.study, self.config.sweep.n_trials) > 0

    def tick(self, session: RunSession) -> None:
        now = time.monotonic()
        if self.trials and now - self._last_heartbeat >= HEARTBEAT_S:
            self._last_heartbeat = now
            studies.heartbeat(self.study, [t.trial for t in self.trials.values()])
        while (
            session.free_slots >= self.runs_per_trial
            and studies.unstarted(self.study, self.config.sweep.n_trials) > 0
        ):
            self._ask(session)

    def _ask(self, session: RunSession) -> None:
        trial = self.study.ask()
        studies.claim(trial)
        params = suggest(trial, self.space)
        try:
            specs = expand_runs(trial_config(self.config, self.label, params))
        except ConfigError as err:  # a sampled value the method refuses: the trial's own fault
            self._tell_failed(trial.number, trial, f"invalid values: {err}")
            return
        entry = _Trial(trial, params, specs)
        self.trials[trial.number] = entry
        shown = ", ".join(f"{k}={_short(v)}" for k, v in params.items())
        self.console.print(f"trial {trial.number} ({self.label}): {escape(shown)}")
        for spec in specs:
            self.by_run[spec.run_key] = trial.number
            session.submit(
                spec,
                {
                    "optuna.study": self.study.study_name,
                    "optuna.trial_number": str(trial.number),
                    "trial_state": "running",
                },
            )

    # ------------------------------------------------------------------ reporting
    def task_done(self, spec: RunSpec, r: Any, event: dict[str, Any]) -> bool | str:
        entry = self.trials.get(self.by_run.get(spec.run_key, -1))
        if entry is None or self.multi or entry.pruned_at is not None:
            return False
        step = int(event["task"])
        entry.rows.setdefault(spec.run_key, {})[step] = r.avg_acc_seen(step)
        entry.last[spec.run_key] = event
        if step in entry.reported or any(
            step not in entry.rows.get(s.run_key, {}) for s in entry.specs
        ):
            return False
        entry.reported.add(step)
        value = sum(entry.rows[s.run_key][step] for s in entry.specs) / len(entry.specs)
        entry.trial.report(value, step)
        if not entry.trial.should_prune():
            return False
        entry.pruned_at = step
        self.console.print(
            f"[yellow]trial {entry.trial.number} ({self.label}) pruned after task {step}: "
            f"average accuracy {100 * value:.2f}%[/]"
        )
        reason = f"trial {entry.trial.number} pruned after task {step}"
        for other in entry.specs:
            if other.run_key != spec.run_key:
                self._session.stop(other.run_key, reason)
        return reason

    def run_ended(self, spec: RunSpec, result: RunResult) -> None:
        number = self.by_run.get(spec.run_key)
        entry = self.trials.get(number) if number is not None else None
        if entry is None:
            return
        entry.results[spec.run_key] = result
        if len(entry.results) < len(entry.specs):
            return
        del self.trials[number]
        self._decide(entry)

    # ------------------------------------------------------------------ telling
    def _decide(self, entry: _Trial) -> None:
        results = list(entry.results.values())
        trial = entry.trial
        if entry.pruned_at is not None:
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            self.counts["pruned"] += 1
            self._tag(results, "pruned")
            self.console.print(f"trial {trial.number} ({self.label}) pruned · {self._progress()}")
            return
        failed = [r for r in results if r.status not in ("FINISHED", "SKIPPED")]
        if failed:
            reason = (failed[0].error or failed[0].status).strip().splitlines()[-1][:300]
            self._tell_failed(trial.number, trial, reason)
            self._tag(results, "failed")
            return
        try:
            values = [self._objective(entry, name) for name in self.objectives]
        except ValueError as err:
            self._tell_failed(trial.number, trial, str(err))
            self._tag(results, "failed")
            return
        if any(r.at_chance for r in results):
            trial.set_user_attr("lia.at_chance", True)
        self.study.tell(trial, values if self.multi else values[0])
        self.counts["complete"] += 1
        self._tag(results, "complete")
        best = self._best_text()
        shown = ", ".join(f"{n} {_short(v)}" for n, v in zip(self.objectives, values, strict=True))
        self.console.print(
            f"trial {trial.number} ({self.label}) complete: {shown}{best} · {self._progress()}"
        )

    def _objective(self, entry: _Trial, name: str) -> float:
        """The mean over the trial's runs of objective ``name``."""
        values = []
        for spec in entry.specs:
            result = entry.results[spec.run_key]
            value = (result.metrics or {}).get(name)
            if value is None and name == "train_time_s":
                value = result.train_time_s
            if value is None:
                value = entry.last.get(spec.run_key, {}).get(name)
            if value is None and result.mlflow_run_id:  # reused: read it back from MLflow
                run = self._session.tracker.client.get_run(result.mlflow_run_id)
                value = run.data.metrics.get(name)
            if value is None:
                raise ValueError(f"run {spec.run_name} has no {name} to optimise")
            values.append(float(value))
        return sum(values) / len(values)

    def _tell_failed(self, number: int, trial: optuna.Trial, reason: str) -> None:
        trial.set_user_attr("lia.fail_reason", reason)
        self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        self.counts["failed"] += 1
        self.console.print(
            f"[red]trial {number} ({self.label}) failed:[/] {escape(reason)} · {self._progress()}"
        )

    def _tag(self, results: list[RunResult], state: str) -> None:
        for result in results:
            if result.mlflow_run_id:
                self._session.tracker.client.set_tag(result.mlflow_run_id, "trial_state", state)

    def abandon(self, reason: str) -> None:
        """The driver is going away: fail the trials in flight and queue their params again."""
        for number, entry in list(self.trials.items()):
            try:
                entry.trial.set_user_attr("lia.orphaned", reason)
                self.study.tell(entry.trial, state=optuna.trial.TrialState.FAIL)
                self.study.enqueue_trial(
                    entry.params, user_attrs={"lia.retry_of": number}, skip_if_exists=False
                )
            except Exception as err:  # the next invocation's recover_orphans will do it
                log.warning("could not release trial %s: %s", number, err)
        self.trials.clear()

    def _progress(self) -> str:
        """Trials decided of n_trials, by state, running now, and an ETA."""
        c = self.counts
        done_here = c["complete"] + c["pruned"] + c["failed"]
        decided = studies.decided(self.study)
        left = max(0, self.config.sweep.n_trials - decided)
        eta = ""
        if done_here and left:
            per_trial = (time.monotonic() - self.started) / done_here
            eta = f" · ETA {per_trial * left / 60:.1f} min"
        return (
            f"{decided}/{self.config.sweep.n_trials} decided "
            f"({c['complete']} complete, {c['pruned']} pruned, {c['failed']} failed; "
            f"{len(self.trials)} running){eta}"
        )

    def _best_text(self) -> str:
        if self.multi:
            return f" · Pareto front: {len(self.study.best_trials)} trials"
        best = self.study.best_trial
        return f" · best {_short(best.value)} (trial {best.number})"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def sweep(
    config: SweepExperimentConfig,
    *,
    progress: bool = True,
    console: Console | None = None,
) -> list[StudyResult]:
    """Run every study of ``config``'s sweep until each has ``n_trials`` decided trials."""
    console = console or Console(stderr=True, soft_wrap=True)
    preflight.check_run(config)
    studies.check_storage(config.sweep.storage)
    spaces = sweep_spaces(config)
    n_objectives = len(config.sweep.objective)
    studies.build_pruner(config.sweep.pruner, n_objectives, config.sweep.prune_from_task)
    for space in spaces.values():
        grid = grid_values(space) if config.sweep.sampler == "grid" else None
        studies.build_sampler(config.sweep.sampler, config.sweep.sampler_seed, grid, n_objectives)
        points = math.prod(len(v) for v in grid.values()) if grid else None
        if points is not None and config.sweep.n_trials > points:
            raise ConfigError(
                f"sweep.n_trials={config.sweep.n_trials} is more than the grid's {points} "
                f"points; accepted: at most {points} with sweep.sampler=grid"
            )
    uri = resolve_tracking_uri(config.tracking.uri)
    experiment = config.tracking.experiment or f"{config.name}-sweep"
    tracker = Tracker(
        uri, experiment, config.tracking.artifact_location, config.tracking.flush_interval_s
    )
    started_ray = ensure_ray(config.ray)
    sigterm = interrupt_on_signals()  # `kill` ends a sweep like Ctrl-C: trials released
    try:
        plan = plan_actors(config.resources, 10**6)
        tracker.ensure_experiment()
        tracker.reconcile()
        results = [
            _run_study(config, label, spaces[label], tracker, plan, console, progress)
            for label in tuned_labels(config)
        ]
        if config.sweep.protocol == "heldout" and any(r.best_params for r in results):
            _evaluate_heldout(config, results, console, progress)
        return results
    finally:
        stop_ray(started_ray, sigterm)


def _run_study(
    config: SweepExperimentConfig,
    label: str,
    space: dict[str, Dimension],
    tracker: Tracker,
    plan: tuple[int, float, float],
    console: Console,
    progress: bool,
) -> StudyResult:
    s = config.sweep
    n_objectives = len(s.objective)
    grid = grid_values(space) if s.sampler == "grid" else None
    name = s.study_name or f"{config.name}-{label}"
    if s.study_name and len(tuned_labels(config)) > 1:
        name = f"{s.study_name}-{label}"
    storage = studies.open_storage(s.storage)
    study = studies.open_study(
        storage,
        name,
        [OBJECTIVES[o] for o in s.objective],
        studies.build_sampler(s.sampler, s.sampler_seed, grid, n_objectives),
        studies.build_pruner(s.pruner, n_objectives, s.prune_from_task),
    )
    settings = {
        "label": label,
        "objective": list(s.objective),
        "sampler": s.sampler,
        "sampler_seed": s.sampler_seed,
        "pruner": s.pruner,
        "prune_from_task": s.prune_from_task,
        "protocol": s.protocol,
        "seeds_per_trial": s.seeds_per_trial,
        "n_trials": s.n_trials,
    }
    changed = studies.record_settings(study, settings)
    for key, (before, now) in changed.items():
        console.print(f"[yellow]study {name}: {key} was {before}, now {now}[/]")
    orphans = studies.recover_orphans(study)
    if orphans:
        console.print(
            f"[yellow]study {name}: trials {', '.join(map(str, orphans))} were left RUNNING "
            "by a driver that died: marked FAIL, their parameters queued again[/]"
        )
    left = studies.remaining(study, s.n_trials)
    console.print(
        f"study {name} ({label}): {studies.decided(study)} of {s.n_trials} trials decided, "
        f"{left} to go · sampler {s.sampler} · pruner {s.pruner} · protocol {s.protocol} · "
        f"storage {redact(studies.storage_url(s.storage))}"
    )
    parent_id = tracker.start_parent(
        f"{name}-{time.strftime('%Y%m%d-%H%M%S')}",
        to_yaml(config),
        {
            "lia.study": name,
            "code_version": code_version(),
            **{f"sweep.{k}": str(v) for k, v in settings.items()},
            "sweep.storage": redact(studies.storage_url(s.storage)),
        },
    )
    observer = _StudyObserver(config, label, study, space, console)
    session = RunSession(config, tracker, parent_id, console, progress, [], observer=observer)
    observer._session = session
    status = "FINISHED"
    try:
        if left:
            session.run([], plan)
    except KeyboardInterrupt:
        status = "KILLED"
        observer.abandon("the driver was interrupted")
        raise
    except BaseException as err:
        status = "FAILED"
        observer.abandon(f"the driver failed: {type(err).__name__}: {err}")
        raise
    finally:
        result = _summarise(study, label, name, s.storage, parent_id, s.objective)
        tracker.finish_parent(parent_id, _study_artifacts(study, result), status=status)
        _log_study_summary(tracker, parent_id, result)
    return result


def _summarise(
    study: optuna.Study,
    label: str,
    name: str,
    storage: str | None,
    parent_id: str,
    objectives: list[str],
) -> StudyResult:
    states = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    counts = {
        "complete": sum(t.state == states.COMPLETE for t in trials),
        "pruned": sum(t.state == states.PRUNED for t in trials),
        "failed": sum(
            t.state == states.FAIL and "lia.orphaned" not in t.user_attrs for t in trials
        ),
        "orphaned": sum("lia.orphaned" in t.user_attrs for t in trials),
    }
    best_params = best_values = None
    pareto: list[dict[str, Any]] = []
    if counts["complete"]:
        if len(objectives) > 1:
            for t in study.best_trials:
                pareto.append(
                    {"trial": t.number, **dict(zip(objectives, t.values, strict=True)), **t.params}
                )
            sign = 1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1
            first = max(study.best_trials, key=lambda t: sign * t.values[0])
            best_params, best_values = dict(first.params), list(first.values)
        else:
            best_params, best_values = dict(study.best_trial.params), [study.best_value]
    return StudyResult(
        label,
        name,
        studies.storage_url(storage),
        parent_id,
        counts,
        best_params,
        best_values,
        pareto,
    )


def _study_artifacts(study: optuna.Study, result: StudyResult) -> dict[str, Any]:
    """Trials table, Pareto front and Optuna's plots, for the study's parent run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    artifacts: dict[str, Any] = {}
    frame = study.trials_dataframe()
    if not frame.empty:
        artifacts["trials.csv"] = frame.to_csv(index=False)
    if result.pareto:
        import pandas as pd

        artifacts["pareto_front.csv"] = pd.DataFrame(result.pareto).to_csv(index=False)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    plots = {
        "optimization_history.png": optuna.visualization.matplotlib.plot_optimization_history,
        "intermediate_values.png": optuna.visualization.matplotlib.plot_intermediate_values,
        "param_importances.png": optuna.visualization.matplotlib.plot_param_importances,
    }
    if len(study.directions) > 1:
        plots = {"pareto_front.png": optuna.visualization.matplotlib.plot_pareto_front}
    for filename, plot in plots.items():
        if filename == "param_importances.png" and (
            len(complete) < 2 or len({k for t in complete for k in t.params}) < 2
        ):
            continue  # importance needs two parameters and two complete trials
        try:
            with warnings.catch_warnings():  # Optuna marks its matplotlib plots experimental
                warnings.simplefilter("ignore")
                axes = plot(study)
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
            plt.close(figure)
            artifacts[filename] = buffer.getvalue()
        except (ValueError, RuntimeError) as err:  # too few trials for this plot
            log.info("no %s: %s", filename, err)
    return artifacts


def _log_study_summary(tracker: Tracker, parent_id: str, result: StudyResult) -> None:
    tags = {f"trials.{k}": str(v) for k, v in result.counts.items()}
    if result.best_params is not None:
        tags.update({f"best.{k}": str(v) for k, v in result.best_params.items()})
        tags["best.values"] = ", ".join(f"{v:.6g}" for v in result.best_values or [])
    for key, value in tags.items():
        tracker.client.set_tag(parent_id, key, value)


def best_config(config: SweepExperimentConfig, result: StudyResult) -> dict[str, Any]:
    """The config running one tuned label with its study's best values (no sweep section).

    The protocol's tuning changes (other seeds, fewer tasks) are not carried over: it runs on
    the evaluation stream with the config's own seeds. One label per config, because tuned
    ``train.*`` / ``model.*`` values belong to that label's study only.
    """
    base = OmegaConf.to_container(OmegaConf.structured(config), resolve=True)
    base.pop("sweep")
    base["methods"] = {result.label: dict(base["methods"][result.label] or {})}
    for key, value in (result.best_params or {}).items():
        if key.split(".")[0] in SECTIONS:
            section, name = key.split(".", 1)
            base[section][name] = value
        else:
            base["methods"][result.label][key] = value
    return base


def export_best(config: SweepExperimentConfig, result: StudyResult) -> str:
    """:func:`best_config` as YAML ``lia run`` accepts, headed by where the values came from."""
    header = (
        f"# {result.label}: tuned by Optuna study {result.study_name!r} "
        f"({redact(result.storage)}), "
        f"protocol {config.sweep.protocol}, {', '.join(config.sweep.objective)} = "
        + ", ".join(f"{v:.6g}" for v in result.best_values or [])
    )
    return header + "\n" + OmegaConf.to_yaml(OmegaConf.create(best_config(config, result)))


def _evaluate_heldout(
    config: SweepExperimentConfig, results: list[StudyResult], console: Console, progress: bool
) -> None:
    """heldout: run the best values on the evaluation stream, fresh seeds, as ``lia run``."""
    from orchestrator.driver import execute

    console.print(
        f"protocol heldout: running the best values on the evaluation stream with seeds "
        f"{list(config.seeds)} (experiment {config.tracking.experiment or config.name!r})"
    )
    for result in results:
        if result.best_params is not None:
            best = load_config(best_config(config, result))
            tags = {
                "lia.tuned_by": result.study_name,
                "sweep.protocol": "heldout",
                "sweep.storage": redact(result.storage),
                "tuned.label": result.label,
                **{f"tuned.{k}": str(v) for k, v in (result.best_params or {}).items()},
            }
            result.evaluation = execute(best, progress=progress, console=console, tags=tags).summary
