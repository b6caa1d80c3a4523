"""Reading an experiment back from MLflow: the runs DataFrame, and the report files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from orchestrator import plots
from orchestrator.results import (
    METRICS,
    RunResult,
    avg_acc_curves,
    mean_r,
    runs_frame,
    summarize,
    to_csv,
    to_latex,
    to_markdown,
)
from orchestrator.tracking import finished_child_runs, load_r_matrices, resolve_tracking_uri

FORMATS = ("md", "csv", "latex")


def load_experiment(experiment: str, tracking_uri: str | None = None) -> pd.DataFrame:
    """Every finished run of an MLflow experiment: metrics and R matrices, one row per run.

    A run executed several times (same run key) appears once, its latest finished execution.
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
    runs = finished_child_runs(client, [found.experiment_id])
    matrices = load_r_matrices(client, [r.info.run_id for r in runs.values()])
    results = []
    for key, run in runs.items():
        tags, values = run.data.tags, run.data.metrics
        results.append(
            RunResult(
                key,
                tags.get("label", tags.get("method", "?")),
                tags.get("method", "?"),
                int(tags.get("seed", 0)),
                int(tags.get("order", 0)),
                "FINISHED",
                run.info.run_id,
                scenario=tags.get("scenario"),
                r=matrices[run.info.run_id],
                metrics={m: values.get(m) for m in METRICS},
                train_time_s=values.get("train_time_s"),
            )
        )
    frame = runs_frame(results)
    return frame.sort_values(["label", "order", "seed"], kind="stable").reset_index(drop=True)


def write_report(
    experiment: str,
    out_dir: str | Path,
    formats: list[str] | tuple[str, ...] = ("md",),
    tracking_uri: str | None = None,
) -> dict[str, Path]:
    """Summary table(s), per-method R heatmaps and accuracy curves for ``experiment``."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"--format {unknown[0]!r} is unknown; accepted: {', '.join(FORMATS)}")
    runs = load_experiment(experiment, tracking_uri)
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
        (out / name).write_text(writer(summary))
        written[fmt] = out / name
    runs.drop(columns=["R", "random_init", "tasks", "error"]).to_csv(out / "runs.csv", index=False)
    written["runs"] = out / "runs.csv"
    for label in summary["label"]:
        R, b, tasks = mean_r(runs, label)
        n = int((runs["label"] == label).sum())
        path = out / f"r_matrix_{label}.png"
        plots.r_heatmap(R, tasks, b, path, title=f"{label}: mean R over {n} runs")
        written[f"heatmap_{label}"] = path
    curves_path = out / "avg_accuracy.png"
    plots.accuracy_curves(
        avg_acc_curves(runs),
        curves_path,
        title=f"{experiment}: average accuracy on tasks seen (mean ± std)",
    )
    written["curves"] = curves_path
    return written
