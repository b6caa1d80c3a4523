"""The driver: expand a config into runs, compute the missing ones on the actor pool, log MLflow.

The driver is the only process that writes to MLflow. One invocation:

1. checks the config against the machine (``preflight``) and expands it into runs;
2. reads which runs already finished (nothing is written yet): with ``reuse="same-code"`` a
   run is reused when its run key matches (same configuration, seed and code), with ``"any"``
   when its configuration and seed match whatever code produced it, with ``"none"`` never;
3. connects to Ray and plans the actors (a request the cluster cannot meet fails here);
4. creates the experiment if needed, ends the runs a dead invocation left RUNNING, and opens
   its parent run;
5. takes a lease per run key before computing it — a run another live invocation holds is
   waited for, then reused if that invocation finished it — and runs the rest on the
   :class:`~orchestrator.pool.ActorPool`, which retries runs whose worker died;
6. closes the parent with the summary, whatever happened.
"""

from __future__ import annotations

import hashlib
import io
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import ray
from rich.console import Console
from rich.markup import escape

from cluster import ensure_ray, plan_actors
from learners import ConfigError
from orchestrator import plots
from orchestrator.config import REUSE_MODES, ExperimentConfig, RunSpec, expand_runs, to_yaml
from orchestrator.pool import interrupted, note_interrupt
from orchestrator.progress import summary_table
from orchestrator.results import (
    METRICS,
    RunResult,
    avg_acc_curves,
    runs_frame,
    runs_table,
    summarize,
    to_csv,
    to_markdown,
)
from orchestrator.runner import format_error
from orchestrator.session import RunSession, code_version, reused_result
from orchestrator.tracking import Tracker, load_r_matrices, metric_name, resolve_tracking_uri

log = logging.getLogger(__name__)

__all__ = [
    "REUSE_MODES",
    "ExperimentResult",
    "execute",
    "plan_actors",
    "interrupt_on_signals",
    "stop_ray",
    "summary_table",
]


@dataclass
class ExperimentResult:
    """What one invocation produced."""

    experiment: str
    tracking_uri: str
    parent_run_id: str | None  # None when the invocation computed nothing
    runs: pd.DataFrame
    summary: pd.DataFrame
    counts: dict[str, int] = field(default_factory=dict)
    arrivals: list[tuple[float, str, str, int | None]] = field(default_factory=list)
    """every event as the driver received it: (seconds since start, run name, kind, task)"""
    notes: list[str] = field(default_factory=list)
    """what the invocation printed besides progress (reused, re-run, reconciled, retried)"""


def execute(
    config: ExperimentConfig,
    *,
    progress: bool = True,
    console: Console | None = None,
    reuse: str = "same-code",
    tags: dict[str, str] | None = None,
    overrides: list[str] | None = None,
) -> ExperimentResult:
    """Compute every run of ``config`` not already finished; log all of it to MLflow.

    An invocation that computes something gets a parent run, named after the config and the
    command line's ``overrides`` (or a short hash of the config when there are none), holding
    the summary (artifacts, and ``ACC/<label>``-style metrics); one that only reuses finished
    runs gets none (``parent_run_id`` None). ``tags`` go on the parent run (``lia sweep``
    marks the runs of a tuned configuration with the study and protocol that chose it)."""
    from orchestrator import preflight

    preflight.check_run(config)
    if reuse not in REUSE_MODES:
        raise ConfigError(f"--reuse {reuse!r} is not accepted; expected one of {REUSE_MODES}")
    console = console or Console(stderr=True, soft_wrap=True)
    experiment = config.tracking.experiment or config.name
    uri = resolve_tracking_uri(config.tracking.uri)
    runs = expand_runs(config)
    tracker = Tracker(
        uri, experiment, config.tracking.artifact_location, config.tracking.flush_interval_s
    )
    reusable = _reusable(tracker, runs, reuse)
    pending = [s for s in runs if s.run_key not in reusable]
    skipped = [s for s in runs if s.run_key in reusable]
    notes: list[str] = []
    if skipped:
        notes.append(
            f"{len(skipped)} of {len(runs)} runs already finished in MLflow experiment "
            f"{experiment!r}: reused"
        )
    if reuse == "same-code" and pending:
        older = tracker.finished_runs("instance_key")
        changed = [s for s in pending if s.instance_key in older]
        if changed:
            notes.append(
                f"{len(changed)} runs re-run because their code changed since they finished "
                f"({', '.join(sorted({s.label for s in changed}))}); --reuse any keeps the old "
                "results"
            )
    for note in notes:
        console.print(f"[yellow]{escape(note)}[/]")

    started_ray = False
    plan = None
    sigterm = None
    if pending:
        started_ray = ensure_ray(config.ray)
        # after ray.init, whose own SIGTERM handler would end the process mid-cleanup
        sigterm = interrupt_on_signals()
        try:  # a resource request the cluster cannot meet fails before MLflow is touched
            plan = plan_actors(config.resources, len(pending))
        except BaseException:
            stop_ray(started_ray, sigterm)
            raise
    try:
        tracker.ensure_experiment()
        ended = tracker.reconcile()
        if ended:
            note = f"ended {len(ended)} runs a dead invocation left RUNNING: {', '.join(ended)}"
            notes.append(note)
            console.print(f"[yellow]{escape(note)}[/]")
        parent_id = None
        if pending:  # an invocation that only reuses finished runs leaves no trace in MLflow
            parent_id = tracker.start_parent(
                parent_name(config, overrides),
                to_yaml(config),
                {
                    "code_version": code_version(),
                    "runs.total": str(len(runs)),
                    "runs.skipped": str(len(skipped)),
                    "reuse": reuse,
                    **(tags or {}),
                },
            )
    except BaseException:
        stop_ray(started_ray, sigterm)
        raise

    session = RunSession(config, tracker, parent_id, console, progress, notes, reuse)
    session.counts["skipped"] = len(skipped)
    results: list[RunResult] = []
    status = "FINISHED"
    try:
        results += _reused_results(tracker, skipped, reusable)
        if plan is not None:
            session.run(pending, plan)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        stop_ray(started_ray, sigterm)
        frame = runs_frame(results + session.results)
        try:
            summary = summarize(frame)
            artifacts = _parent_artifacts(frame, summary, config.name)
        except Exception as err:  # the summary must never keep the parent RUNNING
            log.exception("could not summarise the runs")
            summary = pd.DataFrame()
            artifacts = {"summary_error.txt": format_error(err)}
        if parent_id is not None:
            tracker.finish_parent(parent_id, artifacts, status, summary_metrics(summary))
    counts = dict(session.counts, running=0)
    return ExperimentResult(
        experiment, uri, parent_id, frame, summary, counts, session.arrivals, notes
    )


def stop_ray(started_ray: bool, signals: Any) -> None:
    """Shut down the Ray this invocation started; restore what :func:`interrupt_on_signals` set."""
    if started_ray:
        ray.shutdown()
    if signals is not None:
        handlers, unraisablehook = signals
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        sys.unraisablehook = unraisablehook
        note_interrupt(None)  # handled by now: not for a later invocation in this process


def interrupt_on_signals() -> Any:
    """Make SIGTERM (``kill``) end the invocation like Ctrl-C (SIGINT): live runs marked KILLED.

    A KeyboardInterrupt raised while Python runs a weakref callback or ``__del__`` is swallowed
    and printed as an ignored exception with its traceback. So both signals are recorded
    before the raise (the pool's loop re-raises a recorded one), and that print is dropped;
    nothing else Python ignores is.
    Returns what :func:`stop_ray` restores (None when not in the main thread).
    """
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum: int, frame: object) -> None:
        note_interrupt(signum)  # re-raised by the pool's loop if this raise is swallowed
        raise KeyboardInterrupt(f"signal {signum}")

    previous_hook = sys.unraisablehook

    def unraisable(info: Any) -> None:
        if not (interrupted() and isinstance(info.exc_value, KeyboardInterrupt)):
            previous_hook(info)

    note_interrupt(None)
    handlers = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous = signal.signal(signum, interrupt)
        handlers[signum] = signal.SIG_DFL if previous is None else previous
    sys.unraisablehook = unraisable
    return handlers, previous_hook


def _reusable(tracker: Tracker, runs: list[RunSpec], reuse: str) -> dict[str, Any]:
    """Finished MLflow runs that stand for some of ``runs``, by the spec's run key."""
    if reuse == "none":
        return {}
    if reuse == "same-code":
        finished = tracker.finished_runs("run_key")
        return {s.run_key: finished[s.run_key] for s in runs if s.run_key in finished}
    finished = tracker.finished_runs("instance_key")
    return {s.run_key: finished[s.instance_key] for s in runs if s.instance_key in finished}


def _reused_results(
    tracker: Tracker, specs: list[RunSpec], reusable: dict[str, Any]
) -> list[RunResult]:
    """Results of reused runs (R matrices read back); relabels runs whose label changed."""
    results = []
    for spec in specs:
        run = reusable[spec.run_key]
        if run.data.tags.get("label") != spec.label:  # renamed: the latest name wins
            tracker.client.set_tag(run.info.run_id, "label", spec.label)
        results.append(reused_result(spec, run))
    if results:
        matrices = load_r_matrices(tracker.client, [r.mlflow_run_id for r in results])
        for result in results:
            result.r = matrices[result.mlflow_run_id]
    return results


def parent_name(config: ExperimentConfig, overrides: list[str] | None) -> str:
    """``quickstart: seeds=[0] train.lr=0.01 · 11-27 10:31``: what tells invocations apart in
    the runs table (the overrides, else a short hash of the whole config), then the time."""
    if overrides:
        what = " ".join(overrides)
        what = what if len(what) <= 60 else what[:57] + "..."
    else:
        what = "config " + hashlib.sha256(to_yaml(config).encode()).hexdigest()[:8]
    return f"{config.name}: {what} · {time.strftime('%m-%d %H:%M')}"


def summary_metrics(summary: pd.DataFrame) -> dict[str, float]:
    """The parent run's metrics: each configuration's mean ``ACC``, ``BWT``, ``FWT`` and
    ``forgetting`` over its seeds (``ACC/ewc``; fractions, like the child runs' metrics)."""
    out = {}
    for _, row in summary.iterrows():
        for m in METRICS:
            value = row.get(f"{m}_mean")
            if value is not None and not pd.isna(value):
                out[metric_name(f"{m}/{row['label']}")] = float(value)
    return out


def _parent_artifacts(runs: pd.DataFrame, summary: pd.DataFrame, name: str) -> dict[str, Any]:
    artifacts: dict[str, Any] = {"runs.csv": runs_table(runs).to_csv(index=False)}
    if summary.empty:
        return artifacts
    artifacts["summary.csv"] = to_csv(summary)
    artifacts["summary.md"] = to_markdown(summary)
    curves = {k: v for k, v in avg_acc_curves(runs).items() if v.size}
    if curves:
        png = io.BytesIO()
        colors = plots.palette(list(summary["label"]))  # the report's colours, too
        plots.accuracy_curves(
            curves, png, title=f"{name}: accuracy on tasks seen (mean ± std)", colors=colors
        )
        artifacts["comparison.png"] = png.getvalue()
    return artifacts
