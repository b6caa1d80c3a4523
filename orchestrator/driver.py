"""The driver: expand a config into runs, run them on StreamRunner actors, write MLflow.

The driver is the only process that writes to MLflow. Actors stream one event per finished
task; the driver consumes every live generator with ``ray.wait`` so rows from many runs
arrive interleaved, as they are produced.
"""

from __future__ import annotations

import io
import logging
import math
import os
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import ray
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from learners import ConfigError
from learners.metrics import RMatrix, compute_metrics
from orchestrator import plots
from orchestrator.config import ExperimentConfig, RayConfig, RunSpec, expand_runs, to_yaml
from orchestrator.results import (
    METRICS,
    RunResult,
    avg_acc_curves,
    runs_frame,
    summarize,
    table_rows,
    to_csv,
    to_markdown,
)
from orchestrator.runner import format_error, make_runner_class
from orchestrator.tracking import Tracker, load_r_matrices, resolve_tracking_uri

log = logging.getLogger(__name__)


@dataclass
class ExperimentResult:
    """What one invocation produced."""

    experiment: str
    tracking_uri: str
    parent_run_id: str
    runs: pd.DataFrame
    summary: pd.DataFrame
    counts: dict[str, int] = field(default_factory=dict)
    arrivals: list[tuple[float, str, str, int | None]] = field(default_factory=list)
    """every event as the driver received it: (seconds since start, run name, kind, task)"""


@dataclass
class _Live:
    spec: RunSpec
    actor: Any
    run_id: str
    started: float
    tasks: list[str] = field(default_factory=list)
    r: RMatrix | None = None
    scenario: str | None = None
    train_time_s: float = 0.0
    eval_time_s: float = 0.0
    last: dict[str, Any] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    resumed_from: int | None = None


def code_version() -> str:
    """The git commit of the code (with '+dirty' if modified), else the package version."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return "learnsitall " + version("learnsitall")
        except PackageNotFoundError:
            return "unknown"


def ensure_ray(config: RayConfig) -> bool:
    """Connect to ``ray.address`` / $RAY_ADDRESS, or start Ray locally. True if we started it."""
    if ray.is_initialized():
        return False
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(
            num_cpus=config.num_cpus,
            num_gpus=config.num_gpus,
            include_dashboard=False,
            logging_level=logging.WARNING,
            configure_logging=True,
        )
    return True


def plan_actors(resources: Any, pending: int) -> tuple[int, float, float]:
    """(number of actors, CPUs per actor, GPUs per actor) for what the cluster offers."""
    cluster = ray.cluster_resources()
    cpus = float(resources.cpus_per_run)
    gpus = resources.gpus_per_run
    if gpus is None:
        gpus = 1.0 if cluster.get("GPU", 0) >= 1 else 0.0
    if gpus > cluster.get("GPU", 0) + 1e-9:
        raise ConfigError(
            f"resources.gpus_per_run={gpus} but the Ray cluster has {cluster.get('GPU', 0)} GPUs"
        )
    slots = math.floor(cluster.get("CPU", 1) / cpus + 1e-9)
    if gpus > 0:
        slots = min(slots, math.floor(cluster.get("GPU", 0) / gpus + 1e-9))
    if resources.max_concurrent_runs:
        slots = min(slots, resources.max_concurrent_runs)
    if slots < 1:
        raise ConfigError(
            f"resources.cpus_per_run={cpus:g} does not fit the Ray cluster "
            f"({cluster.get('CPU', 0):g} CPUs); accepted: at most {cluster.get('CPU', 0):g}"
        )
    return max(1, min(slots, pending)), cpus, gpus


class _ProgressView:
    """Terminal progress: runs done / running / failed / skipped, and an ETA over tasks."""

    def __init__(self, console: Console, total_tasks: int, enabled: bool):
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("tasks · {task.fields[counts]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
        )
        self.task = self.progress.add_task("runs", total=max(total_tasks, 1), counts="")

    def shrink(self, tasks: int) -> None:
        total = self.progress.tasks[0].total or 1
        self.progress.update(self.task, total=max(1, total - tasks))

    def update(self, counts: dict[str, int], advance: int = 0) -> None:
        text = " · ".join(f"{k} {v}" for k, v in counts.items())
        self.progress.update(self.task, advance=advance, counts=text)


def execute(
    config: ExperimentConfig,
    *,
    progress: bool = True,
    console: Console | None = None,
) -> ExperimentResult:
    """Run every run of ``config`` not already finished; log all of it to MLflow."""
    console = console or Console(stderr=True)
    experiment = config.tracking.experiment or config.name
    uri = resolve_tracking_uri(config.tracking.uri)
    tracker = Tracker(
        uri, experiment, config.tracking.artifact_location, config.tracking.flush_interval_s
    )
    runs = expand_runs(config)
    finished = tracker.finished_runs()
    pending = [s for s in runs if s.run_key not in finished]
    skipped = [s for s in runs if s.run_key in finished]
    if skipped:
        console.print(
            f"[yellow]{len(skipped)} of {len(runs)} runs already finished in MLflow "
            f"experiment {experiment!r}: skipped[/]"
        )
    started_ray = False
    plan = None
    if pending:
        started_ray = ensure_ray(config.ray)
        try:  # a resource request the cluster cannot meet fails before anything is logged
            plan = plan_actors(config.resources, len(pending))
        except ConfigError:
            if started_ray:
                ray.shutdown()
            raise
    parent_id = tracker.start_parent(
        f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}",
        to_yaml(config),
        {
            "code_version": code_version(),
            "runs.total": str(len(runs)),
            "runs.skipped": str(len(skipped)),
        },
    )

    results = [_skipped_result(s, finished[s.run_key]) for s in skipped]
    if skipped:
        matrices = load_r_matrices(tracker.client, [r.mlflow_run_id for r in results])
        for result in results:
            result.r = matrices[result.mlflow_run_id]
    counts = {"done": 0, "running": 0, "failed": 0, "skipped": len(skipped)}
    arrivals: list[tuple[float, str, str, int | None]] = []
    status = "FINISHED"
    try:
        if plan is not None:
            results += _run_all(
                config, tracker, parent_id, pending, plan, counts, console, progress, arrivals
            )
    except BaseException:
        status = "KILLED"
        raise
    finally:
        if started_ray:
            ray.shutdown()
        frame = runs_frame(results)
        summary = summarize(frame)
        tracker.finish_parent(
            parent_id, _parent_artifacts(frame, summary, config.name), status=status
        )
    counts["running"] = 0
    return ExperimentResult(experiment, uri, parent_id, frame, summary, counts, arrivals)


def _skipped_result(spec: RunSpec, run: Any) -> RunResult:
    metrics = run.data.metrics
    return _result(
        spec,
        "SKIPPED",
        run.info.run_id,
        scenario=run.data.tags.get("scenario"),
        metrics={m: metrics.get(m) for m in METRICS},
        train_time_s=metrics.get("train_time_s"),
    )


def _run_all(
    config: ExperimentConfig,
    tracker: Tracker,
    parent_id: str,
    pending: list[RunSpec],
    plan: tuple[int, float, float],
    counts: dict[str, int],
    console: Console,
    show_progress: bool,
    arrivals: list[tuple[float, str, str, int | None]],
) -> list[RunResult]:
    n_actors, cpus, gpus = plan
    runner_cls = make_runner_class(cpus, gpus)
    fraction = gpus if 0 < gpus < 1 else None

    def new_actor():
        return runner_cls.remote(
            torch_threads=max(1, math.floor(cpus)), gpu_memory_fraction=fraction
        )

    device_text = f"{gpus:g} GPU" if gpus > 0 else "CPU only (no GPU requested or present)"
    console.print(
        f"{len(pending)} runs on {n_actors} actors · {cpus:g} CPU + {device_text} per run"
    )
    # absolute, so every actor writes where the driver means whatever its working directory
    checkpoint_dir = (
        str(Path(config.checkpoints.dir).expanduser().resolve()) if config.checkpoints.dir else None
    )
    cleanups: list[Any] = []
    started = time.perf_counter()
    idle = [new_actor() for _ in range(n_actors)]
    queue = deque(pending)
    live: dict[Any, _Live] = {}
    results: list[RunResult] = []
    view = _ProgressView(console, len(pending) * config.stream.num_tasks, show_progress)
    try:
        with view.progress:
            while queue or live:
                while idle and queue:
                    spec = queue.popleft()
                    actor = idle.pop()
                    run_id = tracker.start_child(spec, parent_id)
                    generator = actor.run.remote(
                        spec.resolved, list(config.plugins), spec.run_key, checkpoint_dir
                    )
                    live[generator] = _Live(spec, actor, run_id, time.perf_counter())
                counts["running"] = len(live)
                view.update(counts)
                ready, _ = ray.wait(list(live), num_returns=1, timeout=1.0)
                for generator in ready:
                    state = live[generator]
                    try:
                        event = ray.get(next(generator))
                    except StopIteration:
                        del live[generator]
                        idle.append(state.actor)
                        results.append(_finish(tracker, state, console))
                        if checkpoint_dir is not None:  # the results are in MLflow now
                            cleanups.append(
                                state.actor.forget.remote(checkpoint_dir, state.spec.run_key)
                            )
                        counts["done"] += 1
                    except Exception as err:  # a learner raised, or the actor died
                        del live[generator]
                        results.append(_fail(tracker, state, err, console))
                        counts["failed"] += 1
                        # the failed run's unfinished tasks leave the ETA's total
                        view.shrink(config.stream.num_tasks - (len(state.r.R) if state.r else 0))
                        dead = isinstance(err, ray.exceptions.RayActorError)
                        idle.append(new_actor() if dead else state.actor)
                    else:
                        arrivals.append(
                            (
                                time.perf_counter() - started,
                                state.spec.run_name,
                                event["kind"],
                                event.get("task"),
                            )
                        )
                        if _handle(tracker, state, event):
                            view.update(counts, advance=1)
            counts["running"] = 0
            view.update(counts)
        ray.wait(cleanups, num_returns=len(cleanups), timeout=30)
    except BaseException:
        # interrupted (Ctrl-C) or the driver failed: stop the actors, keep what was logged
        for state in live.values():
            state.actor.stop.remote()
            tracker.fail_child(state.run_id, "the driver was interrupted", status="KILLED")
        raise
    return results


def _fail(tracker: Tracker, state: _Live, err: BaseException, console: Console) -> RunResult:
    """Mark a run FAILED in MLflow and report it."""
    error = format_error(err)
    tracker.fail_child(state.run_id, error)
    last_line = str(err).strip().splitlines()[-1][:300]
    console.print(f"[red]run {state.spec.run_name} failed:[/] {escape(last_line)}")
    return _result(
        state.spec, "FAILED", state.run_id, scenario=state.scenario, r=state.r, error=error
    )


def _handle(tracker: Tracker, state: _Live, event: dict[str, Any]) -> bool:
    """Log one event; True when it was a finished task."""
    kind = event["kind"]
    if kind == "start":
        if event.get("resumed_from_task") is not None:
            state.resumed_from = int(event["resumed_from_task"])
        state.scenario = event["scenario"]
        state.tasks = list(event["tasks"])
        tracker.log_start(state.run_id, event)
        return False
    if kind == "artifacts":
        state.files.update(event["files"])
        return False
    if kind == "init":
        state.r = RMatrix(state.tasks, event["row"])
        tracker.log_init_row(state.run_id, event["row"])
        state.eval_time_s += event["eval_time_s"]
        return False
    assert state.r is not None, "a task event before the init event"
    state.r.append(event["row"])
    state.train_time_s += event["train_time_s"]
    state.eval_time_s += event["eval_time_s"]
    state.last = event
    tracker.log_task_row(state.run_id, state.r, event)
    return True


def _finish(tracker: Tracker, state: _Live, console: Console) -> RunResult:
    spec = state.spec
    assert state.r is not None and state.scenario is not None
    metrics = compute_metrics(state.r, state.scenario)
    totals = {
        "train_time_s": state.train_time_s,
        "eval_time_s": state.eval_time_s,
        "wall_time_s": time.perf_counter() - state.started,
    }
    for key in (
        "peak_memory_bytes",
        "model_parameters",
        "model_bytes",
        "stored_samples",
        "stored_bytes",
    ):
        if key in state.last:
            totals[key] = float(state.last[key])
    tracker.finish_child(state.run_id, state.r, metrics, totals, state.files)
    values = metrics.as_dict()
    resumed = (
        f" (resumed: {state.resumed_from} tasks from its checkpoint)" if state.resumed_from else ""
    )
    console.print(
        f"run {spec.run_name} finished{resumed}: ACC {100 * metrics.acc:.2f}%"
        + (f" BWT {100 * metrics.bwt:+.2f}" if metrics.bwt is not None else "")
    )
    return _result(
        spec,
        "FINISHED",
        state.run_id,
        scenario=state.scenario,
        r=state.r,
        metrics=values,
        train_time_s=state.train_time_s,
    )


def _result(spec: RunSpec, status: str, run_id: str, **details: Any) -> RunResult:
    """A RunResult for ``spec``: identity from the spec, the rest from ``details``."""
    return RunResult(
        spec.run_key,
        spec.label,
        spec.method,
        spec.seed,
        spec.order_index,
        status,
        run_id,
        **details,
    )


def _parent_artifacts(runs: pd.DataFrame, summary: pd.DataFrame, name: str) -> dict[str, Any]:
    artifacts: dict[str, Any] = {
        "runs.csv": runs.drop(columns=["R", "random_init", "tasks"]).to_csv(index=False)
    }
    if summary.empty:
        return artifacts
    artifacts["summary.csv"] = to_csv(summary)
    artifacts["summary.md"] = to_markdown(summary)
    curves = {k: v for k, v in avg_acc_curves(runs).items() if v.size}
    if curves:
        png = io.BytesIO()
        plots.accuracy_curves(curves, png, title=f"{name}: average accuracy on tasks seen")
        artifacts["comparison.png"] = png.getvalue()
    return artifacts


def summary_table(summary: pd.DataFrame, title: str) -> Table:
    """The summary as a rich table (accuracy in %, mean ± std over seeds)."""
    header, rows = table_rows(summary)
    table = Table(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table
