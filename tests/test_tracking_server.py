"""The same code against an MLflow tracking server (started here on 127.0.0.1) instead of SQLite."""

from __future__ import annotations

import pytest
from conftest import mlflow_server as start_mlflow_server
from conftest import tiny_config, write_config
from mlflow.tracking import MlflowClient

from orchestrator import load_experiment
from orchestrator.cli import main

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on a free loopback port, with its own store and artifact root."""
    with start_mlflow_server(tmp_path_factory.mktemp("server")) as uri:
        yield uri


def test_lia_run_logs_to_a_tracking_server(mlflow_server, tmp_path):
    config = tiny_config(tmp_path, name="served", methods={"finetune": {}}, seeds=[0])
    config["tracking"] = {"uri": mlflow_server}
    path = write_config(tmp_path, config)
    assert main(["run", str(path), "--no-progress"]) == 0
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("served")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.run_key != ''")
    assert [r.info.status for r in runs] == ["FINISHED"]
    files = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"r_matrix.json", "r_matrix.csv", "r_matrix.png"} <= files
    # read back through the server, and re-running skips the finished run
    frame = load_experiment("served", tracking_uri=mlflow_server)
    assert len(frame) == 1 and len(frame.loc[0, "R"]) == 3
    assert main(["run", str(path), "--no-progress"]) == 0
    assert (
        len(client.search_runs([experiment.experiment_id], filter_string="tags.run_key != ''")) == 1
    )
