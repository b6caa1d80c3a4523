"""Plots: annotated R-matrix heatmaps and average-accuracy curves with bands."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def r_heatmap(
    R: Sequence[Sequence[float]],
    tasks: Sequence[str],
    random_init: Sequence[float] | None,
    path: str | Path,
    title: str,
) -> None:
    """Annotated heatmap of R (rows: after learning task i; columns: evaluated task j)."""
    rows = [list(r) for r in R]
    labels = [f"after {t}" for t in tasks[: len(rows)]]
    if random_init is not None:
        rows = [list(random_init), *rows]
        labels = ["random init", *labels]
    data = np.array(rows, dtype=float)
    size = max(3.5, 0.55 * len(tasks) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(data, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(tasks)), [str(t) for t in tasks], rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("evaluated on task")
    if len(tasks) <= 20:
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                colour = "black" if data[i, j] > 0.6 else "white"
                ax.text(
                    j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=7, color=colour
                )
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="accuracy")
    ax.set_title(title, fontsize=10 if len(title) > 50 else None)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def accuracy_curves(
    curves: dict[str, np.ndarray],
    path: str | Path,
    title: str,
) -> None:
    """Mean average-accuracy-on-seen-tasks per configuration vs tasks learned, ± std band.

    ``curves[name]`` is an array (runs, tasks), keyed by the configuration's display name;
    empty arrays are left out.
    """
    drawn = {}
    for name, values in curves.items():
        values = np.atleast_2d(np.asarray(values, dtype=float))
        if values.size:
            drawn[name] = values
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, values in sorted(drawn.items()):
        mean = values.mean(axis=0)
        std = values.std(axis=0, ddof=1) if values.shape[0] > 1 else np.zeros_like(mean)
        x = np.arange(1, mean.shape[0] + 1)
        ax.plot(x, mean, marker="o", markersize=3, label=f"{name} (n={values.shape[0]})")
        ax.fill_between(x, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1), alpha=0.2)
    if drawn:
        longest = max(v.shape[1] for v in drawn.values())
        ax.set_xticks(range(1, longest + 1))
        ax.legend(fontsize=8)
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("average accuracy on tasks seen")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
