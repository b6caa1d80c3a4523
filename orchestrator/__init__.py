"""The driver: expand configs into runs, run them on Ray actors, log to MLflow, report.

Python API::

    from orchestrator import run_experiment, load_experiment
    runs = run_experiment("configs/quickstart.yaml", ["seeds=[0,1]"])
    same = load_experiment("quickstart")

The API is imported on first use, so Ray actors that import ``orchestrator.runner`` do not
pay for MLflow, pandas and rich (about 2 s of start-up per actor).
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_experiment", "run_experiment"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from orchestrator import api

        return getattr(api, name)
    raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
