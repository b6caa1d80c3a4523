"""The report's size columns and its final-ACC-vs-size figure. The runs are logged the way the
driver logs them (the Tracker: child runs of real RunSpecs, a row per task, then the final
metrics) with synthetic accuracies and sizes, so no run is trained."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_config
from matplotlib.colors import to_rgba
from rich.console import Console
from scipy import stats

from learners.metrics import RMatrix, compute_metrics
from orchestrator import plots
from orchestrator.config import expand_runs, load_config
from orchestrator.progress import summary_table
from orchestrator.report import load_experiment, write_report
from orchestrator.results import human_bytes, human_count, summarize, table_rows
from orchestrator.tracking import Tracker

TASKS = ["t0", "t1", "t2"]
INIT = [0.1, 0.1, 0.1]
ACC = {
    "ewc": (0.60, 0.62),
    "finetune": (0.50, 0.54),
    "net2net": (0.90, 0.92),
    "replay": (0.80, 0.84),
}
"""each label's final ACC for seeds 0 and 1"""
SIZED = ("finetune", "net2net", "replay")
"""the labels whose runs logged their sizes; ewc's stand for runs logged before sizes were"""


def sizes(label: str, seed: int, task: int) -> dict[str, int]:
    """What a learner's ``resources()`` says after ``task``: Net2Net grows with every task,
    replay's buffer fills (its bytes differ by seed, so the table must average); ewc logs
    none."""
    if label not in SIZED:
        return {}
    growth = task + 1 if label == "net2net" else 1
    stored = 50 * (task + 1) if label == "replay" else 0
    return {
        "model_parameters": 2410 * growth,
        "model_bytes": 4 * 2410 * growth,
        "stored_samples": stored,
        "stored_bytes": (260 * stored + 100 * seed) if stored else 0,
    }


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """The tracking URI of experiment ``sizes``: 4 methods, 2 seeds, 3 tasks each."""
    tmp = tmp_path_factory.mktemp("sizes")
    methods = {"ewc": {}, "finetune": {}, "replay": {"buffer_size": 150}, "net2net": {}}
    config = tiny_config(tmp, name="sizes", methods=methods)
    specs = expand_runs(load_config(config))
    tracker = Tracker(config["tracking"]["uri"], "sizes", config["tracking"]["artifact_location"])
    tracker.ensure_experiment()
    parent = tracker.start_parent("sizes: synthetic", "name: sizes\n", {})
    for spec in specs:
        run_id = tracker.start_child(spec, parent)
        tracker.log_start(run_id, {"scenario": "domain", "device": "cpu", "node": "here",
                                   "torch_threads": 1})  # fmt: skip
        tracker.log_init_row(run_id, INIT)
        acc = ACC[spec.label][spec.seed]
        rows = [[0.9, 0.2, 0.2], [0.7, 0.9, 0.2], [acc, acc, acc]]
        for task, row in enumerate(rows):
            r = RMatrix(list(TASKS), list(INIT), rows[: task + 1])
            event = {"task": task, "row": row, **sizes(spec.label, spec.seed, task)}
            tracker.log_task_row(run_id, r, event)
        r = RMatrix(list(TASKS), list(INIT), rows)
        final = {k: float(v) for k, v in sizes(spec.label, spec.seed, len(TASKS) - 1).items()}
        tracker.finish_child(run_id, r, compute_metrics(r, "domain"), final)
    tracker.finish_parent(parent, {})
    return config["tracking"]["uri"]


def final(label: str, key: str) -> float:
    """The mean over both seeds of a label's size after the last task."""
    return float(np.mean([sizes(label, seed, len(TASKS) - 1)[key] for seed in (0, 1)]))


def test_human_sizes():
    assert human_bytes(512) == "512 B"
    assert human_bytes(20_480) == "20.5 kB"
    assert human_bytes(999_999) == "1 MB"  # rounded before the unit is chosen
    assert human_bytes(1.6e6) == "1.6 MB" and human_bytes(0) == "0 B"
    assert human_count(830) == "830" and human_count(7230) == "7.23k"
    assert human_count(11_173_962) == "11.2M"


def test_the_tables_carry_each_labels_final_size(experiment, tmp_path):
    written = write_report("sizes", tmp_path, ["md", "csv", "latex"], experiment)
    table = pd.read_csv(written["csv"]).set_index("label")
    assert sorted(table.index) == sorted(ACC)
    for label in SIZED:
        for key in ("model_parameters", "model_bytes", "stored_samples", "stored_bytes"):
            assert table.loc[label, f"{key}_mean"] == pytest.approx(final(label, key)), key
    # the last task's sizes, not an earlier task's: net2net grew threefold
    assert table.loc["net2net", "model_parameters_mean"] == 3 * 2410
    assert table.loc["replay", "stored_bytes_mean"] == 260 * 150 + 50
    md = written["md"].read_text()
    assert md.count("| model params | model + memory |") == 2  # the std and the CI tables
    lines = md.splitlines()
    for label, cells in {
        "ewc": "| n/a | n/a |",
        "finetune": "| 2.41k | 9.64 kB + 0 B |",
        "net2net": "| 7.23k | 28.9 kB + 0 B |",
        "replay": "| 2.41k | 9.64 kB + 39 kB |",
    }.items():
        rows = [line for line in lines if line.startswith(f"| {label} | 2 |")]
        assert len(rows) == 2 and all(row.endswith(cells) for row in rows), rows
        if label not in SIZED:
            assert np.isnan(table.loc[label, "model_bytes_mean"])
            continue
        model, stored = final(label, "model_bytes"), final(label, "stored_bytes")
        assert cells == (
            f"| {human_count(final(label, 'model_parameters'))} | "
            f"{human_bytes(model)} + {human_bytes(stored)} |"
        )
    assert "Size after the last task" in md
    assert "model params & model + memory" in written["latex"].read_text()


def test_the_terminal_table_leaves_sizes_out_and_fits_80_columns(experiment):
    summary = summarize(load_experiment("sizes", experiment))
    header, _ = table_rows(summary, compact=True)
    assert "model params" not in header and "model + memory" not in header
    out = io.StringIO()
    Console(file=out, width=80).print(summary_table(summary, "sizes"))
    assert max(len(line) for line in out.getvalue().splitlines()) <= 80


def test_a_table_without_sizes_has_no_size_columns():
    """Runs logged before sizes existed (or frames built by hand): no empty columns."""
    frame = pd.DataFrame({"label": ["a"], "method": ["a"], "status": ["FINISHED"],
                          "seed": [0], "ACC": [0.5], "config_key": ["k"]})  # fmt: skip
    header, _ = table_rows(summarize(frame))
    assert "model params" not in header


@pytest.mark.parametrize("fmt", plots.FIGURE_FORMATS)
def test_the_size_figure_is_written_in_each_format(experiment, tmp_path, fmt):
    written = write_report("sizes", tmp_path, ["md"], experiment, figure_format=fmt)
    path = written["acc_vs_size"]
    assert path == tmp_path / f"acc_vs_size.{fmt}"
    start = {"png": b"\x89PNG", "pdf": b"%PDF", "svg": b"<?xml"}[fmt]
    assert path.read_bytes().startswith(start)


def test_the_size_figure_puts_each_label_at_its_size_and_acc_in_its_colour(
    experiment, tmp_path, monkeypatch
):
    drawn, palettes = [], {}
    original_sizes, original_curves = plots.acc_vs_size, plots.accuracy_curves

    def spy_sizes(*args, **kwargs):
        drawn.append(original_sizes(*args, **kwargs))
        palettes["sizes"] = kwargs["colors"]

    def spy_curves(*args, **kwargs):
        palettes["curves"] = kwargs["colors"]
        original_curves(*args, **kwargs)

    monkeypatch.setattr(plots, "acc_vs_size", spy_sizes)
    monkeypatch.setattr(plots, "accuracy_curves", spy_curves)
    write_report("sizes", tmp_path, ["md"], experiment)
    (ax,) = drawn
    assert ax.get_xscale() == "log"
    assert ax.xaxis.get_major_formatter()(1e4, 0) == "10 kB"
    assert "model + stored memory" in ax.get_xlabel() and "ACC (%)" in ax.get_ylabel()
    by_label = {line.get_label(): line for line in ax.lines}
    assert "ewc (n=2)" not in by_label  # no size, no point; its colour stays its own
    colours = plots.palette(sorted(ACC))  # the summary's order: labels sorted
    scatters = [c for c in ax.collections if len(c.get_offsets()) == 2]  # a dot per seed
    for label in SIZED:
        acc0, acc1 = ACC[label]
        colour = to_rgba(colours[label])
        assert to_rgba(palettes["curves"][label]) == colour  # as in avg_accuracy
        point = by_label[f"{label} (n=2)"]
        model, stored = final(label, "model_bytes"), final(label, "stored_bytes")
        acc = 100 * (acc0 + acc1) / 2
        assert point.get_xdata()[0] == pytest.approx(model + stored)
        assert point.get_ydata()[0] == pytest.approx(acc)
        assert to_rgba(point.get_color()) == colour
        hollow = [
            line
            for line in ax.lines
            if line.get_markerfacecolor() == "none"
            and to_rgba(line.get_color()) == colour
            and line.get_xdata()[0] == pytest.approx(model)
        ]
        assert len(hollow) == 1 and hollow[0].get_ydata()[0] == pytest.approx(acc)
        seeds = [c for c in scatters if to_rgba(c.get_facecolor()[0])[:3] == colour[:3]]
        assert len(seeds) == 1
        ends = {seed: sizes(label, seed, len(TASKS) - 1) for seed in (0, 1)}
        runs = [(ends[0]["model_bytes"] + ends[0]["stored_bytes"], 100 * acc0),
                (ends[1]["model_bytes"] + ends[1]["stored_bytes"], 100 * acc1)]  # fmt: skip
        np.testing.assert_allclose(sorted(map(tuple, seeds[0].get_offsets())), sorted(runs))
        half = stats.t.ppf(0.975, 1) * np.std([100 * acc0, 100 * acc1], ddof=1) / np.sqrt(2)
        (bar,) = [c for c in ax.containers if to_rgba(c.lines[2][0].get_color()[0]) == colour]
        (segment,) = bar.lines[2][0].get_segments()
        assert segment[:, 0] == pytest.approx([model + stored] * 2)
        assert segment[:, 1] == pytest.approx([acc - half, acc + half])
