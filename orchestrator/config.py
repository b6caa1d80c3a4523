"""Experiment configuration: structured OmegaConf dataclasses, validation and run expansion.

``load_config(path, overrides)`` returns a validated :class:`ExperimentConfig` or raises one
:class:`ConfigError` naming the key and what it accepts — before any Ray work starts.
``expand_runs(config)`` turns it into the list of :class:`RunSpec` (method × seed × order).
"""

from __future__ import annotations

import contextvars
import dataclasses
import importlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    InterpolationResolutionError,
    OmegaConfBaseException,
)

from learners import ConfigError, MetaTrainingConfig, ModelConfig, TrainConfig, learner_class
from learners.hparams import as_dict, build_dataclass, check_ranges, hp
from task_streams import StreamConfig, build_stream, validate_stream_config

REUSE_MODES = ("same-code", "any", "none")
"""which finished runs stand for a config's runs: same config, seed and code; the same
whatever the code; none"""


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
class RetryConfig:
    """What happens when Ray loses a run (its worker, actor or node died)."""

    max_retries: int = hp(3, help="re-dispatches of a run whose worker, actor or node died", low=0)
    backoff_s: float = hp(1.0, help="seconds before the first retry; doubles each time", low=0.0)
    backoff_max_s: float = hp(30.0, help="longest wait between retries, in seconds", low=0.0)


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
    meta_training: MetaTrainingConfig = field(default_factory=MetaTrainingConfig)
    """the phase before the stream of meta-trained methods (lstm_meta); ignored by others"""
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)
    retries: RetryConfig = field(default_factory=RetryConfig)


@dataclass(frozen=True)
class MethodSpec:
    """A validated entry of ``methods``: label, learner name and hyperparameters."""

    label: str
    method: str
    hparams: dict[str, Any]


@dataclass(frozen=True)
class RunSpec:
    """One run: method + hyperparameters, stream (with its task order), seed. Plain data.

    ``run_key``, ``config_key`` and ``instance_key`` are explained in orchestrator/identity.py.
    """

    run_key: str
    label: str
    method: str
    seed: int
    order_index: int
    resolved: dict[str, Any]
    config_key: str = ""
    instance_key: str = ""
    code_hash: str = ""

    @property
    def run_name(self) -> str:
        suffix = f"-o{self.order_index}" if self.order_index else ""
        return f"{self.label}-s{self.seed}{suffix}"


# examples shown in type errors, where the syntax is the hard part (others: the default)
_EXAMPLES = {
    "seeds": "[0,1]",
    "task_orders": "[[0,1,2],[2,0,1]]",
    "plugins": "[my_methods]",
    "methods": "{finetune: {}}",
    "stream.task_order": "[2,0,1]",
}


def _omegaconf_error(
    err: Exception, culprit: str | None = None, given: str | None = None
) -> ConfigError:
    """One ConfigError for an OmegaConf merge/conversion error: the key and what it accepts.

    ``culprit`` is the top-level key or override key being merged when the error happened
    (OmegaConf sometimes reports a key relative to a nested node, or none); ``given`` the
    value as the user wrote it, when known.
    """
    full_key = str(getattr(err, "full_key", None) or "")
    key = full_key if full_key and (not culprit or _same_root(full_key, culprit)) else culprit
    key = key or "?"
    message = str(err).splitlines()[0]
    if isinstance(err, ConfigKeyError):
        section = key.rsplit(".", 1)[0] if "." in key else ""
        accepted = _accepted_keys(section)
        return ConfigError(
            f"unknown key {key}; accepted keys{' in ' + section if section else ''}: {accepted}"
        )
    if isinstance(err, InterpolationResolutionError):
        return ConfigError(f"{key}: {message}")
    # a value of the wrong type (or null where a value is required): say what the key takes
    field_key = re.sub(r"\[[^\]]*\]", "", key)
    found = _field_type(field_key)
    if found is None and culprit:
        field_key = re.sub(r"\[[^\]]*\]", "", culprit)
        found = _field_type(field_key)
    if found is None:
        return ConfigError(f"{key}: {message}")
    tp, default = found
    example = _EXAMPLES.get(field_key)
    if example is None and isinstance(default, list) and default:
        example = json.dumps(default, separators=(",", ":"))
    text = f"{field_key} must be {describe_type(tp)}"
    if example:
        text += f", e.g. {field_key}={example}"
    if given is not None:
        given = given if given.strip() else "nothing"
        if culprit and culprit.startswith(field_key + "."):  # e.g. train.lr.x=1 for train.lr
            given = f"{culprit}={given}"
        text += f"; got {given}"
    elif key != field_key:
        text += f" ({message.rstrip('.')} at {key})"
    return ConfigError(text)


def _same_root(key: str, other: str) -> bool:
    """Both dotted keys start with the same top-level key (``model.hidden[0]``, ``model``)."""
    return re.split(r"[.\[]", key)[0] == re.split(r"[.\[]", other)[0]


def describe_type(tp: Any) -> str:
    """What a config field of type ``tp`` accepts, in words (``list[int]``: a list of integers)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        inner_text = describe_type(inner[0]) if len(inner) == 1 else "a value"
        return inner_text.replace("a non-empty string", "a string") + " or null"
    if typing.get_origin(tp) is list:
        return "a list of " + _plural(args[0] if args else Any)
    if typing.get_origin(tp) is dict or tp is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    return {
        str: "a non-empty string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
    }.get(tp, "a value")


def _plural(tp: Any) -> str:
    if typing.get_origin(tp) is list:
        return "lists of " + _plural(typing.get_args(tp)[0])
    return {str: "strings", int: "integers", float: "numbers", bool: "booleans"}.get(tp, "values")


def _field_type(key: str) -> tuple[Any, Any] | None:
    """(type, default) of the config field at dotted ``key``; None if there is none."""
    node: Any = _SCHEMA.get()
    tp: Any = None
    default: Any = None
    for part in [p for p in key.split(".") if p]:
        if not dataclasses.is_dataclass(node):
            return None
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            return None
        tp = typing.get_type_hints(node)[part]
        f = fields[part]
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None if f.default is dataclasses.MISSING else f.default
        node = tp
    return (tp, default) if tp is not None else None


def _accepted_keys(section: str) -> str:
    node: Any = _SCHEMA.get()
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


_SCHEMA: contextvars.ContextVar[type] = contextvars.ContextVar("schema", default=ExperimentConfig)
"""the structured config being loaded, for error messages that list keys and types"""

# what OmegaConf raises on a value it cannot merge or convert (TypeError: e.g. a list merged
# into a mapping); ConfigError (a ValueError) from a dataclass's __post_init__ passes through
_MERGE_ERRORS = (OmegaConfBaseException, TypeError, ValueError)


def _merge(base: DictConfig, user: DictConfig, overrides: list[str]) -> ExperimentConfig:
    """Merge the file, then each override, so an error is pinned on the key that caused it."""
    try:
        merged = OmegaConf.merge(base, user)
    except _MERGE_ERRORS as err:
        culprit = None
        for key in user:
            try:
                OmegaConf.merge(base, OmegaConf.masked_copy(user, [str(key)]))
            except _MERGE_ERRORS:
                culprit = str(key)
                break
        given = None
        if culprit is not None:
            # the value as written, at the most precise key the error names
            full_key = str(getattr(err, "full_key", None) or "")
            path = full_key if full_key and _same_root(full_key, culprit) else culprit
            path = re.sub(r"\[[^\]]*\]", "", path)
            value = OmegaConf.select(user, path, default=None)
            if isinstance(value, (DictConfig, ListConfig)):
                value = OmegaConf.to_container(value)
            given = "null" if value is None else json.dumps(value, default=str)
        raise _omegaconf_error(err, culprit, given) from None
    for item in overrides:
        key, raw = (part.strip() for part in item.split("=", 1))
        try:
            dotlist = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as err:
            raise _omegaconf_error(err, key, raw) from None
        except Exception as err:  # the YAML parser's errors come in many types
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML ({first}); quote lists and "
                "mappings for the shell, with a space after each colon, e.g. 'seeds=[0,1]' or "
                "'train.lr={type: log, low: 0.0001, high: 0.1}'"
            ) from None
        try:
            merged = OmegaConf.merge(merged, dotlist)
        except ConfigError:
            raise
        except _MERGE_ERRORS as err:
            # a list given where a mapping was (or the reverse) replaces it, where the schema
            # allows either (a search range written as [low, high] over {type: ...}, say)
            if not _replace_container(merged, key, OmegaConf.select(dotlist, key)):
                _refuse_key_inside_list(merged, key, raw)
                raise _omegaconf_error(err, key, raw) from None
    try:
        return OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except _MERGE_ERRORS as err:
        raise _omegaconf_error(err) from None


def _refuse_key_inside_list(merged: DictConfig, key: str, raw: str) -> None:
    """ConfigError when ``key`` (an override's) names a field inside a list, as
    ``sweep.space.beta.high`` where ``sweep.space.beta`` is ``[0.001, 1.0]``."""
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:end])
        try:
            node = OmegaConf.select(merged, prefix, default=None)
        except _MERGE_ERRORS:
            continue
        if isinstance(node, ListConfig):
            shown = json.dumps(OmegaConf.to_container(node), separators=(",", ":"))
            raise ConfigError(
                f"override {key}={raw}: {prefix} is a list ({shown}), which has no key "
                f"{parts[end]!r}; set it whole, e.g. {prefix}={shown}"
            )
        if node is not None:
            return


def _replace_container(merged: DictConfig, key: str, value: Any) -> bool:
    """Set ``key`` to ``value`` without merging, when both the old and the new value are
    containers of different kinds; False when that is not the case or the schema refuses."""
    try:
        old = OmegaConf.select(merged, key, default=None)
    except _MERGE_ERRORS:  # the path runs through a list (a.b.c with b a list)
        return False
    containers = (DictConfig, ListConfig)
    if not (isinstance(old, containers) and isinstance(value, containers)):
        return False
    if isinstance(old, DictConfig) == isinstance(value, DictConfig):
        return False
    try:
        OmegaConf.update(merged, key, OmegaConf.to_container(value), merge=False)
    except _MERGE_ERRORS:
        return False
    return True


def load_config(
    source: str | Path | dict[str, Any] | ExperimentConfig | DictConfig | None = None,
    overrides: list[str] | None = None,
    *,
    schema: type[ExperimentConfig] = ExperimentConfig,
) -> ExperimentConfig:
    """Read a YAML file (or dict / config object), apply ``key=value`` overrides, validate.

    ``schema`` is the structured config to merge into: ExperimentConfig, or a subclass that
    adds sections (``lia sweep``'s ``sweep:``); its error messages name keys the same way.
    """
    token = _SCHEMA.set(schema)
    try:
        return _load(source, overrides, schema)
    finally:
        _SCHEMA.reset(token)


def _load(
    source: str | Path | dict[str, Any] | ExperimentConfig | DictConfig | None,
    overrides: list[str] | None,
    schema: type[ExperimentConfig],
) -> ExperimentConfig:
    base = OmegaConf.structured(schema)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            raise ConfigError(f"config file {str(path)!r} is a folder; expected a YAML file")
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
    config = _merge(base, user, list(overrides or []))
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
    if any(not isinstance(p, str) or not p.strip() for p in config.plugins):
        raise ConfigError(
            f"plugins={_show(config.plugins)} is not accepted; plugins must be a list of "
            "module names, e.g. plugins=[my_methods]"
        )
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
        info = build_stream(stream, seed=int(config.seeds[0])).info
    except (ValueError, TypeError, OSError) as err:
        raise ConfigError(
            str(err) if str(err).startswith("stream.") else f"stream: {err}"
        ) from None
    # every section: declared ranges (hp() fields), and every float finite (no nan / inf)
    for section in dataclasses.fields(config):
        value = getattr(config, section.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, f"{section.name}.")
    for spec in method_specs(config):  # a method that cannot learn this stream, said why
        data = "+".join(stream.domains) if stream.domains else stream.source
        where = f"methods.{spec.label} on stream {stream.name} ({data})"
        cls = learner_class(spec.method)
        cls.check_scenario(info.scenario, where)
        cls.check_setup(info, config.meta_training, where, model=config.model)
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
    if config.checkpoints.dir is not None and not config.checkpoints.dir.strip():
        raise ConfigError(
            "checkpoints.dir is empty; give a folder path, or null to disable checkpoints"
        )
    validate_ray(config.ray)


def validate_ray(ray_config: RayConfig) -> None:
    """Static checks of the ``ray`` section (reachability is checked by the preflight)."""
    if ray_config.num_cpus is not None and ray_config.num_cpus < 1:
        raise ConfigError(
            f"ray.num_cpus={ray_config.num_cpus} is not accepted; expected an integer >= 1, "
            "or null for all cores"
        )
    if ray_config.num_gpus is not None and ray_config.num_gpus < 0:
        raise ConfigError(
            f"ray.num_gpus={ray_config.num_gpus} is not accepted; expected an integer >= 0, "
            "or null to detect the GPUs"
        )
    if ray_config.address is not None:
        parse_ray_address(ray_config.address, "ray.address")


RAY_ADDRESS_FORMS = (
    "host:port (e.g. head:6379), ray://host:port (e.g. ray://head:10001), auto or local"
)


def parse_ray_address(address: str, key: str = "ray.address") -> tuple[str, int] | None:
    """(host, port) of a Ray address to connect to; None for ``auto`` and ``local``.

    ConfigError (naming ``key``) when it is none of: ``host:port``, ``ray://host:port``,
    ``auto``, ``local``.
    """
    text = address.strip()
    if text in ("auto", "local"):
        return None
    rest = text[len("ray://") :] if text.startswith("ray://") else text
    host, sep, port = rest.rstrip("/").rpartition(":")
    host = host.strip("[]")
    if not sep and text.startswith("ray://") and rest and "/" not in rest:
        host, port = rest, "10001"  # the Ray client's default port
    if not host or "/" in host or "://" in text[len("ray://") :] or not port.isdigit():
        raise ConfigError(f"{key}={address!r} is not accepted; expected {RAY_ADDRESS_FORMS}")
    if not 0 < int(port) < 65536:
        raise ConfigError(f"{key}={address!r}: port {port} is out of range; expected 1-65535")
    return host, int(port)


def _show(value: Any) -> str:
    """A config value as it would be written in an override."""
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=str, separators=(",", ":"))
    return str(value)


def expand_runs(config: ExperimentConfig) -> list[RunSpec]:
    """Every (method, seed, order) run of the experiment, in a stable order."""
    orders: list[list[int] | None] = (
        [list(o) for o in config.task_orders] if config.task_orders else [config.stream.task_order]
    )
    from orchestrator import identity

    model = as_dict(config.model)
    train = as_dict(config.train)
    runs = []
    seen: dict[str, str] = {}
    for spec in method_specs(config):
        code = identity.code_hash(spec.method)
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
                if learner_class(spec.method).META_TRAINED:  # others: keys unchanged
                    resolved["meta_training"] = as_dict(config.meta_training)
                instance = identity.instance_key(resolved)
                if seen.setdefault(instance, spec.label) != spec.label:
                    raise ConfigError(
                        f"methods.{seen[instance]} and methods.{spec.label} are the same "
                        "configuration; give one of them a different setting or remove it"
                    )
                runs.append(
                    RunSpec(
                        identity.run_key(resolved, code),
                        spec.label,
                        spec.method,
                        int(seed),
                        order_index,
                        resolved,
                        config_key=identity.config_key(resolved),
                        instance_key=instance,
                        code_hash=code,
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
    """The resolved config as YAML, every URL's password replaced by ``***`` (it is logged)."""
    from orchestrator.net import redact

    def scrub(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: scrub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [scrub(v) for v in value]
        return redact(value) if isinstance(value, str) and "://" in value else value

    container = OmegaConf.to_container(OmegaConf.structured(config), resolve=True)
    return OmegaConf.to_yaml(OmegaConf.create(scrub(container)))
