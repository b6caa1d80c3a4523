"""The Python API for scripting comparisons: run a config, or load an experiment, as a DataFrame."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator.config import ExperimentConfig, load_config
from orchestrator.driver import execute
from orchestrator.report import load_experiment


def run_experiment(
    config: str | Path | dict[str, Any] | ExperimentConfig,
    overrides: list[str] | None = None,
    *,
    progress: bool = False,
    reuse: str = "same-code",
) -> pd.DataFrame:
    """Run a config (YAML path, dict or ExperimentConfig) and return its runs as a DataFrame.

    One row per run of this config, with the columns of :func:`load_experiment` (label,
    method, seed, order, status, ACC, BWT, FWT, forgetting, train_time_s, run_key,
    mlflow_run_id, tasks, random_init, R, error, config_key, config, code_hash, attempts,
    at_chance, params). Runs already finished in MLflow are not re-run (``reuse``: the same
    config, seed and code — ``"same-code"`` —, whatever the code — ``"any"`` —, or never —
    ``"none"``); they appear with status SKIPPED. ``load_experiment`` returns every
    configuration the experiment holds; filtered by this frame's ``config_key`` values it
    holds the same runs.
    """
    return execute(load_config(config, overrides), progress=progress, reuse=reuse).runs


__all__ = ["load_experiment", "run_experiment"]
