"""Run results as a pandas DataFrame, their aggregation per configuration, and summary tables.

A *configuration* is everything that defines a run except its seed, its task order and its
label (a name, not a setting): runs of one configuration, those sharing a ``config_key``, are
what the tables average over. A run without a config key (frames built by hand, old
experiments without params) falls back to grouping by its label. Each configuration has a
display name (:func:`config_names`): its bare label when the label has one configuration in
the frame, else the label plus the params that tell its configurations apart, e.g.
``finetune (train.lr=0.05)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from learners.metrics import RMatrix

METRICS = ("ACC", "BWT", "FWT", "forgetting")
CONTINUAL = ("stability_gap", "min_acc", "recency_bias")
"""continual-evaluation metrics (learners/metrics.py): reported when a run has them"""
RESOURCES = ("model_parameters", "model_bytes", "stored_samples", "stored_bytes")
"""a run's size after its last task (``Learner.resources()``): the model, and what the method
stores besides it (replay buffer, importance weights, old models); reported when a run has them"""
RUN_COLUMNS = (
    "label",
    "method",
    "seed",
    "order",
    "status",
    "scenario",
    *METRICS,
    *CONTINUAL,
    "train_time_s",
    *RESOURCES,
    "run_key",
    "mlflow_run_id",
    "tasks",
    "random_init",
    "R",
    "error",
    "config_key",
    "config",
    "code_hash",
    "attempts",
    "at_chance",
    "params",
)
NON_CSV_COLUMNS = ("R", "random_init", "tasks", "params")
"""Columns holding lists or dicts: left out of ``runs.csv`` (see :func:`runs_table`)."""
DONE = ("FINISHED", "SKIPPED")
NOT_CONFIG_PARAMS = frozenset({"label", "seed", "stream.task_order"})
"""Params that vary inside one configuration (and so are left out of its derived key)."""
NOT_SHOWN_PARAMS = NOT_CONFIG_PARAMS | {"method"}
"""Params never used to tell a label's configurations apart in display names."""
MAX_SHOWN_PARAMS = 3
MAX_VALUE_CHARS = 24


@dataclass
class RunResult:
    """What became of one run."""

    run_key: str
    label: str
    method: str
    seed: int
    order: int
    status: str  # FINISHED | FAILED | SKIPPED (finished earlier)
    mlflow_run_id: str | None
    scenario: str | None = None
    r: RMatrix | None = None
    metrics: dict[str, float | None] | None = None
    train_time_s: float | None = None
    error: str | None = None
    config_key: str | None = None
    code_hash: str | None = None
    params: dict[str, str] | None = None  # the flattened resolved config (MLflow params)
    attempts: int = 1
    at_chance: bool | None = None

    def row(self) -> dict[str, Any]:
        metrics = self.metrics or {}
        return {
            "label": self.label,
            "method": self.method,
            "seed": self.seed,
            "order": self.order,
            "status": self.status,
            "scenario": self.scenario,
            **{m: metrics.get(m) for m in (*METRICS, *CONTINUAL)},
            "train_time_s": self.train_time_s,
            **{m: metrics.get(m) for m in RESOURCES},
            "run_key": self.run_key,
            "mlflow_run_id": self.mlflow_run_id,
            "tasks": self.r.tasks if self.r else None,
            "random_init": self.r.random_init if self.r else None,
            "R": self.r.R if self.r else None,
            "error": self.error,
            "config_key": self.config_key,
            "config": None,  # filled in by runs_frame: it depends on the other runs
            "code_hash": self.code_hash,
            "attempts": self.attempts,
            "at_chance": self.at_chance,
            "params": dict(self.params) if self.params is not None else None,
        }


# ---------------------------------------------------------------------- configurations
def derive_config_key(params: dict[str, str]) -> str:
    """A config key for a run that lacks the ``config_key`` tag (experiments logged before it).

    The 16-hex-digit SHA-256 of its sorted params minus ``label``, ``seed`` and
    ``stream.task_order``, so runs differing only in seed or task order share it.
    """
    kept = {k: str(v) for k, v in sorted(params.items()) if k not in NOT_CONFIG_PARAMS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _config_keys(results: list[RunResult]) -> list[str | None]:
    """Each run's config key: its tag, else derived from its params.

    A run without the tag whose params match those of a tagged run of the same frame gets
    that run's key, so an experiment mixing runs logged before and after the tag existed
    still groups by configuration.
    """
    derived = [derive_config_key(r.params) if r.params else None for r in results]
    adopted = {d: r.config_key for r, d in zip(results, derived, strict=True) if r.config_key and d}
    return [
        r.config_key or (adopted.get(d, d) if d else None)
        for r, d in zip(results, derived, strict=True)
    ]


Group = tuple[str, str]
"""A configuration in a frame: ("key", config_key), or ("label", label) without a key."""


def _labels(frame: pd.DataFrame) -> list[str]:
    return [str(v) for v in frame["label"]] if "label" in frame else ["?"] * len(frame)


def _group_keys(frame: pd.DataFrame) -> list[Group]:
    """Per row, the configuration it belongs to: its config key, else its label."""
    keys = list(frame["config_key"]) if "config_key" in frame else [None] * len(frame)
    return [
        ("label", lab) if _missing(k) else ("key", str(k))
        for lab, k in zip(_labels(frame), keys, strict=True)
    ]


def _key_of(group: Group) -> str | None:
    return group[1] if group[0] == "key" else None


def _short_value(value: Any) -> str:
    if _missing(value):
        return "unset"
    text = str(value)
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        if not text.lstrip("-").isdigit() and math.isfinite(number):
            text = f"{number:.6g}"
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "…"


def _param_order(key: str) -> tuple[int, str]:
    prefixes = ("hparams.", "train.", "model.", "stream.")
    rank = next((i for i, p in enumerate(prefixes) if key.startswith(p)), len(prefixes))
    return rank, key


def config_names(frame: pd.DataFrame) -> pd.Series:
    """Display name of each row's configuration, indexed like ``frame``.

    The bare label when that label has one configuration in the frame; else the label plus
    the params (at most three, hyperparameters first) whose values differ between that
    label's configurations, e.g. ``finetune (train.lr=0.05)``. Seed, label, task order and
    method never count as a difference. Where params cannot tell two configurations apart,
    the name ends with the first 8 digits of the config key, e.g. ``finetune [3f2a9c01]``.
    A configuration whose runs carry several labels (it was renamed) is named after all of
    them, ``old/new``.
    """
    groups = _group_keys(frame)
    params_col = list(frame["params"]) if "params" in frame else [None] * len(frame)
    params: dict[Group, dict[str, str]] = {}
    labels: dict[Group, list[str]] = {}
    for g, p, lab in zip(groups, params_col, _labels(frame), strict=True):
        if g not in params and isinstance(p, dict):
            params[g] = p
        if lab not in labels.setdefault(g, []):
            labels[g].append(lab)
    by_label: dict[str, list[Group]] = {}
    for g, labs in labels.items():
        by_label.setdefault("/".join(labs), []).append(g)
    names: dict[Group, str] = {}
    for label, configs in by_label.items():
        if len(configs) == 1:
            names[configs[0]] = label
            continue
        shown = {k for c in configs for k in params.get(c, {})} - NOT_SHOWN_PARAMS
        differing = sorted(
            (k for k in shown if len({str(params.get(c, {}).get(k)) for c in configs}) > 1),
            key=_param_order,
        )
        for c in configs:
            if c not in params or not differing:
                names[c] = f"{label} [{(_key_of(c) or 'no key')[:8]}]"
                continue
            parts = [f"{k}={_short_value(params[c].get(k))}" for k in differing[:MAX_SHOWN_PARAMS]]
            more = ", …" if len(differing) > MAX_SHOWN_PARAMS else ""
            names[c] = f"{label} ({', '.join(parts)}{more})"
        taken = [names[c] for c in configs]
        for c in configs:
            if taken.count(names[c]) > 1:
                names[c] = f"{names[c]} [{(_key_of(c) or 'no key')[:8]}]"
    return pd.Series([names[g] for g in groups], index=frame.index, dtype=object)


def _names(frame: pd.DataFrame) -> list[str]:
    """The frame's ``config`` column when it names each configuration once, else recomputed.

    A frame filtered from a larger one keeps the names it was given (they say which of the
    label's configurations it holds); frames concatenated by hand get fresh, unique names.
    """
    groups = _group_keys(frame)
    if "config" in frame and len(frame):
        given = list(frame["config"])
        if not any(_missing(v) for v in given):
            pairs = set(zip(groups, map(str, given), strict=True))
            if len(pairs) == len({g for g, _ in pairs}) == len({n for _, n in pairs}):
                return [str(v) for v in given]
    return [str(v) for v in config_names(frame)]


def runs_frame(results: list[RunResult]) -> pd.DataFrame:
    """One row per run with its metrics, R matrix, configuration key and display name."""
    rows = [r.row() for r in results]
    for row, key in zip(rows, _config_keys(results), strict=True):
        row["config_key"] = key
    frame = pd.DataFrame(rows, columns=list(RUN_COLUMNS))
    if len(frame):
        frame["config"] = config_names(frame).to_numpy()
    return frame


def runs_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The csv-safe columns of a runs frame, for ``runs.csv``.

    Leaves out the list and dict columns (R, random_init, tasks, params) and keeps only the
    last line of each ``error`` (the full traceback is the run's ``error.txt`` artifact).
    """
    table = frame.drop(columns=[c for c in NON_CSV_COLUMNS if c in frame])
    if "error" in table:
        table = table.assign(error=[last_error_line(e) for e in table["error"]])
    return table


def last_error_line(error: Any) -> str | None:
    """The last non-empty line of an error text (its exception), at most 300 characters."""
    if _missing(error) or not str(error).strip():
        return None
    return str(error).strip().splitlines()[-1].strip()[:300]


def run_name(row: pd.Series | dict[str, Any]) -> str:
    """``label-s<seed>``, with ``-o<order>`` for task orders after the first (as in MLflow)."""
    label = str(row.get("label", "?"))
    seed = row.get("seed")
    order = row.get("order")
    name = label if _missing(seed) else f"{label}-s{int(seed)}"
    if not _missing(order) and int(order):
        name += f"-o{int(order)}"
    return name


# ---------------------------------------------------------------------- R matrices
def _matrix(value: Any) -> np.ndarray | None:
    """A 2-D float array of an R-like cell, or None when missing, empty or ragged."""
    if value is None or isinstance(value, float):
        return None
    try:
        array = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        return None
    return array if array.ndim == 2 and array.size else None


def _full_shape(group: pd.DataFrame) -> tuple[int, int] | None:
    """The shape of a complete R in this configuration: that of its finished runs' longest R."""
    if "R" not in group:
        return None
    done = group["status"].isin(DONE) if "status" in group else pd.Series(True, group.index)
    for candidates in (group[done], group):
        shapes = [m.shape for m in map(_matrix, candidates["R"]) if m is not None]
        if shapes:
            rows = max(s[0] for s in shapes)
            return next(s for s in shapes if s[0] == rows)
    return None


def _stackable(group: pd.DataFrame) -> pd.DataFrame:
    """The finished (or skipped) runs of one configuration whose R has the full shape."""
    shape = _full_shape(group)
    if shape is None:
        return group.iloc[0:0]
    statuses = group["status"] if "status" in group else ["FINISHED"] * len(group)
    keep = [
        status in DONE and (m := _matrix(r)) is not None and m.shape == shape
        for status, r in zip(statuses, group["R"], strict=True)
    ]
    return group[keep]


def _short(group: pd.DataFrame) -> pd.DataFrame:
    """Runs (any status) of one configuration whose R has fewer rows than the full one."""
    shape = _full_shape(group)
    if shape is None:
        return group.iloc[0:0]
    keep = [(m := _matrix(r)) is not None and m.shape[0] < shape[0] for r in group["R"]]
    return group[keep]


def _by_config(runs: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(display name, rows) per configuration, in order of first appearance."""
    names = _names(runs)
    groups = _group_keys(runs)
    order: dict[Group, list[int]] = {}
    for position, g in enumerate(groups):
        order.setdefault(g, []).append(position)
    return [(names[rows[0]], runs.iloc[rows]) for rows in order.values()]


def mean_r(runs: pd.DataFrame, name: str) -> tuple[np.ndarray, np.ndarray | None, list[str]] | None:
    """Mean R matrix, mean random-init row and task names of one configuration.

    ``name`` is the display name (the ``config`` column; the ``label`` of :func:`summarize`).
    Only finished or skipped runs with a full-length R are averaged; None when there is none.
    """
    group = dict(_by_config(runs)).get(name)
    if group is None:
        return None
    usable = _stackable(group)
    if usable.empty:
        return None
    R = np.mean([_matrix(r) for r in usable["R"]], axis=0)
    width = R.shape[1]
    inits = []
    if "random_init" in usable:
        for b in usable["random_init"]:
            row = np.asarray(b, dtype=float) if isinstance(b, list | tuple) else None
            if row is not None and row.shape == (width,):
                inits.append(row)
    b = np.mean(inits, axis=0) if inits else None
    tasks = usable["tasks"].iloc[0] if "tasks" in usable else None
    if not isinstance(tasks, list | tuple) or len(tasks) != width:
        tasks = [str(j) for j in range(width)]
    return R, b, [str(t) for t in tasks]


def _per_run(runs: pd.DataFrame, of_r: Any) -> dict[str, np.ndarray]:
    """Per configuration (display name), ``of_r(R)`` of each finished or skipped run with a
    full-length R, stacked (runs, ...); a configuration without any is left out."""
    out: dict[str, np.ndarray] = {}
    if "R" not in runs:
        return out
    for name, group in _by_config(runs):
        usable = _stackable(group)
        if not usable.empty:
            out[name] = np.asarray([of_r(_matrix(R)) for R in usable["R"]])
    return out


def avg_acc_curves(runs: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per configuration (display name), an array (runs, tasks) of the average accuracy on the
    tasks seen after each task (runs as :func:`_per_run` keeps them)."""
    return _per_run(runs, lambda R: [R[i, : i + 1].mean() for i in range(R.shape[0])])


def forgetting_per_task(runs: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per configuration (display name), an array (runs, tasks − 1) of each task's forgetting
    at the end of the stream (``learners.metrics``'s definition: its best accuracy before the
    last task minus its final accuracy). Same runs as :func:`avg_acc_curves`."""
    from learners.metrics import RMatrix, compute_metrics

    def forgetting(R: np.ndarray) -> list[float]:
        width = R.shape[1]  # "class": forgetting needs no random-init row
        r = RMatrix([str(j) for j in range(width)], [0.0] * width, R.tolist())
        return compute_metrics(r, "class").forgetting_per_task

    curves = _per_run(runs, forgetting)
    return {name: values for name, values in curves.items() if values.size}


def size_points(runs: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per configuration (display name), an array (runs, 3) of each finished (or skipped)
    run's final ACC, ``model_bytes`` and ``stored_bytes``; runs missing any of them are left
    out, and so is a configuration without any run left."""
    out: dict[str, np.ndarray] = {}
    columns = ["ACC", "model_bytes", "stored_bytes"]
    if not set(columns) <= set(runs.columns):
        return out
    for name, group in _by_config(runs):
        status = group["status"] if "status" in group else pd.Series("FINISHED", group.index)
        values = group.loc[status.isin(DONE), columns].astype(float).dropna()
        if len(values):
            out[name] = values.to_numpy()
    return out


def stream_description(runs: pd.DataFrame) -> str:
    """``split digits, class-IL, 5 tasks`` from the runs' params (the first run's)."""
    params = next((p for p in runs.get("params", []) if isinstance(p, dict)), None) or {}
    name = params.get("stream.name", "")
    source = params.get("stream.source", "")
    parts = [f"{name} {source}".strip() or "stream"]
    scenario = params.get("stream.scenario")
    if scenario in (None, "", "None"):  # the stream's default: the run records the scenario
        scenario = next((s for s in runs.get("scenario", []) if isinstance(s, str)), None)
    if scenario:
        parts.append(f"{scenario}-IL")
    if params.get("stream.num_tasks"):
        parts.append(f"{params['stream.num_tasks']} tasks")
    return ", ".join(parts)


# ---------------------------------------------------------------------- summary
def ci95(values: np.ndarray) -> float:
    """Half-width of the 95% Student-t interval of the mean of ``values``; NaN below 2."""
    n = len(values)
    if n < 2:
        return float("nan")
    return float(stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n))


SUMMARY_EXTRA = (
    "ACC_best",
    "ACC_p_vs_best",
    "ACC_pairs",
    "failed",
    "failed_runs",
    "errors",
    "short",
    "short_runs",
    "at_chance",
    "config_key",
)
SUMMARY_COLUMNS = (
    "label",
    "method",
    "n",
    *(f"{m}_{s}" for m in (*METRICS, *CONTINUAL) for s in ("mean", "std", "ci95")),
    *(f"{m}_mean" for m in RESOURCES),
    *SUMMARY_EXTRA,
)


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration, in order of first appearance.

    ``label`` is the configuration's display name (:func:`config_names`); ``n`` counts its
    finished (or skipped) runs, whose metrics give the mean / std / 95% CI half-width columns
    and the mean of each size after the last task (``model_bytes_mean``, … of RESOURCES).
    Then ``failed`` (count) with ``failed_runs`` (run names such as ``ewc-s1``) and
    ``errors`` (their last error lines, "" where unknown); ``short`` (count) with
    ``short_runs``: runs of any status whose R has fewer rows than the configuration's full
    R, left out of curves and heatmaps; ``at_chance``: finished runs flagged at chance; and
    ``config_key``. A configuration whose every run failed has a row with ``n`` = 0.
    """
    rows = []
    finished: list[pd.DataFrame] = []
    for name, every in _by_config(runs):
        status = every["status"] if "status" in every else pd.Series("FINISHED", every.index)
        group = every[status.isin(DONE)]
        key = _key_of(_group_keys(every.iloc[:1])[0])
        row: dict[str, Any] = {"label": name, "method": every["method"].iloc[0], "n": len(group)}
        for m in (*METRICS, *CONTINUAL, *RESOURCES):
            values = group[m].dropna().to_numpy(dtype=float) if m in group else np.array([], float)
            row[f"{m}_mean"] = float(values.mean()) if len(values) else float("nan")
            if m not in RESOURCES:  # sizes: the mean only
                row[f"{m}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
                row[f"{m}_ci95"] = ci95(values)
        failed = every[status == "FAILED"]
        row["failed"] = len(failed)
        row["failed_runs"] = [run_name(r) for _, r in failed.iterrows()]
        row["errors"] = [last_error_line(r.get("error")) or "" for _, r in failed.iterrows()]
        short = _short(every) if "R" in every else every.iloc[0:0]
        row["short"] = len(short)
        row["short_runs"] = [run_name(r) for _, r in short.iterrows()]
        flagged = group["at_chance"] if "at_chance" in group else pd.Series([], dtype=object)
        row["at_chance"] = sum(not _missing(v) and str(v).lower() == "true" for v in flagged)
        row["config_key"] = key
        rows.append(row)
        finished.append(group)
    _compare_with_best(rows, finished)
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


SIGNIFICANCE = 0.05
"""a configuration whose paired p-value against the best is at least this is marked as not
significantly different from the best"""


def paired_p_value(ours: np.ndarray, best: np.ndarray) -> float:
    """Two-sided p-value of a paired sign-flip permutation test of mean(ours − best) = 0.

    Exact (all 2^n sign patterns) up to n = 13 pairs; with n pairs the smallest attainable
    p-value is 2 / 2^n, so fewer than 6 pairs can never reach 0.05.
    """
    differences = np.asarray(ours, float) - np.asarray(best, float)
    if len(differences) == 0:
        return float("nan")
    if len(differences) < 2 or not np.any(differences):
        return 1.0  # one pair: both sign patterns are as extreme as the one seen
    result = stats.permutation_test(
        (np.asarray(ours, float), np.asarray(best, float)),
        lambda x, y, axis: np.mean(x - y, axis=axis),
        permutation_type="samples",
        vectorized=True,
        n_resamples=9999,
        alternative="two-sided",
        random_state=0,
    )
    return float(result.pvalue)


def _compare_with_best(rows: list[dict[str, Any]], groups: list[pd.DataFrame]) -> None:
    """``ACC_p_vs_best`` and ``ACC_pairs`` of every row: the paired test of its final ACC
    against the configuration with the best mean ACC, runs paired by (seed, task order)."""
    for row in rows:
        row["ACC_best"], row["ACC_p_vs_best"], row["ACC_pairs"] = False, float("nan"), 0
    scored = [i for i, r in enumerate(rows) if not math.isnan(r["ACC_mean"])]
    if len(scored) < 2:
        return
    best = max(scored, key=lambda i: rows[i]["ACC_mean"])
    rows[best]["ACC_best"] = True

    def by_instance(group: pd.DataFrame) -> dict[tuple[Any, Any], float]:
        order = group["order"] if "order" in group else pd.Series(0, index=group.index)
        return {
            (seed, o): float(acc)
            for seed, o, acc in zip(group["seed"], order, group["ACC"], strict=True)
            if not _missing(acc)
        }

    reference = by_instance(groups[best])
    for i in scored:
        ours = by_instance(groups[i])
        shared = sorted(set(ours) & set(reference), key=str)
        rows[i]["ACC_pairs"] = len(shared)
        if i == best:
            rows[i]["ACC_p_vs_best"] = 1.0
        elif shared:
            rows[i]["ACC_p_vs_best"] = paired_p_value(
                np.array([ours[k] for k in shared]), np.array([reference[k] for k in shared])
            )


def _scaled(value: float, units: tuple[tuple[str, float], ...], smallest: str) -> str:
    value = float(f"{value:.3g}")  # rounded first: 999 999 is "1 MB", not "1e+03 kB"
    for unit, scale in units:
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.0f}{smallest}"


def human_bytes(value: float) -> str:
    """``512 B``, ``20.5 kB``, ``1.6 MB``: three significant digits, decimal units (1 kB =
    1000 B)."""
    units = ((" TB", 1e12), (" GB", 1e9), (" MB", 1e6), (" kB", 1e3))
    return _scaled(value, units, " B")


def human_count(value: float) -> str:
    """``830``, ``5.13k``, ``11.2M``: a count with three significant digits."""
    return _scaled(value, (("G", 1e9), ("M", 1e6), ("k", 1e3)), "")


def has_sizes(summary: pd.DataFrame) -> bool:
    """Whether any configuration of ``summary`` has a final model size."""
    return "model_bytes_mean" in summary and bool(summary["model_bytes_mean"].notna().any())


def _size_cells(row: pd.Series) -> list[str]:
    """``model params`` and ``model + memory`` cells of a summary row."""
    params = row.get("model_parameters_mean")
    model, stored = row.get("model_bytes_mean"), row.get("stored_bytes_mean")
    count = "n/a" if _missing(params) else human_count(params)
    if _missing(model):
        return [count, "n/a"]
    if _missing(stored):
        return [count, human_bytes(model)]
    return [count, f"{human_bytes(model)} + {human_bytes(stored)}"]


def _cell(mean: float, std: float, pct: bool = True, compact: bool = False) -> str:
    if math.isnan(mean):
        return "n/a"
    scale = 100.0 if pct else 1.0
    digits, sep = (1, "±") if compact else (2, " ± ")
    if math.isnan(std):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f}{sep}{std * scale:.{digits}f}"


def _count(summary: pd.DataFrame, column: str) -> pd.Series:
    if column not in summary:
        return pd.Series(0, index=summary.index)
    return summary[column].fillna(0).astype(int)


def table_rows(
    summary: pd.DataFrame, spread: str = "std", compact: bool = False
) -> tuple[list[str], list[list[str]]]:
    """Header and string cells in %: mean ± std over seeds, or mean ± 95% CI (``spread="ci95"``).

    A ``failed`` column appears when any run failed, an ``at chance`` column when any
    finished run is flagged at chance level, and, when runs logged their sizes, ``model
    params`` and ``model + memory`` (bytes): the size after the last task, mean over seeds.
    ``compact``: one decimal, short headers and verdicts, and no sizes, for a terminal of 80
    columns.
    """
    failed, chance = _count(summary, "failed"), _count(summary, "at_chance")
    any_failed, any_chance = bool(failed.sum()), bool(chance.sum())
    compared = "ACC_p_vs_best" in summary and int(summary["ACC_p_vs_best"].notna().sum()) > 1
    sizes = not compact and has_sizes(summary)
    short = {"forgetting": "forget"} if compact else {}
    header = [
        "method",
        "n",
        *([("fail" if compact else "failed")] if any_failed else []),
        *([("chance" if compact else "at chance")] if any_chance else []),
        *[(f"{short.get(m, m)} %" if compact else f"{m} (%)") for m in METRICS],
        *([("vs best" if compact else "ACC vs best")] if compared else []),
        *(["model params", "model + memory"] if sizes else []),
    ]
    rows = []
    for i, (_, s) in enumerate(summary.iterrows()):
        extra = [str(failed.iloc[i])] if any_failed else []
        extra += [str(chance.iloc[i])] if any_chance else []
        cells = [_cell(s[f"{m}_mean"], s[f"{m}_{spread}"], compact=compact) for m in METRICS]
        if compared:
            cells.append(_versus_best(s, compact))
        if sizes:
            cells += _size_cells(s)
        rows.append([str(s["label"]), str(int(s["n"])), *extra, *cells])
    return header, rows


def _versus_best(row: pd.Series, compact: bool = False) -> str:
    p, pairs = row["ACC_p_vs_best"], int(row["ACC_pairs"] or 0)
    if bool(row["ACC_best"]):
        return "best"
    if _missing(p):
        return "n/a"
    verdict = "not sig." if p >= SIGNIFICANCE else "worse"
    if compact:  # the p-values are in the report's tables
        return "n.s." if p >= SIGNIFICANCE else "worse"
    return f"{verdict} (p={p:.3g}, {pairs} pair{'s' if pairs != 1 else ''})"


def significance_note(summary: pd.DataFrame) -> str | None:
    """What the "ACC vs best" column means, for the rows of ``summary``; None without it."""
    if "ACC_p_vs_best" not in summary or int(summary["ACC_p_vs_best"].notna().sum()) < 2:
        return None
    best = summary.loc[summary["ACC_best"].astype(bool), "label"].iloc[0]
    pairs = int(summary["ACC_pairs"].max())
    return (
        f"ACC vs best: each configuration's final ACC against the best mean ACC ({best}), a "
        "paired two-sided sign-flip permutation test over the runs the two share (same seed "
        f"and task order); 'not sig.' = p >= {SIGNIFICANCE}: do not read the gap as real. "
        f"With {pairs} pairs the smallest p attainable is {2 / 2**pairs:.3g}"
        + (" — too few seeds to tell any two apart." if 2 / 2**pairs >= SIGNIFICANCE else ".")
    )


ADVISED_SEEDS = 5
"""fewer seeds than this: the report advises more (with 5 seeds the 95% t-interval's
half-width is 1.24 standard deviations; with 3, 2.48)"""


def seeds_advice(summary: pd.DataFrame) -> str | None:
    """A line advising more seeds when a configuration has fewer than ADVISED_SEEDS finished
    runs (and at least one); None otherwise."""
    counts = [int(n) for n in summary.get("n", []) if not _missing(n) and int(n) > 0]
    if not counts or min(counts) >= ADVISED_SEEDS:
        return None
    fewest = min(counts)
    return (
        f"Fewer than {ADVISED_SEEDS} seeds (as few as {fewest}): the intervals above are wide "
        f"and differences uncertain; run at least {ADVISED_SEEDS} seeds (at least 6 for the "
        "paired test of 'ACC vs best' to be able to reach p < 0.05), e.g. seeds=[0,1,2,3,4,5]."
    )


def significance_legend(summary: pd.DataFrame) -> str | None:
    """One line under the terminal table: what ``vs best`` means, and the smallest p the
    seeds allow; None without that column."""
    if "ACC_p_vs_best" not in summary or int(summary["ACC_p_vs_best"].notna().sum()) < 2:
        return None
    pairs = int(summary["ACC_pairs"].max())
    line = f"vs best: paired test of ACC; n.s. = p >= {SIGNIFICANCE}"
    if 2 / 2**pairs >= SIGNIFICANCE:
        line += f", always with {pairs} seeds: run >= 6"
    return line


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _as_list(value: Any) -> list[str]:
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    if _missing(value) or not str(value):
        return []
    return [v.strip() for v in str(value).split(";")]


def failure_lines(summary: pd.DataFrame) -> list[str]:
    """``name: last error line`` (or just the name) of every failed run in ``summary``."""
    lines = []
    for _, s in summary.iterrows():
        names = _as_list(s.get("failed_runs"))
        errors = _as_list(s.get("errors"))
        for i, name in enumerate(names):
            error = errors[i] if i < len(errors) else ""
            lines.append(f"{name}: {error}" if error else name)
    return lines


def to_markdown(summary: pd.DataFrame) -> str:
    """Mean ± std over seeds, then mean ± half-width of the 95% t-interval of the mean, then
    the failed runs by name with their last error line."""
    lines = ["Mean ± standard deviation over seeds (accuracy points, %):", ""]
    lines += _markdown_table(*table_rows(summary, "std"))
    lines += ["", "Mean ± half-width of the 95% confidence interval (Student t, n − 1 dof):", ""]
    lines += _markdown_table(*table_rows(summary, "ci95"))
    note = significance_note(summary)
    if note:
        lines += ["", note]
    advice = seeds_advice(summary)
    if advice:
        lines += ["", advice]
    if has_sizes(summary):
        lines += ["", "Size after the last task, mean over seeds: model params = the model's "
                  "parameters; model + memory = its bytes + the bytes the method stores besides "
                  "it (replay buffer, importance weights, old models); 1 kB = 1000 B."]  # fmt: skip
    present = [
        m for m in CONTINUAL if f"{m}_mean" in summary and summary[f"{m}_mean"].notna().any()
    ]
    if present:
        lines += ["", "Continual evaluation (%, mean ± 95% CI): stability gap = the dip of old "
                  "tasks right after a task switch (needs train.eval_every_steps); min_acc = "
                  "the lowest accuracy of an old task at any measured point; recency_bias = "
                  "the share of old tasks' samples assigned to the newest task's classes "
                  "(class-IL).", ""]  # fmt: skip
        header = ["method", "n", *present]
        rows = [
            [str(r["label"]), str(int(r["n"])),
             *(_cell(r[f"{m}_mean"], r[f"{m}_ci95"]) for m in present)]
            for _, r in summary.iterrows()
        ]  # fmt: skip
        lines += _markdown_table(header, rows)
    failures = failure_lines(summary)
    if failures:
        lines += ["", "Failed runs:", ""]
        lines += [f"- {f}" for f in failures]
    return "\n".join(lines) + "\n"


def to_latex(summary: pd.DataFrame) -> str:
    header, rows = table_rows(summary)
    esc = [h.replace("%", r"\%") for h in header]
    body = [
        " & ".join(c.replace("±", r"$\pm$").replace("_", r"\_") for c in r) + r" \\" for r in rows
    ]
    return (
        "\n".join(
            [
                r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}",
                r"\toprule",
                " & ".join(esc) + r" \\",
                r"\midrule",
                *body,
                r"\bottomrule",
                r"\end{tabular}",
            ]
        )
        + "\n"
    )


def to_csv(summary: pd.DataFrame) -> str:
    """Every statistic; list columns (failed_runs, errors, short_runs) joined with "; "."""
    table = summary.copy()
    for column in ("failed_runs", "errors", "short_runs"):
        if column in table:
            table[column] = ["; ".join(_as_list(v)) for v in table[column]]
    return table.to_csv(index=False)


def safe_name(name: str) -> str:
    """A filesystem-safe version of a display name: ``finetune (train.lr=0.05)`` becomes
    ``finetune_train.lr=0.05``."""
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", name).strip("_.") or "config"
