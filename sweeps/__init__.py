"""Sweeps: Optuna studies on top of the orchestrator (coming with the sweeps issue)."""
