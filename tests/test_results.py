"""Aggregation per configuration, robustness to failed and partial runs, load_experiment's
selection of configurations, and the chance-level flag. No Ray; MLflow only as a local
SQLite store filled by hand."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Param
from mlflow.tracking import MlflowClient

from learners.metrics import RMatrix, at_chance, chance_accuracy
from orchestrator.report import load_experiment, write_report
from orchestrator.results import (
    RUN_COLUMNS,
    RunResult,
    avg_acc_curves,
    config_names,
    derive_config_key,
    mean_r,
    runs_frame,
    runs_table,
    summarize,
    table_rows,
    to_csv,
    to_latex,
    to_markdown,
)
from task_streams.base import StreamInfo

TASKS = ["t0", "t1", "t2"]
INIT = [0.1, 0.1, 0.1]


def params(label: str, method: str, seed: int, lr: float = 0.1, **extra: str) -> dict[str, str]:
    """The flattened config of a run, the way the driver logs it as MLflow params."""
    return {
        "label": label,
        "method": method,
        "seed": str(seed),
        "stream.name": "permuted",
        "stream.num_tasks": "3",
        "stream.task_order": "None",
        "model.hidden": "[32]",
        "train.lr": str(lr),
        "train.epochs": "1",
        **extra,
    }


def matrix(final: float, rows: int = 3) -> RMatrix:
    """A 3-task R whose rows after the first are constant ``final``; ``rows`` < 3 is partial."""
    R = [[0.9, 0.2, 0.2], [0.7, 0.9, 0.2], [final, final, final]][:rows]
    return RMatrix(list(TASKS), list(INIT), R)


def run(
    label: str,
    seed: int,
    acc: float | None,
    *,
    method: str | None = None,
    lr: float = 0.1,
    status: str = "FINISHED",
    rows: int | None = 3,
    config_key: str | None = None,
    with_params: bool = True,
    error: str | None = None,
    chance: bool | None = None,
) -> RunResult:
    method = method or label
    return RunResult(
        f"{label}-{seed}-{lr}",
        label,
        method,
        seed,
        0,
        status,
        f"id-{label}-{seed}-{lr}",
        scenario="domain",
        r=matrix(acc or 0.0, rows) if rows else None,
        metrics={"ACC": acc, "BWT": -0.1 if acc is not None else None, "FWT": 0.0}
        if status != "FAILED"
        else None,
        error=error,
        config_key=config_key,
        params=params(label, method, seed, lr) if with_params else None,
        at_chance=chance,
    )


# ---------------------------------------------------------------------- configurations
def test_two_learning_rates_of_one_label_are_two_configurations():
    frame = runs_frame(
        [
            run("finetune", 0, 0.8, lr=0.1),
            run("finetune", 1, 0.9, lr=0.1),
            run("replay", 0, 0.95),
            run("finetune", 0, 0.5, lr=0.05),
            run("finetune", 1, 0.3, lr=0.05),
            run("finetune", 2, 0.4, lr=0.05),
        ]
    )
    assert list(frame["config"]) == [
        "finetune (train.lr=0.1)",
        "finetune (train.lr=0.1)",
        "replay",
        "finetune (train.lr=0.05)",
        "finetune (train.lr=0.05)",
        "finetune (train.lr=0.05)",
    ]
    assert frame["config_key"].nunique() == 3  # derived from the params: no tags here
    summary = summarize(frame)
    # one row per configuration, in order of first appearance
    assert list(summary["label"]) == [
        "finetune (train.lr=0.1)",
        "replay",
        "finetune (train.lr=0.05)",
    ]
    s = summary.set_index("label")
    assert s.loc["finetune (train.lr=0.1)", "n"] == 2
    assert s.loc["finetune (train.lr=0.1)", "ACC_mean"] == pytest.approx(0.85)
    assert s.loc["finetune (train.lr=0.05)", "n"] == 3
    assert s.loc["finetune (train.lr=0.05)", "ACC_mean"] == pytest.approx(0.4)
    assert s.loc["finetune (train.lr=0.05)", "ACC_std"] == pytest.approx(0.1)
    assert s.loc["replay", "n"] == 1 and s.loc["replay", "method"] == "replay"
    assert s.loc["replay", "config_key"] == frame.loc[2, "config_key"]
    # curves and heatmaps are per configuration too
    curves = avg_acc_curves(frame)
    assert {k: v.shape for k, v in curves.items()} == {
        "finetune (train.lr=0.1)": (2, 3),
        "replay": (1, 3),
        "finetune (train.lr=0.05)": (3, 3),
    }
    # last point: mean of the final row; (0.5 + 0.3 + 0.4) / 3 = 0.4
    assert curves["finetune (train.lr=0.05)"][:, -1].mean() == pytest.approx(0.4)
    R, b, tasks = mean_r(frame, "finetune (train.lr=0.1)")
    assert R[2] == pytest.approx([0.85, 0.85, 0.85]) and R[1][1] == pytest.approx(0.9)
    assert list(b) == pytest.approx(INIT) and tasks == TASKS
    md = to_markdown(summary)
    assert "| finetune (train.lr=0.05) | 3 | 40.00 ± 10.00 |" in md


def test_config_key_tags_group_and_old_untagged_runs_adopt_them():
    same = params("ewc", "ewc", 0)
    tagged = [
        run("ewc", 0, 0.6, config_key="c0ffee00c0ffee00"),
        run("ewc", 1, 0.8, config_key="c0ffee00c0ffee00"),
    ]
    untagged = run("ewc", 2, 0.7)  # logged before the tag existed, same params
    frame = runs_frame([*tagged, untagged])
    assert set(frame["config_key"]) == {"c0ffee00c0ffee00"}
    assert summarize(frame).loc[0, "n"] == 3
    # a different tag with the same params is a different configuration, told apart by key
    other = run("ewc", 0, 0.1, config_key="deadbeefdeadbeef")
    frame = runs_frame([*tagged, other])
    assert sorted(summarize(frame)["label"]) == ["ewc [c0ffee00]", "ewc [deadbeef]"]
    assert derive_config_key(same) == derive_config_key({**same, "seed": "7", "label": "x"})
    assert derive_config_key(same) != derive_config_key({**same, "train.lr": "0.2"})


def test_frames_of_two_invocations_concatenated_get_distinct_names():
    # each run_experiment frame names its one configuration by the bare label
    first = runs_frame([run("finetune", 0, 0.8), run("finetune", 1, 0.6)])
    second = runs_frame([run("finetune", 0, 0.2, lr=0.05)])
    assert set(first["config"]) == set(second["config"]) == {"finetune"}
    summary = summarize(pd.concat([first, second], ignore_index=True))
    assert list(summary["label"]) == ["finetune (train.lr=0.1)", "finetune (train.lr=0.05)"]
    assert list(summary["n"]) == [2, 1]
    assert list(summary["ACC_mean"]) == pytest.approx([0.7, 0.2])


def test_a_renamed_label_is_the_same_configuration():
    # the label is a name, not a setting: runs of one config key under two labels are one row
    frame = runs_frame(
        [
            run("finetune", 0, 0.8, config_key="1234567812345678"),
            run("ft", 1, 0.6, config_key="1234567812345678"),
        ]
    )
    summary = summarize(frame)
    assert list(summary["label"]) == ["finetune/ft"] and summary.loc[0, "n"] == 2
    assert summary.loc[0, "ACC_mean"] == pytest.approx(0.7)


def test_names_show_only_differing_params_and_fall_back_to_label():
    frame = pd.DataFrame(
        {
            "label": ["ewc", "ewc", "replay"],
            "config_key": ["k1", "k2", "k3"],
            "params": [
                params("ewc", "ewc", 0, **{"hparams.ewc_lambda": "10"}),
                params("ewc", "ewc", 1, **{"hparams.ewc_lambda": "1000"}),
                params("replay", "replay", 0),
            ],
        }
    )
    assert list(config_names(frame)) == [
        "ewc (hparams.ewc_lambda=10)",
        "ewc (hparams.ewc_lambda=1000)",
        "replay",
    ]
    # no config_key column at all (frames built by hand): one configuration per label
    legacy = pd.DataFrame({"label": ["a", "a", "b"]})
    assert list(config_names(legacy)) == ["a", "a", "b"]


def test_runs_frame_columns_and_csv_table():
    frame = runs_frame(
        [
            run("ewc", 0, 0.8, chance=False),
            run("ewc", 1, None, status="FAILED", rows=2, error="Traceback\n  ...\nValueError: x\n"),
        ]
    )
    assert list(frame.columns) == list(RUN_COLUMNS)
    assert list(frame.columns[:23]) == [
        "label",
        "method",
        "seed",
        "order",
        "status",
        "scenario",
        "ACC",
        "BWT",
        "FWT",
        "forgetting",
        "stability_gap",
        "min_acc",
        "recency_bias",
        "train_time_s",
        "model_parameters",
        "model_bytes",
        "stored_samples",
        "stored_bytes",
        "run_key",
        "mlflow_run_id",
        "tasks",
        "random_init",
        "R",
    ]
    assert frame.loc[0, "params"]["train.lr"] == "0.1" and frame.loc[0, "attempts"] == 1
    table = runs_table(frame)
    assert not {"R", "random_init", "tasks", "params"} & set(table.columns)
    assert {"config_key", "config", "code_hash", "attempts", "at_chance"} <= set(table.columns)
    assert table.loc[1, "error"] == "ValueError: x"
    back = pd.read_csv(io.StringIO(table.to_csv(index=False)))
    assert len(back) == 2 and back.loc[0, "config"] == "ewc"


# ---------------------------------------------------------------------- failed and partial runs
def ragged_frame() -> pd.DataFrame:
    return runs_frame(
        [
            run("ewc", 0, 0.6),
            run("ewc", 1, 0.7),
            run(
                "ewc",
                3,
                None,
                status="FAILED",
                rows=2,
                error="Traceback (most recent call last):\n  ...\nRuntimeError: boom on task 2\n",
            ),
            run("ewc", 2, 0.8),
            run("boom", 0, None, status="FAILED", rows=None, error="RuntimeError: at init"),
            run("boom", 1, None, status="FAILED", rows=1),
        ]
    )


def test_a_failed_run_with_a_partial_r_is_counted_named_and_left_out_of_curves():
    frame = ragged_frame()
    summary = summarize(frame).set_index("label")
    assert summary.loc["ewc", "n"] == 3 and summary.loc["ewc", "failed"] == 1
    assert summary.loc["ewc", "failed_runs"] == ["ewc-s3"]
    assert summary.loc["ewc", "errors"] == ["RuntimeError: boom on task 2"]
    assert summary.loc["ewc", "short"] == 1 and summary.loc["ewc", "short_runs"] == ["ewc-s3"]
    assert summary.loc["ewc", "ACC_mean"] == pytest.approx(0.7)
    curves = avg_acc_curves(frame)
    assert curves["ewc"].shape == (3, 3)
    # average accuracy on tasks seen: after t0 0.9, after t1 (0.7 + 0.9) / 2, then the final
    assert curves["ewc"].mean(axis=0) == pytest.approx([0.9, 0.8, 0.7])
    R, _, _ = mean_r(frame, "ewc")
    assert R.shape == (3, 3) and R[2] == pytest.approx([0.7, 0.7, 0.7])


def test_a_configuration_whose_runs_all_failed_has_a_row_and_no_plot():
    frame = ragged_frame()
    summary = summarize(frame)
    boom = summary.set_index("label").loc["boom"]
    assert boom["n"] == 0 and boom["failed"] == 2
    assert boom["failed_runs"] == ["boom-s0", "boom-s1"]
    assert math.isnan(boom["ACC_mean"])
    assert "boom" not in avg_acc_curves(frame)
    assert mean_r(frame, "boom") is None
    header, rows = table_rows(summary)
    assert header[:3] == ["method", "n", "failed"] and "at chance" not in header
    assert rows[1][:4] == ["boom", "0", "2", "n/a"]
    md = to_markdown(summary)
    assert "| boom | 0 | 2 | n/a |" in md and "| ewc | 3 | 1 | 70.00 ± 10.00 |" in md
    failures = md.split("Failed runs:")[1]
    assert "- ewc-s3: RuntimeError: boom on task 2" in failures
    assert "- boom-s0: RuntimeError: at init" in failures and "- boom-s1\n" in failures
    assert to_latex(summary).startswith(r"\begin{tabular}{lrrrrrr}")
    csv = to_csv(summary)
    assert csv.splitlines()[0].startswith("label,method,n,ACC_mean,ACC_std,ACC_ci95,BWT_mean")
    back = pd.read_csv(io.StringIO(csv)).set_index("label")
    assert back.loc["boom", "failed_runs"] == "boom-s0; boom-s1"
    assert back.loc["ewc", "failed"] == 1 and "config_key" in back.columns


def test_a_finished_run_with_a_shorter_r_does_not_break_the_stack():
    # no config key and no params: grouped by label, as frames built by hand are
    frame = runs_frame(
        [run("a", 0, 0.5, with_params=False), run("a", 1, 0.6, rows=2, with_params=False)]
    )
    assert summarize(frame).loc[0, "short_runs"] == ["a-s1"]
    assert avg_acc_curves(frame)["a"].shape == (1, 3)
    assert mean_r(frame, "a")[0][2] == pytest.approx([0.5, 0.5, 0.5])


def test_at_chance_column_appears_when_a_run_is_flagged():
    frame = runs_frame(
        [run("a", 0, 0.1, chance=True), run("a", 1, 0.11, chance=True), run("b", 0, 0.9)]
    )
    summary = summarize(frame)
    assert list(summary["at_chance"]) == [2, 0]
    header, rows = table_rows(summary)
    assert header[:3] == ["method", "n", "at chance"] and rows[0][:3] == ["a", "2", "2"]
    header, _ = table_rows(summarize(runs_frame([run("b", 0, 0.9, chance=False)])))
    assert "at chance" not in header


# ---------------------------------------------------------------------- load_experiment
NEW_KEYS = {"lr01": "aaaa1111aaaa1111", "lr005": "aaab2222aaab2222", "replay": "bbbb3333bbbb3333"}


def log_run(
    client: MlflowClient,
    experiment_id: str,
    label: str,
    seed: int,
    acc: float,
    start: int,
    *,
    lr: float = 0.1,
    config_key: str | None = None,
    status: str = "FINISHED",
    run_key: str | None = None,
) -> str:
    tags = {
        "run_key": run_key or f"{label}-{seed}-{lr}",
        "label": label,
        "method": label,
        "seed": str(seed),
        "order": "0",
        "scenario": "domain",
        "lia.kind": "run",
        "code_hash": "c0de",
        "attempts": "2",
        "at_chance": "false",
    }
    if config_key:
        tags["config_key"] = config_key
    else:  # an experiment logged before the new identity: none of the new tags
        for key in ("code_hash", "attempts", "at_chance"):
            tags.pop(key)
    run = client.create_run(experiment_id, start_time=start, tags=tags, run_name=label)
    run_id = run.info.run_id
    client.log_batch(
        run_id, params=[Param(k, v) for k, v in params(label, label, seed, lr).items()]
    )
    client.log_metric(run_id, "ACC", acc)
    client.log_text(run_id, matrix(acc).to_json(), "r_matrix.json")
    client.set_terminated(run_id, status, end_time=start + 100)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    new = client.create_experiment("new", artifact_location=str(tmp / "artifacts-new"))
    log_run(client, new, "finetune", 0, 0.8, 1000, config_key=NEW_KEYS["lr01"])
    log_run(client, new, "finetune", 1, 0.9, 2000, config_key=NEW_KEYS["lr01"])
    log_run(client, new, "replay", 0, 0.95, 3000, config_key=NEW_KEYS["replay"])
    log_run(client, new, "finetune", 0, 0.5, 4000, lr=0.05, config_key=NEW_KEYS["lr005"])
    # the same run executed again: the later finished execution wins
    log_run(client, new, "finetune", 0, 0.3, 5000, lr=0.05, config_key=NEW_KEYS["lr005"])
    # a failed execution is not read back
    log_run(client, new, "replay", 1, 0.0, 6000, config_key=NEW_KEYS["replay"], status="FAILED")
    old = client.create_experiment("old", artifact_location=str(tmp / "artifacts-old"))
    log_run(client, old, "finetune", 0, 0.8, 1000)
    log_run(client, old, "finetune", 1, 0.6, 2000)
    log_run(client, old, "finetune", 0, 0.2, 3000, lr=0.05)
    return uri


def test_load_experiment_reads_every_configuration_and_the_new_tags(store):
    runs = load_experiment("new", store)
    assert len(runs) == 4
    assert list(runs["config"]) == [
        "finetune (train.lr=0.05)",
        "finetune (train.lr=0.1)",
        "finetune (train.lr=0.1)",
        "replay",
    ]
    assert list(runs["config_key"]) == [
        NEW_KEYS["lr005"],
        NEW_KEYS["lr01"],
        NEW_KEYS["lr01"],
        NEW_KEYS["replay"],
    ]
    assert runs.loc[0, "ACC"] == pytest.approx(0.3)  # the latest execution of that run key
    assert set(runs["attempts"]) == {2} and set(runs["code_hash"]) == {"c0de"}
    assert set(runs["at_chance"]) == {False}
    assert runs.loc[0, "params"]["train.lr"] == "0.05" and runs.loc[0, "R"][2] == [0.3] * 3
    summary = summarize(runs).set_index("label")
    assert summary.loc["finetune (train.lr=0.1)", "ACC_mean"] == pytest.approx(0.85)
    assert summary.loc["finetune (train.lr=0.05)", "n"] == 1


def test_load_experiment_selects_a_configuration_by_key_prefix(store):
    runs = load_experiment("new", store, config_key="aaab")
    assert list(runs["config_key"]) == [NEW_KEYS["lr005"]]
    assert list(runs["config"]) == ["finetune (train.lr=0.05)"]  # named as in the experiment
    full = load_experiment("new", store, config_key=NEW_KEYS["replay"])
    assert list(full["label"]) == ["replay"]
    with pytest.raises(ValueError, match="'aaa' is ambiguous") as ambiguous:
        load_experiment("new", store, config_key="aaa")
    assert NEW_KEYS["lr01"] in str(ambiguous.value) and NEW_KEYS["replay"] not in str(
        ambiguous.value
    )
    with pytest.raises(ValueError, match="matches no configuration") as unknown:
        load_experiment("new", store, config_key="ffff")
    message = str(unknown.value)
    for key in NEW_KEYS.values():
        assert key in message
    assert "finetune (train.lr=0.05)" in message and "(replay)" in message


def test_load_experiment_latest_keeps_each_labels_newest_configuration(store):
    runs = load_experiment("new", store, latest=True)
    assert sorted(zip(runs["label"], runs["config_key"], strict=True)) == [
        ("finetune", NEW_KEYS["lr005"]),
        ("replay", NEW_KEYS["replay"]),
    ]


def test_old_runs_without_config_key_still_group_by_configuration(store):
    runs = load_experiment("old", store)
    keys = list(dict.fromkeys(runs["config_key"]))
    assert len(keys) == 2 and all(len(k) == 16 for k in keys)
    summary = summarize(runs).set_index("label")
    assert summary.loc["finetune (train.lr=0.1)", "n"] == 2
    assert summary.loc["finetune (train.lr=0.1)", "ACC_mean"] == pytest.approx(0.7)
    assert summary.loc["finetune (train.lr=0.05)", "ACC_mean"] == pytest.approx(0.2)
    assert set(runs["attempts"]) == {1} and runs["at_chance"].isna().all()


def test_write_report_names_files_after_configurations(store, tmp_path):
    written = write_report("new", tmp_path, ["md", "csv"], store, config_key="aaab")
    heatmap = written["heatmap_finetune (train.lr=0.05)"]
    assert heatmap.name == "r_matrix_finetune_train.lr=0.05.png" and heatmap.exists()
    assert "| finetune (train.lr=0.05) | 1 |" in written["md"].read_text()
    assert "heatmap_replay" not in written
    table = pd.read_csv(written["runs"])
    assert list(table["config_key"]) == [NEW_KEYS["lr005"]] and "R" not in table.columns
    every = write_report("new", tmp_path / "all", ["md"], store)
    assert {k for k in every if k.startswith("heatmap_")} == {
        "heatmap_finetune (train.lr=0.05)",
        "heatmap_finetune (train.lr=0.1)",
        "heatmap_replay",
    }
    latest = write_report("new", tmp_path / "latest", ["md"], store, latest=True)
    assert "heatmap_finetune (train.lr=0.1)" not in latest and "heatmap_replay" in latest


# ---------------------------------------------------------------------- chance level
def info(scenario: str, num_classes: int, task_classes: tuple[tuple[int, ...], ...]) -> StreamInfo:
    names = tuple(f"t{i}" for i in range(len(task_classes)))
    return StreamInfo("split", scenario, (1, 8, 8), num_classes, names, task_classes)


def test_chance_accuracy_per_scenario():
    classes = ((0, 1), (2, 3, 4), (5, 6, 7, 8, 9))
    # task-incremental: outputs masked to the task's classes
    assert chance_accuracy(info("task", 10, classes)) == pytest.approx([1 / 2, 1 / 3, 1 / 5])
    # class-incremental: every output unit competes
    assert chance_accuracy(info("class", 10, classes)) == pytest.approx([0.1] * 3)
    # domain-incremental: the shared head has num_classes units (2 for split domain-IL)
    assert chance_accuracy(info("domain", 2, ((0, 1), (0, 1)))) == pytest.approx([0.5, 0.5])


def test_at_chance_by_hand():
    # 10 classes, 5 tasks of 500 test samples: se = sqrt(5 * 0.1 * 0.9 / 500) / 5 = 0.006,
    # so the bound is 0.1 + 3 * 0.006 = 0.118
    chance, counts = [0.1] * 5, [500] * 5
    assert at_chance([0.10] * 5, chance, counts)
    assert at_chance([0.11] * 5, chance, counts)
    assert at_chance([0.117] * 5, chance, counts)
    assert not at_chance([0.119] * 5, chance, counts)
    assert not at_chance([0.15] * 5, chance, counts)
    # the mean decides: one good task among chance-level ones is 0.1 + 0.5 / 5 = 0.2
    assert not at_chance([0.6, 0.1, 0.1, 0.1, 0.1], chance, counts)
    # one task of 500: se = sqrt(0.09 / 500) = 0.013416, bound 0.14025
    assert at_chance([0.14], [0.1], [500]) and not at_chance([0.141], [0.1], [500])
    # fewer test samples widen the bound: 50 samples, se = 0.042426, bound 0.22728
    assert at_chance([0.22], [0.1], [50]) and not at_chance([0.23], [0.1], [50])
    # task-IL chance levels differ per task: mean chance (0.5 + 0.2) / 2 = 0.35,
    # se = sqrt(0.25 / 100 + 0.16 / 100) / 2 = 0.032016, bound 0.44605
    assert at_chance([0.5, 0.39], [0.5, 0.2], [100, 100])
    assert not at_chance([0.5, 0.4], [0.5, 0.2], [100, 100])
    with pytest.raises(ValueError, match="one per task"):
        at_chance([0.1, 0.1], [0.1], [500, 500])


def test_at_chance_agrees_with_a_simulated_chance_classifier():
    rng = np.random.default_rng(0)
    chance, counts = [0.1] * 5, [500] * 5
    flagged = [
        at_chance(list(rng.binomial(500, 0.1, size=5) / 500), chance, counts) for _ in range(2000)
    ]
    assert np.mean(flagged) > 0.99  # a chance-level classifier is flagged (all but ~0.13%)


# ---------------------------------------------------------------------- significance
def test_paired_permutation_p_values_are_exact():
    from orchestrator.results import paired_p_value

    best = np.array([0.80, 0.82, 0.81, 0.79, 0.83, 0.80])
    assert paired_p_value(best, best) == 1.0
    assert paired_p_value(best[:1] - 0.1, best[:1]) == 1.0  # one pair tells nothing
    # every one of n pairs worse: only the all-minus and all-plus patterns are as extreme
    assert paired_p_value(best[:3] - 0.05, best[:3]) == pytest.approx(2 / 2**3)
    assert paired_p_value(best - 0.05, best) == pytest.approx(2 / 2**6)
    # mixed signs: not distinguishable from no difference
    mixed = best + np.array([0.01, -0.02, 0.015, -0.01, 0.02, -0.015])
    assert paired_p_value(mixed, best) > 0.5


def test_the_report_marks_what_is_not_significantly_different_from_the_best():
    def frame(seeds: int, gap: float) -> pd.DataFrame:
        noise = [0.0, 0.01, -0.01, 0.02, -0.02, 0.005]
        return runs_frame(
            [run("replay", s, 0.9 + noise[s]) for s in range(seeds)]
            + [run("ewc", s, 0.9 + noise[s] - gap) for s in range(seeds)]
        )

    few = summarize(frame(3, 0.05))
    assert list(few["ACC_best"]) == [True, False]
    assert few["ACC_p_vs_best"].iloc[1] == pytest.approx(0.25)
    text = to_markdown(few)
    assert "| best |" in text and "not sig. (p=0.25, 3 pairs)" in text
    assert "too few seeds to tell any two apart" in text
    assert "Fewer than 5 seeds (as few as 3)" in text and "run at least 5 seeds" in text
    many = summarize(frame(6, 0.05))
    assert "Fewer than 5 seeds" not in to_markdown(many)
    assert many["ACC_p_vs_best"].iloc[1] == pytest.approx(2 / 64)
    assert "worse (p=0.0312, 6 pairs)" in to_markdown(many)
    # runs pair by seed: a configuration run on other seeds has nothing to compare
    other = runs_frame([run("replay", 0, 0.9), run("replay", 1, 0.91), run("ewc", 5, 0.5)])
    assert summarize(other)["ACC_pairs"].tolist() == [2, 0]


def test_error_texts_stored_with_runs_are_plain_text():
    """Ray colours the errors it relays; error.txt and the error tag must not carry that."""
    from orchestrator.runner import format_error, plain_text

    coloured = (
        "\x1b[36mray::StreamRunner.run()\x1b[39m (pid=1)\n\x1b[1m\x1b[31mValueError: bad\x1b[0m"
    )
    assert plain_text(coloured) == "ray::StreamRunner.run() (pid=1)\nValueError: bad"
    try:
        raise RuntimeError("\x1b[31mred\x1b[0m")
    except RuntimeError as err:
        text = format_error(err)
    assert "RuntimeError: red" in text and "\x1b" not in text


def test_a_failed_runs_error_is_stored_as_plain_text(tmp_path):
    from orchestrator.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path}/m.db", "plain", str(tmp_path / "art"), 0)
    experiment_id = tracker.ensure_experiment()
    run_id = tracker.client.create_run(experiment_id).info.run_id
    tracker.fail_child(run_id, "\x1b[31mValueError: bad\x1b[0m\n")
    path = tracker.client.download_artifacts(run_id, "error.txt", str(tmp_path))
    assert open(path).read() == "ValueError: bad\n"
    assert tracker.client.get_run(run_id).data.tags["error"] == "ValueError: bad"


def test_the_closing_table_fits_an_80_column_pipe_without_breaking_a_cell():
    import io

    from rich.console import Console

    from orchestrator.progress import summary_table
    from orchestrator.results import SUMMARY_COLUMNS

    rows = []
    for label, acc in [("lstm_meta", 0.8037), ("ewc", 0.1732), ("a_very_long_label_x", 0.6)]:
        row = dict.fromkeys(SUMMARY_COLUMNS)
        row.update(label=label, method=label, n=2, failed=1, at_chance=1, ACC_pairs=2,
                   ACC_best=label == "lstm_meta", ACC_p_vs_best=0.5)  # fmt: skip
        for m, value in (("ACC", acc), ("BWT", -0.9562), ("FWT", -0.0123), ("forgetting", 0.9)):
            row.update({f"{m}_mean": value, f"{m}_std": 0.0139, f"{m}_ci95": 0.12})
        rows.append(row)
    out = io.StringIO()
    Console(file=out, width=80).print(summary_table(pd.DataFrame(rows), "t"))
    lines = out.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    text = out.getvalue()
    for cell in ("80.4±1.4", "-95.6±1.4", "-1.2±1.4", "90.0±1.4", "n.s.", "best"):
        assert cell in text, cell  # whole, on one line
    assert any(line.startswith("lstm_meta ") for line in lines)  # a usual label stays whole


def test_accuracy_axes_fit_the_data_in_percent():
    from orchestrator.plots import _limits

    assert _limits(82.0, 90.0) == (75.0, 95.0)  # 82-90 % curves get the plot, not a tenth
    assert _limits(1.0, 99.0) == (0.0, 100.0)
    assert _limits(40.0, 41.0) == (35.0, 45.0)


def test_forgetting_per_task_follows_the_metrics_definition():
    from orchestrator.results import forgetting_per_task

    R = [[0.9, 0.1, 0.0], [0.6, 0.8, 0.1], [0.5, 0.7, 0.9]]
    frame = pd.DataFrame({"label": ["m"], "config": ["m"], "method": ["m"],
                          "status": ["FINISHED"], "R": [R], "config_key": ["k"]})  # fmt: skip
    out = forgetting_per_task(frame)
    # task 0: best 0.9 before the end, 0.5 at the end; task 1: 0.8 -> 0.7
    assert out["m"].tolist() == [pytest.approx([0.4, 0.1])]


def test_the_terminal_legend_says_when_the_seeds_cannot_separate_anything():
    from orchestrator.results import significance_legend

    frame = pd.DataFrame({"ACC_p_vs_best": [1.0, 0.25], "ACC_pairs": [3, 3]})
    three = significance_legend(frame)
    assert "n.s. = p >= 0.05" in three and "3 seeds: run >= 6" in three and len(three) <= 80
    frame["ACC_pairs"] = [6, 6]
    assert "run >= 6" not in significance_legend(frame)
    assert significance_legend(frame.iloc[:1]) is None  # one configuration: no column
