"""Stream builders: deterministic ``(StreamConfig, seed) -> TaskStream`` functions, and validation.

Every random choice (which samples a task draws, pixel permutations, noise) comes from a
``torch.Generator`` seeded from ``(seed, builder, purpose, task index)``; the global RNGs are never
touched. A task's content depends only on the seed, the config and its natural position, so a
task order (``stream.task_order``) reorders the same tasks and a longer stream starts with the
same tasks as a shorter one.

Builders (``stream.name``):

- ``permuted`` (domain-incremental; ``scenario: task`` gives the task identity): task 0 shows
  the original images, task t >= 1 applies its own random pixel permutation (the same spatial
  permutation for every channel).
- ``rotated`` (domain-incremental, or ``scenario: task``): task t rotates its images
  counterclockwise by the t-th of ``num_tasks`` angles evenly spaced over [min_angle,
  max_angle] (bilinear, zero padding).
- ``split``: classes 0..num_tasks*classes_per_task-1 in natural groups (0,1 | 2,3 | ...);
  scenario task or class keeps labels, domain relabels each class to its position in its group.
- ``noisy_clean`` (domain-incremental, 2 tasks): "noisy" (Gaussian pixel noise) then "clean",
  trained on disjoint samples; both are tested on the same test samples.
- ``domains`` (domain-incremental, or ``scenario: task``): one task per entry of
  ``stream.domains``, each a built-in source (mnist5k, digits, fashion_mnist; all of one input
  shape) shown as is, rotated (``<source>:rot<degrees>``) or with its own random pixel
  permutation (``<source>:perm``), in one label space, e.g. [mnist5k, fashion_mnist,
  mnist5k:rot90]. ``stream.num_tasks`` is the list's length; ``stream.source`` is not used.

Each task samples ``train_per_task`` training and ``test_per_task`` test samples without
replacement from the source's pools (0 takes all of them, shuffled); different tasks may reuse
the same base samples (as in GEM), except in ``noisy_clean``. With ``evaluate_on=validation``
the pools are the two parts of a fixed split of the source's training pool, and the source's
test pool is never read.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from task_streams.base import Task, TaskStream
from task_streams.config import (
    SOURCES,
    SPLIT_SCENARIOS,
    STREAM_BUILDERS,
    StreamConfig,
    register_stream,
)
from task_streams.sources import SourceData, load_source, validation_view

CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(StreamConfig))
KNOWN_NUM_CLASSES = {"mnist5k": 10, "digits": 10, "fashion_mnist": 10}
"""Classes of the bundled sources, so split configs can be checked without loading data."""
KNOWN_INPUT_SHAPES = {"mnist5k": (1, 28, 28), "digits": (1, 8, 8), "fashion_mnist": (1, 28, 28)}
"""(C, H, W) of the bundled sources, so a domains stream's shapes are checked without loading."""
DOMAIN_ENTRY = re.compile(r"^(?P<source>[A-Za-z0-9_]+)(?::(?P<transform>[^:]*))?$")
DOMAIN_ROTATION = re.compile(r"^rot(?P<angle>[+-]?\d+(?:\.\d+)?)$")
DOMAIN_FORMS = (
    "'<source>', '<source>:rot<degrees>' (rotated counterclockwise, e.g. 'mnist5k:rot90') or "
    "'<source>:perm' (a fixed random pixel permutation), with <source> one of "
    f"{tuple(KNOWN_INPUT_SHAPES)}"
)
"""what an entry of stream.domains may be (for error messages)"""

_TRAIN, _TEST, _PERMUTATION, _NOISE = 1, 2, 3, 4
SHARED_LABEL_SCENARIOS = ("domain", "task")
"""scenarios of the streams whose tasks share one label space (all but split)"""
EVALUATE_ON = ("test", "validation")
"""stream.evaluate_on: the source's test pool, or a validation part of its training pool"""


# ------------------------------------------------------------------------------------ validation


def validate_stream_config(config: StreamConfig | Mapping[str, Any]) -> StreamConfig:
    """Check every field of a stream config; return a normalized copy or raise ValueError."""
    if isinstance(config, StreamConfig):
        values = {key: getattr(config, key) for key in CONFIG_KEYS}
    elif isinstance(config, Mapping):
        unknown = sorted(str(k) for k in config if k not in CONFIG_KEYS)
        if unknown:
            raise ValueError(
                f"stream.{unknown[0]} is not a stream setting (unknown key(s) {unknown}); "
                f"accepted keys: {list(CONFIG_KEYS)}"
            )
        defaults = StreamConfig()
        values = {key: config.get(key, getattr(defaults, key)) for key in CONFIG_KEYS}
    else:
        raise ValueError(
            f"stream: expected a StreamConfig or a mapping, got {type(config).__name__}"
        )

    name = values["name"]
    if not isinstance(name, str) or name not in STREAM_BUILDERS:
        raise ValueError(
            f"stream.name={name!r} is not a known stream builder; expected one of "
            f"{sorted(STREAM_BUILDERS)}"
        )
    source = values["source"]
    if not isinstance(source, str) or source not in SOURCES:
        raise ValueError(
            f"stream.source={source!r} is not a known source; expected one of {SOURCES}"
        )
    path = values["path"]
    if path is not None and not isinstance(path, (str, bytes)) and not hasattr(path, "__fspath__"):
        raise ValueError(f"stream.path={path!r} must be a path string or None")
    path = None if path is None or str(path) == "" else str(path)
    if source in ("idx", "npz") and path is None:
        what = "a folder of MNIST-format IDX files" if source == "idx" else "an .npz file"
        raise ValueError(f"stream.path is required for stream.source={source!r} ({what})")
    if source not in ("idx", "npz") and path is not None:
        raise ValueError(
            f"stream.path={path!r} is only used with stream.source 'idx' or 'npz', not "
            f"{source!r}; leave it unset"
        )

    num_tasks = _integer("num_tasks", values["num_tasks"], 1)
    train_per_task = _integer("train_per_task", values["train_per_task"], 0, "0 takes all")
    test_per_task = _integer("test_per_task", values["test_per_task"], 0, "0 takes all")
    classes_per_task = _integer("classes_per_task", values["classes_per_task"], 1)
    min_angle = _real("min_angle", values["min_angle"])
    max_angle = _real("max_angle", values["max_angle"])
    noise_std = _real("noise_std", values["noise_std"], minimum=0.0)
    if min_angle > max_angle:
        raise ValueError(
            f"stream.min_angle={min_angle} is greater than stream.max_angle={max_angle}; "
            "expected min_angle <= max_angle"
        )

    domains = values["domains"]
    if name == "domains":
        domains = _domains(domains)
        num_tasks = len(domains)
        if source != "mnist5k" or path is not None:
            raise ValueError(
                f"stream.source={source!r} is not used by the domains stream, whose sources are "
                "named in stream.domains (e.g. [fashion_mnist, 'mnist5k:rot90']); leave "
                "stream.source and stream.path unset"
            )
    elif domains is not None:
        raise ValueError(
            f"stream.domains={_show(domains)} is only used by the domains stream, not by "
            f"stream.name={name!r}; leave it unset or set stream.name=domains"
        )

    scenario = values["scenario"]
    if name == "split":
        if scenario is not None and scenario not in SPLIT_SCENARIOS:
            raise ValueError(
                f"stream.scenario={scenario!r} is not a split scenario; expected one of "
                f"{SPLIT_SCENARIOS} (or None for 'task')"
            )
        known = KNOWN_NUM_CLASSES.get(source)
        if known is not None and num_tasks * classes_per_task > known:
            raise ValueError(
                f"stream.num_tasks={num_tasks} x stream.classes_per_task={classes_per_task} = "
                f"{num_tasks * classes_per_task} classes, but source {source!r} has {known}"
            )
    elif scenario not in (None, *SHARED_LABEL_SCENARIOS):
        raise ValueError(
            f"stream.scenario={scenario!r} is not valid for the {name!r} stream, whose tasks "
            "share one label space; expected 'domain' (the default: no task identity at test "
            "time) or 'task' (the task identity is given, as in GEM's permuted MNIST)"
        )
    if name == "noisy_clean" and num_tasks != 2:
        raise ValueError(
            f"stream.num_tasks={num_tasks} is out of range for the 'noisy_clean' stream; it has "
            "exactly 2 tasks (noisy, then clean): set stream.num_tasks=2"
        )

    task_order = values["task_order"]
    if task_order is not None:
        task_order = _task_order(task_order, num_tasks)
    evaluate_on = values["evaluate_on"]
    if evaluate_on not in EVALUATE_ON:
        raise ValueError(
            f"stream.evaluate_on={evaluate_on!r} is not accepted; expected one of {EVALUATE_ON}"
        )

    return StreamConfig(
        name=name,
        source=source,
        path=path,
        num_tasks=num_tasks,
        train_per_task=train_per_task,
        test_per_task=test_per_task,
        scenario=scenario,
        classes_per_task=classes_per_task,
        min_angle=min_angle,
        max_angle=max_angle,
        noise_std=noise_std,
        task_order=task_order,
        evaluate_on=evaluate_on,
        domains=domains,
    )


def _integer(key: str, value: Any, minimum: int, note: str = "") -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(
            f"stream.{key}={value!r} is not an integer; expected an integer >= {minimum}"
        )
    if value < minimum:
        extra = f" ({note})" if note else ""
        raise ValueError(
            f"stream.{key}={value} is out of range; expected an integer >= {minimum}{extra}"
        )
    return int(value)


def _real(key: str, value: Any, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"stream.{key}={value!r} is not a finite number")
    if minimum is not None and value < minimum:
        raise ValueError(f"stream.{key}={value} is out of range; expected a number >= {minimum}")
    return float(value)


def _task_order(order: Any, num_tasks: int) -> list[int]:
    expected = f"expected a permutation of 0..{num_tasks - 1} (stream.num_tasks={num_tasks})"
    if isinstance(order, (str, bytes)) or not isinstance(order, (Sequence, np.ndarray)):
        try:
            order = list(order)  # e.g. omegaconf ListConfig
        except TypeError:
            raise ValueError(f"stream.task_order={order!r} is not a list; {expected}") from None
    items = list(order)
    if any(isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in items):
        raise ValueError(f"stream.task_order={items!r} holds non-integers; {expected}")
    items = [int(i) for i in items]
    if sorted(items) != list(range(num_tasks)):
        raise ValueError(f"stream.task_order={items!r} is not a permutation; {expected}")
    return items


def _show(value: Any) -> str:
    """A config value as the user wrote it: lists (omegaconf's too) as plain lists."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return repr(value)
    return repr(list(value))


def parse_domain(entry: str) -> tuple[str, str | None, float]:
    """``(source, transform, angle)`` of a stream.domains entry: transform None, "rot" (by
    ``angle`` degrees) or "perm"; ValueError naming the entry and what is accepted."""
    where = f"stream.domains entry {entry!r}"
    match = DOMAIN_ENTRY.match(entry.strip()) if isinstance(entry, str) else None
    if match is None:
        raise ValueError(f"{where} is not accepted; expected {DOMAIN_FORMS}")
    source, transform = match["source"], match["transform"]
    if source not in KNOWN_INPUT_SHAPES:
        raise ValueError(
            f"{where} names source {source!r}, which is not a built-in source; expected "
            f"{DOMAIN_FORMS}"
        )
    if transform is None:
        return source, None, 0.0
    if transform == "perm":
        return source, "perm", 0.0
    rotation = DOMAIN_ROTATION.match(transform)
    if rotation is None:
        raise ValueError(
            f"{where} has the transform {transform!r}, which is not one of rot<degrees> or "
            f"perm; expected {DOMAIN_FORMS}"
        )
    return source, "rot", float(rotation["angle"])


def _domains(domains: Any) -> list[str]:
    """Check stream.domains for the domains stream: a non-empty list of parseable entries whose
    sources share one input shape; the entries, stripped."""
    example = "e.g. stream.domains=[mnist5k, fashion_mnist, 'mnist5k:rot90']"
    if domains is None:
        raise ValueError(f"stream.domains is required by the domains stream; {example}")
    if isinstance(domains, (str, bytes)) or not hasattr(domains, "__iter__"):
        raise ValueError(f"stream.domains={domains!r} is not a list of entries; {example}")
    entries = list(domains)
    if not entries:
        raise ValueError(f"stream.domains=[] is empty; give one entry per task, {example}")
    shapes: dict[tuple[int, ...], str] = {}  # input shape -> the first entry with it
    for entry in entries:
        shapes.setdefault(KNOWN_INPUT_SHAPES[parse_domain(entry)[0]], entry)
    entries = [entry.strip() for entry in entries]
    if len(shapes) > 1:
        found = "; ".join(f"{entry.strip()!r}: {shape}" for shape, entry in shapes.items())
        raise ValueError(
            f"stream.domains={entries!r} mixes input shapes ({found}); every entry's source "
            "must have the same (C, H, W): "
            + ", ".join(f"{name} {shape}" for name, shape in KNOWN_INPUT_SHAPES.items())
        )
    return entries


# -------------------------------------------------------------------------------------- building


def build_stream(config: StreamConfig | Mapping[str, Any], seed: int) -> TaskStream:
    """Validate ``config`` and build its stream; the same (config, seed) gives identical tensors."""
    checked = validate_stream_config(config)
    return STREAM_BUILDERS[checked.name](checked, _seed(seed))


def _seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed={seed!r} is out of range; expected an integer >= 0")
    return int(seed)


def generator(seed: int, *keys: int) -> torch.Generator:
    """A torch.Generator seeded from (seed, keys) via numpy's SeedSequence (independent streams)."""
    state = np.random.SeedSequence(_seed(seed), spawn_key=keys).generate_state(2, np.uint32)
    return torch.Generator().manual_seed((int(state[0]) << 31) ^ int(state[1]))


def pixel_permutations(num_tasks: int, num_pixels: int, seed: int) -> list[torch.Tensor]:
    """The permuted stream's pixel orders: identity for task 0, random for tasks 1.."""
    perms = [torch.arange(num_pixels)]
    for task in range(1, num_tasks):
        gen = generator(seed, _tag("permuted"), _PERMUTATION, task)
        perms.append(torch.randperm(num_pixels, generator=gen))
    return perms


def permute_pixels(x: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """Reorder the H*W pixel positions of images (N,C,H,W), identically for every channel."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h * w)[:, :, permutation].reshape(n, c, h, w)


def rotate_images(x: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotate float images (N,C,H,W) counterclockwise (as displayed) by ``angle`` degrees.

    Bilinear interpolation, zeros outside the image; multiples of 360 return an exact copy.
    """
    if float(angle) % 360.0 == 0.0:
        return x.clone()
    n, c, h, w = x.shape
    rad = math.radians(angle)
    cos, sin = math.cos(rad), math.sin(rad)
    # Output pixel (u, v) (x right, y down) samples the input at the point rotated by -angle;
    # normalized coordinates scale x by W/2 and y by H/2, hence the aspect factors.
    theta = torch.tensor([[cos, -sin * h / w, 0.0], [sin * w / h, cos, 0.0]], dtype=x.dtype)
    grid = F.affine_grid(theta[None], [1, 1, h, w], align_corners=False)
    out = torch.empty_like(x)
    chunk = 8192  # bounds the temporary memory of grid_sample
    for start in range(0, n, chunk):
        part = x[start : start + chunk]
        out[start : start + chunk] = F.grid_sample(
            part,
            grid.expand(part.shape[0], h, w, 2),  # one grid for every image, not copied
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )
    return out.clamp_(0.0, 1.0)


def _tag(name: str) -> int:
    return zlib.crc32(name.encode())


def _to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 (N,H,W) or (N,C,H,W) -> float32 (N,C,H,W) in [0, 1]."""
    x = x.unsqueeze(1) if x.dim() == 3 else x
    return x.to(torch.float32).div_(255.0)


def _sample(
    requested: int, available: int, gen: torch.Generator, key: str, what: str
) -> torch.Tensor:
    """``requested`` distinct positions in 0..available-1 (all of them, shuffled, for 0)."""
    if available == 0:
        raise ValueError(f"stream.{key}: no samples available for {what}")
    if requested > available:
        raise ValueError(
            f"stream.{key}={requested} exceeds the {available} samples available for {what}; "
            f"use at most {available} (or 0 for all)"
        )
    order = torch.randperm(available, generator=gen)
    return order if requested == 0 else order[:requested]


def _draw(
    config: StreamConfig,
    source: SourceData,
    seed: int,
    builder: str,
    task: int,
    train_rows: torch.Tensor | None = None,
    test_rows: torch.Tensor | None = None,
    what: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one task's uint8 (N,C,H,W) images and labels from the source pools (or rows)."""
    parts = []
    for split, rows, count, key in (
        ("train", train_rows, config.train_per_task, "train_per_task"),
        ("test", test_rows, config.test_per_task, "test_per_task"),
    ):
        x_pool = source.x_train if split == "train" else source.x_test
        y_pool = source.y_train if split == "train" else source.y_test
        available = len(y_pool) if rows is None else len(rows)
        gen = generator(seed, _tag(builder), _TRAIN if split == "train" else _TEST, task)
        label = f"{split}ing{' ' + what if what else ''} in source {source.name!r}"
        picked = _sample(count, available, gen, key, label)
        if rows is not None:
            picked = rows[picked]
        x = x_pool[picked]
        parts += [x.unsqueeze(1) if x.dim() == 3 else x, y_pool[picked]]
    return parts[0], parts[1], parts[2], parts[3]


def _assemble(
    config: StreamConfig,
    seed: int,
    source: SourceData,
    tasks: list[Task],
    scenario: str,
    num_classes: int,
    metadata: dict[str, Any],
    source_name: str | None = None,
) -> TaskStream:
    """Put naturally ordered tasks into presentation order (stream.task_order) and wrap them;
    ``source_name`` names the sources when there are several (default: ``source``'s name)."""
    source_name = source_name or source.name
    order = config.task_order if config.task_order is not None else list(range(len(tasks)))
    ordered = [
        dataclasses.replace(tasks[natural], id=position) for position, natural in enumerate(order)
    ]
    info = {
        "builder": config.name,
        "source": source_name,
        "seed": seed,
        "task_order": list(order),
        "natural_task_names": [t.name for t in tasks],
        "train_per_task": config.train_per_task,
        "test_per_task": config.test_per_task,
    }
    return TaskStream(
        name=f"{config.name}-{source_name}",
        scenario=scenario,
        tasks=ordered,
        input_shape=source.input_shape,
        num_classes=num_classes,
        metadata={**info, **metadata},
    )


_VALIDATION_VIEWS: dict[int, tuple[SourceData, SourceData]] = {}
"""id(source) -> (source, its validation view): made once per loaded source"""


def _source(config: StreamConfig, name: str | None = None) -> SourceData:
    """The source ``name`` (default stream.source), or its validation view (evaluate_on)."""
    source = load_source(config.source, config.path) if name is None else load_source(name)
    if config.evaluate_on != "validation":
        return source
    cached = _VALIDATION_VIEWS.get(id(source))
    if cached is None or cached[0] is not source:
        if len(_VALIDATION_VIEWS) >= 4:
            _VALIDATION_VIEWS.clear()
        cached = _VALIDATION_VIEWS[id(source)] = (source, validation_view(source))
    return cached[1]


@register_stream("permuted")
def build_permuted(config: StreamConfig, seed: int) -> TaskStream:
    """Permuted stream: task 0 original images, task t >= 1 a fixed random pixel permutation."""
    config, seed = validate_stream_config(config), _seed(seed)
    source = _source(config)
    _, h, w = source.input_shape
    perms = pixel_permutations(config.num_tasks, h * w, seed)
    classes = tuple(range(source.num_classes))
    tasks = []
    for t, perm in enumerate(perms):
        x_tr, y_tr, x_te, y_te = _draw(config, source, seed, "permuted", t)
        if t > 0:  # permuting uint8 before conversion moves 4x less memory
            x_tr, x_te = permute_pixels(x_tr, perm), permute_pixels(x_te, perm)
        x_tr, x_te = _to_float(x_tr), _to_float(x_te)
        tasks.append(Task(t, f"perm{t}", x_tr, y_tr, x_te, y_te, classes))
    meta = {"permutation": "task 0 identity; task t>=1 torch.randperm(H*W) seeded per task"}
    return _assemble(
        config, seed, source, tasks, config.scenario or "domain", source.num_classes, meta
    )


def rotation_angles(num_tasks: int, min_angle: float, max_angle: float) -> list[float]:
    """Angles of the rotated stream: evenly spaced over [min, max]; one task uses min_angle."""
    if num_tasks == 1:
        return [float(min_angle)]
    step = (max_angle - min_angle) / (num_tasks - 1)
    return [float(min_angle + step * t) for t in range(num_tasks)]


def _angle_names(angles: list[float]) -> list[str]:
    names = [f"rot{round(a)}" for a in angles]
    if len(set(names)) < len(names):
        names = [f"rot{round(a, 3):g}" for a in angles]
    if len(set(names)) < len(names):
        names = [f"rot{i}_{a:g}" for i, a in enumerate(angles)]
    return names


@register_stream("rotated")
def build_rotated(config: StreamConfig, seed: int) -> TaskStream:
    """Rotated stream: task t rotates its images by the t-th evenly spaced angle."""
    config, seed = validate_stream_config(config), _seed(seed)
    source = _source(config)
    angles = rotation_angles(config.num_tasks, config.min_angle, config.max_angle)
    names = _angle_names(angles)
    classes = tuple(range(source.num_classes))
    tasks = []
    for t, (angle, name) in enumerate(zip(angles, names, strict=True)):
        x_tr, y_tr, x_te, y_te = _draw(config, source, seed, "rotated", t)
        x_tr, x_te = rotate_images(_to_float(x_tr), angle), rotate_images(_to_float(x_te), angle)
        tasks.append(Task(t, name, x_tr, y_tr, x_te, y_te, classes))
    meta = {"angles": dict(zip(names, angles, strict=True))}
    return _assemble(
        config, seed, source, tasks, config.scenario or "domain", source.num_classes, meta
    )


@register_stream("split")
def build_split(config: StreamConfig, seed: int) -> TaskStream:
    """Split stream: task t holds classes t*k..t*k+k-1 (k = classes_per_task)."""
    config, seed = validate_stream_config(config), _seed(seed)
    source = _source(config)
    k, used = config.classes_per_task, config.num_tasks * config.classes_per_task
    if used > source.num_classes:
        raise ValueError(
            f"stream.num_tasks={config.num_tasks} x stream.classes_per_task={k} = {used} classes, "
            f"but source {source.name!r} has {source.num_classes}"
        )
    scenario = config.scenario or "task"
    groups = [tuple(range(t * k, (t + 1) * k)) for t in range(config.num_tasks)]
    relabel = torch.arange(source.num_classes) % k  # class -> position within its group
    tasks = []
    for t, group in enumerate(groups):
        wanted = torch.tensor(group)
        train_rows = torch.nonzero(torch.isin(source.y_train, wanted)).flatten()
        test_rows = torch.nonzero(torch.isin(source.y_test, wanted)).flatten()
        what = f"of classes {list(group)}"
        x_tr, y_tr, x_te, y_te = _draw(
            config, source, seed, "split", t, train_rows, test_rows, what
        )
        x_tr, x_te, classes = _to_float(x_tr), _to_float(x_te), group
        if scenario == "domain":
            y_tr, y_te, classes = relabel[y_tr], relabel[y_te], tuple(range(k))
        name = "split_" + "_".join(str(c) for c in group)
        tasks.append(Task(t, name, x_tr, y_tr, x_te, y_te, classes))
    num_classes = k if scenario == "domain" else used
    meta = {"class_groups": {task.name: list(g) for task, g in zip(tasks, groups, strict=True)}}
    return _assemble(config, seed, source, tasks, scenario, num_classes, meta)


@register_stream("noisy_clean")
def build_noisy_clean(config: StreamConfig, seed: int) -> TaskStream:
    """Two tasks: "noisy" (clipped Gaussian pixel noise) then "clean", disjoint train samples."""
    config, seed = validate_stream_config(config), _seed(seed)
    source = _source(config)
    pool = len(source.y_train)
    per_task = config.train_per_task or pool // 2
    if 2 * per_task > pool or per_task == 0:
        raise ValueError(
            f"stream.train_per_task={config.train_per_task}: the noisy_clean stream trains its two "
            f"tasks on disjoint samples, so it needs 2 x {per_task} but source {source.name!r} "
            f"has {pool} training samples; use at most {pool // 2} (or 0 for half each)"
        )
    tag = _tag("noisy_clean")
    order = torch.randperm(pool, generator=generator(seed, tag, _TRAIN, 0))
    train_parts = (order[:per_task], order[per_task : 2 * per_task])
    test_rows = _sample(
        config.test_per_task,
        len(source.y_test),
        generator(seed, tag, _TEST, 0),
        "test_per_task",
        f"testing in source {source.name!r}",
    )
    x_te, y_te = _to_float(source.x_test[test_rows]), source.y_test[test_rows]
    noise_gen = generator(seed, tag, _NOISE, 0)
    classes = tuple(range(source.num_classes))
    tasks = []
    for t, (name, rows) in enumerate(zip(("noisy", "clean"), train_parts, strict=True)):
        x_tr, y_tr = _to_float(source.x_train[rows]), source.y_train[rows]
        x_test = x_te.clone()
        if name == "noisy":
            x_tr = _add_noise(x_tr, config.noise_std, noise_gen)
            x_test = _add_noise(x_test, config.noise_std, noise_gen)
        tasks.append(Task(t, name, x_tr, y_tr, x_test, y_te.clone(), classes))
    meta = {"noise_std": config.noise_std, "shared_test_samples": True}
    return _assemble(
        config, seed, source, tasks, config.scenario or "domain", source.num_classes, meta
    )


def _add_noise(x: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    return (x + std * noise).clamp_(0.0, 1.0)


def domain_task_names(domains: list[str]) -> list[str]:
    """Task names of a domains stream: ``mnist5k``, ``mnist5k_rot90``, ``digits_perm``; an
    entry used more than once gets its position appended (``digits_perm_0``, ``digits_perm_2``)."""
    names = []
    for entry in domains:
        source, transform, angle = parse_domain(entry)
        suffix = {None: "", "perm": "_perm", "rot": f"_rot{angle:g}"}[transform]
        names.append(source + suffix)
    return [f"{n}_{t}" if names.count(n) > 1 else n for t, n in enumerate(names)]


@register_stream("domains")
def build_domains(config: StreamConfig, seed: int) -> TaskStream:
    """Domains stream: task t shows the source of stream.domains[t], as is, rotated or with its
    own fixed random pixel permutation, in one label space."""
    config, seed = validate_stream_config(config), _seed(seed)
    domains = list(config.domains or [])
    names = domain_task_names(domains)
    sources = {
        name: _source(config, name) for name in dict.fromkeys(parse_domain(d)[0] for d in domains)
    }
    tag = _tag("domains")
    tasks = []
    for t, (entry, name) in enumerate(zip(domains, names, strict=True)):
        source_name, transform, angle = parse_domain(entry)
        source = sources[source_name]
        x_tr, y_tr, x_te, y_te = _draw(config, source, seed, "domains", t)
        if transform == "perm":  # permuting uint8 before conversion moves 4x less memory
            _, h, w = source.input_shape
            perm = torch.randperm(h * w, generator=generator(seed, tag, _PERMUTATION, t))
            x_tr, x_te = permute_pixels(x_tr, perm), permute_pixels(x_te, perm)
        x_tr, x_te = _to_float(x_tr), _to_float(x_te)
        if transform == "rot":
            x_tr, x_te = rotate_images(x_tr, angle), rotate_images(x_te, angle)
        classes = tuple(range(source.num_classes))
        tasks.append(Task(t, name, x_tr, y_tr, x_te, y_te, classes))
    first = sources[parse_domain(domains[0])[0]]
    num_classes = max(s.num_classes for s in sources.values())
    meta = {
        "domains": dict(zip(names, domains, strict=True)),
        "permutation": "each :perm task its own torch.randperm(H*W), seeded per task",
    }
    return _assemble(
        config,
        seed,
        first,
        tasks,
        config.scenario or "domain",
        num_classes,
        meta,
        source_name="+".join(sources),
    )
