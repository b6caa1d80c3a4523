"""Per-task checkpoints of a run, keyed by its run key, so an interrupted run resumes.

After each finished task the actor writes ``<dir>/<run_key>/latest.pt``: the learner's full
``state_dict()`` and every event the run has produced so far (plain Python). The file is
written to a temporary name and renamed, so a crash mid-write leaves the previous checkpoint
intact, and it loads with ``torch.load(weights_only=True)``: no arbitrary unpickling.
The folder must be reachable by every actor (a shared filesystem on a cluster).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from learners.meta import atomic_save

log = logging.getLogger(__name__)

FILENAME = "latest.pt"


PHASES = "phases"


def phase_dir(root: str | Path) -> Path:
    """Where finished and partial phases (meta-training) are kept, by their own key: shared by
    every run and sweep trial with the same phase, and kept after the runs finish (delete it to
    compute them again)."""
    return Path(root) / PHASES


def run_dir(root: str | Path, run_key: str) -> Path:
    """The folder holding one run's checkpoint."""
    return Path(root) / run_key


def save(root: str | Path, run_key: str, learner_state: dict, events: list[dict]) -> Path:
    """Atomically write the checkpoint after the last event in ``events``."""
    folder = run_dir(root, run_key)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILENAME
    atomic_save({"format": 1, "learner": learner_state, "events": events}, path)
    return path


def load(root: str | Path, run_key: str) -> dict[str, Any] | None:
    """The run's checkpoint, or None if it has none (an unreadable one is ignored, logged)."""
    path = run_dir(root, run_key) / FILENAME
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # a corrupt file must not block a fresh start
        log.warning("ignoring unreadable checkpoint %s: %s", path, err)
        return None


def remove(root: str | Path, run_key: str) -> None:
    """Delete a run's checkpoint folder (once its results are safely in MLflow)."""
    shutil.rmtree(run_dir(root, run_key), ignore_errors=True)
