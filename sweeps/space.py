"""Search spaces: the ``sweep.space`` syntax, the default space from ``hp(search=...)``, Optuna.

A space maps keys to dimensions. A key is a hyperparameter of the tuned method
(``ewc_lambda``), a ``train.*`` field (``train.lr``), a ``model.*`` field (``model.dropout``)
or, for a meta-trained method (lstm_meta), a ``meta_training.*`` field
(``meta_training.lr``).
Each key takes one of:

- ``{type: float | log | int | int_log, low: x, high: y}``: a range, bounds inclusive; ``log``
  is a float sampled log-uniformly, ``int_log`` an integer sampled log-uniformly (low > 0).
- ``{type: categorical, choices: [a, b, ...]}``: one of the listed values.
- ``[low, high]``: two numbers, a range of the field's own type (float or int), log-scaled
  when the field declares ``log=True`` (as ``ewc_lambda``, ``train.lr``, ``buffer_size``).
- ``[a, b, c, ...]``: any other list (three or more values, one value, or strings / booleans):
  the choices of a categorical.

Keys of train.* and model.* may also be nested (``train: {lr: ...}``), which is what an
override such as ``sweep.space.train.lr=[0.001,0.1]`` makes.

Without ``type`` a mapping is read like the short forms: ``choices`` makes it categorical,
``low``/``high`` a range of the field's type. An empty space means the default space: every
field declared with ``search=`` in the method's dataclass, in TrainConfig and in ModelConfig
(and in MetaTrainingConfig for a meta-trained method).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import optuna
from omegaconf import OmegaConf

from learners import ConfigError, MetaTrainingConfig, ModelConfig, TrainConfig, learner_class
from learners.hparams import check_ranges, describe_range
from orchestrator.config import describe_type

KINDS = ("float", "log", "int", "int_log", "categorical")
SECTIONS = {"train": TrainConfig, "model": ModelConfig, "meta_training": MetaTrainingConfig}
"""config sections a space key may name; meta_training only for meta-trained methods"""
GRID_MAX_INT_VALUES = 20
_SPEC_KEYS = ("type", "low", "high", "choices")
_SCALARS = (bool, int, float, str)


@dataclass(frozen=True)
class Dimension:
    """One searched key: a numeric range (float, log, int, int_log) or categorical choices."""

    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None


@dataclass(frozen=True)
class _Target:
    """The config field a space key sets: its dataclass, field and Python type."""

    cls: type
    field: dataclasses.Field
    type: type


def _targets(method: str) -> dict[str, _Target]:
    """Every searchable key of ``method``: its hyperparameters, then train.*, then model.*."""
    learner = learner_class(method)
    sections = [("", learner.HParams)]
    applies = {"train": learner.TRAINS_ON_STREAM, "meta_training": learner.META_TRAINED}
    sections += [(f"{name}.", cls) for name, cls in SECTIONS.items() if applies.get(name, True)]
    targets = {}
    for prefix, cls in sections:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] in _SCALARS:
                targets[prefix + f.name] = _Target(cls, f, hints[f.name])
    return targets


def default_space(method: str) -> dict[str, Dimension]:
    """The space declared with ``hp(search=..., log=...)`` for ``method``, train.* and model.*."""
    space = {}
    for key, target in _targets(method).items():
        search = target.field.metadata.get("search")
        if search is None:
            continue
        if isinstance(search, tuple) and len(search) == 2:
            space[key] = Dimension(key, _range_kind(target), search[0], search[1])
        else:
            space[key] = Dimension(key, "categorical", choices=tuple(search))
    return space


def _range_kind(target: _Target) -> str:
    """A range's kind for a field: its type (int or float), log-scaled as it declares."""
    log = bool(target.field.metadata.get("log"))
    if target.type is int:
        return "int_log" if log else "int"
    return "log" if log else "float"


def parse_space(
    raw: Mapping[str, Any], method: str, label: str, where: str = "sweep.space"
) -> dict[str, Dimension]:
    """The space ``raw`` (``sweep.space``) for ``label``'s method, checked; empty = default.

    ``where`` is the config path the keys are named under in errors (``sweep.space``, or
    ``sweep.space.<label>`` for a label's own section)."""
    if not raw:
        return default_space(method)
    targets = _targets(method)
    space = {}
    for key, spec in _flatten_sections(raw).items():
        if key not in targets:
            raise ConfigError(
                f"{where}.{key} is not a searchable key of method {method} (label "
                f"{label}); accepted keys: {', '.join(targets)}"
            )
        space[key] = _dimension(key, spec, targets[key], where)
    return space


def label_spaces(
    raw: Mapping[str, Any], methods: Mapping[str, str], tuned: list[str]
) -> dict[str, dict[str, Dimension]]:
    """Each tuned label's space from a ``sweep.space`` that may give labels their own keys.

    A key of ``raw`` naming a label of ``methods`` is that label's own section (``ewc:
    {ewc_lambda: [1, 10000]}``); the other keys are shared by every tuned label. A label's
    space is the shared keys plus its own (its own win); where both are empty, its method's
    default space. Sections of labels the sweep does not tune are checked all the same."""
    shared = {k: v for k, v in raw.items() if k not in methods}
    own = {k: v for k, v in raw.items() if k in methods}
    for label, section in own.items():
        if not isinstance(section, Mapping):
            raise ConfigError(
                f"sweep.space.{label}={section!r}: {label!r} is a method label, so its entry is "
                "that label's own space, a mapping of key -> search spec, e.g. "
                f"sweep.space.{label}.train.lr=[0.0001,0.01]"
            )
    spaces = {}
    for label in dict.fromkeys([*tuned, *own]):
        space = parse_space(shared, methods[label], label) if shared else {}
        if own.get(label):
            space.update(parse_space(own[label], methods[label], label, f"sweep.space.{label}"))
        spaces[label] = space or default_space(methods[label])
    return {label: spaces[label] for label in tuned}


def _flatten_sections(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``{train: {lr: spec}}`` (what the override sweep.space.train.lr=... makes) as train.lr."""
    flat = {}
    for key, spec in raw.items():
        if key in SECTIONS and isinstance(spec, Mapping):
            flat.update({f"{key}.{name}": value for name, value in spec.items()})
        else:
            flat[str(key)] = spec
    return flat


def _dimension(key: str, spec: Any, target: _Target, where: str = "sweep.space") -> Dimension:
    """One checked Dimension from a user's spec for ``key``."""
    name = f"{where}.{key}"
    if isinstance(spec, Mapping):
        unknown = [str(k) for k in spec if k not in _SPEC_KEYS]
        if unknown:
            raise ConfigError(
                f"unknown key {name}.{unknown[0]}; accepted keys: {', '.join(_SPEC_KEYS)}"
            )
        kind = spec.get("type")
        if kind is None:
            kind = "categorical" if "choices" in spec else _range_kind(target)
        if kind not in KINDS:
            raise ConfigError(
                f"{name}.type={kind!r} is not accepted; expected one of {', '.join(KINDS)}"
            )
        if kind == "categorical":
            if "low" in spec or "high" in spec:
                raise ConfigError(f"{name}: a categorical takes choices, not low/high")
            return _categorical(name, key, spec.get("choices"), target)
        if "choices" in spec or "low" not in spec or "high" not in spec:
            raise ConfigError(f"{name}: type {kind} takes low and high (not choices)")
        return _range(name, key, kind, spec["low"], spec["high"], target)
    if isinstance(spec, (list, tuple)):
        numbers = all(_is_number(v) for v in spec)
        if len(spec) == 2 and numbers:
            return _range(name, key, _range_kind(target), spec[0], spec[1], target)
        return _categorical(name, key, spec, target)
    raise ConfigError(
        f"{name}={spec!r} is not accepted; expected {{type: float|log|int|int_log, low: x, "
        "high: y}, {type: categorical, choices: [...]}, [low, high] or a list of choices"
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _range(name: str, key: str, kind: str, low: Any, high: Any, target: _Target) -> Dimension:
    """A checked numeric Dimension: bounds fit the field's type and accepted range."""
    if target.type not in (int, float):
        raise ConfigError(
            f"{name}: {key} is not a number ({describe_range(target.field)}); give it as "
            "{type: categorical, choices: [...]}"
        )
    if target.type is int and kind not in ("int", "int_log"):
        raise ConfigError(
            f"{name}: {key} is an integer; use type int or int_log with integer bounds, "
            f"e.g. {{type: int_log, low: {low}, high: {high}}}"
        )
    if target.type is float and kind not in ("float", "log"):
        raise ConfigError(f"{name}: {key} is a float; use type float or log")
    for bound in (low, high):
        if not _is_number(bound) or (kind in ("int", "int_log") and not isinstance(bound, int)):
            expected = "integers" if kind in ("int", "int_log") else "numbers"
            raise ConfigError(f"{name}: bounds of type {kind} must be {expected}; got {bound!r}")
    if low > high:
        raise ConfigError(f"{name}: low={low} is greater than high={high}")
    if kind in ("log", "int_log") and low <= 0:
        raise ConfigError(f"{name}: type {kind} needs low > 0; got low={low}")
    for what, bound in (("low", low), ("high", high)):
        _check_accepted(name, key, what, bound, target)
    if kind in ("float", "log"):
        low, high = float(low), float(high)
    return Dimension(key, kind, low, high)


def _categorical(name: str, key: str, choices: Any, target: _Target) -> Dimension:
    """A checked categorical Dimension: every choice is a value the field accepts."""
    if not isinstance(choices, (list, tuple)) or not choices:
        raise ConfigError(f"{name}: a categorical needs a non-empty list of choices")
    for choice in choices:
        fits = (
            isinstance(choice, target.type)
            and not (isinstance(choice, bool) and target.type is not bool)
        ) or (target.type is float and _is_number(choice))
        if not fits:
            raise ConfigError(
                f"{name}: choice {choice!r} is not accepted by {key}; expected "
                f"{describe_type(target.type)}"
            )
        _check_accepted(name, key, "choice", choice, target)
    if target.type is float:
        choices = [float(c) for c in choices]
    return Dimension(key, "categorical", choices=tuple(choices))


def _check_accepted(name: str, key: str, what: str, value: Any, target: _Target) -> None:
    """ConfigError unless ``key`` accepts ``value`` (its hp() range or choices)."""
    try:
        check_ranges(dataclasses.replace(target.cls(), **{target.field.name: value}))
    except ConfigError:
        raise ConfigError(
            f"{name}: {what} {value!r} is not accepted by {key}; expected "
            f"{describe_range(target.field)}"
        ) from None


def suggest(trial: optuna.Trial, space: Mapping[str, Dimension]) -> dict[str, Any]:
    """The trial's value for every dimension (Optuna parameter names are the keys)."""
    params = {}
    for key, dim in space.items():
        if dim.kind == "categorical":
            params[key] = trial.suggest_categorical(key, list(dim.choices or ()))
        elif dim.kind in ("int", "int_log"):
            log = dim.kind == "int_log"
            params[key] = trial.suggest_int(key, int(dim.low), int(dim.high), log=log)
        else:
            log = dim.kind == "log"
            params[key] = trial.suggest_float(key, float(dim.low), float(dim.high), log=log)
    return params


def to_overrides(label: str, params: Mapping[str, Any]) -> list[str]:
    """``key=value`` overrides for load_config: method keys go under ``methods.<label>``."""
    overrides = []
    for key, value in params.items():
        path = key if key.split(".")[0] in SECTIONS else f"methods.{label}.{key}"
        overrides.append(f"{path}={_format(value)}")
    return overrides


def _format(value: Any) -> str:
    """``value`` as an override's right-hand side that OmegaConf parses back to it exactly."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    text = str(value)
    if isinstance(value, str) and _parse_value(text) != value:
        return json.dumps(value)
    return text


def _parse_value(text: str) -> Any:
    """What OmegaConf reads from an override's right-hand side (None if it cannot)."""
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([f"value={text}"]))["value"]
    except Exception:  # the YAML parser's errors come in many types
        return None


def grid_values(space: Mapping[str, Dimension]) -> dict[str, list[Any]]:
    """The search space as Optuna's GridSampler takes it (categorical and small int ranges)."""
    grid = {}
    for key, dim in space.items():
        if dim.kind == "categorical":
            grid[key] = list(dim.choices or ())
        elif dim.kind in ("int", "int_log"):
            count = int(dim.high) - int(dim.low) + 1
            if count > GRID_MAX_INT_VALUES:
                raise ConfigError(
                    f"sweep.space.{key}: the grid sampler takes int ranges of at most "
                    f"{GRID_MAX_INT_VALUES} values, this one has {count}; give it as "
                    "{type: categorical, choices: [...]}"
                )
            grid[key] = list(range(int(dim.low), int(dim.high) + 1))
        else:
            raise ConfigError(
                f"grid needs categorical or int dimensions; give sweep.space.{key} as "
                "{type: categorical, choices: [...]}"
            )
    return grid
