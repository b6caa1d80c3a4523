"""A session of runs: leases, the actor pool's callbacks, MLflow child runs, progress.

:class:`RunSession` computes runs on an :class:`~orchestrator.pool.ActorPool` for one parent
run. Its user submits run specs (all at once for ``lia run``,
a trial at a time for ``lia sweep``) and may pass a :class:`RunObserver` that hears of every
finished task (and may stop the run: a pruned trial) and of every run's end. For each run the
session takes the run key's lease when an actor is free for it, asks MLflow whether another
invocation finished it meanwhile, ends RUNNING records a dead invocation left for it, and
logs its events to one MLflow child run however many attempts it takes.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from rich.console import Console
from rich.markup import escape

from cluster import cluster_nodes, describe_plan
from learners import storage
from learners.metrics import RMatrix, at_chance, compute_metrics, continual_eval
from orchestrator import checkpoints
from orchestrator.config import ExperimentConfig, RunSpec, flatten
from orchestrator.leases import Lease, LeaseStore
from orchestrator.liveness import HEARTBEAT_S
from orchestrator.pool import ActorPool, Job, is_system_failure
from orchestrator.progress import ProgressView
from orchestrator.results import CONTINUAL, METRICS, RESOURCES, RunResult
from orchestrator.runner import format_error, make_runner_class
from orchestrator.tracking import Tracker, load_r_matrices, sqlite_path

log = logging.getLogger(__name__)

LEASE_POLL_S = 2.0
"""how often runs another invocation holds are checked again"""
FORGET_TIMEOUT_S = 30.0
"""longest wait for an actor to delete a finished run's checkpoint"""


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


def phase_first(pending: list[RunSpec]) -> list[RunSpec]:
    """``pending`` reordered so that runs sharing a phase (meta-training: same method,
    hyperparameters and ``meta_training`` section, any seed) do not take several actors at
    once: the first of each such group goes first, the runs without a phase next, the rest
    of each group last. A second seed dispatched beside the first would hold an actor only to
    wait for the first's phase (it is computed once, under a lock)."""
    seen: set[str] = set()
    first, plain, later = [], [], []
    for spec in pending:
        if "meta_training" not in spec.resolved:
            plain.append(spec)
            continue
        shared = [spec.method, spec.resolved.get("hparams"), spec.resolved["meta_training"]]
        group = json.dumps(shared, sort_keys=True, default=str)
        (later if group in seen else first).append(spec)
        seen.add(group)
    return first + plain + later


def lease_root(config: ExperimentConfig, uri: str) -> Path:
    """Where run leases live: beside the checkpoints, else beside a SQLite store, else home."""
    if config.checkpoints.dir:  # a remote one: leases on this machine (see learners/storage.py)
        return storage.local_lock_dir(config.checkpoints.dir) / ".leases"
    db = sqlite_path(uri)
    if db is not None:
        return db.resolve().parent / ".lia-leases"
    return Path.home() / ".cache" / "learnsitall" / "leases"


def reused_result(spec: RunSpec, run: Any) -> RunResult:
    metrics, tags = run.data.metrics, run.data.tags
    chance = tags.get("at_chance")
    return run_result(
        spec,
        "SKIPPED",
        run.info.run_id,
        scenario=tags.get("scenario"),
        metrics={m: metrics.get(m) for m in (*METRICS, *CONTINUAL, *RESOURCES)},
        train_time_s=metrics.get("train_time_s"),
        code_hash=tags.get("code_hash", spec.code_hash),
        attempts=int(tags.get("attempts", 1)),
        at_chance=None if chance is None else chance == "true",
    )


def run_result(spec: RunSpec, status: str, run_id: str | None, **details: Any) -> RunResult:
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
class RunState:
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
    stop_reason: str | None = None
    logged_tasks: set[int] = field(default_factory=set)
    phase_logged_step: int = 0
    """the last phase-curve step logged to MLflow (a retried attempt re-sends earlier ones)"""
    task_steps: dict[int, int] = field(default_factory=dict)
    """gradient steps of each finished task: where its continual-evaluation curve starts"""
    curves: dict[int, list[list[float]]] = field(default_factory=dict)
    recency: dict[int, float] = field(default_factory=dict)

    def new_attempt(self) -> None:
        """An attempt re-yields its checkpoint's events: rebuild the view from them."""
        self.r = None
        self.train_time_s = self.eval_time_s = 0.0
        self.last, self.files = {}, {}


class RunObserver:
    """What a session's user hears; override what you need (``lia sweep`` does)."""

    def task_done(self, spec: RunSpec, r: RMatrix, event: dict[str, Any]) -> bool | str:
        """A run finished a task (``r`` has its rows so far); True (or a reason) stops it."""
        return False

    def run_ended(self, spec: RunSpec, result: RunResult) -> None:
        """A run finished, failed, was stopped, or another invocation finished it."""

    def tick(self, session: RunSession) -> None:
        """Once per turn of the loop: a chance to :meth:`RunSession.submit` more runs."""

    def wants_more(self) -> bool:
        """Whether more runs will be submitted (the session keeps going while True)."""
        return False


class RunSession:
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
        observer: RunObserver | None = None,
    ):
        self.config = config
        self.observer = observer or RunObserver()
        self.tags: dict[str, dict[str, str]] = {}
        self.tracker = tracker
        self.parent_id = parent_id
        self.console = console
        self.show_progress = show_progress
        self.notes = notes
        # absolute, so every actor writes where the driver means whatever its working directory
        self.checkpoint_dir = (
            storage.resolve(config.checkpoints.dir) if config.checkpoints.dir else None
        )
        self.leases = LeaseStore(lease_root(config, tracker.uri))
        self.results: list[RunResult] = []
        self.counts = {
            "done": 0,
            "running": 0,
            "failed": 0,
            "stopped": 0,
            "skipped": 0,
            "waiting": 0,
        }
        self.arrivals: list[tuple[float, str, str, int | None]] = []
        self.reuse = reuse
        self.todo: deque[RunSpec] = deque()
        self.waiting: dict[str, RunSpec] = {}
        self.active: dict[str, RunState] = {}
        self.code_version = code_version()
        self.started = time.perf_counter()
        self._last_heartbeat = time.monotonic()
        self._last_lease_poll = time.monotonic()
        self.view: ProgressView | None = None
        self.pool: ActorPool | None = None

    # ------------------------------------------------------------------ the loop
    def run(self, pending: list[RunSpec], plan: tuple[int, float, float]) -> None:
        """Compute ``pending`` (and whatever the observer submits) until nothing is left."""
        n_actors, cpus, gpus = plan
        runner_cls = make_runner_class(cpus, gpus)
        fraction = gpus if 0 < gpus < 1 else None

        def new_actor() -> Any:
            return runner_cls.remote(
                torch_threads=max(1, math.floor(cpus)), gpu_memory_fraction=fraction
            )

        if pending:
            self.console.print(describe_plan(len(pending), plan, cluster_nodes()))
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
                self.todo = deque(phase_first(pending))
                pool.run(
                    self,
                    until_idle=lambda: (
                        not self.waiting and not self.todo and not self.observer.wants_more()
                    ),
                )
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
                result = reused_result(spec, done)
                result.r = load_r_matrices(self.tracker.client, [done.info.run_id])[
                    done.info.run_id
                ]
                self.counts["skipped"] += 1
                self.view.shrink(self.config.stream.num_tasks)
                self.console.print(f"run {spec.run_name} was finished by another invocation")
                self._ended(spec, result)
                return True
        # no live invocation holds it: a RUNNING record of it belongs to a dead one
        self.tracker.reconcile(own_parent=self.parent_id, run_key=spec.run_key)
        state = RunState(spec, lease)
        self.active[spec.run_key] = state
        args = (spec.resolved, list(self.config.plugins), spec.run_key, self.checkpoint_dir)
        self.pool.submit(Job(spec.run_key, spec.run_name, args, data=state))
        return True

    def submit(self, spec: RunSpec, tags: dict[str, str] | None = None) -> None:
        """Queue one more run (its MLflow child gets ``tags`` besides the usual ones)."""
        self.tags[spec.run_key] = dict(tags or {})
        self.todo.append(spec)
        if self.view is not None:
            self.view.grow(self.config.stream.num_tasks)

    @property
    def free_slots(self) -> int:
        """How many more runs could start now."""
        return self.pool.idle_capacity - len(self.todo) if self.pool is not None else 0

    def stop(self, run_key: str, reason: str) -> None:
        """Stop a run (queued or running); its end reaches the observer as STOPPED."""
        for spec in list(self.todo):
            if spec.run_key == run_key:
                self.todo.remove(spec)
                self._stopped_result(spec, None, reason)
                return
        state = self.active.get(run_key)
        if state is not None:
            state.stop_reason = reason
            self.pool.stop(run_key)

    def tick(self, pool: ActorPool) -> None:
        self.observer.tick(self)
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
        state: RunState = job.data
        if state.run_id is None:
            state.started = time.perf_counter()
            state.run_id = self.tracker.start_child(
                state.spec,
                self.parent_id,
                {"code_version": self.code_version, **self.tags.get(state.spec.run_key, {})},
            )
        else:
            self.tracker.log_attempt(state.run_id, job.attempts, job.errors[-1])
        state.new_attempt()

    def event(self, job: Job, event: dict[str, Any]) -> bool:
        state: RunState = job.data
        kind = event.get("kind")
        handler = EVENT_HANDLERS.get(kind)
        if handler is None:
            raise ValueError(
                f"run {job.name} sent an event of unknown kind {kind!r}; "
                f"known kinds: {', '.join(EVENT_HANDLERS)}"
            )
        self.arrivals.append(
            (time.perf_counter() - self.started, job.name, kind, event.get("task"))
        )
        if handler(self, state, event):
            self.view.update(self.counts, advance=1)
        if kind == "task" and state.stop_reason is None:
            stop = self.observer.task_done(state.spec, state.r, event)
            if stop:
                state.stop_reason = stop if isinstance(stop, str) else "stopped by its observer"
                return True
        return False

    def finished(self, job: Job) -> None:
        state: RunState = job.data
        result = self._finish(state, job.attempts)
        self.counts["done"] += 1
        self._forget(job, state)
        self._ended(state.spec, result)

    def stopped(self, job: Job) -> None:
        state: RunState = job.data
        reason = state.stop_reason or "stopped"
        if state.run_id is not None:
            self.tracker.fail_child(state.run_id, reason, status="KILLED")
            self.tracker.client.set_tag(state.run_id, "lia.end_reason", reason)
        self._forget(job, state)
        self._stopped_result(state.spec, state, reason, job.attempts)

    def _stopped_result(
        self, spec: RunSpec, state: RunState | None, reason: str, attempts: int = 0
    ) -> None:
        self.counts["stopped"] += 1
        logged = len(state.logged_tasks) if state is not None else 0
        self.view.shrink(self.config.stream.num_tasks - logged)
        self._ended(
            spec,
            run_result(
                spec,
                "STOPPED",
                state.run_id if state is not None else None,
                scenario=state.scenario if state is not None else None,
                r=state.r if state is not None else None,
                error=reason,
                attempts=attempts,
            ),
        )

    def _ended(self, spec: RunSpec, result: RunResult) -> None:
        self.results.append(result)
        self.observer.run_ended(spec, result)

    def retrying(self, job: Job, error: BaseException, delay_s: float) -> None:
        self.console.print(
            f"[yellow]run {job.name}: {first_line(error)}; retrying in {delay_s:.0f} s "
            f"(attempt {job.attempts + 1} of {self.config.retries.max_retries + 1})[/]"
        )

    def failed(self, job: Job, error: BaseException) -> None:
        state: RunState = job.data
        text = format_error(error)
        if state.run_id is None:  # it never started
            state.run_id = self.tracker.start_child(state.spec, self.parent_id)
        self.tracker.fail_child(state.run_id, text)
        self.console.print(f"[red]run {job.name} failed:[/] {escape(first_line(error))}")
        result = run_result(
            state.spec,
            "FAILED",
            state.run_id,
            scenario=state.scenario,
            r=state.r,
            error=text,
            attempts=job.attempts,
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
        self._ended(state.spec, result)

    # ------------------------------------------------------------------ events
    def _on_start(self, state: RunState, event: dict[str, Any]) -> bool:
        if event.get("resumed_from_task") is not None:
            state.resumed_from = int(event["resumed_from_task"])
        state.scenario = event["scenario"]
        state.tasks = list(event["tasks"])
        state.chance = list(event.get("chance") or [])
        state.test_counts = list(event.get("test_counts") or [])
        self.tracker.log_start(state.run_id, event)
        return False

    def _on_init(self, state: RunState, event: dict[str, Any]) -> bool:
        state.r = RMatrix(state.tasks, event["row"])
        state.eval_time_s += event["eval_time_s"]
        if not state.init_logged:
            self.tracker.log_init_row(state.run_id, event["row"])
            state.init_logged = True
        return False

    def _on_task(self, state: RunState, event: dict[str, Any]) -> bool:
        if state.r is None:
            raise ValueError("a task event arrived before the init event")
        state.r.append(event["row"])
        state.train_time_s += event["train_time_s"]
        state.eval_time_s += event["eval_time_s"]
        state.last = event
        task = int(event["task"])
        state.task_steps[task] = int(event.get("steps", 0))
        if "curve" in event:
            state.curves[task] = [point["row"] for point in event["curve"]]
        if event.get("recency_bias") is not None:
            state.recency[task] = float(event["recency_bias"])
        if task in state.logged_tasks:  # re-yielded by a retried attempt: logged already
            return False
        state.logged_tasks.add(task)
        self.tracker.log_task_row(state.run_id, state.r, event)
        if "curve" in event:  # accuracy during training, on the run's global step axis
            offset = sum(state.task_steps.get(t, 0) for t in range(task))
            self.tracker.log_task_curve(state.run_id, event, offset)
        return True

    def _on_phase(self, state: RunState, event: dict[str, Any]) -> bool:
        """Meta-training progress: its loss curve to MLflow, and a line when it ends."""
        name = event["phase"]
        points = [event["point"]] if event["event"] == "progress" else event["curve"]
        points = [p for p in points if p["step"] > state.phase_logged_step]
        if points:
            self.tracker.log_phase_curve(state.run_id, name, points)
            state.phase_logged_step = int(points[-1]["step"])
        if event["event"] == "done":
            self.tracker.log_phase_done(state.run_id, event)
            how = (
                f"reused from the cache (computed in {event['compute_seconds']:.0f} s)"
                if event["cached"]
                else f"done in {event['seconds']:.0f} s"
                + (f", resumed at step {event['resumed_from']}" if event["resumed_from"] else "")
            )
            line = f"{state.spec.run_name}: {name} ({event['steps']} steps) {how}"
            self.console.print(escape(line))
        return False

    def _on_artifacts(self, state: RunState, event: dict[str, Any]) -> bool:
        state.files.update(event["files"])
        return False

    # ------------------------------------------------------------------ endings
    def _finish(self, state: RunState, attempts: int) -> RunResult:
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
        tasks = len(state.r.R)
        continual = continual_eval(state.r.R, [state.curves.get(t, []) for t in range(tasks)])
        for key, value in continual.as_dict().items():
            if value is not None:
                totals[key] = value
        if state.recency:
            totals["recency_bias"] = sum(state.recency.values()) / len(state.recency)
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
        return run_result(
            spec,
            "FINISHED",
            state.run_id,
            scenario=state.scenario,
            r=state.r,
            metrics={**metrics.as_dict(), **{m: totals.get(m) for m in (*CONTINUAL, *RESOURCES)}},
            train_time_s=state.train_time_s,
            attempts=attempts,
            at_chance=flagged,
        )

    def _forget(self, job: Job, state: RunState) -> None:
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

    def _kept_checkpoint(self, state: RunState, why: str) -> None:
        self.active.pop(state.spec.run_key, None)
        if self.checkpoint_dir is None or not state.logged_tasks:
            return
        path = checkpoints.run_dir(self.checkpoint_dir, state.spec.run_key)
        self._note(
            f"run {state.spec.run_name} {why} after {len(state.logged_tasks)} tasks; its "
            f"checkpoint is kept at {path}: run the same command again to resume it"
        )

    def _release(self, state: RunState) -> None:
        if state.lease is not None:
            state.lease.release()

    def _note(self, text: str) -> None:
        self.notes.append(text)
        self.console.print(f"[yellow]{escape(text)}[/]")


EVENT_HANDLERS = {
    "start": RunSession._on_start,
    "init": RunSession._on_init,
    "task": RunSession._on_task,
    "phase": RunSession._on_phase,
    "artifacts": RunSession._on_artifacts,
}


def first_line(error: BaseException) -> str:
    """One line about ``error``: Ray's own failures are summarised, a run's error quoted."""
    if is_system_failure(error):
        text = str(error)
        detail = text.split("Worker exit detail:", 1)[-1] if "Worker exit detail:" in text else ""
        detail = detail.strip().split(". ")[0][:120]
        what = "Ray lost the run: its worker, actor or node died"
        return f"{type(error).__name__}: {what}" + (f" ({detail})" if detail else "")
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1][:300]}" if lines else type(error).__name__
