"""The actor pool: runs jobs on StreamRunner actors, recovers from dead workers, stops on request.

One pool serves ``lia run`` and (next) ``lia sweep``. It knows nothing of MLflow or Optuna:
its user passes :class:`PoolCallbacks` and hears of every event, finish, retry and failure.

- Jobs are dispatched to idle actors; every live run is a Ray generator and ``ray.wait``
  reads them all at once, so events of concurrent runs arrive as they are produced.
- A run whose worker, actor or node died (any Ray system error) is re-dispatched to a fresh
  actor after a backoff (``backoff_s`` doubling up to ``backoff_max_s``), at most
  ``max_retries`` times; the actor resumes it after its last checkpointed task. An error the
  run's own code raised is not retried: the same seed would raise it again.
- ``PoolCallbacks.event`` may answer True to stop a run: the actor is asked to stop at its
  next batch, and killed if it has not stopped within ``stop_timeout_s``.
- An event the callbacks cannot handle (they raise) fails that run, not the pool.
- An actor no job waits for (nothing queued, no retry pending) is killed at once: idle, it
  would hold its CPUs and GPUs, which the fresh actor of a retry may need on a cluster that
  lost a node.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import ray

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One run to compute: ``args`` go to ``StreamRunner.run``; ``data`` is the user's."""

    key: str
    name: str
    args: tuple[Any, ...]
    data: Any = None
    attempts: int = 0
    """how many times it was dispatched so far"""
    errors: list[str] = field(default_factory=list)
    """the system errors that ended earlier attempts"""
    actor: Any = None
    """the actor of the latest attempt"""


class PoolCallbacks(Protocol):
    """What the pool tells its user. Every method is called from the pool's thread."""

    def dispatched(self, job: Job) -> None:
        """``job`` was sent to an actor (``job.attempts`` counts this attempt)."""

    def event(self, job: Job, event: dict[str, Any]) -> bool:
        """One event of ``job``; return True to stop the run."""

    def finished(self, job: Job) -> None:
        """``job``'s generator ended normally."""

    def stopped(self, job: Job) -> None:
        """``job`` ended because ``event`` asked it to stop."""

    def retrying(self, job: Job, error: BaseException, delay_s: float) -> None:
        """``job``'s worker died; it will be re-dispatched after ``delay_s``."""

    def failed(self, job: Job, error: BaseException) -> None:
        """``job`` failed for good (its own error, or retries exhausted)."""

    def tick(self, pool: ActorPool) -> None:
        """Once per turn of the loop (about every ``poll_s``): progress, heartbeats, submits."""


def is_system_failure(error: BaseException) -> bool:
    """True when Ray lost the run (dead worker, actor or node), not when the run raised."""
    return isinstance(error, ray.exceptions.RayError) and not isinstance(
        error, ray.exceptions.RayTaskError
    )


@dataclass
class _Live:
    job: Job
    actor: Any
    stop_requested_at: float | None = None


_interrupt: dict[str, int | None] = {"signal": None}


def note_interrupt(signum: int | None) -> None:
    """Record (or, with None, clear) a signal that must end the loop of :meth:`ActorPool.run`.

    A signal handler that raises KeyboardInterrupt can be lost: when the signal lands while
    Python runs a weakref callback or a ``__del__``, the exception is printed as "ignored" and
    the program goes on. The loop re-raises a recorded signal at its next turn."""
    _interrupt["signal"] = signum


def interrupted() -> bool:
    """Whether a signal recorded by :func:`note_interrupt` is waiting to be raised."""
    return _interrupt["signal"] is not None


def raise_if_interrupted() -> None:
    """KeyboardInterrupt if a signal was recorded by :func:`note_interrupt` (then cleared)."""
    signum, _interrupt["signal"] = _interrupt["signal"], None
    if signum is not None:
        raise KeyboardInterrupt(f"signal {signum}")


class ActorPool:
    """Dispatch jobs to at most ``size`` actors made by ``new_actor``; see the module doc."""

    def __init__(
        self,
        new_actor: Callable[[], Any],
        size: int,
        *,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        backoff_max_s: float = 30.0,
        stop_timeout_s: float = 30.0,
        poll_s: float = 1.0,
    ):
        self.new_actor = new_actor
        self.size = size
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.stop_timeout_s = stop_timeout_s
        self.poll_s = poll_s
        self._idle: list[Any] = []
        self._actors = 0
        self._queue: deque[Job] = deque()
        self._delayed: list[tuple[float, int, Job]] = []
        self._order = itertools.count()
        self._live: dict[Any, _Live] = {}
        self._callbacks: Any = None
        self.replaced_actors = 0

    # ------------------------------------------------------------------ public
    def submit(self, job: Job) -> None:
        """Queue a job; it starts when an actor is free."""
        self._queue.append(job)

    @property
    def running(self) -> list[Job]:
        return [state.job for state in self._live.values()]

    def stop(self, key: str) -> bool:
        """Stop the job ``key``: ask its actor to stop (a queued job is dropped at once).

        Its end is reported through ``stopped``. False if no such job is queued or running.
        """
        for state in self._live.values():
            if state.job.key == key:
                if state.stop_requested_at is None:
                    state.stop_requested_at = time.monotonic()
                    state.actor.stop.remote()
                return True
        for job in list(self._queue):
            if job.key == key:
                self._queue.remove(job)
                self._callbacks.stopped(job)
                return True
        for item in list(self._delayed):
            if item[2].key == key:
                self._delayed.remove(item)
                heapq.heapify(self._delayed)
                self._callbacks.stopped(item[2])
                return True
        return False

    @property
    def idle_capacity(self) -> int:
        """How many more jobs could start now (actors neither running nor promised a job)."""
        return self.size - len(self._live) - len(self._queue)

    @property
    def busy(self) -> bool:
        """Whether any job is queued, waiting for a retry, or running."""
        return bool(self._queue or self._delayed or self._live)

    def run(self, callbacks: PoolCallbacks, until_idle: Callable[[], bool] | None = None) -> None:
        """Run queued jobs (and those ``tick`` submits) until none is left.

        ``until_idle`` (optional) is asked when the pool is idle: while it returns False the
        pool keeps ticking, for a user who will submit more (runs waiting on a lease).
        """
        self._callbacks = callbacks
        try:
            while True:
                raise_if_interrupted()
                callbacks.tick(self)
                if not self.busy and (until_idle is None or until_idle()):
                    break
                self._dispatch(callbacks)
                if not self._queue and not self._delayed:
                    self._release_idle()
                if not self._live:
                    time.sleep(self._wait_time())
                    continue
                ready, _ = ray.wait(list(self._live), num_returns=1, timeout=self._wait_time())
                for generator in ready:
                    self._advance(generator, callbacks)
                self._enforce_stops()
        except BaseException:
            # the driver is going away: end every live run now (checkpoints are written
            # atomically after each task, so killing loses only the task in progress)
            for state in self._live.values():
                ray.kill(state.actor, no_restart=True)
            raise
        finally:
            for actor in self._idle:
                ray.kill(actor, no_restart=True)
            self._idle.clear()

    # ------------------------------------------------------------------ internals
    def _wait_time(self) -> float:
        if self._delayed and not self._live:
            return max(0.0, min(self.poll_s, self._delayed[0][0] - time.monotonic()))
        return self.poll_s

    def _take_actor(self) -> Any | None:
        if self._idle:
            return self._idle.pop()
        if self._actors < self.size:
            self._actors += 1
            return self.new_actor()
        return None

    def _dispatch(self, callbacks: PoolCallbacks) -> None:
        now = time.monotonic()
        while self._delayed and self._delayed[0][0] <= now:
            _, _, job = heapq.heappop(self._delayed)
            self._queue.appendleft(job)
        while self._queue and len(self._live) < self.size:
            actor = self._take_actor()
            if actor is None:
                return
            job = self._queue.popleft()
            job.attempts += 1
            job.actor = actor
            callbacks.dispatched(job)
            generator = actor.run.remote(*job.args)
            self._live[generator] = _Live(job, actor)

    def _release_idle(self) -> None:
        """Kill the actors no job waits for: an idle actor holds its CPUs and GPUs, and an actor
        the pool started for a retry may be waiting for exactly those (a cluster that lost a
        node has no others)."""
        while self._idle:
            ray.kill(self._idle.pop(), no_restart=True)
            self._actors -= 1

    def _release(self, state: _Live, dead: bool) -> None:
        if dead:
            ray.kill(state.actor, no_restart=True)
            self._actors -= 1
            self.replaced_actors += 1
        else:
            self._idle.append(state.actor)

    def _advance(self, generator: Any, callbacks: PoolCallbacks) -> None:
        state = self._live[generator]
        job = state.job
        try:
            event = ray.get(next(generator))
        except StopIteration:
            del self._live[generator]
            self._release(state, dead=False)
            (callbacks.stopped if state.stop_requested_at else callbacks.finished)(job)
            return
        except Exception as error:
            del self._live[generator]
            self._ended_with(state, error, callbacks)
            return
        try:
            stop = callbacks.event(job, event)
        except Exception as error:  # the user could not handle the event: fail this run
            log.exception("run %s: event handling failed", job.name)
            del self._live[generator]
            self._release(state, dead=True)
            callbacks.failed(job, error)
            return
        if stop and state.stop_requested_at is None:
            state.stop_requested_at = time.monotonic()
            state.actor.stop.remote()

    def _ended_with(self, state: _Live, error: BaseException, callbacks: PoolCallbacks) -> None:
        job = state.job
        system = is_system_failure(error)
        self._release(state, dead=system)
        if state.stop_requested_at is not None:
            callbacks.stopped(job)
        elif system and job.attempts <= self.max_retries:
            job.errors.append(str(error).strip().splitlines()[0][:300] if str(error) else "")
            delay = min(self.backoff_s * 2 ** (job.attempts - 1), self.backoff_max_s)
            callbacks.retrying(job, error, delay)
            heapq.heappush(self._delayed, (time.monotonic() + delay, next(self._order), job))
        else:
            callbacks.failed(job, error)

    def _enforce_stops(self) -> None:
        """Kill actors that did not stop within ``stop_timeout_s`` of being asked."""
        now = time.monotonic()
        for state in self._live.values():
            asked = state.stop_requested_at
            if asked is not None and now - asked > self.stop_timeout_s:
                ray.kill(state.actor, no_restart=True)  # its generator then raises: stopped
