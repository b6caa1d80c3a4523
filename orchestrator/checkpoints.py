"""Per-task checkpoints of a run, keyed by its run key, so an interrupted run resumes.

After each finished task the actor writes ``<dir>/<run_key>/latest.pt``: the learner's full
``state_dict()`` and every event the run has produced so far (plain Python). ``dir`` is a local
folder or an fsspec URI (``s3://bucket/ckpt``): see ``learners/storage.py``. It is written
atomically (a crash mid-write leaves the previous checkpoint intact) and loads with
``torch.load(weights_only=True)``: no arbitrary unpickling. Every actor must reach it (a
shared filesystem or an object store on a cluster).
"""

from __future__ import annotations

import logging
from typing import Any

from learners import storage

log = logging.getLogger(__name__)

FILENAME = "latest.pt"


PHASES = "phases"


def phase_dir(root: str) -> str:
    """Where finished and partial phases (meta-training) are kept, by their own key: shared by
    every run and sweep trial with the same phase, and kept after the runs finish (delete it to
    compute them again)."""
    return storage.join(root, PHASES)


def run_dir(root: str, run_key: str) -> str:
    """The folder (or URI prefix) holding one run's checkpoint."""
    return storage.join(root, run_key)


def save(root: str, run_key: str, learner_state: dict, events: list[dict]) -> str:
    """Atomically write the checkpoint after the last event in ``events``; returns its path."""
    path = storage.join(run_dir(root, run_key), FILENAME)
    storage.save({"format": 1, "learner": learner_state, "events": events}, path)
    return path


def load(root: str, run_key: str) -> dict[str, Any] | None:
    """The run's checkpoint, or None if it has none (an unreadable one is ignored, logged)."""
    path = storage.join(run_dir(root, run_key), FILENAME)
    try:
        return storage.load(path)
    except FileNotFoundError:
        return None
    except Exception as err:  # a corrupt file must not block a fresh start
        log.warning("ignoring unreadable checkpoint %s: %s", path, err)
        return None


def remove(root: str, run_key: str) -> None:
    """Delete a run's checkpoint folder (once its results are safely in MLflow)."""
    storage.remove(run_dir(root, run_key))
