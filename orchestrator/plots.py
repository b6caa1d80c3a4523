"""Figures fit for a paper: R-matrix heatmaps, average-accuracy curves, forgetting per task,
final accuracy against size.

Every figure is one column wide (3.5 in) in matplotlib's ``seaborn-v0_8-paper`` style, with
8-point text, so it reads when printed in a two-column paper; accuracies are in %, like the
tables. The format follows the file name's suffix (``.png``, ``.pdf``, ``.svg``); a file-like
target gets PNG. Colours come from :func:`palette`, one per configuration for every figure of
an experiment.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from orchestrator.results import human_bytes  # noqa: E402

COLUMN_WIDTH_IN = 3.5
STYLE = "seaborn-v0_8-paper"
FONT_PT = 8
FIGURE_FORMATS = ("png", "pdf", "svg")


def palette(names: Sequence[str]) -> dict[str, Any]:
    """One colour per name, in the given order (the summary's order of configurations), so a
    configuration has the same colour in every figure of an experiment."""
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


@contextlib.contextmanager
def _paper() -> Iterator[None]:
    with plt.style.context(STYLE), plt.rc_context({"font.size": FONT_PT,
                                                    "axes.titlesize": FONT_PT,
                                                    "axes.labelsize": FONT_PT,
                                                    "legend.fontsize": FONT_PT - 1,
                                                    "xtick.labelsize": FONT_PT - 1,
                                                    "ytick.labelsize": FONT_PT - 1,
                                                    # text stays text: editable, searchable
                                                    "svg.fonttype": "none",
                                                    "pdf.fonttype": 42}):  # fmt: skip
        yield


def _save(fig: Any, path: str | Path | IO[bytes]) -> None:
    fmt = Path(path).suffix.lstrip(".").lower() if isinstance(path, str | Path) else "png"
    fig.savefig(path, format=fmt or "png", dpi=200, bbox_inches="tight")
    plt.close(fig)


def r_heatmap(
    R: Sequence[Sequence[float]],
    tasks: Sequence[str],
    random_init: Sequence[float] | None,
    path: str | Path | IO[bytes],
    title: str,
) -> None:
    """Annotated heatmap of R in % (rows: after learning task i; columns: evaluated task j)."""
    rows = [list(r) for r in R]
    labels = [f"after {t}" for t in tasks[: len(rows)]]
    if random_init is not None:
        rows = [list(random_init), *rows]
        labels = ["random init", *labels]
    data = 100 * np.array(rows, dtype=float)
    width = max(COLUMN_WIDTH_IN, 0.3 * len(tasks) + 1.6)
    with _paper():
        fig, ax = plt.subplots(figsize=(width, width * 0.8))
        image = ax.imshow(data, vmin=0, vmax=100, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(tasks)), [str(t) for t in tasks], rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("evaluated on task")
        ax.grid(False)
        if len(tasks) <= 12:
            for i in range(data.shape[0]):
                for j in range(data.shape[1]):
                    colour = "black" if data[i, j] > 60 else "white"
                    ax.text(j, i, f"{data[i, j]:.0f}", ha="center", va="center",
                            fontsize=FONT_PT - 2, color=colour)  # fmt: skip
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="accuracy (%)")
        ax.set_title(title)
        _save(fig, path)


def _limits(low: float, high: float) -> tuple[float, float]:
    """Axis limits in % that fit [low, high] with a margin, on multiples of 5, within 0-100."""
    return max(0.0, 5 * math.floor((low - 3) / 5)), min(100.0, 5 * math.ceil((high + 3) / 5))


def accuracy_curves(
    curves: dict[str, np.ndarray],
    path: str | Path | IO[bytes],
    title: str,
    colors: dict[str, Any] | None = None,
) -> None:
    """Mean average accuracy on the tasks seen (%) per configuration vs tasks learned, with a
    ± std band; the y axis fits the data.

    ``curves[name]`` is an array (runs, tasks), keyed by the configuration's display name;
    empty arrays are left out. ``colors``: :func:`palette` of every configuration.
    """
    drawn = {n: np.atleast_2d(np.asarray(v, dtype=float)) for n, v in curves.items()}
    drawn = {n: 100 * v for n, v in drawn.items() if v.size}
    colors = colors or palette(list(drawn))
    with _paper():
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH_IN, 2.6))
        lows, highs = [], []
        for name, values in drawn.items():
            mean = values.mean(axis=0)
            std = values.std(axis=0, ddof=1) if values.shape[0] > 1 else np.zeros_like(mean)
            x = np.arange(1, mean.shape[0] + 1)
            colour = colors.get(name)
            ax.plot(x, mean, marker="o", markersize=2.5, color=colour,
                    label=f"{name} (n={values.shape[0]})")  # fmt: skip
            ax.fill_between(x, mean - std, mean + std, alpha=0.2, color=colour, linewidth=0)
            lows.append(float((mean - std).min()))
            highs.append(float((mean + std).max()))
        if drawn:
            longest = max(v.shape[1] for v in drawn.values())
            ax.set_xticks(range(1, longest + 1))
            ax.set_ylim(*_limits(min(lows), max(highs)))
            ax.legend(frameon=False)
        ax.set_xlabel("tasks learned")
        ax.set_ylabel("average accuracy on tasks seen (%)")
        ax.set_title(title)
        _save(fig, path)


def forgetting_bars(
    forgetting: dict[str, np.ndarray],
    tasks: Sequence[str],
    path: str | Path | IO[bytes],
    title: str,
    colors: dict[str, Any] | None = None,
) -> None:
    """Forgetting of each task (%) at the end of the stream, bars per configuration, mean ±
    std over runs. ``forgetting[name]`` is an array (runs, tasks − 1): the last task cannot
    have been forgotten yet."""
    drawn = {n: 100 * np.atleast_2d(np.asarray(v, dtype=float)) for n, v in forgetting.items()}
    drawn = {n: v for n, v in drawn.items() if v.size}
    colors = colors or palette(list(drawn))
    with _paper():
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH_IN, 2.6))
        width = 0.8 / max(1, len(drawn))
        for k, (name, values) in enumerate(drawn.items()):
            mean = values.mean(axis=0)
            std = values.std(axis=0, ddof=1) if values.shape[0] > 1 else None
            x = np.arange(mean.shape[0]) + (k - (len(drawn) - 1) / 2) * width
            ax.bar(x, mean, width, yerr=std, color=colors.get(name), label=name,
                   error_kw={"elinewidth": 0.6, "capsize": 1.5})  # fmt: skip
        count = max((v.shape[1] for v in drawn.values()), default=0)
        ax.set_xticks(range(count), [str(t) for t in tasks[:count]], rotation=45, ha="right")
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xlabel("task")
        ax.set_ylabel("forgetting at the end (%)")
        if drawn:
            ax.legend(frameon=False)
        ax.set_title(title)
        _save(fig, path)


def acc_vs_size(
    points: dict[str, np.ndarray],
    path: str | Path | IO[bytes],
    title: str,
    colors: dict[str, Any] | None = None,
    intervals: dict[str, float] | None = None,
) -> Axes:
    """Final ACC (%) against final size in bytes on a log axis, one colour per configuration.

    ``points[name]`` is an array (runs, 3) of each run's ACC (fraction), model bytes and stored
    bytes. A filled marker sits at the mean ACC and the mean model + stored memory, with an
    ACC error bar of half-width ``intervals[name]`` (a fraction; NaN or absent: none); a hollow
    one at the mean model alone, joined to it; each run is a faint dot at its model + memory.
    Returns the (closed) axes, whose points can be read back.
    """
    drawn = {n: np.atleast_2d(np.asarray(v, dtype=float)) for n, v in points.items()}
    drawn = {n: v for n, v in drawn.items() if v.size}
    colors = colors or palette(list(drawn))
    intervals = intervals or {}
    with _paper():
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH_IN, 2.6))
        accs: list[float] = []
        sizes: list[float] = []
        for name, values in drawn.items():
            acc = 100 * values[:, 0]
            model, total = values[:, 1], values[:, 1] + values[:, 2]
            mean_acc, mean_model, mean_total = float(acc.mean()), model.mean(), total.mean()
            half = 100 * float(intervals.get(name, math.nan))
            colour = colors.get(name)
            ax.scatter(total, acc, s=6, color=colour, alpha=0.3, linewidths=0)
            ax.plot([mean_model, mean_total], [mean_acc, mean_acc], color=colour, linewidth=0.6)
            ax.plot(mean_model, mean_acc, "o", markersize=4, markerfacecolor="none",
                    markeredgewidth=0.8, color=colour)  # fmt: skip
            if not math.isnan(half):
                ax.errorbar(mean_total, mean_acc, yerr=half, fmt="none", ecolor=colour,
                            elinewidth=0.6, capsize=1.5)  # fmt: skip
                accs += [mean_acc - half, mean_acc + half]
            ax.plot(mean_total, mean_acc, "o", markersize=4, color=colour,
                    label=f"{name} (n={len(acc)})")  # fmt: skip
            accs += list(acc)
            sizes += [mean_model, *total]
        ax.set_xscale("log")
        positive = [x for x in sizes if x > 0]
        if positive:
            low, high = min(positive) / 1.6, max(positive) * 1.6
            if high / low < 10:  # a decade at least, so that some 1-2-5 ticks fall inside
                centre = math.sqrt(low * high)
                low, high = centre / math.sqrt(10), centre * math.sqrt(10)
            ax.set_xlim(low, high)
            subs = (1.0, 2.0, 5.0) if math.log10(high / low) < 2.5 else (1.0,)
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
            ax.set_ylim(*_limits(min(accs), max(accs)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: human_bytes(x)))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("final size: model + stored memory (bytes, log scale)")
        ax.set_ylabel("final ACC (%)")
        if drawn:
            kinds = [
                Line2D([], [], linestyle="none", marker="o", markersize=4, color="black",
                       label="model + memory"),
                Line2D([], [], linestyle="none", marker="o", markersize=4, color="black",
                       markerfacecolor="none", markeredgewidth=0.8, label="model only"),
            ]  # fmt: skip
            handles, _ = ax.get_legend_handles_labels()
            # beside the axes: with many methods a legend inside would cover points
            ax.legend(handles=[*handles, *kinds], frameon=False, loc="upper left",
                      bbox_to_anchor=(1.01, 1.0))  # fmt: skip
        ax.set_title(title)
        _save(fig, path)
    return ax
