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

import io
import logging
import math
import signal
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import ray
from rich.console import Console
from rich.markup import escape

from cluster import describe_plan, ensure_ray, plan_actors
from learners import ConfigError
from learners.metrics import RMatrix, at_chance, compute_metrics
from orchestrator import checkpoints, plots
from orchestrator.config import ExperimentConfig, RunSpec, expand_runs, flatten, to_yaml
from orchestrator.leases import Lease, LeaseStore
from orchestrator.liveness import HEARTBEAT_S
from orchestrator.pool import ActorPool, Job, is_system_failure
from orchestrator.progress import ProgressView, summary_table
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
from orchestrator.runner import format_error, make_runner_class
from orchestrator.tracking import Tracker, load_r_matrices, resolve_tracking_uri

log = logging.getLogger(__name__)

REUSE_MODES = ("same-code", "any", "none")
LEASE_POLL_S = 2.0
"""how often runs another invocation holds are checked again"""
FORGET_TIMEOUT_S = 30.0
"""longest wait for an actor to delete a finished run's checkpoint"""

__all__ = ["REUSE_MODES", "ExperimentResult", "execute", "plan_actors", "summary_table"]


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
    notes: list[str] = field(default_factory=list)
    """what the invocation printed besides progress (reused, re-run, reconciled, retried)"""


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


def lease_root(config: ExperimentConfig, uri: str) -> Path:
    """Where run leases live: beside the checkpoints, else beside a SQLite store, else home."""
    from orchestrator.tracking import sqlite_path

    if config.checkpoints.dir:
        return Path(config.checkpoints.dir).expanduser().resolve() / ".leases"
    db = sqlite_path(uri)
    if db is not None:
        return db.resolve().parent / ".lia-leases"
    return Path.home() / ".cache" / "learnsitall" / "leases"


def execute(
    config: ExperimentConfig,
    *,
    progress: bool = True,
    console: Console | None = None,
    reuse: str = "same-code",
) -> ExperimentResult:
    """Compute every run of ``config`` not already finished; log all of it to MLflow."""
    from orchestrator import preflight

    preflight.check_run(config)
    if reuse not in REUSE_MODES:
        raise ConfigError(f"--reuse {reuse!r} is not accepted; expected one of {REUSE_MODES}")
    console = console or Console(stderr=True)
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
        sigterm = _sigterm_interrupts()
        try:  # a resource request the cluster cannot meet fails before MLflow is touched
            plan = plan_actors(config.resources, len(pending))
        except BaseException:
            _stop_ray(started_ray, sigterm)
            raise
    try:
        tracker.ensure_experiment()
        ended = tracker.reconcile()
        if ended:
            note = f"ended {len(ended)} runs a dead invocation left RUNNING: {', '.join(ended)}"
            notes.append(note)
            console.print(f"[yellow]{escape(note)}[/]")
        parent_id = tracker.start_parent(
            f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            to_yaml(config),
            {
                "code_version": code_version(),
                "runs.total": str(len(runs)),
                "runs.skipped": str(len(skipped)),
                "reuse": reuse,
            },
        )
    except BaseException:
        _stop_ray(started_ray, sigterm)
        raise

    session = _Session(config, tracker, parent_id, console, progress, notes, reuse)
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
        _stop_ray(started_ray, sigterm)
        frame = runs_frame(results + session.results)
        try:
            summary = summarize(frame)
            artifacts = _parent_artifacts(frame, summary, config.name)
        except Exception as err:  # the summary must never keep the parent RUNNING
            log.exception("could not summarise the runs")
            summary = pd.DataFrame()
            artifacts = {"summary_error.txt": format_error(err)}
        tracker.finish_parent(parent_id, artifacts, status=status)
    counts = dict(session.counts, running=0)
    return ExperimentResult(
        experiment, uri, parent_id, frame, summary, counts, session.arrivals, notes
    )


def _stop_ray(started_ray: bool, sigterm: Any) -> None:
    """Shut down the Ray this invocation started, and restore the SIGTERM handler."""
    if started_ray:
        ray.shutdown()
    if sigterm is not None:
        signal.signal(signal.SIGTERM, sigterm)


def _sigterm_interrupts() -> Any:
    """Make SIGTERM (``kill``) end the invocation like Ctrl-C: live runs marked KILLED.

    Returns the handler to restore afterwards (None when not in the main thread).
    """
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    return signal.SIG_DFL if previous is None else previous


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
        results.append(_reused_result(spec, run))
    if results:
        matrices = load_r_matrices(tracker.client, [r.mlflow_run_id for r in results])
        for result in results:
            result.r = matrices[result.mlflow_run_id]
    return results


def _reused_result(spec: RunSpec, run: Any) -> RunResult:
    metrics, tags = run.data.metrics, run.data.tags
    chance = tags.get("at_chance")
    return _result(
        spec,
        "SKIPPED",
        run.info.run_id,
        scenario=tags.get("scenario"),
        metrics={m: metrics.get(m) for m in METRICS},
        train_time_s=metrics.get("train_time_s"),
        code_hash=tags.get("code_hash", spec.code_hash),
        attempts=int(tags.get("attempts", 1)),
        at_chance=None if chance is None else chance == "true",
    )


def _result(spec: RunSpec, status: str, run_id: str | None, **details: Any) -> RunResult:
    """A RunResult for ``spec``: identity from the spec, the rest from ``details``."""
    details.setdefault("code_hash", spec.code_hash)
    return RunResult(
        spec.run_key,
        spec.label,
        spec.method,
        spec.seed,
        spec.order_index,
        status,
        run_id,
        config_key=spec.config_key,
        params=flatten(spec.resolved),
        **details,
    )


@dataclass
class _RunState:
    """The driver's view of one run being computed (``Job.data``)."""

    spec: RunSpec
    lease: Lease | None
    run_id: str | None = None
    started: float = 0.0
    tasks: list[str] = field(default_factory=list)
    scenario: str | None = None
    chance: list[float] = field(default_factory=list)
    test_counts: list[int] = field(default_factory=list)
    r: RMatrix | None = None
    train_time_s: float = 0.0
    eval_time_s: float = 0.0
    last: dict[str, Any] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    resumed_from: int | None = None
    init_logged: bool = False
    logged_tasks: set[int] = field(default_factory=set)

    def new_attempt(self) -> None:
        """An attempt re-yields its checkpoint's events: rebuild the view from them."""
        self.r = None
        self.train_time_s = self.eval_time_s = 0.0
        self.last, self.files = {}, {}


class _Session:
    """The runs one invocation computes: leases, the pool's callbacks, MLflow, progress."""

    def __init__(
        self,
        config: ExperimentConfig,
        tracker: Tracker,
        parent_id: str,
        console: Console,
        show_progress: bool,
        notes: list[str],
        reuse: str = "same-code",
    ):
        self.config = config
        self.tracker = tracker
        self.parent_id = parent_id
        self.console = console
        self.show_progress = show_progress
        self.notes = notes
        # absolute, so every actor writes where the driver means whatever its working directory
        self.checkpoint_dir = (
            str(Path(config.checkpoints.dir).expanduser().resolve())
            if config.checkpoints.dir
            else None
        )
        self.leases = LeaseStore(lease_root(config, tracker.uri))
        self.results: list[RunResult] = []
        self.counts = {"done": 0, "running": 0, "failed": 0, "skipped": 0, "waiting": 0}
        self.arrivals: list[tuple[float, str, str, int | None]] = []
        self.reuse = reuse
        self.todo: deque[RunSpec] = deque()
        self.waiting: dict[str, RunSpec] = {}
        self.active: dict[str, _RunState] = {}
        self.code_version = code_version()
        self.started = time.perf_counter()
        self._last_heartbeat = time.monotonic()
        self._last_lease_poll = time.monotonic()
        self.view: ProgressView | None = None
        self.pool: ActorPool | None = None

    # ------------------------------------------------------------------ the loop
    def run(self, pending: list[RunSpec], plan: tuple[int, float, float]) -> None:
        n_actors, cpus, gpus = plan
        runner_cls = make_runner_class(cpus, gpus)
        fraction = gpus if 0 < gpus < 1 else None

        def new_actor() -> Any:
            return runner_cls.remote(
                torch_threads=max(1, math.floor(cpus)), gpu_memory_fraction=fraction
            )

        self.console.print(describe_plan(len(pending), plan))
        retry = self.config.retries
        self.pool = pool = ActorPool(
            new_actor,
            n_actors,
            max_retries=retry.max_retries,
            backoff_s=retry.backoff_s,
            backoff_max_s=retry.backoff_max_s,
        )
        self.view = ProgressView(
            self.console, len(pending) * self.config.stream.num_tasks, self.show_progress
        )
        try:
            with self.view.progress:
                # a run's lease is taken when an actor is free for it, so invocations started
                # side by side share the work instead of one waiting for all of it
                self.todo = deque(pending)
                pool.run(self, until_idle=lambda: not self.waiting and not self.todo)
                self.counts["running"] = 0
                self.view.update(self.counts)
        except BaseException:
            # interrupted (Ctrl-C, SIGTERM) or the driver failed: the pool has killed the
            # live actors; keep what was logged and the checkpoints
            for state in list(self.active.values()):
                if state.run_id is not None:
                    self.tracker.fail_child(
                        state.run_id, "the driver was interrupted", status="KILLED"
                    )
                self._kept_checkpoint(state, "interrupted")
                self._release(state)
            raise
        finally:
            for spec in self.waiting.values():
                log.info("run %s left to the invocation computing it", spec.run_name)

    def _claim(self, spec: RunSpec) -> bool:
        """Take the run's lease and queue it; False if another invocation holds it."""
        lease = self.leases.try_acquire(spec.run_key, {"parent_run": self.parent_id})
        if lease is None:
            if spec.run_key not in self.waiting:
                holder = self.leases.holder(spec.run_key)
                self._note(
                    f"run {spec.run_name} is being computed by another invocation (pid "
                    f"{holder.get('pid', '?')} on {holder.get('host', '?')}): waiting for it"
                )
            self.waiting[spec.run_key] = spec
            self.counts["waiting"] = len(self.waiting)
            return False
        self.waiting.pop(spec.run_key, None)
        self.counts["waiting"] = len(self.waiting)
        if self.reuse != "none":  # another invocation may have finished it since we looked
            done = self.tracker.finished_run(spec.run_key)
            if done is not None:  # the other invocation finished it while we waited
                lease.release()
                result = _reused_result(spec, done)
                result.r = load_r_matrices(self.tracker.client, [done.info.run_id])[
                    done.info.run_id
                ]
                self.results.append(result)
                self.counts["skipped"] += 1
                self.view.shrink(self.config.stream.num_tasks)
                self.console.print(f"run {spec.run_name} was finished by another invocation")
                return True
        # no live invocation holds it: a RUNNING record of it belongs to a dead one
        self.tracker.reconcile(own_parent=self.parent_id, run_key=spec.run_key)
        state = _RunState(spec, lease)
        self.active[spec.run_key] = state
        args = (spec.resolved, list(self.config.plugins), spec.run_key, self.checkpoint_dir)
        self.pool.submit(Job(spec.run_key, spec.run_name, args, data=state))
        return True

    def tick(self, pool: ActorPool) -> None:
        now = time.monotonic()
        if now - self._last_heartbeat >= HEARTBEAT_S:
            self._last_heartbeat = now
            self.tracker.heartbeat(self.parent_id)
        if self.waiting and now - self._last_lease_poll >= LEASE_POLL_S:
            self._last_lease_poll = now
            for spec in list(self.waiting.values()):
                self._claim(spec)
        while self.todo and pool.idle_capacity > 0:
            self._claim(self.todo.popleft())
        self.counts["running"] = len(pool.running)
        self.view.update(self.counts)

    # ------------------------------------------------------------------ pool callbacks
    def dispatched(self, job: Job) -> None:
        state: _RunState = job.data
        if state.run_id is None:
            state.started = time.perf_counter()
            state.run_id = self.tracker.start_child(
                state.spec, self.parent_id, {"code_version": self.code_version}
            )
        else:
            self.tracker.log_attempt(state.run_id, job.attempts, job.errors[-1])
        state.new_attempt()

    def event(self, job: Job, event: dict[str, Any]) -> bool:
        state: _RunState = job.data
        kind = event.get("kind")
        handler = _EVENT_HANDLERS.get(kind)
        if handler is None:
            raise ValueError(
                f"run {job.name} sent an event of unknown kind {kind!r}; "
                f"known kinds: {', '.join(_EVENT_HANDLERS)}"
            )
        self.arrivals.append(
            (time.perf_counter() - self.started, job.name, kind, event.get("task"))
        )
        if handler(self, state, event):
            self.view.update(self.counts, advance=1)
        return False

    def finished(self, job: Job) -> None:
        state: _RunState = job.data
        self.results.append(self._finish(state, job.attempts))
        self.counts["done"] += 1
        self._forget(job, state)

    def stopped(self, job: Job) -> None:  # lia run never asks a run to stop
        self.failed(job, RuntimeError("the run was stopped"))

    def retrying(self, job: Job, error: BaseException, delay_s: float) -> None:
        self.console.print(
            f"[yellow]run {job.name}: {_first_line(error)}; retrying in {delay_s:.0f} s "
            f"(attempt {job.attempts + 1} of {self.config.retries.max_retries + 1})[/]"
        )

    def failed(self, job: Job, error: BaseException) -> None:
        state: _RunState = job.data
        text = format_error(error)
        if state.run_id is None:  # it never started
            state.run_id = self.tracker.start_child(state.spec, self.parent_id)
        self.tracker.fail_child(state.run_id, text)
        self.console.print(f"[red]run {job.name} failed:[/] {escape(_first_line(error))}")
        self.results.append(
            _result(
                state.spec,
                "FAILED",
                state.run_id,
                scenario=state.scenario,
                r=state.r,
                error=text,
                attempts=job.attempts,
            )
        )
        self.counts["failed"] += 1
        self.view.shrink(self.config.stream.num_tasks - len(state.logged_tasks))
        if is_system_failure(error):
            # Ray kept losing it: the checkpoint lets the same command resume it later
            self._kept_checkpoint(state, "failed")
            self._release(state)
        else:
            # its own code raised: the same seed and code raise again, so the state is useless
            self._forget(job, state)

    # ------------------------------------------------------------------ events
    def _on_start(self, state: _RunState, event: dict[str, Any]) -> bool:
        if event.get("resumed_from_task") is not None:
            state.resumed_from = int(event["resumed_from_task"])
        state.scenario = event["scenario"]
        state.tasks = list(event["tasks"])
        state.chance = list(event.get("chance") or [])
        state.test_counts = list(event.get("test_counts") or [])
        self.tracker.log_start(state.run_id, event)
        return False

    def _on_init(self, state: _RunState, event: dict[str, Any]) -> bool:
        state.r = RMatrix(state.tasks, event["row"])
        state.eval_time_s += event["eval_time_s"]
        if not state.init_logged:
            self.tracker.log_init_row(state.run_id, event["row"])
            state.init_logged = True
        return False

    def _on_task(self, state: _RunState, event: dict[str, Any]) -> bool:
        if state.r is None:
            raise ValueError("a task event arrived before the init event")
        state.r.append(event["row"])
        state.train_time_s += event["train_time_s"]
        state.eval_time_s += event["eval_time_s"]
        state.last = event
        task = int(event["task"])
        if task in state.logged_tasks:  # re-yielded by a retried attempt: logged already
            return False
        state.logged_tasks.add(task)
        self.tracker.log_task_row(state.run_id, state.r, event)
        return True

    def _on_artifacts(self, state: _RunState, event: dict[str, Any]) -> bool:
        state.files.update(event["files"])
        return False

    # ------------------------------------------------------------------ endings
    def _finish(self, state: _RunState, attempts: int) -> RunResult:
        spec = state.spec
        if state.r is None or state.scenario is None:
            raise ValueError(f"run {spec.run_name} ended without its R matrix")
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
        final = state.r.R[-1]
        chance = state.chance or [0.0] * len(final)
        counts = state.test_counts or [0] * len(final)
        flagged = at_chance(final, chance, counts)
        chance_acc = sum(chance) / len(chance) if chance else 0.0
        tags = {"at_chance": "true" if flagged else "false", "chance_acc": f"{chance_acc:.4f}"}
        self.tracker.finish_child(state.run_id, state.r, metrics, totals, state.files, tags)
        resumed = (
            f" (resumed: {state.resumed_from} tasks from its checkpoint)"
            if state.resumed_from
            else ""
        )
        line = f"run {spec.run_name} finished{resumed}: ACC {100 * metrics.acc:.2f}%" + (
            f" BWT {100 * metrics.bwt:+.2f}" if metrics.bwt is not None else ""
        )
        self.console.print(line)
        if flagged:
            self.console.print(
                f"[yellow]warning: run {spec.run_name} is at chance level: final ACC "
                f"{100 * metrics.acc:.2f}% vs chance {100 * chance_acc:.2f}% — it learned "
                "nothing it kept; check train.lr and the method's settings[/]"
            )
        return _result(
            spec,
            "FINISHED",
            state.run_id,
            scenario=state.scenario,
            r=state.r,
            metrics=metrics.as_dict(),
            train_time_s=state.train_time_s,
            attempts=attempts,
            at_chance=flagged,
        )

    def _forget(self, job: Job, state: _RunState) -> None:
        """Delete the run's checkpoint (its results are in MLflow), then free its lease.

        The actor deletes it (it sees the checkpoint folder wherever the driver runs); the
        driver waits, so the lease is never freed while the checkpoint still exists.
        """
        self.active.pop(state.spec.run_key, None)
        if self.checkpoint_dir is not None and job.actor is not None:
            try:
                ray.get(
                    job.actor.forget.remote(self.checkpoint_dir, state.spec.run_key),
                    timeout=FORGET_TIMEOUT_S,
                )
            except Exception as err:  # a stale checkpoint is harmless: same key, same state
                log.warning("could not delete the checkpoint of %s: %s", job.name, err)
        self._release(state)

    def _kept_checkpoint(self, state: _RunState, why: str) -> None:
        self.active.pop(state.spec.run_key, None)
        if self.checkpoint_dir is None or not state.logged_tasks:
            return
        path = checkpoints.run_dir(self.checkpoint_dir, state.spec.run_key)
        self._note(
            f"run {state.spec.run_name} {why} after {len(state.logged_tasks)} tasks; its "
            f"checkpoint is kept at {path}: run the same command again to resume it"
        )

    def _release(self, state: _RunState) -> None:
        if state.lease is not None:
            state.lease.release()

    def _note(self, text: str) -> None:
        self.notes.append(text)
        self.console.print(f"[yellow]{escape(text)}[/]")


_EVENT_HANDLERS = {
    "start": _Session._on_start,
    "init": _Session._on_init,
    "task": _Session._on_task,
    "artifacts": _Session._on_artifacts,
}


def _first_line(error: BaseException) -> str:
    """One line about ``error``: Ray's own failures are summarised, a run's error quoted."""
    if is_system_failure(error):
        text = str(error)
        detail = text.split("Worker exit detail:", 1)[-1] if "Worker exit detail:" in text else ""
        detail = detail.strip().split(". ")[0][:120]
        what = "Ray lost the run: its worker, actor or node died"
        return f"{type(error).__name__}: {what}" + (f" ({detail})" if detail else "")
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1][:300]}" if lines else type(error).__name__


def _parent_artifacts(runs: pd.DataFrame, summary: pd.DataFrame, name: str) -> dict[str, Any]:
    artifacts: dict[str, Any] = {"runs.csv": runs_table(runs).to_csv(index=False)}
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
