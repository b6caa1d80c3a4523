"""Leases: one invocation at a time computes a given run, whatever else runs beside it.

A lease is an exclusive ``flock`` on ``<root>/<run_key>.lock``, held by the driver while it
computes that run (and until the run's checkpoint is gone). The operating system drops it
when the process exits, however it exits — a SIGKILLed driver frees its leases at once, so
there is no expiry to tune. The file records who holds it, for messages.

The root is ``<checkpoints.dir>/.leases`` (beside the checkpoints the lease protects), so
every invocation sharing checkpoints shares leases; on a cluster that folder is on the
shared filesystem. Lock files are never deleted while in use: deleting a lock file another
process has open would let two holders lock two different files.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any


class Lease:
    """A held lease; :meth:`release` (or process exit) frees it."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


class LeaseStore:
    """Leases by key under one folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.lock"

    def try_acquire(self, key: str, owner: dict[str, Any] | None = None) -> Lease | None:
        """The lease on ``key`` if nobody holds it, else None (never blocks)."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.time(),
            **(owner or {}),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        return Lease(path, fd)

    def holder(self, key: str) -> dict[str, Any]:
        """What the lease file says about its last holder ({} if unknown)."""
        try:
            return json.loads(self.path(key).read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def is_held(self, key: str) -> bool:
        """Whether some process holds ``key``'s lease right now."""
        if not self.path(key).exists():
            return False
        lease = self.try_acquire(key)
        if lease is None:
            return True
        lease.release()
        return False
