"""The driver: expand configs into runs, run them on Ray actors, log to MLflow, report.

Python API::

    from orchestrator import run_experiment, load_experiment
    runs = run_experiment("configs/quickstart.yaml", ["seeds=[0,1]"])
    same = load_experiment("quickstart")
"""

from orchestrator.api import load_experiment, run_experiment

__all__ = ["load_experiment", "run_experiment"]
