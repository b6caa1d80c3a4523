"""Sweeps: Optuna studies on top of the orchestrator — config section and search spaces."""

from sweeps.config import (
    OBJECTIVES,
    SweepConfig,
    SweepExperimentConfig,
    load_sweep_config,
    sweep_spaces,
    tuned_labels,
    validate_sweep,
)
from sweeps.space import (
    Dimension,
    default_space,
    grid_values,
    parse_space,
    suggest,
    to_overrides,
)

__all__ = [
    "OBJECTIVES",
    "Dimension",
    "SweepConfig",
    "SweepExperimentConfig",
    "default_space",
    "grid_values",
    "load_sweep_config",
    "parse_space",
    "suggest",
    "sweep_spaces",
    "to_overrides",
    "tuned_labels",
    "validate_sweep",
]
