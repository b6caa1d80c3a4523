"""A phase before the stream: meta-training, configured, resumable and cached by its own key.

Some learners (the LSTM meta-learner, ``learners/lstm_meta.py``) must first be trained on a
task *family* before they meet the stream. That work is a :class:`Phase`: a sequence of steps
with a resumable state, configured by the ``meta_training`` section
(:class:`MetaTrainingConfig`), whose result (the meta-trained weights) does not depend on the
run's seed or stream tasks. So:

- :func:`phase_key` hashes what the result depends on (the phase's settings, the method and the
  hyperparameters it names, the stream's input shape and classes, the code): runs of several
  seeds, and sweep trials that change only deployment settings, share one result;
- :func:`run_phase` runs a phase with a cache folder: it returns a finished result at once
  (``cached``), or takes the folder's lock (so two workers never compute the same phase),
  resumes from the partial state a killed worker left, checkpoints every CHECKPOINT_EVERY_S
  seconds, stops between steps when asked (TrainingStopped, partial state kept), and writes
  the result atomically. It yields ``phase`` events (progress, loss curve) that the driver
  logs to MLflow.

Without a cache folder (a notebook), the phase simply runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from learners import storage
from learners.hparams import hp
from task_streams.families import FAMILIES

CHECKPOINT_EVERY_S = 20.0  # partial state written at most this often (and when stopped)
CURVE_POINTS = 200  # a phase's loss curve keeps at most about this many points
LOCK_POLL_S = 0.5


@dataclass
class MetaTrainingConfig:
    """The ``meta_training`` section: how a meta-learner is trained before the stream."""

    family: str = hp(
        "random_labels",
        help="task family episodes are drawn from (random_labels, sine, linear)",
        choices=FAMILIES,
    )
    source: str = hp(
        "mnist5k", help="random_labels: image source (its training pool; never the test pool)"
    )
    ways: int = hp(5, help="random_labels: classes per task", low=2)
    dim: int = hp(4, help="linear: input dimension", low=1)
    episodes: int = hp(
        20000, help="meta-training episodes in all", low=1, search=(2000, 100000), log=True
    )
    episode_length: int = hp(50, help="samples per task in an episode", low=2)
    segments: int = hp(
        1, help="tasks per episode, switched without announcement (1 = no switch)", low=1
    )
    queries: int = hp(
        0,
        help="random_labels: after each task of an episode, this many unseen images of every "
        "task so far, answered from the state without feedback and scored (retention, as a "
        "stream's R matrix asks); the tasks of an episode then have distinct classes and labels",
        low=0,
    )
    queries_from: float = hp(
        0.5,
        help="fraction of meta-training done before queries are scored: first learn each task "
        "from feedback, then also keep them (a curriculum; with queries from the first step, "
        "the LSTM never learned a task in context: measured)",
        low=0.0,
        high=1.0,
    )
    batch: int = hp(16, help="episodes per meta-gradient step", low=1)
    lr: float = hp(1e-3, help="meta-learning rate (Adam)", gt=0.0, search=(1e-4, 1e-2), log=True)
    truncation: int = hp(
        50,
        help="samples per truncated-BPTT chunk (state carried, gradient cut between chunks)",
        low=1,
        search=(10, 200),
        log=True,
    )
    clip: float = hp(1.0, help="gradient-norm clip per step", gt=0.0)
    seed: int = hp(0, help="seed of meta-training (weights' init and episodes), not the run's")


class Phase:
    """Resumable work before the stream. Subclasses define the methods below."""

    name = "phase"

    def total_steps(self) -> int:
        raise NotImplementedError

    def step(self) -> dict[str, float]:
        """One step; its metrics (``loss`` required; others are diagnostics)."""
        raise NotImplementedError

    @property
    def done_steps(self) -> int:
        raise NotImplementedError

    def key_payload(self) -> dict[str, Any]:
        """Everything the result depends on (hashed by :func:`phase_key`)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Progress to resume from (weights_only-loadable)."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def result(self) -> dict[str, Any]:
        """What the learner keeps once the phase is finished."""
        raise NotImplementedError

    def apply(self, result: dict[str, Any]) -> None:
        """Give ``result`` to the learner."""
        raise NotImplementedError


def phase_key(phase: Phase, code: str = "") -> str:
    """16 hex digits: the hash of what the phase's result depends on, plus the code's hash."""
    payload = {"phase": phase.name, "key": phase.key_payload(), "code": code}
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path, should_stop: Callable[[], bool] | None) -> Iterator[None]:
    """Hold an exclusive lock on ``path``, waiting for another holder (a stop request ends the
    wait). The OS drops the lock when its process dies, so a killed worker never leaves it held."""
    from learners.base import TrainingStopped

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if should_stop is not None and should_stop():
                    raise TrainingStopped("stopped waiting for another worker's phase") from None
                time.sleep(LOCK_POLL_S)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def run_phase(
    phase: Phase,
    cache_dir: str | os.PathLike | None = None,
    should_stop: Callable[[], bool] | None = None,
    code: str = "",
) -> Iterator[dict[str, Any]]:
    """Run ``phase`` (or fetch its cached result) and apply the result; yields ``phase`` events.

    Events: ``{"kind": "phase", "phase": name, "key": ..., "event": "progress", "steps": n,
    "point": {"step": k, "loss": x, ...}}`` about CURVE_POINTS times (each metric of
    :meth:`Phase.step` averaged since the previous point), then ``"event": "done"`` with
    ``cached`` (True when the result came from the cache), ``resumed_from`` (the step a partial
    state resumed from, or None), ``seconds`` (spent here), ``compute_seconds`` (spent
    computing it, over every attempt) and the whole ``curve`` (the points, also for a cached
    result).
    """
    key = phase_key(phase, code)
    base = {"kind": "phase", "phase": phase.name, "key": key}
    started = time.perf_counter()
    folder = storage.resolve(cache_dir) if cache_dir is not None else None
    if folder is not None:
        final = storage.join(folder, f"{key}.pt")
        if storage.exists(final):
            yield from _cached(phase, final, base, started)
            return
        with _locked(storage.local_lock_dir(folder) / f"{key}.lock", should_stop):
            if storage.exists(final):  # another worker finished it while this one waited
                yield from _cached(phase, final, base, started)
                return
            yield from _compute(phase, folder, key, base, started, should_stop)
        return
    yield from _compute(phase, None, key, base, started, should_stop)


def _cached(phase: Phase, final: str, base: dict, started: float) -> Iterator[dict[str, Any]]:
    saved = storage.load(final)
    phase.apply(saved["result"])
    yield {
        **base,
        "event": "done",
        "cached": True,
        "resumed_from": None,
        "steps": int(saved["steps"]),
        "seconds": time.perf_counter() - started,
        "compute_seconds": float(saved.get("seconds", 0.0)),
        "curve": saved["curve"],
    }


def _compute(
    phase: Phase,
    folder: str | None,
    key: str,
    base: dict,
    started: float,
    should_stop: Callable[[], bool] | None,
) -> Iterator[dict[str, Any]]:
    from learners.base import TrainingStopped

    computing = time.perf_counter()  # after any wait for another worker's lock
    partial = storage.join(folder, f"{key}.partial.pt") if folder is not None else None
    curve: list[dict[str, float]] = []
    spent = 0.0  # compute seconds of earlier attempts
    resumed_from = None
    if partial is not None and storage.exists(partial):
        saved = storage.load(partial)
        phase.load_state_dict(saved["phase"])
        curve, spent = list(saved["curve"]), float(saved["seconds"])
        resumed_from = phase.done_steps
    total = phase.total_steps()
    every = max(1, total // CURVE_POINTS)
    window: list[dict[str, float]] = []
    last_save = time.perf_counter()

    def save_partial() -> None:
        if partial is not None:
            state = {"phase": phase.state_dict(), "curve": curve,
                     "seconds": spent + time.perf_counter() - computing}  # fmt: skip
            storage.save(state, partial)

    while phase.done_steps < total:
        if should_stop is not None and should_stop():
            save_partial()
            raise TrainingStopped(f"stopped during {phase.name} at step {phase.done_steps}")
        window.append(phase.step())
        k = phase.done_steps
        if k % every == 0 or k == total:
            point = {"step": k}
            point.update({m: sum(w[m] for w in window) / len(window) for m in window[0]})
            window = []
            curve.append(point)
            yield {**base, "event": "progress", "steps": total, "point": point}
        if partial is not None and time.perf_counter() - last_save >= CHECKPOINT_EVERY_S:
            save_partial()
            last_save = time.perf_counter()
    seconds = spent + time.perf_counter() - computing
    result = phase.result()
    if folder is not None:
        storage.save({"result": result, "curve": curve, "steps": total, "seconds": seconds},
                     storage.join(folder, f"{key}.pt"))  # fmt: skip
        storage.remove(partial)
    phase.apply(result)
    yield {
        **base,
        "event": "done",
        "cached": False,
        "resumed_from": resumed_from,
        "steps": total,
        "seconds": time.perf_counter() - started,
        "compute_seconds": seconds,
        "curve": curve,
    }
