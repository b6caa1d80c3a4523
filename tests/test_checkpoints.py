"""Per-task checkpoints: safe format, and a run whose worker died resumes bit-identically."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config, write_config
from mlflow.tracking import MlflowClient

from orchestrator import checkpoints, load_experiment
from orchestrator.cli import main


def test_save_load_round_trip_is_weights_only_and_atomic(tmp_path):
    state = {"model": {"w": torch.arange(3.0)}, "tasks_learned": 2, "name": "x"}
    events = [{"kind": "init", "row": [0.1, 0.2]}, {"kind": "task", "task": 0, "row": [0.9, 0.1]}]
    path = checkpoints.save(tmp_path, "abc", state, events)
    assert path == tmp_path / "abc" / "latest.pt"
    assert [p.name for p in (tmp_path / "abc").iterdir()] == ["latest.pt"]  # no partial left
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["learner"]["model"]["w"], torch.arange(3.0))
    assert checkpoints.load(tmp_path, "abc")["events"] == events
    assert checkpoints.load(tmp_path, "missing") is None
    path.write_bytes(b"not a checkpoint")
    assert checkpoints.load(tmp_path, "abc") is None  # unreadable: start afresh, not crash
    checkpoints.remove(tmp_path, "abc")
    assert not (tmp_path / "abc").exists()


@pytest.mark.usefixtures("ray_local")
def test_a_run_whose_worker_died_resumes_from_its_last_task_on_the_next_invocation(tmp_path):
    config = tiny_config(
        tmp_path,
        name="resume",
        seeds=[0],
        plugins=["lia_test_plugin"],
        methods={"finetune": {}, "flaky": {"method": "die_once_on_task_2"}},
    )
    config["checkpoints"] = {"dir": str(tmp_path / "ckpt")}
    config["retries"] = {"max_retries": 0}  # no automatic retry: the user re-runs the command
    path = write_config(tmp_path, config)
    assert main(["run", str(path), "--no-progress"]) == 1  # the flaky run's worker died
    saved = list((tmp_path / "ckpt").glob("*/latest.pt"))
    assert len(saved) == 1  # the finished run's checkpoint is gone, the died one's remains
    checkpoint = torch.load(saved[0], weights_only=True)
    assert [e["kind"] for e in checkpoint["events"]] == ["init", "task", "task"]
    assert checkpoint["learner"]["tasks_learned"] == 2

    assert main(["run", str(path), "--no-progress"]) == 0
    client = MlflowClient(tracking_uri=config["tracking"]["uri"])
    exp = client.get_experiment_by_name("resume")
    flaky = client.search_runs(
        [exp.experiment_id], "tags.label = 'flaky'", order_by=["attributes.start_time DESC"]
    )
    assert [r.info.status for r in flaky] == ["FINISHED", "FAILED"]
    assert flaky[0].data.tags["resumed_from_task"] == "2"
    # every task is in the resumed run's history, the replayed ones included
    assert [m.step for m in client.get_metric_history(flaky[0].info.run_id, "acc_task_0")] == [
        0,
        1,
        2,
    ]
    # same seed, same math: the resumed run's R equals the uninterrupted fine-tune run's
    runs = load_experiment("resume", tracking_uri=config["tracking"]["uri"]).set_index("label")
    assert runs.loc["flaky", "R"] == runs.loc["finetune", "R"]
    assert runs.loc["flaky", "random_init"] == runs.loc["finetune", "random_init"]
    assert not saved[0].exists()  # removed once the results were in MLflow
