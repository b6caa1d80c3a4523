"""The ``sweep:`` section of a config: what to tune, how, and where the study lives.

``load_sweep_config(path, overrides)`` is ``load_config`` with the section added: it returns a
:class:`SweepExperimentConfig` or raises one ConfigError naming the key and what it accepts.
What needs Optuna or the network (the storage, a pruner on a multi-objective study) is checked
by sweeps/study.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from learners import ConfigError, hp
from orchestrator.config import ExperimentConfig, load_config, method_specs
from sweeps import study as studies
from sweeps.space import Dimension, grid_values, label_spaces
from task_streams import build_stream, validate_stream_config
from task_streams.sources import VALIDATION_FRACTION

HELDOUT_SEED_OFFSET = 10_000
"""the heldout protocol tunes on seeds + this: other streams, other initialisations"""

OBJECTIVES: dict[str, str] = {
    "ACC": "maximize",
    "BWT": "maximize",
    "FWT": "maximize",
    "forgetting": "minimize",
    "stored_bytes": "minimize",
    "stored_samples": "minimize",
    "model_parameters": "minimize",
    "train_time_s": "minimize",
}
"""objective name -> the direction Optuna optimises it in"""

SAMPLERS = tuple(studies.SAMPLERS)
PRUNERS = tuple(studies.PRUNERS)
PROTOCOLS = ("full", "heldout", "first_tasks")


@dataclass
class SweepConfig:
    """What a sweep tunes and how: one Optuna study per tuned method label."""

    methods: list[str] = hp([], help="labels of the config's methods to tune; empty = all")
    n_trials: int = hp(20, help="trials per study", low=1)
    space: dict[str, Any] = hp(
        {},
        help="key -> search spec (syntax: sweeps/space.py), for every tuned label; a key naming "
        "a method label holds that label's own keys; empty = each method's hp(search=) defaults",
    )
    objective: list[str] = hp(
        ["ACC"], help="one or two objectives: " + ", ".join(OBJECTIVES) + " (two: Pareto front)"
    )
    sampler: str = hp("tpe", help="Optuna sampler", choices=SAMPLERS)
    sampler_seed: int = hp(0, help="the sampler's seed")
    pruner: str = hp("median", help="Optuna pruner (single-objective studies)", choices=PRUNERS)
    prune_from_task: int = hp(
        1,
        help="median / percentile prune from this task index on (0 = after the first task; "
        "1, the default, waits until forgetting can show)",
        low=0,
    )
    seeds_per_trial: int = hp(
        1, help="runs per trial, on the first seeds of `seeds`; its value is their mean", low=1
    )
    protocol: str = hp(
        "full",
        help="full: tune on the evaluation stream; heldout: on a derived validation stream; "
        "first_tasks: on the first `first_tasks` tasks only",
        choices=PROTOCOLS,
    )
    first_tasks: int = hp(2, help="tasks the first_tasks protocol tunes on", low=1)
    storage: str | None = hp(
        None,
        help="Optuna storage: null = sqlite:///optuna.db here; a journal file (.log, "
        ".journal) or an RDB URL (postgresql://...)",
    )
    study_name: str | None = hp(None, help="null = <config name>-<label>")


@dataclass
class SweepExperimentConfig(ExperimentConfig):
    """An experiment plus the ``sweep:`` section that tunes it."""

    sweep: SweepConfig = field(default_factory=SweepConfig)


def load_sweep_config(
    source: str | Path | dict[str, Any] | ExperimentConfig | DictConfig | None = None,
    overrides: list[str] | None = None,
) -> SweepExperimentConfig:
    """Read a config with a ``sweep:`` section, apply overrides, validate all of it."""
    config = load_config(source, overrides, schema=SweepExperimentConfig)
    validate_sweep(config)
    return config


def tuned_labels(config: SweepExperimentConfig) -> list[str]:
    """The method labels the sweep tunes (``sweep.methods``, or every label)."""
    return list(config.sweep.methods) or [spec.label for spec in method_specs(config)]


def sweep_spaces(config: SweepExperimentConfig) -> dict[str, dict[str, Dimension]]:
    """Each tuned label's search space: the shared keys of ``sweep.space`` plus the label's
    own section there (:func:`sweeps.space.label_spaces`), or its method's default."""
    methods = {spec.label: spec.method for spec in method_specs(config)}
    return label_spaces(config.sweep.space, methods, tuned_labels(config))


def _check_validation_stream(config: SweepExperimentConfig) -> None:
    """heldout: the validation stream (the training pool split in two) must supply the
    stream's sample counts; built once here, before any work, as load_config builds the
    evaluation stream."""
    try:
        stream = replace(validate_stream_config(config.stream), evaluate_on="validation")
        build_stream(stream, seed=int(config.seeds[0]) + HELDOUT_SEED_OFFSET)
    except (ValueError, TypeError, OSError) as err:
        raise ConfigError(
            f"sweep.protocol=heldout tunes on a validation stream (the training pool split "
            f"{1 - VALIDATION_FRACTION:.0%} / {VALIDATION_FRACTION:.0%}), and {err}"
        ) from None


def validate_sweep(config: SweepExperimentConfig) -> None:
    """Raise ConfigError on the first invalid value of the ``sweep`` section."""
    sweep = config.sweep
    labels = [spec.label for spec in method_specs(config)]
    for label in sweep.methods:
        if label not in labels:
            raise ConfigError(
                f"sweep.methods: {label!r} is not a label of methods; accepted labels: "
                f"{', '.join(labels)}"
            )
    if len(set(sweep.methods)) != len(sweep.methods):
        raise ConfigError(f"sweep.methods={list(sweep.methods)} has duplicates")
    accepted = ", ".join(OBJECTIVES)
    unknown = [name for name in sweep.objective if name not in OBJECTIVES]
    if unknown:
        raise ConfigError(
            f"sweep.objective: unknown objective {unknown[0]!r}; accepted: {accepted}"
        )
    if not 1 <= len(sweep.objective) <= 2 or len(set(sweep.objective)) != len(sweep.objective):
        raise ConfigError(
            f"sweep.objective={list(sweep.objective)} is not accepted; expected one or two "
            f"different objectives of {accepted}, e.g. sweep.objective=[ACC,stored_bytes]"
        )
    if sweep.protocol == "first_tasks" and sweep.first_tasks >= config.stream.num_tasks:
        raise ConfigError(
            f"sweep.first_tasks={sweep.first_tasks} must be less than stream.num_tasks="
            f"{config.stream.num_tasks} for protocol first_tasks"
        )
    if sweep.protocol == "heldout":
        _check_validation_stream(config)
    if sweep.seeds_per_trial > len(config.seeds):
        raise ConfigError(
            f"sweep.seeds_per_trial={sweep.seeds_per_trial} needs as many seeds in seeds; "
            f"seeds={list(config.seeds)} has {len(config.seeds)}"
        )
    if sweep.study_name is not None and not sweep.study_name.strip():
        raise ConfigError("sweep.study_name is empty; give a name, or null for <name>-<label>")
    spaces = sweep_spaces(config)  # parsing checks every tuned label's space
    if sweep.sampler == "grid":
        for space in spaces.values():
            grid_values(space)
    if sweep.pruner != "none" and list(sweep.objective) != ["ACC"] and len(sweep.objective) == 1:
        raise ConfigError(
            f"sweep.pruner={sweep.pruner} with sweep.objective={list(sweep.objective)}: trials "
            "report their average accuracy after each task, so pruning fits objective ACC "
            "only; use sweep.objective=[ACC] or sweep.pruner=none"
        )
    if "FWT" in sweep.objective and config.stream.scenario == "class":
        raise ConfigError(
            "sweep.objective: FWT is undefined on a class-incremental stream (unseen classes "
            "score 0 by construction); accepted here: "
            + ", ".join(name for name in OBJECTIVES if name != "FWT")
        )
