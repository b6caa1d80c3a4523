"""The actor pool on its own: retries after a dead worker, failures, stops, bad events."""

from __future__ import annotations

import pytest
import ray

from orchestrator.pool import ActorPool, Job


class Recorder:
    """PoolCallbacks that record what the pool reports; ``stop_on`` asks to stop a run."""

    def __init__(self, stop_on: str | None = None, refuse: str | None = None):
        self.stop_on, self.refuse = stop_on, refuse
        self.calls: list[tuple[str, str]] = []
        self.events: dict[str, list[dict]] = {}
        self.errors: dict[str, BaseException] = {}

    def dispatched(self, job):
        self.calls.append(("dispatched", job.name))

    def event(self, job, event):
        if event["kind"] == self.refuse:
            raise ValueError(f"unknown event kind {event['kind']!r}")
        self.events.setdefault(job.name, []).append(event)
        return event["kind"] == self.stop_on

    def finished(self, job):
        self.calls.append(("finished", job.name))

    def stopped(self, job):
        self.calls.append(("stopped", job.name))

    def retrying(self, job, error, delay_s):
        self.calls.append(("retrying", job.name))

    def failed(self, job, error):
        self.calls.append(("failed", job.name))
        self.errors[job.name] = error

    def tick(self, pool):
        pass


@pytest.fixture(scope="module")
def new_actor(ray_local):
    from lia_test_plugin import ScriptedRunner

    cls = ray.remote(ScriptedRunner).options(
        num_cpus=1, max_concurrency=2, max_restarts=0, max_task_retries=0
    )
    return cls.remote


def _run(new_actor, jobs, callbacks, **options):
    pool = ActorPool(new_actor, size=2, backoff_s=0.05, poll_s=0.2, **options)
    for job in jobs:
        pool.submit(job)
    pool.run(callbacks)
    return pool


def test_a_dead_worker_is_retried_on_a_fresh_actor(new_actor, tmp_path):
    script = [("event", {"kind": "a"}), ("die_once",), ("event", {"kind": "b"})]
    job = Job("k", "flaky", (script, str(tmp_path / "died")))
    steady = Job("s", "steady", ([("event", {"kind": "a"})],))
    callbacks = Recorder()
    pool = _run(new_actor, [job, steady], callbacks)
    assert ("retrying", "flaky") in callbacks.calls
    assert (
        callbacks.calls[-2:] == [("finished", "flaky")] or ("finished", "flaky") in callbacks.calls
    )
    assert ("finished", "steady") in callbacks.calls and not callbacks.errors
    assert job.attempts == 2 and len(job.errors) == 1 and pool.replaced_actors == 1
    # the second attempt re-ran the script: its events arrive again, then the rest (the first
    # attempt's event may die with its worker before the driver reads it)
    kinds = [e["kind"] for e in callbacks.events["flaky"]]
    assert kinds in (["a", "a", "b"], ["a", "b"])


def test_retries_are_bounded_and_own_errors_are_not_retried(new_actor):
    dying = Job("d", "dying", ([("die",)],))
    raising = Job("r", "raising", ([("raise", "boom")],))
    callbacks = Recorder()
    _run(new_actor, [dying, raising], callbacks, max_retries=1)
    assert dying.attempts == 2 and callbacks.calls.count(("retrying", "dying")) == 1
    assert isinstance(callbacks.errors["dying"], ray.exceptions.RayActorError)
    assert raising.attempts == 1 and ("retrying", "raising") not in callbacks.calls
    assert "boom" in str(callbacks.errors["raising"])


def test_a_callback_may_stop_a_run_and_a_bad_event_fails_only_its_run(new_actor):
    stopping = Job("x", "stopping", ([("event", {"kind": "go"}), ("wait_for_stop", 60)],))
    bad = Job("b", "bad", ([("event", {"kind": "bogus"}), ("event", {"kind": "a"})],))
    good = Job("g", "good", ([("event", {"kind": "a"})],))
    callbacks = Recorder(stop_on="go", refuse="bogus")
    _run(new_actor, [stopping, bad, good], callbacks)
    assert ("stopped", "stopping") in callbacks.calls
    assert "unknown event kind 'bogus'" in str(callbacks.errors["bad"])
    assert ("finished", "good") in callbacks.calls


def test_the_session_refuses_an_event_of_unknown_kind():
    from orchestrator.session import RunSession

    with pytest.raises(ValueError, match="unknown kind 'bogus'; known kinds: start, init"):
        RunSession.event(None, Job("k", "some-run", ()), {"kind": "bogus"})


def test_a_signal_whose_exception_was_swallowed_still_ends_the_loop(new_actor):
    """A SIGTERM landing in a weakref callback loses its KeyboardInterrupt ("Exception
    ignored"); the recorded signal ends the pool's loop at its next turn all the same."""
    from orchestrator.pool import note_interrupt

    class SwallowedSignal(Recorder):
        def event(self, job, event):
            note_interrupt(15)  # what the handler records before its raise is lost
            return super().event(job, event)

    waiting = Job("w", "waiting", ([("event", {"kind": "go"}), ("wait_for_stop", 60)],))
    callbacks = SwallowedSignal()
    with pytest.raises(KeyboardInterrupt, match="signal 15"):
        _run(new_actor, [waiting], callbacks)
    assert callbacks.events["waiting"] == [{"kind": "go"}]
    _run(new_actor, [Job("n", "next", ([("event", {"kind": "a"})],))], Recorder())  # cleared


def test_a_swallowed_signal_prints_no_traceback_and_other_ignored_errors_still_print():
    """The swallowed KeyboardInterrupt of a recorded signal is not printed (the loop re-raises
    it); any other exception Python ignores still is, and everything is restored after."""
    import subprocess
    import sys

    script = """
import signal, sys, weakref
from orchestrator.driver import interrupt_on_signals, stop_ray

class Thing:
    pass

def raise_in_callback(error):
    def callback(ref):
        raise error
    thing = Thing()
    ref = weakref.ref(thing, callback)
    del thing  # Python runs the callback and prints its exception as ignored

# what was there before: a background job starts with SIGINT ignored, a library may set a hook
hook = sys.unraisablehook
on_term, on_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
restore = interrupt_on_signals()
handler = signal.getsignal(signal.SIGTERM)
try:
    handler(15, None)
except KeyboardInterrupt:
    pass
raise_in_callback(KeyboardInterrupt("signal 15"))  # swallowed: the signal was recorded
raise_in_callback(ValueError("an unrelated ignored error"))
stop_ray(False, restore)
assert sys.unraisablehook is hook
assert signal.getsignal(signal.SIGTERM) is on_term
assert signal.getsignal(signal.SIGINT) is on_int
raise_in_callback(KeyboardInterrupt("after the invocation"))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "signal 15" not in out.stderr
    assert "an unrelated ignored error" in out.stderr
    assert "after the invocation" in out.stderr
