"""Reading an experiment back from MLflow: the runs DataFrame, and the report files."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.tracking import MlflowClient

from learners.metrics import RMatrix
from orchestrator import plots
from orchestrator.results import (
    CONTINUAL,
    METRICS,
    RESOURCES,
    RunResult,
    avg_acc_curves,
    ci95,
    forgetting_per_task,
    mean_r,
    runs_frame,
    runs_table,
    safe_name,
    size_points,
    stream_description,
    summarize,
    to_csv,
    to_latex,
    to_markdown,
)
from orchestrator.tracking import finished_child_runs, load_r_matrices, resolve_tracking_uri

FORMATS = ("md", "csv", "latex")
SECTIONS_GROUP = "lia.report_sections"
"""entry points ``(client, experiment_id) -> markdown | None``: sections a package adds to
an experiment's summary.md, before the tables (``lia sweep``'s studies, say)"""


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def _flag(value: str | None) -> bool | None:
    if value is None:
        return None
    return value.strip().lower() == "true"


def _r_matrices(client: MlflowClient, run_ids: list[str]) -> dict[str, RMatrix | None]:
    """Each run's ``r_matrix.json``; None for a run whose artifact cannot be read."""
    try:
        return dict(load_r_matrices(client, run_ids))
    except Exception:  # one bad artifact: fetch one by one, keeping what can be read
        matrices: dict[str, RMatrix | None] = {}
        for run_id in run_ids:
            try:
                matrices[run_id] = load_r_matrices(client, [run_id])[run_id]
            except Exception:
                matrices[run_id] = None
        return matrices


def _result(key: str, run: Any, r: RMatrix | None) -> RunResult:
    tags, values = run.data.tags, run.data.metrics
    return RunResult(
        key,
        tags.get("label", tags.get("method", "?")),
        tags.get("method", "?"),
        _int(tags.get("seed"), 0),
        _int(tags.get("order"), 0),
        "FINISHED",
        run.info.run_id,
        scenario=tags.get("scenario"),
        r=r,
        metrics={m: values.get(m) for m in (*METRICS, *CONTINUAL, *RESOURCES)},
        train_time_s=values.get("train_time_s"),
        config_key=tags.get("config_key") or None,
        code_hash=tags.get("code_hash"),
        params=dict(run.data.params) or None,
        attempts=_int(tags.get("attempts"), 1),
        at_chance=_flag(tags.get("at_chance")),
    )


def _configurations(frame: pd.DataFrame) -> str:
    pairs = frame.drop_duplicates("config_key")[["config_key", "config"]]
    return ", ".join(f"{k} ({n})" for k, n in pairs.itertuples(index=False) if isinstance(k, str))


def _select_config(frame: pd.DataFrame, experiment: str, config_key: str) -> pd.DataFrame:
    """The runs of the one configuration whose key is ``config_key`` or starts with it."""
    keys = [k for k in dict.fromkeys(frame["config_key"]) if isinstance(k, str)]
    matches = [k for k in keys if k == config_key] or [k for k in keys if k.startswith(config_key)]
    if len(matches) != 1:
        problem = "is ambiguous" if matches else "matches no configuration"
        shown = frame[frame["config_key"].isin(matches)] if matches else frame
        raise ValueError(
            f"config key {config_key!r} {problem} in experiment {experiment!r}; "
            f"configurations there: {_configurations(shown) or '(none)'}"
        )
    return frame[frame["config_key"] == matches[0]]


def _latest_configs(frame: pd.DataFrame, started: dict[str, int]) -> pd.DataFrame:
    """Per label, the runs of the configuration of that label's most recently started run."""
    start = frame["mlflow_run_id"].map(lambda run_id: started.get(run_id, 0))
    newest = frame.assign(_start=start).sort_values("_start", kind="stable")
    chosen = newest.groupby("label", sort=False).tail(1)
    keep = set(zip(chosen["label"], chosen["config_key"].fillna(""), strict=True))
    mask = [
        (label, key) in keep
        for label, key in zip(frame["label"], frame["config_key"].fillna(""), strict=True)
    ]
    return frame[mask]


def _current(runs: dict[str, Any]) -> dict[str, Any]:
    """Per run instance (configuration, seed, task order), its latest finished execution.

    After a fix to a learner the run is computed again under a new run key; the result of the
    old code is superseded, never averaged with the new one. Runs logged before instance keys
    existed stand for themselves.
    """
    latest: dict[str, tuple[str, Any]] = {}
    for key, run in runs.items():
        instance = run.data.tags.get("instance_key") or key
        held = latest.get(instance)
        if held is None or (run.info.start_time or 0) >= (held[1].info.start_time or 0):
            latest[instance] = (key, run)
    return dict(latest.values())


def load_experiment(
    experiment: str,
    tracking_uri: str | None = None,
    *,
    config_key: str | None = None,
    latest: bool = False,
) -> pd.DataFrame:
    """Every finished run of an MLflow experiment, of every configuration, one row per run.

    Same columns as :func:`orchestrator.run_experiment` (see ``results.RUN_COLUMNS``). A run
    executed several times (same configuration, seed and task order — under older code too)
    appears once, its latest finished execution. Runs
    logged without a ``config_key`` tag get one derived from their params.
    ``config_key`` keeps the one configuration whose key is, or uniquely starts with, that
    string (ValueError listing the keys and display names otherwise); ``latest=True`` keeps,
    per label, only the configuration of its most recently started run. Display names (the
    ``config`` column) are those over the whole experiment, so a selected configuration
    keeps the name that tells it apart from its siblings. Sorted by label, configuration,
    task order and seed.
    """
    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(
            f"no MLflow experiment named {experiment!r} at {uri}; "
            f"experiments there: {', '.join(names) or '(none)'}"
        )
    runs = _current(finished_child_runs(client, [found.experiment_id]))
    matrices = _r_matrices(client, [r.info.run_id for r in runs.values()])
    results = [_result(key, run, matrices[run.info.run_id]) for key, run in runs.items()]
    frame = runs_frame(results)
    if config_key is not None:
        frame = _select_config(frame, experiment, config_key)
    if latest and not frame.empty:
        started = {run.info.run_id: run.info.start_time or 0 for run in runs.values()}
        frame = _latest_configs(frame, started)
    return frame.sort_values(["label", "config", "order", "seed"], kind="stable").reset_index(
        drop=True
    )


def report_sections(experiment: str, tracking_uri: str | None = None) -> list[str]:
    """The markdown sections installed packages add for ``experiment`` (SECTIONS_GROUP)."""
    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    sections = []
    for entry in sorted(entry_points(group=SECTIONS_GROUP), key=lambda e: e.name):
        section = entry.load()(client, found.experiment_id)
        if section:
            sections.append(section)
    return sections


def write_report(
    experiment: str,
    out_dir: str | Path,
    formats: list[str] | tuple[str, ...] = ("md",),
    tracking_uri: str | None = None,
    *,
    config_key: str | None = None,
    latest: bool = False,
    figure_format: str = "png",
) -> dict[str, Path]:
    """Summary table(s), per-configuration R heatmaps, accuracy curves, forgetting per task
    and final ACC against size for ``experiment``; figures as ``figure_format`` (png, pdf or
    svg), one colour per configuration in all of them.

    ``config_key`` and ``latest`` select configurations as in :func:`load_experiment`. The
    returned paths are keyed by format (``md``, ``csv``, ``latex``), ``runs``,
    ``heatmap_<display name>``, ``curves``, ``forgetting`` and ``acc_vs_size`` (when runs
    logged their sizes).
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"--format {unknown[0]!r} is unknown; accepted: {', '.join(FORMATS)}")
    if figure_format not in plots.FIGURE_FORMATS:
        raise ValueError(
            f"--figure-format {figure_format!r} is unknown; accepted: "
            f"{', '.join(plots.FIGURE_FORMATS)}"
        )
    runs = load_experiment(experiment, tracking_uri, config_key=config_key, latest=latest)
    if runs.empty:
        raise ValueError(f"experiment {experiment!r} has no finished runs to report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(runs)
    written: dict[str, Path] = {}
    writers = {
        "md": ("summary.md", to_markdown),
        "csv": ("summary.csv", to_csv),
        "latex": ("summary.tex", to_latex),
    }
    for fmt in formats:
        name, writer = writers[fmt]
        text = writer(summary)
        if fmt == "md":
            text = "".join(f"{part}\n" for part in report_sections(experiment, tracking_uri)) + text
        (out / name).write_text(text)
        written[fmt] = out / name
    runs_table(runs).to_csv(out / "runs.csv", index=False)
    written["runs"] = out / "runs.csv"
    curves = avg_acc_curves(runs)
    colors = plots.palette(list(summary["label"]))
    stream = stream_description(runs)
    files: set[str] = set()
    last_tasks: list[str] = []
    for name, key, method in zip(summary["label"], summary["config_key"], summary["method"],
                                 strict=True):  # fmt: skip
        averaged = mean_r(runs, name)
        if averaged is None:  # no finished run with a full R: nothing to draw
            continue
        R, b, tasks = averaged
        last_tasks = tasks
        stem = safe_name(name)
        if stem in files:
            stem = f"{stem}_{str(key)[:8]}"
        files.add(stem)
        path = out / f"r_matrix_{stem}.{figure_format}"
        n = len(curves.get(name, []))
        what = name if name == method else f"{name} ({method})"
        seeds = f"mean of {n} runs" if n != 1 else "1 run"
        plots.r_heatmap(R, tasks, b, path, title=f"{what} on {stream}: R, {seeds}")
        written[f"heatmap_{name}"] = path
    curves_path = out / f"avg_accuracy.{figure_format}"
    plots.accuracy_curves(
        curves, curves_path, title=f"{stream}: accuracy on tasks seen (mean ± std)", colors=colors
    )
    written["curves"] = curves_path
    forgetting = forgetting_per_task(runs)
    if forgetting:
        path = out / f"forgetting.{figure_format}"
        title = f"{stream}: forgetting per task (mean ± std)"
        plots.forgetting_bars(forgetting, last_tasks, path, title=title, colors=colors)
        written["forgetting"] = path
    sizes = size_points(runs)
    if sizes:
        path = out / f"acc_vs_size.{figure_format}"
        intervals = {name: ci95(points[:, 0]) for name, points in sizes.items()}
        title = f"{stream}: final ACC vs size (mean ± 95% CI)"
        plots.acc_vs_size(sizes, path, title=title, colors=colors, intervals=intervals)
        written["acc_vs_size"] = path
    return written
