"""Per-task checkpoints: safe format, and a run whose worker died resumes bit-identically."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config, write_config
from mlflow.tracking import MlflowClient

from orchestrator import checkpoints, load_experiment
from orchestrator.cli import main


@pytest.mark.parametrize("where", ["folder", "memory://"])
def test_save_load_round_trip_is_weights_only_and_atomic(tmp_path, where):
    """The same checkpoint round trip in a local folder and at an fsspec URI (memory://: an
    in-process filesystem; tests/test_cluster.py runs an S3 server)."""
    from learners import storage

    root = str(tmp_path) if where == "folder" else f"memory://ckpt-{tmp_path.name}"
    state = {"model": {"w": torch.arange(3.0)}, "tasks_learned": 2, "name": "x"}
    events = [{"kind": "init", "row": [0.1, 0.2]}, {"kind": "task", "task": 0, "row": [0.9, 0.1]}]
    path = checkpoints.save(root, "abc", state, events)
    assert path == f"{root}/abc/latest.pt"
    if where == "folder":
        assert [p.name for p in (tmp_path / "abc").iterdir()] == ["latest.pt"]  # no partial
    loaded = storage.load(path)
    assert torch.equal(loaded["learner"]["model"]["w"], torch.arange(3.0))
    assert checkpoints.load(root, "abc")["events"] == events
    assert checkpoints.load(root, "missing") is None
    torch.save({"f": print}, tmp_path / "pickled.pt")  # a checkpoint that is not weights-only
    storage.save({"ok": 1}, path)  # overwrite, then plant the unsafe bytes at the same place
    unsafe = (tmp_path / "pickled.pt").read_bytes()
    if where == "folder":
        (tmp_path / "abc" / "latest.pt").write_bytes(unsafe)
    else:
        import fsspec

        fsspec.filesystem("memory").pipe_file(path.split("://", 1)[1], unsafe)
    assert checkpoints.load(root, "abc") is None  # refused: never unpickled
    storage.save({"ok": 1}, path)
    assert checkpoints.load(root, "abc") == {"ok": 1}
    checkpoints.remove(root, "abc")
    assert not storage.exists(f"{root}/abc/latest.pt") and checkpoints.load(root, "abc") is None


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
