"""Experiment configuration: structured OmegaConf dataclasses, validation and run expansion.

``load_config(path, overrides)`` returns a validated :class:`ExperimentConfig` or raises one
:class:`ConfigError` naming the key and what it accepts — before any Ray work starts.
``expand_runs(config)`` turns it into the list of :class:`RunSpec` (method × seed × order).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from learners import ConfigError, ModelConfig, TrainConfig, learner_class
from learners.hparams import as_dict, build_dataclass, check_ranges
from task_streams import StreamConfig, build_stream, validate_stream_config

RUN_KEY_VERSION = 1


@dataclass
class ResourcesConfig:
    """What each run gets and how many run at once."""

    cpus_per_run: float = 1.0
    """CPU slots reserved per run; torch uses this many threads (at least 1)"""
    gpus_per_run: float | None = None
    """GPUs per run: 1, or a fraction (0.5, 0.25) to pack runs on one GPU; 0 forces CPU;
    null = 1 if the cluster has GPUs, else 0"""
    max_concurrent_runs: int = 0
    """upper bound on actors running at once; 0 = as many as the cluster fits"""


@dataclass
class TrackingConfig:
    """Where results go."""

    uri: str | None = None
    """MLflow tracking URI; null = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db"""
    experiment: str | None = None
    """MLflow experiment name; null = the config's name"""
    artifact_location: str | None = None
    """artifact root for a new experiment; null = MLflow's default"""
    flush_interval_s: float = 2.0
    """per-task metrics of a run are written at most this often (and when it ends)"""


@dataclass
class RayConfig:
    """How to reach Ray."""

    address: str | None = None
    """cluster address (ray://host:10001 or host:6379); null = $RAY_ADDRESS, else local"""
    num_cpus: int | None = None
    """CPUs of a locally started Ray instance; null = all cores"""
    num_gpus: int | None = None
    """GPUs of a locally started Ray instance; null = detected"""


@dataclass
class CheckpointConfig:
    """Where runs keep the state needed to resume after their last finished task."""

    dir: str | None = "checkpoints"
    """folder (relative to the working directory, or absolute; shared by all nodes on a
    cluster); null disables checkpoints"""


@dataclass
class ExperimentConfig:
    """One experiment: methods × seeds × task orders on one stream."""

    name: str = "experiment"
    plugins: list[str] = field(default_factory=list)
    """modules to import before building learners/streams (your own ``@register`` methods);
    they must be importable on every Ray node"""
    methods: dict[str, Any] = field(default_factory=dict)
    """label -> hyperparameter overrides; a ``method`` key picks the learner when the label
    is not a method name (e.g. ``ewc_strong: {method: ewc, ewc_lambda: 1e4}``)"""
    seeds: list[int] = field(default_factory=lambda: [0])
    task_orders: list[list[int]] | None = None
    """several presentation orders (each a permutation of the tasks); null = natural order"""
    stream: StreamConfig = field(default_factory=StreamConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)


@dataclass(frozen=True)
class MethodSpec:
    """A validated entry of ``methods``: label, learner name and hyperparameters."""

    label: str
    method: str
    hparams: dict[str, Any]


@dataclass(frozen=True)
class RunSpec:
    """One run: method + hyperparameters, stream (with its task order), seed. Plain data."""

    run_key: str
    label: str
    method: str
    seed: int
    order_index: int
    resolved: dict[str, Any]

    @property
    def run_name(self) -> str:
        suffix = f"-o{self.order_index}" if self.order_index else ""
        return f"{self.label}-s{self.seed}{suffix}"


def _omegaconf_error(err: OmegaConfBaseException) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    message = str(err).splitlines()[0]
    if isinstance(err, ConfigKeyError):
        section = key.rsplit(".", 1)[0] if "." in key else ""
        accepted = _accepted_keys(section)
        return ConfigError(
            f"unknown key {key}; accepted keys{' in ' + section if section else ''}: {accepted}"
        )
    return ConfigError(f"{key}: {message}")


def _accepted_keys(section: str) -> str:
    node: Any = ExperimentConfig
    for part in [p for p in section.split(".") if p]:
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            return "?"
        default = (
            fields[part].default_factory
            if fields[part].default_factory is not dataclasses.MISSING
            else None
        )
        node = type(default()) if default is not None else None
        if node is None or not dataclasses.is_dataclass(node):
            return "?"
    return ", ".join(f.name for f in dataclasses.fields(node))


def load_config(
    source: str | Path | dict[str, Any] | ExperimentConfig | DictConfig | None = None,
    overrides: list[str] | None = None,
) -> ExperimentConfig:
    """Read a YAML file (or dict / config object), apply ``key=value`` overrides, validate."""
    base = OmegaConf.structured(ExperimentConfig)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            user = OmegaConf.load(path)
        except Exception as err:  # yaml errors come in many types
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
        if not isinstance(user, DictConfig):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    elif isinstance(source, ExperimentConfig):
        user = OmegaConf.structured(source)
    elif source is None:
        user = OmegaConf.create({})
    else:
        user = OmegaConf.create(source)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        merged = OmegaConf.merge(base, user, OmegaConf.from_dotlist(list(overrides or [])))
        config: ExperimentConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _omegaconf_error(err) from None
    validate(config)
    return config


def import_plugins(modules: list[str]) -> None:
    """Import user modules that register learners or streams; ConfigError if one fails."""
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as err:
            raise ConfigError(
                f"plugins: cannot import {name!r} ({type(err).__name__}: {err})"
            ) from None


def method_specs(config: ExperimentConfig) -> list[MethodSpec]:
    """Validate ``methods``: known learners, known hyperparameter keys, types and ranges."""
    if not config.methods:
        raise ConfigError("methods is empty; name at least one method, e.g. methods.finetune={}")
    specs = []
    for label, overrides in config.methods.items():
        overrides = dict(overrides or {})
        method = str(overrides.pop("method", label))
        cls = learner_class(method)
        hparams = build_dataclass(cls.HParams, overrides, prefix=f"methods.{label}.")
        specs.append(MethodSpec(str(label), method, as_dict(hparams)))
    return specs


def validate(config: ExperimentConfig) -> None:
    """Raise ConfigError on the first invalid value anywhere in ``config``."""
    if not config.name or "/" in config.name:
        raise ConfigError(f"name={config.name!r} must be a non-empty string without '/'")
    import_plugins(config.plugins)
    method_specs(config)
    if not config.seeds:
        raise ConfigError("seeds is empty; give at least one seed, e.g. seeds=[0]")
    if len(set(config.seeds)) != len(config.seeds):
        raise ConfigError(f"seeds={list(config.seeds)} has duplicates")
    try:
        stream = validate_stream_config(config.stream)
        for order in config.task_orders or []:
            validate_stream_config(dataclasses.replace(stream, task_order=list(order)))
        # Building it once here catches missing or malformed data files and sample counts the
        # data cannot supply, before any actor starts (milliseconds for the bundled sources).
        build_stream(stream, seed=int(config.seeds[0]))
    except (ValueError, TypeError, OSError) as err:
        raise ConfigError(
            str(err) if str(err).startswith("stream.") else f"stream: {err}"
        ) from None
    check_ranges(config.model, "model.")
    check_ranges(config.train, "train.")
    r = config.resources
    if r.cpus_per_run <= 0:
        raise ConfigError(f"resources.cpus_per_run={r.cpus_per_run} must be > 0")
    # a run trains on one device: a whole GPU or a share of one
    if r.gpus_per_run is not None and not 0 <= r.gpus_per_run <= 1:
        raise ConfigError(
            f"resources.gpus_per_run={r.gpus_per_run} is not accepted; expected 0 (CPU), "
            "1, or a fraction such as 0.5 or 0.25 to pack several runs on one GPU"
        )
    if config.tracking.flush_interval_s < 0:
        raise ConfigError(
            f"tracking.flush_interval_s={config.tracking.flush_interval_s} must be >= 0"
        )
    if r.max_concurrent_runs < 0:
        raise ConfigError(f"resources.max_concurrent_runs={r.max_concurrent_runs} must be >= 0")


def run_key(resolved: dict[str, Any]) -> str:
    """Stable 16-hex-digit hash of a run's fully resolved config."""
    payload = json.dumps({"v": RUN_KEY_VERSION, **resolved}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def expand_runs(config: ExperimentConfig) -> list[RunSpec]:
    """Every (method, seed, order) run of the experiment, in a stable order."""
    orders: list[list[int] | None] = (
        [list(o) for o in config.task_orders] if config.task_orders else [config.stream.task_order]
    )
    model = as_dict(config.model)
    train = as_dict(config.train)
    runs = []
    for spec in method_specs(config):
        for order_index, order in enumerate(orders):
            stream = dataclasses.asdict(config.stream)
            stream["task_order"] = order
            for seed in config.seeds:
                resolved = {
                    "label": spec.label,
                    "method": spec.method,
                    "hparams": spec.hparams,
                    "stream": stream,
                    "model": model,
                    "train": train,
                    "seed": int(seed),
                }
                runs.append(
                    RunSpec(
                        run_key(resolved), spec.label, spec.method, int(seed), order_index, resolved
                    )
                )
    return runs


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested dicts to dotted keys with string values (MLflow params)."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat


def to_yaml(config: ExperimentConfig) -> str:
    """The resolved config as YAML."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))
