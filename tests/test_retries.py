"""A dead worker needs no user: its run is retried on a fresh actor and resumes exactly."""

from __future__ import annotations

from conftest import tiny_config, write_config
from mlflow.tracking import MlflowClient

from orchestrator import load_experiment
from orchestrator.cli import main


def _children(uri: str, experiment: str) -> list:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if r.data.tags.get("lia.kind") == "run"]


def test_a_sigkilled_worker_is_retried_and_its_run_resumes_bit_identically(ray_local, tmp_path):
    config = tiny_config(
        tmp_path,
        name="sigkill",
        seeds=[0, 1],
        plugins=["lia_test_plugin"],
        methods={"finetune": {}, "victim": {"method": "sigkill_once_on_task_2"}},
    )
    config["stream"]["num_tasks"] = 4
    config["retries"] = {"max_retries": 2, "backoff_s": 0.2}
    path = write_config(tmp_path, config)
    assert main(["run", str(path), "--no-progress"]) == 0  # no re-run by hand needed
    uri = config["tracking"]["uri"]
    children = _children(uri, "sigkill")
    # one child per run, none FAILED or RUNNING: the retry continued the same MLflow run
    assert sorted((r.data.tags["label"], r.info.status) for r in children) == sorted(
        [(label, "FINISHED") for label in ("finetune", "victim") for _ in (0, 1)]
    )
    victims = [r for r in children if r.data.tags["label"] == "victim"]
    assert {r.data.tags["attempts"] for r in victims} == {"2"}
    assert all("attempt_1_error" in r.data.tags for r in victims)
    client = MlflowClient(tracking_uri=uri)
    for run in victims:  # every task logged once, the re-yielded ones not twice
        history = client.get_metric_history(run.info.run_id, "acc_task_0")
        assert sorted(m.step for m in history) == [0, 1, 2, 3]
    # the victim is fine-tuning that was killed and resumed: same R as undisturbed fine-tuning
    runs = load_experiment("sigkill", tracking_uri=uri)
    for seed in (0, 1):
        pick = runs[runs.seed == seed].set_index("label")
        assert pick.loc["victim", "R"] == pick.loc["finetune", "R"]
    # checkpoints are gone once results are in MLflow, before the command returns
    assert not list((tmp_path / "checkpoints").glob("*/latest.pt"))


def test_a_run_that_keeps_dying_fails_with_its_last_error_and_the_rest_finish(
    ray_local, tmp_path, capsys
):
    config = tiny_config(
        tmp_path,
        name="keeps-dying",
        seeds=[0, 1],
        plugins=["lia_test_plugin"],
        methods={"dies": {"method": "die_on_task_1"}, "finetune": {}},
    )
    config["retries"] = {"max_retries": 1, "backoff_s": 0.1}
    config["resources"] = {"max_concurrent_runs": 1}  # later runs need replacement actors
    assert main(["run", str(write_config(tmp_path, config)), "--no-progress"]) == 1
    out = capsys.readouterr()
    children = _children(config["tracking"]["uri"], "keeps-dying")
    status = sorted((r.data.tags["label"], r.info.status) for r in children)
    assert status == [
        ("dies", "FAILED"),
        ("dies", "FAILED"),
        ("finetune", "FINISHED"),
        ("finetune", "FINISHED"),
    ]
    assert {r.data.tags["attempts"] for r in children if r.data.tags["label"] == "dies"} == {"2"}
    # the summary is printed, with the failed runs counted and named
    text = " ".join((out.out + out.err).split())
    assert "retrying" in text and "dies-s0" in text and "dies-s1" in text
    (header,) = [line.split() for line in out.out.splitlines() if line.startswith("method ")]
    assert "finetune" in out.out and "fail" in header  # the failed runs' column
    # the parent ended with its summary (the failed runs' partial R matrices did not crash it)
    client = MlflowClient(tracking_uri=config["tracking"]["uri"])
    exp = client.get_experiment_by_name("keeps-dying")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`lia.kind` = 'invocation'")
    assert parent.info.status == "FINISHED"
    files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.md", "summary.csv", "comparison.png"} <= files
