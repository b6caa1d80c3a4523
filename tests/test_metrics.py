"""Metrics against hand-worked R matrices."""

import json

import pytest

from learners.metrics import CLASS_IL_FWT_REASON, RMatrix, compute_metrics

# Three tasks. random-init b = [0.1, 0.2, 0.3]
#   after t0: [0.9, 0.4, 0.35]
#   after t1: [0.7, 0.8, 0.5]
#   after t2: [0.6, 0.7, 0.95]
R3 = RMatrix(
    ["a", "b", "c"],
    [0.1, 0.2, 0.3],
    [[0.9, 0.4, 0.35], [0.7, 0.8, 0.5], [0.6, 0.7, 0.95]],
)


def test_three_task_metrics_by_hand():
    m = compute_metrics(R3, "domain")
    assert m.acc == pytest.approx((0.6 + 0.7 + 0.95) / 3)
    # BWT: ((0.6 - 0.9) + (0.7 - 0.8)) / 2 = -0.2
    assert m.bwt == pytest.approx(-0.2)
    # FWT: ((0.4 - 0.2) + (0.5 - 0.3)) / 2 = 0.2
    assert m.fwt == pytest.approx(0.2)
    # forgetting: task a: max(0.9, 0.7) - 0.6 = 0.3; task b: max(0.4, 0.8) - 0.7 = 0.1
    assert m.forgetting_per_task == pytest.approx([0.3, 0.1])
    assert m.forgetting == pytest.approx(0.2)
    assert m.undefined == {}


def test_forgetting_uses_the_best_earlier_row_not_the_diagonal():
    r = RMatrix(["a", "b", "c"], [0, 0, 0], [[0.5, 0, 0], [0.9, 0.5, 0], [0.4, 0.5, 0.5]])
    m = compute_metrics(r, "task")
    assert m.forgetting_per_task == pytest.approx([0.5, 0.0])
    assert m.bwt == pytest.approx(((0.4 - 0.5) + (0.5 - 0.5)) / 2)


def test_one_task_stream():
    r = RMatrix(["only"], [0.1], [[0.8]])
    m = compute_metrics(r, "task")
    assert m.acc == pytest.approx(0.8)
    assert m.bwt is None and m.fwt is None and m.forgetting is None
    assert set(m.undefined) == {"BWT", "FWT", "forgetting"}


def test_class_incremental_fwt_is_undefined_with_reason():
    m = compute_metrics(R3, "class")
    assert m.fwt is None
    assert m.undefined["FWT"] == CLASS_IL_FWT_REASON
    assert m.bwt == pytest.approx(-0.2)


def test_incomplete_matrix_is_refused():
    r = RMatrix(["a", "b"], [0.5, 0.5], [[0.9, 0.1]])
    with pytest.raises(ValueError, match="1 of 2 rows"):
        compute_metrics(r, "domain")


def test_json_shape_and_round_trip(tmp_path):
    path = tmp_path / "r_matrix.json"
    R3.save_json(path)
    data = json.loads(path.read_text())
    assert set(data) == {"tasks", "random_init", "R"}
    assert data["R"][1][0] == 0.7
    assert RMatrix.load_json(path) == R3


def test_csv_layout():
    lines = R3.to_csv().strip().splitlines()
    assert lines[0] == "after,a,b,c"
    assert lines[1] == "random_init,0.1,0.2,0.3"
    assert lines[3] == "after_b,0.7,0.8,0.5"


def test_shape_checks():
    with pytest.raises(ValueError, match="random_init"):
        RMatrix(["a", "b"], [0.1], [])
    r = RMatrix(["a"], [0.1])
    r.append([0.5])
    with pytest.raises(ValueError, match="complete"):
        r.append([0.6])
    assert r.avg_acc_seen(0) == 0.5


def test_summary_counts_failures_and_aggregates_over_seeds():
    import math

    import pandas as pd

    from orchestrator.results import summarize, to_markdown

    runs = pd.DataFrame(
        [
            {
                "label": "a",
                "method": "ewc",
                "status": "FINISHED",
                "ACC": 0.5,
                "BWT": -0.1,
                "FWT": 0.0,
                "forgetting": 0.2,
            },
            {
                "label": "a",
                "method": "ewc",
                "status": "SKIPPED",
                "ACC": 0.7,
                "BWT": -0.3,
                "FWT": 0.0,
                "forgetting": 0.4,
            },
            {
                "label": "b",
                "method": "replay",
                "status": "FAILED",
                "ACC": None,
                "BWT": None,
                "FWT": None,
                "forgetting": None,
            },
        ]
    )
    summary = summarize(runs).set_index("label")
    assert summary.loc["a", "n"] == 2 and summary.loc["a", "failed"] == 0
    assert summary.loc["a", "ACC_mean"] == pytest.approx(0.6)
    assert summary.loc["a", "ACC_std"] == pytest.approx(math.sqrt(0.02))
    # t(0.975, 1) = 12.706: the 95% half-width of two samples is 12.706 * std / sqrt(2)
    assert summary.loc["a", "ACC_ci95"] == pytest.approx(
        12.7062 * math.sqrt(0.02) / math.sqrt(2), rel=1e-4
    )
    assert summary.loc["b", "n"] == 0 and summary.loc["b", "failed"] == 1
    table = to_markdown(summary.reset_index())
    assert "| a | 2 | 0 | 60.00 ± 14.14 |" in table and "| b | 0 | 1 | n/a |" in table
    assert "| a | 2 | 0 | 60.00 ± 127.06 |" in table  # the 95% interval table


def test_continual_evaluation_metrics_against_hand_worked_curves():
    from learners.metrics import NO_CURVE_REASON, continual_eval

    # 3 tasks; task 0 reaches 0.9, dips to 0.3 early in task 1 and recovers to 0.8 by its
    # end; during task 2 it dips to 0.5 and ends at 0.7. Task 1 reaches 0.9, dips to 0.4.
    R = [[0.9, 0.1, 0.1], [0.8, 0.9, 0.1], [0.7, 0.6, 0.9]]
    curves = [
        [[0.5, 0.1, 0.1]],  # during task 0 (no old task: unused)
        [[0.3, 0.5, 0.1], [0.6, 0.8, 0.1]],  # during task 1
        [[0.5, 0.4, 0.6], [0.6, 0.5, 0.8]],  # during task 2
    ]
    m = continual_eval(R, curves)
    # switch 1: task 0 from 0.9 to min 0.3 -> 0.6; switch 2: task 0 0.8 -> 0.5 (0.3),
    # task 1 0.9 -> 0.4 (0.5): mean 0.4; overall mean of the switches (0.6 + 0.4) / 2
    assert m.gap_per_switch == pytest.approx([0.6, 0.4])
    assert m.stability_gap == pytest.approx(0.5)
    # min-ACC: task 0's lowest after it was learned 0.3, task 1's 0.4 -> 0.35
    assert m.min_acc == pytest.approx(0.35)
    # R alone hides the dip: its forgetting of task 0 is only 0.2
    assert max(r[0] for r in R[:2]) - R[2][0] == pytest.approx(0.2)
    # without curves: min-ACC from R only, no stability gap (with the reason)
    bare = continual_eval(R, [])
    assert bare.stability_gap is None and bare.undefined["stability_gap"] == NO_CURVE_REASON
    assert bare.min_acc == pytest.approx((0.7 + 0.6) / 2)


def test_recency_bias_is_the_share_of_old_samples_sent_to_the_newest_classes():
    from learners.metrics import recency_bias

    assert recency_bias([4, 5, 4, 0, 1, 2], {4, 5}) == pytest.approx(0.5)
    assert recency_bias([4, 4, 5], {4, 5}) == 1.0
    assert recency_bias([], {4, 5}) is None
