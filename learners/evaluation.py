"""Running a learner over a stream: one R row per finished task, with timings and resources."""

from __future__ import annotations

import contextlib
import resource
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from learners.base import Learner
from learners.metrics import RMatrix, recency_bias
from task_streams.base import TaskStream


@torch.no_grad()
def evaluate(learner: Learner, stream: TaskStream) -> list[float]:
    """Test accuracy of ``learner`` on every task of ``stream`` (one R row)."""
    return _evaluate(learner, stream)[0]


@torch.no_grad()
def _evaluate(learner: Learner, stream: TaskStream) -> tuple[list[float], list[torch.Tensor]]:
    """One R row and the predictions it was computed from (one tensor per task)."""
    row, predictions = [], []
    for task in stream:
        predicted = learner.predict(task.x_test, task_id=task.id)
        predictions.append(predicted)
        row.append(float((predicted == task.y_test).float().mean().item()))
    return row, predictions


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # ru_maxrss is in KiB on Linux: the process's peak resident memory so far.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class GpuUtilization:
    """The mean utilisation (%) of a GPU while a block runs, sampled every ``every_s`` seconds
    by a background thread (``torch.cuda.utilization``, NVML's per-device figure: every process
    on that GPU counts, so runs packed on one GPU see their sum). ``mean`` is None when
    nothing could be read (no NVML binding, no sample yet)."""

    def __init__(self, read: Callable[[], float], every_s: float = 0.1):
        self.read, self.every_s = read, every_s
        self.samples: list[float] = []
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def of(cls, device: torch.device) -> GpuUtilization | None:
        """A sampler for ``device`` if it is a GPU whose utilisation can be read, else None."""
        if device.type != "cuda":
            return None
        try:
            torch.cuda.utilization(device)
        except Exception:  # no pynvml / NVML: utilisation is not reported
            return None
        return cls(lambda: float(torch.cuda.utilization(device)))

    def __enter__(self) -> GpuUtilization:
        def sample() -> None:
            while True:
                try:
                    self.samples.append(float(self.read()))
                except Exception:
                    return
                if self._done.wait(self.every_s):
                    return

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def iter_stream(
    learner: Learner,
    stream: TaskStream,
    should_stop: Callable[[], bool] | None = None,
    start_task: int = 0,
) -> Iterator[dict[str, Any]]:
    """Learn ``stream`` task by task, yielding plain-Python events.

    First ``{"kind": "init", "row": [...]}`` (accuracy before learning anything; skipped when
    resuming at ``start_task`` > 0), then per task ``{"kind": "task", "task": i, "row": [...],
    "train_time_s", "eval_time_s", "steps", "peak_memory_bytes", model size, stored memory}``,
    and on a GPU whose utilisation can be read, ``gpu_utilization_pct`` while it trained.
    With ``train.eval_every_steps`` = N > 0, a task event also carries ``curve``: the R-like
    rows measured every N steps while it trained (``[{"step": k, "row": [...]}, ...]``). On a
    class-incremental stream, a task event after the first carries ``recency_bias``
    (:func:`learners.metrics.recency_bias`, from the same predictions as the row).
    """
    if start_task == 0:
        started = time.perf_counter()
        row = evaluate(learner, stream)
        yield {"kind": "init", "row": row, "eval_time_s": time.perf_counter() - started}
    every = learner.train_config.eval_every_steps
    class_il = stream.info.scenario == "class"
    for position, task in enumerate(stream.tasks[start_task:], start=start_task):
        if learner.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(learner.device)
        curve: list[dict[str, Any]] = []
        during = 0.0  # seconds of evaluation inside the task's training

        def measure(step: int, curve: list = curve) -> None:
            nonlocal during
            if step % every == 0:
                began = time.perf_counter()
                curve.append({"step": step, "row": evaluate(learner, stream)})
                during += time.perf_counter() - began

        learner.step_hook = measure if every else None
        started = time.perf_counter()
        sampler = GpuUtilization.of(learner.device)
        try:
            with sampler or contextlib.nullcontext():
                stats = learner.learn(task, should_stop=should_stop)
                if learner.device.type == "cuda":
                    torch.cuda.synchronize(learner.device)
        finally:
            learner.step_hook = None
        trained = time.perf_counter()
        row, predictions = _evaluate(learner, stream)
        evaluated = time.perf_counter()
        extra: dict[str, Any] = {}
        if every:
            extra["curve"] = curve
            extra["during_eval_time_s"] = during
        if class_il and position > 0:
            newest = set(stream.info.task_classes[position])
            old = [int(p) for done in predictions[:position] for p in done.tolist()]
            bias = recency_bias(old, newest)
            if bias is not None:
                extra["recency_bias"] = bias
        yield {
            "kind": "task",
            "task": task.id,
            "row": row,
            "train_time_s": trained - started - during,
            "eval_time_s": evaluated - trained + during,
            "steps": stats["steps"],
            "peak_memory_bytes": _peak_memory_bytes(learner.device),
            **learner.resources(),
            **(
                {"gpu_utilization_pct": sampler.mean}
                if sampler and sampler.mean is not None
                else {}
            ),
            **extra,
        }


def r_matrix_from_events(tasks: list[str], events: list[dict[str, Any]]) -> RMatrix:
    """The R matrix recorded by an ``init`` event and the ``task`` events after it."""
    init, *learned = events
    r = RMatrix(list(tasks), init["row"])
    for event in learned:
        r.append(event["row"])
    return r


def run_stream(
    learner: Learner,
    stream: TaskStream,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> RMatrix:
    """Learn the whole stream and return its R matrix (the notebook-friendly entry point)."""
    events = []
    for event in iter_stream(learner, stream):
        events.append(event)
        if on_event is not None:
            on_event(event)
    return r_matrix_from_events([t.name for t in stream], events)
