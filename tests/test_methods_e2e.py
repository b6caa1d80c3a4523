"""Every registered method through `lia run` on the Ray actors: checkpoints, events, MLflow."""

from __future__ import annotations

import pytest
from conftest import tiny_config, write_config
from mlflow.tracking import MlflowClient
from test_learners import METHOD_HPARAMS, METHOD_SECTIONS, REGISTERED

from learners import LEARNERS
from orchestrator.cli import main


@pytest.mark.usefixtures("ray_local")
def test_every_method_runs_under_lia_run(tmp_path):
    methods = {name: dict(METHOD_HPARAMS.get(name, {})) for name in REGISTERED}
    # a composed method runs like any other (the Ray actor composes it from its name)
    methods["ewc_head"] = {"method": "ewc+expanding_head", **METHOD_HPARAMS["ewc"]}
    config = tiny_config(tmp_path, name="every", methods=methods, seeds=[0])
    # the task-incremental scenario: every method supports it (progressive and packnet only it)
    assert all("task" in LEARNERS[name].SCENARIOS for name in REGISTERED)
    config["stream"] = {"name": "split", "source": "digits", "num_tasks": 2, "scenario": "task",
                        "train_per_task": 100, "test_per_task": 50}  # fmt: skip
    config["train"] = {"epochs": 1, "batch_size": 10, "optimizer": "adam", "lr": 0.01}
    for sections in METHOD_SECTIONS.values():  # e.g. meta_training, for lstm_meta
        config.update(sections)
    assert main(["run", str(write_config(tmp_path, config)), "--no-progress"]) == 0
    client = MlflowClient(tracking_uri=config["tracking"]["uri"])
    experiment = client.get_experiment_by_name("every")
    runs = client.search_runs([experiment.experiment_id], "tags.`lia.kind` = 'run'")
    finished = {r.data.tags["method"]: r for r in runs if r.info.status == "FINISHED"}
    assert set(finished) == {*REGISTERED, "ewc+expanding_head"}
    for name, run in finished.items():
        assert 0.0 <= run.data.metrics["ACC"] <= 1.0, name
        assert run.data.metrics["stored_bytes"] >= 0, name
