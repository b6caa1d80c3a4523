"""Declaring hyperparameters once: defaults, accepted ranges and search spaces in a dataclass.

A learner's hyperparameters are a dataclass whose fields are made with :func:`hp`. That single
declaration drives config validation (type and range), CLI overrides (OmegaConf merges into
the dataclass), documentation (``help``) and, later, Optuna search spaces (``search``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration value was wrong; the message names the key and what is accepted."""


def hp(
    default: Any,
    *,
    help: str,
    low: float | None = None,
    high: float | None = None,
    gt: float | None = None,
    choices: Sequence[Any] | None = None,
    search: tuple[float, float] | Sequence[Any] | None = None,
    log: bool = False,
) -> Any:
    """A hyperparameter field: default, accepted range or choices, and an optional search space.

    ``low``/``high`` bound the accepted values (inclusive), ``gt`` is an exclusive lower bound
    (``gt=0.0``: strictly positive); float values must also be finite. ``search`` is the
    sub-range (or list of choices) a tuner should explore, sampled log-uniformly when ``log``
    is true.
    """
    if gt is not None and low is not None:
        raise ValueError("hp(): give low (inclusive) or gt (exclusive), not both")
    metadata = {
        "help": help,
        "low": low,
        "high": high,
        "gt": gt,
        "choices": choices,
        "search": search,
        "log": log,
    }
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def describe_range(f: dataclasses.Field) -> str:
    """Human-readable description of what a field accepts."""
    meta = f.metadata
    if meta.get("choices") is not None:
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    low, high, gt = meta.get("low"), meta.get("high"), meta.get("gt")
    if gt is not None and high is not None:
        return f"a value in ({_num(gt)}, {_num(high)}]"
    if low is not None and high is not None:
        return f"a value in [{_num(low)}, {_num(high)}]"
    if gt is not None:
        return f"a value > {_num(gt)}"
    if low is not None:
        return f"a value >= {_num(low)}"
    if high is not None:
        return f"a value <= {_num(high)}"
    return f"a value of type {getattr(f.type, '__name__', f.type)}"


def _num(x: float) -> str:
    """A bound as people write it: 0 rather than 0.0, 0.9 as is."""
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(x)


def check_ranges(obj: Any, prefix: str = "") -> None:
    """Raise ConfigError for the first field of dataclass ``obj`` outside its declared range."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        meta = f.metadata
        key = f"{prefix}{f.name}"
        if meta.get("choices") is not None and value not in meta["choices"]:
            raise ConfigError(f"{key}={value!r} is not accepted; expected {describe_range(f)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            expected = describe_range(f)
            if expected.startswith("a value of type"):
                expected = "a finite number"
            else:
                expected = expected.replace("a value", "a finite value", 1)
            raise ConfigError(f"{key}={value!r} is not accepted; expected {expected}")
        low, high, gt = meta.get("low"), meta.get("high"), meta.get("gt")
        if (
            (low is not None and value < low)
            or (gt is not None and value <= gt)
            or (high is not None and value > high)
        ):
            raise ConfigError(f"{key}={value!r} is out of range; expected {describe_range(f)}")


def build_dataclass(cls: type, values: Mapping[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys, types and ranges.

    Unknown keys, values of the wrong type and out-of-range values raise one ConfigError that
    names the key (with ``prefix``) and what is accepted.
    """
    values = dict(values or {})
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            accepted = ", ".join(names) if names else "(none: this takes no settings)"
            raise ConfigError(f"unknown key {prefix}{key}; accepted keys: {accepted}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), values)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
        field = next((f for f in dataclasses.fields(cls) if f.name == str(key).split(".")[0]), None)
        accepted = describe_range(field) if field is not None else ""
        given = values.get(str(key).split(".")[0], "?")
        raise ConfigError(
            f"{prefix}{key}={given!r} has the wrong type; expected {accepted}"
        ) from None
    check_ranges(obj, prefix)
    return obj


def as_dict(obj: Any) -> dict[str, Any]:
    """Plain-dict view of a hyperparameter dataclass (for logging and run keys)."""
    return dataclasses.asdict(obj)
