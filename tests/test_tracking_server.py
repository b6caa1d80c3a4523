"""The same code against an MLflow tracking server (started here on 127.0.0.1) instead of SQLite."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import tiny_config, write_config
from mlflow.tracking import MlflowClient

from orchestrator import load_experiment
from orchestrator.cli import main

pytestmark = pytest.mark.usefixtures("ray_local")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on a free loopback port, with its own store and artifact root."""
    root = tmp_path_factory.mktemp("server")
    port = _free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    process = subprocess.Popen(
        [
            str(mlflow),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root}/server.db",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{uri}/health", timeout=1).ok:
                break
        except requests.RequestException:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("the MLflow server did not start within 90 s")
    yield uri
    process.terminate()
    process.wait(timeout=30)


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
