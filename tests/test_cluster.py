"""Across nodes: a lost node's runs resume elsewhere from checkpoints in an object store.

A real S3-compatible server (moto's server mode) runs on 127.0.0.1 for the module; a
three-node ``ray.cluster_utils.Cluster`` (a head with no CPU for runs, two one-CPU workers)
stands for a cluster; ``lia run`` drives it as a separate process, as a user would.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from conftest import free_port, mlflow_server, tiny_config, write_config
from mlflow.tracking import MlflowClient
from test_faults import _children, _reference_r, _wait_for

from orchestrator import load_experiment

BUCKET = "lia-checkpoints"


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on 127.0.0.1, a bucket in it, and the environment that points fsspec
    (and every process started after: Ray's nodes, their workers, the driver) at it."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        import boto3

        s3 = boto3.client("s3", endpoint_url=env["FSSPEC_S3_ENDPOINT_URL"])
        s3.create_bucket(Bucket=BUCKET)
        yield s3
    finally:
        server.terminate()
        server.wait(timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_checkpoints_at_an_s3_uri_round_trip_and_a_bad_bucket_is_refused(s3_server, tmp_path):
    from learners import storage
    from orchestrator import checkpoints

    root = f"s3://{BUCKET}/unit"
    path = checkpoints.save(root, "k", {"w": [1, 2]}, [{"kind": "init"}])
    assert path == f"s3://{BUCKET}/unit/k/latest.pt" and storage.size(path) > 0
    keys = [o["Key"] for o in s3_server.list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert "unit/k/latest.pt" in keys  # really in the server's bucket
    assert checkpoints.load(root, "k") == {"format": 1, "learner": {"w": [1, 2]},
                                           "events": [{"kind": "init"}]}  # fmt: skip
    checkpoints.remove(root, "k")
    assert checkpoints.load(root, "k") is None
    # a bucket that does not exist: one clear error, before any run starts, nothing written
    config = tiny_config(tmp_path, name="bad-bucket")
    config["checkpoints"] = {"dir": "s3://no-such-bucket/x"}
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", str(write_config(tmp_path, config))],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "checkpoints.dir='s3://no-such-bucket/x' cannot be written" in out, out
    assert "Traceback" not in out and not (tmp_path / "mlflow.db").exists()


def test_a_removed_node_s_run_resumes_on_the_remaining_node_from_s3(s3_server, tmp_path):
    """Two runs spread over two worker nodes; one node is removed mid-run; its run resumes on
    the other node from its checkpoint in the object store: exit 0, R bit-identical to an
    undisturbed run, every child run FINISHED once, none missing, duplicated or RUNNING."""
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    config = tiny_config(tmp_path, name="lost-node", seeds=[0])
    config["stream"]["num_tasks"] = 8
    config["train"]["epochs"] = 15  # a second or so per task: the removal lands mid-run
    config["tracking"]["flush_interval_s"] = 0
    config["retries"] = {"backoff_s": 0.5}
    config["resources"] = {"cpus_per_run": 1}
    config["checkpoints"] = {"dir": f"s3://{BUCKET}/lost-node"}
    uri = config["tracking"]["uri"]
    reference = _reference_r({**config, "checkpoints": {"dir": str(tmp_path / "ref-ck")}},
                             tmp_path)  # fmt: skip

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False},  # runs go to workers
    )
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    driver = None
    try:
        driver = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "run", str(write_config(tmp_path, config)),
             "--no-progress", "--address", cluster.address],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        client = MlflowClient(tracking_uri=uri)

        def both_live_on_two_nodes() -> bool:
            children = _children(uri, "lost-node")
            nodes = {c.data.tags.get("node") for c in children}
            started = all(
                len(client.get_metric_history(c.info.run_id, "acc_task_0")) >= 2 for c in children
            )  # fmt: skip (rows: the initial one, task 0's)
            return len(children) == 2 and started and len(nodes - {None}) == 2

        _wait_for(both_live_on_two_nodes, 180, driver)
        children = _children(uri, "lost-node")
        victim = next(w for w in workers if w.node_id == children[0].data.tags["node"])
        survivor = next(w for w in workers if w is not victim)
        victim_run = children[0].info.run_id
        rows = len(client.get_metric_history(victim_run, "acc_task_0"))
        assert rows < 9, "the run finished before the node was removed"  # init + 8 tasks
        removed_at = time.monotonic()
        cluster.remove_node(victim)
        out = driver.communicate(timeout=300)[0]
        print(f"recovered and finished {time.monotonic() - removed_at:.1f} s after the removal")
        assert driver.returncode == 0, out
        assert "2 CPUs on 3 nodes → 2 concurrent runs at 1 CPU each · 2 runs on 2 actors" in out
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        cluster.shutdown()

    children = _children(uri, "lost-node")
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    moved = MlflowClient(tracking_uri=uri).get_run(victim_run)
    assert int(moved.data.tags["attempts"]) >= 2
    assert int(moved.data.tags["resumed_from_task"]) >= 1  # from its checkpoint, not task 0
    assert moved.data.tags["node"] == survivor.node_id
    runs = load_experiment("lost-node", tracking_uri=uri)
    assert dict(zip(runs["run_key"], runs["R"], strict=True)) == reference  # bit-identical
    leftover = s3_server.list_objects_v2(Bucket=BUCKET, Prefix="lost-node/").get("Contents", [])
    assert not [o["Key"] for o in leftover if o["Key"].endswith("latest.pt")]  # finished: gone


@pytest.fixture
def ray_head(tmp_path):
    """A real Ray head started with ``ray start --head`` on 127.0.0.1, with its job server
    (dashboard) and token authentication; stopped (only it) afterwards."""
    import secrets
    import shutil
    import tempfile

    gcs, dashboard = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="lia-ray-")  # short: Ray's socket paths must stay < 108
    env = dict(os.environ)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # lia, for jobs
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
         "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--temp-dir={temp}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:  # a separate process: Ray reads the token settings once per process
            probe = subprocess.run(  # ready when the head's job agent runs a job
                [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address,
                 "--", "true"],
                env=env, capture_output=True, timeout=120,
            )  # fmt: skip
            if probe.returncode == 0:
                break
            if time.monotonic() > deadline or head.poll() is not None:
                raise RuntimeError(f"the Ray head's job server did not start: {probe.stderr}")
            time.sleep(1)
        yield address, env
    finally:
        head.terminate()  # --block: on SIGTERM the head drains and stops what it started
        try:
            head.wait(timeout=90)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, 9)  # whatever is left of its session
            shutil.rmtree(temp, ignore_errors=True)


JOB_PLUGIN = '''
"""Only in the job's working dir: importable on the actors only if the working dir reached them."""
from learners import register
from learners.finetune import FineTune


@register("finetune_from_job_dir")
class FineTuneFromJobDir(FineTune):
    pass
'''


def test_ray_job_submit_runs_lia_on_a_real_head_and_mlflow_gets_the_results(
    ray_head, tracking_server, tmp_path
):
    """``ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- lia run``,
    as the README says: the working dir reaches driver and actors (a plugin that exists only
    there trains on them), local state stays behind, results land on the tracking server."""
    address, env = ray_head
    server = tracking_server
    job_dir = tmp_path / "checkout"
    job_dir.mkdir()
    (job_dir / "lia_job_plugin.py").write_text(JOB_PLUGIN)
    config = tiny_config(
        job_dir,
        name="submitted",
        seeds=[0],
        methods={"finetune_from_job_dir": {}},
        plugins=["lia_job_plugin"],
    )
    config["stream"]["num_tasks"] = 2
    config["tracking"] = {"uri": server}
    config["checkpoints"] = {"dir": "checkpoints"}
    write_config(job_dir, config)
    for decoy in ("mlflow.db", "checkpoints/old.pt", ".venv/bin/python"):  # must not travel
        (job_dir / decoy).parent.mkdir(parents=True, exist_ok=True)
        (job_dir / decoy).write_text("local state")
    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address,
         "--working-dir", str(job_dir), "--runtime-env",
         str(repo / "cluster" / "runtime_env.yaml"), "--",
         "sh", "-c", "test ! -e mlflow.db && test ! -e checkpoints/old.pt && test ! -e .venv "
         "&& lia run submitted.yaml --no-progress"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    text = out.stdout + out.stderr
    assert out.returncode == 0 and "succeeded" in text, text
    client = MlflowClient(tracking_uri=server)
    experiment = client.get_experiment_by_name("submitted")
    runs = client.search_runs([experiment.experiment_id], "tags.run_key != ''")
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert runs[0].data.params["method"] == "finetune_from_job_dir"
    frame = load_experiment("submitted", tracking_uri=server)
    assert len(frame) == 1 and len(frame.loc[0, "R"]) == 2  # a row per task
    assert (job_dir / "mlflow.db").read_text() == "local state"  # nothing written here


@pytest.fixture
def tracking_server(tmp_path):
    """``mlflow server`` on a free loopback port with its own store; its URI."""
    with mlflow_server(tmp_path / "server") as uri:
        yield uri
