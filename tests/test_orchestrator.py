"""End to end through Ray and MLflow: lia run, skipping, failures, reports, the Python API."""

from __future__ import annotations

import re

import matplotlib.colors
import pytest
from conftest import tiny_config, write_config
from mlflow.tracking import MlflowClient

from learners.metrics import RMatrix, compute_metrics
from orchestrator import load_experiment, plots, run_experiment
from orchestrator.cli import main
from orchestrator.report import write_report

pytestmark = pytest.mark.usefixtures("ray_local")


def _runs(client: MlflowClient, experiment: str, kind: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if r.data.tags.get("lia.kind") == kind]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny experiment, run once through the CLI."""
    tmp_path = tmp_path_factory.mktemp("tiny")
    path = write_config(tmp_path, tiny_config(tmp_path))
    rc = main(["run", str(path), "--no-progress"])
    return tmp_path, path, rc


def test_lia_run_logs_parent_and_children(tiny_run, tmp_path):
    tmp, _, rc = tiny_run
    assert rc == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    parents = _runs(client, "tiny", "invocation")
    children = _runs(client, "tiny", "run")
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    parent_files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {
        "config.yaml",
        "summary.csv",
        "summary.md",
        "comparison.png",
        "runs.csv",
    } <= parent_files
    assert parent.data.tags["code_version"]
    # told apart in the runs table: the config's name and a short hash of it; and the
    # summary metrics of its configurations, to compare them at a glance
    assert re.fullmatch(r"tiny: config [0-9a-f]{8} · \d\d-\d\d \d\d:\d\d", parent.info.run_name)
    finetune_acc = [c.data.metrics["ACC"] for c in children if c.data.tags["label"] == "finetune"]
    assert parent.data.metrics["ACC/finetune"] == pytest.approx(sum(finetune_acc) / 2)
    assert {"ACC/replay", "BWT/replay", "forgetting/finetune"} <= set(parent.data.metrics)
    for child in children:
        tags = child.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["method"] in {"finetune", "replay"}
        assert tags["stream"] == "permuted" and tags["seed"] in {"0", "1"}
        assert len(tags["run_key"]) == 16
        assert child.info.status == "FINISHED"
        note = tags["mlflow.note.content"]  # the run page's description
        assert f"seed {tags['seed']}" in note and "permuted digits" in note and "3 tasks" in note
        params = child.data.params
        assert params["stream.name"] == "permuted" and params["train.lr"] == "0.1"
        if tags["method"] == "replay":
            assert params["hparams.buffer_size"] == "50"
        files = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"r_matrix.json", "r_matrix.csv", "r_matrix.png"} <= files
        local = tmp_path / child.info.run_id
        local.mkdir()
        r = RMatrix.load_json(
            client.download_artifacts(child.info.run_id, "r_matrix.json", str(local))
        )
        assert len(r.R) == 3 and r.tasks == ["perm0", "perm1", "perm2"]
        # every acc_task_j logged at step i equals R[i][j]
        for j in range(3):
            history = client.get_metric_history(child.info.run_id, f"acc_task_{j}")
            assert sorted((m.step, m.value) for m in history) == [
                (i, pytest.approx(r.R[i][j])) for i in range(3)
            ]
        seen = client.get_metric_history(child.info.run_id, "avg_acc_seen")
        assert [m.step for m in sorted(seen, key=lambda m: m.step)] == [0, 1, 2]
        # the logged metrics equal those recomputed from r_matrix.json
        recomputed = compute_metrics(r, "domain").as_dict()
        for name, value in recomputed.items():
            assert child.data.metrics[name] == pytest.approx(value), name
        assert child.data.metrics["train_time_s"] > 0


def test_second_invocation_creates_no_child_runs(tiny_run, capsys):
    tmp, path, _ = tiny_run
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    before = {r.info.run_id for r in _runs(client, "tiny", "run")}
    assert main(["run", str(path), "--no-progress"]) == 0
    after = {r.info.run_id for r in _runs(client, "tiny", "run")}
    assert after == before
    err = capsys.readouterr().err
    assert "4 of 4 runs already finished" in err and "nothing computed: no parent run" in err
    assert len(_runs(client, "tiny", "invocation")) == 1  # no empty parent for it
    # a changed setting is a new run; the unchanged ones are still skipped
    assert main(["run", str(path), "--no-progress", "seeds=[0,1,2]"]) == 0
    newer = {r.info.run_id for r in _runs(client, "tiny", "run")}
    assert len(newer - before) == 2
    names = sorted(p.info.run_name for p in _runs(client, "tiny", "invocation"))
    assert len(names) == 2 and names[1].startswith("tiny: seeds=[0,1,2] · ")


def test_failed_run_is_marked_and_others_finish(ray_local, tmp_path):
    config = tiny_config(
        tmp_path,
        name="fails",
        seeds=[0],
        methods={"finetune": {}, "boom": {"method": "explode_on_task_1"}},
        plugins=["lia_test_plugin"],
    )
    rc = main(["run", str(write_config(tmp_path, config)), "--no-progress"])
    assert rc == 1
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    by_label = {r.data.tags["label"]: r for r in _runs(client, "fails", "run")}
    assert by_label["finetune"].info.status == "FINISHED"
    failed = by_label["boom"]
    assert failed.info.status == "FAILED"
    error = client.download_artifacts(failed.info.run_id, "error.txt", str(tmp_path))
    assert "boom on task 1" in open(error).read()
    # the row of the task it did finish was logged before the failure
    assert len(client.get_metric_history(failed.info.run_id, "acc_task_0")) == 1


def test_report_writes_tables_and_plots(tiny_run, tmp_path):
    tmp, _, _ = tiny_run
    written = write_report(
        "tiny",
        tmp_path / "report",
        ["md", "csv", "latex"],
        tracking_uri=f"sqlite:///{tmp}/mlflow.db",
    )
    md = written["md"].read_text()
    assert "finetune" in md and "replay" in md and "ACC (%)" in md
    assert written["latex"].read_text().startswith(r"\begin{tabular}")
    for key in ("heatmap_finetune", "heatmap_replay", "curves", "forgetting"):
        assert written[key].stat().st_size > 1000
    summary = written["csv"].read_text().splitlines()
    assert summary[0].startswith("label,method,n,ACC_mean")
    assert (
        main(
            [
                "report",
                "tiny",
                "--tracking-uri",
                f"sqlite:///{tmp}/mlflow.db",
                "--out",
                str(tmp_path / "cli"),
            ]
        )
        == 0
    )
    assert (tmp_path / "cli" / "summary.md").exists()
    # vector figures for a paper, titled with what they show, one colour per method in all
    vector = write_report("tiny", tmp_path / "svg", ["md"], f"sqlite:///{tmp}/mlflow.db",
                          figure_format="svg")  # fmt: skip
    heatmap = vector["heatmap_replay"].read_text()
    assert vector["heatmap_replay"].suffix == ".svg"
    title = r">replay on permuted digits, domain-IL, 3 tasks: R, mean of \d runs<"
    assert re.search(title, heatmap)
    colours = {name: matplotlib.colors.to_hex(c) for name, c in plots.palette(
        ["finetune", "replay"]).items()}  # fmt: skip
    for figure in ("curves", "forgetting", "acc_vs_size"):
        text = vector[figure].read_text()
        assert colours["finetune"] in text and colours["replay"] in text, figure
    assert main(["report", "tiny", "--tracking-uri", f"sqlite:///{tmp}/mlflow.db", "--out",
                 str(tmp_path / "pdf"), "--figure-format", "pdf"]) == 0  # fmt: skip
    pdfs = sorted(p.name for p in (tmp_path / "pdf").glob("*.pdf"))
    assert pdfs == ["acc_vs_size.pdf", "avg_accuracy.pdf", "forgetting.pdf",
                    "r_matrix_finetune.pdf", "r_matrix_replay.pdf"]  # fmt: skip
    assert (tmp_path / "pdf" / "forgetting.pdf").read_bytes().startswith(b"%PDF")
    assert (
        main(["report", "no-such-experiment", "--tracking-uri", f"sqlite:///{tmp}/mlflow.db"]) == 2
    )


def test_python_api_runs_and_loads(tiny_run, tmp_path):
    tmp, _, _ = tiny_run
    runs = load_experiment("tiny", tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    assert len(runs) == 6  # 2 methods x 3 seeds after the second test's extra seed
    assert set(runs.columns) >= {"label", "seed", "ACC", "BWT", "FWT", "forgetting", "R"}
    # a fresh experiment through the API: same seeds give bit-identical R matrices
    config = tiny_config(tmp_path, name="api", methods={"finetune": {}}, seeds=[0])
    fresh = run_experiment(config)
    assert list(fresh["status"]) == ["FINISHED"]
    # its checkpoint went with it (the actor deleted it before the command returned)
    assert not list((tmp_path / "checkpoints").glob("*/latest.pt"))
    original = runs[(runs.label == "finetune") & (runs.seed == 0)].iloc[0]
    assert fresh.iloc[0]["R"] == original["R"]
    assert fresh.iloc[0]["ACC"] == original["ACC"]


def test_rows_of_concurrent_runs_arrive_interleaved_and_live(ray_local, tmp_path):
    from orchestrator.config import load_config
    from orchestrator.driver import execute

    config = tiny_config(tmp_path, name="live", methods={"finetune": {}}, seeds=[0, 1])
    config["stream"]["num_tasks"] = 6
    config["train"]["epochs"] = 200  # ~3 s a run, far longer than the actors' start-up skew
    result = execute(load_config(config), progress=False)
    tasks = [(name, task) for _, name, kind, task in result.arrivals if kind == "task"]
    assert len(tasks) == 12
    names = [name for name, _ in tasks]
    # both runs ran at once on the two actors: each one's rows arrive before the other ends
    first_end = {n: max(i for i, m in enumerate(names) if m == n) for n in set(names)}
    first_start = {n: min(i for i, m in enumerate(names) if m == n) for n in set(names)}
    a, b = sorted(first_end)
    assert first_start[b] < first_end[a] and first_start[a] < first_end[b]
    # and each run's rows arrive in task order, one per finished task
    for n in (a, b):
        assert [t for m, t in tasks if m == n] == list(range(6))


def test_class_incremental_runs_leave_fwt_out_with_a_reason(ray_local, tmp_path):
    config = tiny_config(tmp_path, name="class-il", methods={"finetune": {}}, seeds=[0])
    config["stream"] = {
        "name": "split",
        "source": "digits",
        "num_tasks": 2,
        "classes_per_task": 5,
        "scenario": "class",
    }
    assert main(["run", str(write_config(tmp_path, config)), "--no-progress"]) == 0
    client = MlflowClient(tracking_uri=config["tracking"]["uri"])
    (child,) = _runs(client, "class-il", "run")
    assert "FWT" not in child.data.metrics and "BWT" in child.data.metrics
    assert "class-incremental" in child.data.tags["undefined.FWT"]
    assert child.data.tags["scenario"] == "class"


def test_continual_evaluation_reaches_mlflow_on_a_global_step_axis(ray_local, tmp_path):
    config = tiny_config(tmp_path, name="during", seeds=[0], methods={"finetune": {}})
    config["stream"] = {"name": "split", "source": "digits", "num_tasks": 2, "scenario": "class",
                        "train_per_task": 100, "test_per_task": 50}  # fmt: skip
    config["train"]["eval_every_steps"] = 4
    assert main(["run", str(write_config(tmp_path, config)), "--no-progress"]) == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (child,) = _runs(client, "during", "run")
    history = sorted(client.get_metric_history(child.info.run_id, "during_acc_task_0"),
                     key=lambda m: m.step)  # fmt: skip
    steps = [m.step for m in history]
    # 100 samples / batch 10 = 10 steps a task: measured at 4, 8 and the end (10), then
    # 14, 18, 20 on the run's global axis
    assert steps == [4, 8, 10, 14, 18, 20]
    r = load_experiment("during", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").loc[0, "R"]
    assert [history[2].value, history[5].value] == pytest.approx([r[0][0], r[1][0]])
    metrics = child.data.metrics
    assert {"stability_gap", "min_acc", "recency_bias"} <= set(metrics)
    assert metrics["min_acc"] <= min(m.value for m in history[3:]) + 1e-9
    report = write_report("during", tmp_path / "report", ["md"], f"sqlite:///{tmp_path}/mlflow.db")
    md = report["md"].read_text()
    assert "Continual evaluation" in md and "| stability_gap | min_acc | recency_bias |" in md
