"""Faults lose nothing and leave nothing RUNNING: a killed worker, a killed driver, two drivers.

These start drivers as separate processes (as a user would) where the fault is the driver's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ray
from conftest import tiny_config, write_config
from mlflow.tracking import MlflowClient

from orchestrator import load_experiment
from orchestrator.cli import main


def _children(uri: str, experiment: str) -> list:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if r.data.tags.get("lia.kind") == "run"]


def _all_runs(uri: str, experiment: str) -> list:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=1000)


def _lia(path: Path, cwd: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "run", str(path), "--no-progress", *extra],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _reference_r(config: dict, tmp_path: Path) -> dict[str, list]:
    """R matrix per run key of the same config, run undisturbed in a store of its own."""
    ref = dict(config)
    ref["tracking"] = {
        "uri": f"sqlite:///{tmp_path}/reference.db",
        "artifact_location": str(tmp_path / "reference-artifacts"),
    }
    ref["checkpoints"] = {"dir": str(tmp_path / "reference-checkpoints")}
    (tmp_path / "ref").mkdir()
    assert main(["run", str(write_config(tmp_path / "ref", ref)), "--no-progress"]) == 0
    runs = load_experiment(config["name"], tracking_uri=ref["tracking"]["uri"])
    return dict(zip(runs["run_key"], runs["R"], strict=True))


def _wait_for(predicate, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the driver ended early: {proc.stdout.read()}")
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(0.3)
    raise AssertionError("timed out")


def test_a_killed_driver_leaves_nothing_running_after_a_rerun(tmp_path):
    assert not ray.is_initialized()
    config = tiny_config(tmp_path, name="driver-kill", seeds=[0, 1])
    config["stream"]["num_tasks"] = 4
    config["train"]["epochs"] = 30  # a few seconds a run: time to kill it mid-run
    config["tracking"]["flush_interval_s"] = 0
    path = write_config(tmp_path, config)
    uri = config["tracking"]["uri"]
    driver = _lia(path, tmp_path)
    client = MlflowClient(tracking_uri=uri)

    def some_task_done() -> bool:
        return any(
            client.get_metric_history(r.info.run_id, "acc_task_0")
            for r in _children(uri, "driver-kill")
        )

    _wait_for(some_task_done, 120, driver)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    running = [r for r in _all_runs(uri, "driver-kill") if r.info.status == "RUNNING"]
    assert running  # the dead driver left its parent and in-flight children RUNNING

    assert main(["run", str(path), "--no-progress"]) == 0
    everything = _all_runs(uri, "driver-kill")
    assert not [r for r in everything if r.info.status == "RUNNING"]
    for run in everything:
        if run.info.run_id in {r.info.run_id for r in running}:
            assert run.info.status == "KILLED"
            assert "no longer running" in run.data.tags["lia.end_reason"]
    finished = [r for r in _children(uri, "driver-kill") if r.info.status == "FINISHED"]
    keys = [r.data.tags["run_key"] for r in finished]
    assert len(keys) == len(set(keys)) == 4  # every run once, no duplicate
    runs = load_experiment("driver-kill", tracking_uri=uri)
    assert dict(zip(runs["run_key"], runs["R"], strict=True)) == _reference_r(config, tmp_path)


def test_sigterm_ends_the_live_runs_killed_and_keeps_their_checkpoints(tmp_path):
    config = tiny_config(tmp_path, name="sigterm", seeds=[0])
    # many tasks after the first, so the runs are still live when the signal arrives however
    # slowly this machine polls MLflow
    config["stream"]["num_tasks"] = 12
    config["train"]["epochs"] = 30
    config["tracking"]["flush_interval_s"] = 0
    uri = config["tracking"]["uri"]
    driver = _lia(write_config(tmp_path, config), tmp_path)
    client = MlflowClient(tracking_uri=uri)
    _wait_for(
        lambda: any(
            client.get_metric_history(r.info.run_id, "acc_task_0")
            for r in _children(uri, "sigterm")
        ),
        120,
        driver,
    )
    driver.send_signal(signal.SIGTERM)
    out = driver.communicate(timeout=60)[0]
    assert driver.returncode == 130, out
    assert "Traceback" not in out and "checkpoint is kept at" in out
    statuses = {r.info.status for r in _all_runs(uri, "sigterm")}
    assert "RUNNING" not in statuses and "KILLED" in statuses
    assert list((tmp_path / "checkpoints").glob("*/latest.pt"))


def test_two_concurrent_invocations_compute_every_run_once(tmp_path):
    assert not ray.is_initialized()
    config = tiny_config(tmp_path, name="twice", seeds=[0, 1])
    config["train"]["epochs"] = 10
    path = write_config(tmp_path, config)  # a fresh folder: no mlflow.db yet
    first, second = _lia(path, tmp_path), _lia(path, tmp_path)
    outputs = [p.communicate(timeout=300)[0] for p in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outputs
    assert all("Traceback" not in out for out in outputs), outputs
    children = _children(config["tracking"]["uri"], "twice")
    finished = [r.data.tags["run_key"] for r in children if r.info.status == "FINISHED"]
    assert len(finished) == len(set(finished)) == 4, finished  # each computed once
    assert not [
        r for r in _all_runs(config["tracking"]["uri"], "twice") if r.info.status == "RUNNING"
    ]
    # both print the whole table: the runs one waited for count as reused there
    for out in outputs:
        assert "finetune" in out and "replay" in out and "runs: " in out


def test_reconcile_ends_only_dead_invocations_runs(tmp_path):
    from orchestrator.tracking import Tracker, liveness_tags

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "reconcile")
    exp = tracker.ensure_experiment()
    client = tracker.client
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = {**liveness_tags(), "lia.pid": str(dead.pid), "lia.kind": "invocation"}
    alive = {**liveness_tags(), "lia.kind": "invocation"}
    dead_parent = client.create_run(exp, tags=gone).info.run_id
    live_parent = client.create_run(exp, tags=alive).info.run_id
    dead_child = client.create_run(
        exp, tags={"lia.kind": "run", "mlflow.parentRunId": dead_parent, "run_key": "a"}
    ).info.run_id
    live_child = client.create_run(
        exp, tags={"lia.kind": "run", "mlflow.parentRunId": live_parent, "run_key": "b"}
    ).info.run_id
    legacy = client.create_run(exp, tags={"lia.kind": "invocation"}).info.run_id
    ended = Tracker(uri, "reconcile").reconcile()
    assert len(ended) == 3
    status = {rid: client.get_run(rid).info.status for rid in (dead_parent, dead_child, legacy)}
    assert set(status.values()) == {"KILLED"}
    assert "no longer running" in client.get_run(dead_child).data.tags["lia.end_reason"]
    assert client.get_run(live_parent).info.status == "RUNNING"
    assert client.get_run(live_child).info.status == "RUNNING"
    # a stale heartbeat from another host counts as dead; a fresh one as alive
    other = {**alive, "lia.host": "elsewhere", "lia.heartbeat": str(time.time() - 3600)}
    stale = client.create_run(exp, tags=other).info.run_id
    fresh = client.create_run(exp, tags={**other, "lia.heartbeat": str(time.time())}).info.run_id
    Tracker(uri, "reconcile").reconcile()
    assert client.get_run(stale).info.status == "KILLED"
    assert client.get_run(fresh).info.status == "RUNNING"
    assert os.getpid() == int(client.get_run(live_parent).data.tags["lia.pid"])
