"""Run results as a pandas DataFrame, their aggregation over seeds, and summary tables."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from learners.metrics import RMatrix

METRICS = ("ACC", "BWT", "FWT", "forgetting")
RUN_COLUMNS = (
    "label",
    "method",
    "seed",
    "order",
    "status",
    "scenario",
    *METRICS,
    "train_time_s",
    "run_key",
    "mlflow_run_id",
    "tasks",
    "random_init",
    "R",
    "error",
)


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

    def row(self) -> dict[str, Any]:
        metrics = self.metrics or {}
        return {
            "label": self.label,
            "method": self.method,
            "seed": self.seed,
            "order": self.order,
            "status": self.status,
            "scenario": self.scenario,
            **{m: metrics.get(m) for m in METRICS},
            "train_time_s": self.train_time_s,
            "run_key": self.run_key,
            "mlflow_run_id": self.mlflow_run_id,
            "tasks": self.r.tasks if self.r else None,
            "random_init": self.r.random_init if self.r else None,
            "R": self.r.R if self.r else None,
            "error": self.error,
        }


def runs_frame(results: list[RunResult]) -> pd.DataFrame:
    """One row per run with its metrics and R matrix."""
    return pd.DataFrame([r.row() for r in results], columns=list(RUN_COLUMNS))


def _ci95(values: np.ndarray) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    return float(stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n))


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Per label: number of finished runs and mean / std / 95% CI half-width of each metric."""
    rows = []
    for label, every in runs.groupby("label", sort=False):
        group = every[every["status"].isin(["FINISHED", "SKIPPED"])]
        row: dict[str, Any] = {"label": label, "method": every["method"].iloc[0], "n": len(group)}
        for m in METRICS:
            values = group[m].dropna().to_numpy(dtype=float)
            row[f"{m}_mean"] = float(values.mean()) if len(values) else float("nan")
            row[f"{m}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
            row[f"{m}_ci95"] = _ci95(values)
        row["failed"] = int((every["status"] == "FAILED").sum())
        rows.append(row)
    return pd.DataFrame(rows)


def _cell(mean: float, std: float, pct: bool = True) -> str:
    if math.isnan(mean):
        return "n/a"
    scale = 100.0 if pct else 1.0
    if math.isnan(std):
        return f"{mean * scale:.2f}"
    return f"{mean * scale:.2f} ± {std * scale:.2f}"


def table_rows(summary: pd.DataFrame, spread: str = "std") -> tuple[list[str], list[list[str]]]:
    """Header and string cells in %: mean ± std over seeds, or mean ± 95% CI (``spread="ci95"``)."""
    any_failed = bool(summary["failed"].sum())
    header = ["method", "n", *(["failed"] if any_failed else []), *[f"{m} (%)" for m in METRICS]]
    rows = []
    for _, s in summary.iterrows():
        failed = [str(int(s["failed"]))] if any_failed else []
        cells = [_cell(s[f"{m}_mean"], s[f"{m}_{spread}"]) for m in METRICS]
        rows.append([str(s["label"]), str(int(s["n"])), *failed, *cells])
    return header, rows


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def to_markdown(summary: pd.DataFrame) -> str:
    """Mean ± std over seeds, then mean ± half-width of the 95% t-interval of the mean."""
    lines = ["Mean ± standard deviation over seeds (accuracy points, %):", ""]
    lines += _markdown_table(*table_rows(summary, "std"))
    lines += ["", "Mean ± half-width of the 95% confidence interval (Student t, n − 1 dof):", ""]
    lines += _markdown_table(*table_rows(summary, "ci95"))
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
    return summary.to_csv(index=False)


def mean_r(runs: pd.DataFrame, label: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Mean R matrix and mean random-init row of a label's finished runs, and task names."""
    group = runs[(runs["label"] == label) & runs["R"].notna()]
    R = np.mean([np.asarray(r, dtype=float) for r in group["R"]], axis=0)
    b = np.mean([np.asarray(r, dtype=float) for r in group["random_init"]], axis=0)
    return R, b, list(group["tasks"].iloc[0])


def avg_acc_curves(runs: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per label, an array (runs, tasks) of average accuracy on tasks seen after each task."""
    curves: dict[str, np.ndarray] = {}
    for label, group in runs[runs["R"].notna()].groupby("label", sort=False):
        per_run = []
        for R in group["R"]:
            R = np.asarray(R, dtype=float)
            per_run.append([R[i, : i + 1].mean() for i in range(R.shape[0])])
        curves[str(label)] = np.asarray(per_run)
    return curves
