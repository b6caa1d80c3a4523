"""Is the process that claimed something still alive? One answer for runs, studies, trials.

A claim records who made it: host, pid, the process's start time (so a reused pid does not
count) and a heartbeat the owner refreshes. On this host the process is looked up; on another
host the heartbeat must be recent.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import psutil

HEARTBEAT_S = 15.0
"""how often a live owner refreshes its heartbeat"""
STALE_AFTER_S = 120.0
"""an owner on another host whose heartbeat is older than this is taken for dead"""


def process_started(pid: int) -> float | None:
    """The start time of process ``pid`` (seconds since the epoch), None if there is none."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, ValueError):
        return None


def owner_record() -> dict[str, str]:
    """Who this process is: host, pid, start time and a first heartbeat (all strings)."""
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": str(pid),
        "pid_started": f"{process_started(pid) or 0:.3f}",
        "heartbeat": f"{time.time():.0f}",
    }


def owner_alive(record: Mapping[str, str], what: str = "its driver") -> tuple[bool, str]:
    """Whether the owner described by ``record`` (see :func:`owner_record`) still runs; why not."""
    if "pid" not in record:
        return False, f"{what} left no liveness record"
    host, pid = record.get("host"), int(record["pid"])
    if host == socket.gethostname():
        started = process_started(pid)
        if started is not None and abs(started - float(record.get("pid_started", 0))) < 1.0:
            return True, ""
        return False, f"{what} (pid {pid} on {host}) is no longer running"
    age = time.time() - float(record.get("heartbeat", 0))
    if age < STALE_AFTER_S:
        return True, ""
    return False, f"{what} on {host} sent no heartbeat for {age:.0f} s"
