"""Lost node: the time from a removed cluster node to its run resuming on another node.

A ``ray.cluster_utils.Cluster`` on this machine stands for a cluster: a head with no CPU for
runs, a worker node with 1 CPU (the one that will be lost) and a worker node with
SURVIVOR_CPUS = 2. ``lia run`` drives it as a separate process, as a user would
(``python -m orchestrator.cli run CONFIG --no-progress --address ADDRESS``), with two
fine-tuning runs (seeds 0 and 1) of permuted MNIST, one CPU each, checkpoints after every
task in a local folder (``--s3``: on a moto S3 server this benchmark starts on 127.0.0.1).
Once both runs have finished task 0 and sit on different nodes (MLflow tag ``node``), the
1-CPU node is removed (``Cluster.remove_node``, as the tests do: its processes get SIGTERM,
so its raylet tells the GCS it is going and the driver hears of the lost actor at once; a
node that crashes or drops off the network is left to the GCS's health checks to notice,
which these figures do not measure). The driver waits the retry backoff
(``retries.backoff_s``), starts a fresh actor, and the run resumes from its checkpoint.

The survivor has a second CPU so that a free slot is waiting: the figures are the recovery
itself (detection, backoff, actor start, stream build, checkpoint load), not the time the
other run would hold the only CPU. With SURVIVOR_CPUS = 1 the resumed run would first wait
for the surviving run to finish; the figures then include that wait.

The run's learner is fine-tuning from a plugin that writes time.time() to a marker file in
``load_state_dict`` (resumed) and after the first task it finishes after that (next task).
An undisturbed run of the same config on a local Ray (computed once, first) checks the
resumed R matrix bit for bit.

Prints, as `name: value` lines (median over REPETITIONS, with min and max; a fresh cluster
each):
  remove_to_detected_s    removal -> the driver announced the retry (its stdout)
  remove_to_resume_s      removal -> the fresh actor on the other node loaded the checkpoint
  remove_to_next_task_s   removal -> the first task finished after resuming
  remove_to_exit_s        removal -> `lia run` exited
  remove_node_call_s      how long Cluster.remove_node itself blocked (part of the above)
  retry_backoff_s         the configured wait before the retry (part of the above)
  resumed_from_task       tasks the checkpoint held (>= 1: not a restart from scratch)
  resumed_on_other_node   the resumed run's `node` tag is the surviving node
  resumed_on_fresh_actor  it resumed in a new actor process, not in the surviving run's
                          actor (reused when that run ends while the retry still waits:
                          then no actor start is in the figures; False warns of that)
  exit_code_zero          every invocation exited 0 with both child runs FINISHED
  r_identical             the resumed R equals the undisturbed run's

    python benchmarks/lost_node.py               # full: 3 repetitions, local checkpoints
    python benchmarks/lost_node.py --s3          # checkpoints on a moto S3 server
    python benchmarks/lost_node.py --quick       # 1 repetition, shorter tasks (< 2 min)
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

# ---------------------------------------------------------------- settings
TASKS = 8  # the surviving run must outlast detection + backoff (resumed_on_fresh_actor)
TRAIN_PER_TASK = 1000
TEST_PER_TASK = 500
EPOCHS = 20  # about a second per task (MLP 2x100, batch 10, one thread, two runs at once)
SEEDS = [0, 1]
SURVIVOR_CPUS = 2
BACKOFF_S = 1.0
REPETITIONS = 3
TIMEOUT_S = 300  # per invocation
BUCKET = "lia-checkpoints"
NAME = "lost-node"
QUICK = {"REPETITIONS": 1, "EPOCHS": 10}
# ------------------------------------------------------------------------

PLUGIN = '''
"""Benchmark plugin: fine-tuning that notes when (and in which process) it resumes, when it
finishes its next task, and the processes that ran its tasks."""
import os
import time
from pathlib import Path

from learners.base import register
from learners.finetune import FineTune


@register("finetune_marked")
class FineTuneMarked(FineTune):
    """Fine-tuning; writes time.time() on loading a checkpoint and after the next task."""

    def _marker(self, what):
        return Path(os.environ["LIA_BENCH_MARKERS"]) / f"{what}-{self.seed}"

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self._marker("resumed").write_text(f"{time.time()!r} {os.getpid()}")

    def after_task(self, task):
        super().after_task(task)
        with self._marker("pids").open("a") as pids:
            pids.write(f"{os.getpid()}\\n")
        if self._marker("resumed").exists() and not self._marker("next_task").exists():
            self._marker("next_task").write_text(repr(time.time()))
'''


def config(tmp: Path, checkpoints: str) -> dict:
    return {
        "name": NAME,
        "plugins": ["lia_bench_lost_node"],
        "methods": {"finetune": {"method": "finetune_marked"}},
        "seeds": SEEDS,
        "stream": {
            "name": "permuted",
            "source": "mnist5k",
            "num_tasks": TASKS,
            "train_per_task": TRAIN_PER_TASK,
            "test_per_task": TEST_PER_TASK,
        },
        "model": {"hidden": [100, 100]},
        "train": {"epochs": EPOCHS, "batch_size": 10},
        "resources": {"cpus_per_run": 1},
        "retries": {"backoff_s": BACKOFF_S},
        "tracking": {
            "uri": f"sqlite:///{tmp}/mlflow.db",
            "artifact_location": str(tmp / "artifacts"),
            "flush_interval_s": 0,  # every task row in MLflow at once: polled below
        },
        "checkpoints": {"dir": checkpoints},
    }


def write(tmp: Path, cfg: dict) -> Path:
    import yaml

    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / f"{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def lia(path: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "run", str(path), "--no-progress", *extra],
        cwd=path.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**(env or os.environ), "PYTHONUNBUFFERED": "1"},
    )


def r_by_key(uri: str) -> dict[str, list]:
    from orchestrator import load_experiment

    runs = load_experiment(NAME, tracking_uri=uri)
    return dict(zip(runs["run_key"], runs["R"], strict=True))


def reference(tmp: Path) -> dict[str, list]:
    """R per run key of the same config, undisturbed, on a local Ray (a process of its own)."""
    ref = tmp / "reference"
    (ref / "markers").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["LIA_BENCH_MARKERS"] = str(ref / "markers")
    proc = lia(write(ref, config(ref, str(ref / "checkpoints"))), env=env)
    out = proc.communicate(timeout=TIMEOUT_S)[0]
    if proc.returncode != 0:
        raise RuntimeError(f"the reference run failed:\n{out}")
    return r_by_key(f"sqlite:///{ref}/mlflow.db")


def children(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(NAME)
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    return [r for r in runs if r.data.tags.get("lia.kind") == "run"]


def start_moto() -> subprocess.Popen:
    """moto's S3 server on a free loopback port, a bucket in it, and the environment that
    points fsspec (this process, the Ray nodes, their workers, the driver) at it."""
    exe = Path(sys.executable).parent / "moto_server"
    if not exe.exists():
        raise SystemExit(f"--s3 needs moto_server, not found at {exe} (pip install 'moto[server]')")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        FSSPEC_S3_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise SystemExit("moto_server did not start within 30 s") from None
            time.sleep(0.2)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    return server


def one_run(tmp: Path, rep: int, s3: bool, expected: dict[str, list]) -> dict:
    """Start a cluster, run, remove the node of one run; the figures of this repetition."""
    from mlflow.tracking import MlflowClient
    from ray.cluster_utils import Cluster

    here = tmp / f"rep{rep}"
    markers = here / "markers"
    markers.mkdir(parents=True)
    os.environ["LIA_BENCH_MARKERS"] = str(markers)  # before the nodes start: workers inherit
    ckpt = f"s3://{BUCKET}/{NAME}-{rep}" if s3 else str(here / "checkpoints")
    cfg = config(here, ckpt)
    uri = cfg["tracking"]["uri"]
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False},  # runs go to workers
    )
    victim = cluster.add_node(num_cpus=1)
    survivor = cluster.add_node(num_cpus=SURVIVOR_CPUS)
    cluster.wait_for_nodes()
    driver = None
    lines: list[tuple[float, str]] = []
    try:
        driver = lia(write(here, cfg), "--address", cluster.address)
        reader = threading.Thread(
            target=lambda: lines.extend((time.time(), line) for line in driver.stdout),
            daemon=True,
        )
        reader.start()
        client = MlflowClient(tracking_uri=uri)
        deadline = time.monotonic() + TIMEOUT_S
        while True:  # both runs past task 0 (rows: the initial one, task 0's), node known
            if driver.poll() is not None or time.monotonic() > deadline:
                reader.join(timeout=5)
                raise RuntimeError("the runs never sat on two nodes:\n" + "".join(lines_of(lines)))
            try:
                runs = children(uri)
                nodes = {r.data.tags.get("node") for r in runs} - {None}
                rows = [len(client.get_metric_history(r.info.run_id, "acc_task_0")) for r in runs]
                if len(runs) == len(SEEDS) and min(rows) >= 2:
                    if nodes == {victim.node_id, survivor.node_id}:
                        break
                    raise RuntimeError(f"both runs were placed on one node ({nodes})")
            except RuntimeError:
                raise
            except Exception:  # the store is still being created
                pass
            time.sleep(0.2)
        moved = next(r for r in runs if r.data.tags["node"] == victim.node_id)
        done = len(client.get_metric_history(moved.info.run_id, "acc_task_0")) - 1
        if done >= TASKS:
            raise RuntimeError("the run finished before its node was removed: make tasks longer")
        removed_at = time.time()
        cluster.remove_node(victim)
        remove_call_s = time.time() - removed_at
        driver.wait(timeout=TIMEOUT_S)
        exited_at = time.time()
        reader.join(timeout=10)
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        cluster.shutdown()
    seed = moved.data.tags["seed"]
    resumed, pid = (markers / f"resumed-{seed}").read_text().split()
    resumed = float(resumed)
    # the surviving run's actor, once its run is done, is reused for the retry if the retry
    # is still waiting: then the figures leave out an actor start
    others = {
        p for s in SEEDS if str(s) != seed for p in (markers / f"pids-{s}").read_text().split()
    }
    next_task = float((markers / f"next_task-{seed}").read_text())
    retry = [t for t, line in lines if "retrying in" in line]
    final = {r.info.run_id: r for r in children(uri)}
    tags = final[moved.info.run_id].data.tags
    return {
        "detected": retry[0] - removed_at if retry else float("nan"),
        "resume": resumed - removed_at,
        "next_task": next_task - removed_at,
        "exit": exited_at - removed_at,
        "remove_call": remove_call_s,
        "resumed_from_task": int(tags.get("resumed_from_task", -1)),
        "attempts": int(tags.get("attempts", 1)),
        "other_node": tags.get("node") == survivor.node_id,
        "fresh_actor": pid not in others,
        "ok": driver.returncode == 0
        and len(final) == len(SEEDS)
        and all(r.info.status == "FINISHED" for r in final.values()),
        "same": r_by_key(uri) == expected,
        "output": "".join(lines_of(lines)),
    }


def lines_of(lines: list[tuple[float, str]]) -> list[str]:
    return [line for _, line in lines]


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} (min {min(values):.3f}, max {max(values):.3f})"


def main() -> None:
    global REPETITIONS, EPOCHS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repetition, smaller runs")
    parser.add_argument("--s3", action="store_true", help="checkpoints on a moto S3 server")
    args = parser.parse_args()
    if args.quick:
        REPETITIONS, EPOCHS = QUICK["REPETITIONS"], QUICK["EPOCHS"]
    if os.getloadavg()[0] > 0.5:
        print(f"warning: load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
    started = time.perf_counter()
    server = start_moto() if args.s3 else None
    try:
        with tempfile.TemporaryDirectory() as folder:
            tmp = Path(folder)
            (tmp / "plugin").mkdir()
            (tmp / "plugin" / "lia_bench_lost_node.py").write_text(textwrap.dedent(PLUGIN))
            # the driver and every worker import the plugin: on the path before anything starts
            os.environ["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(tmp / "plugin"), os.environ.get("PYTHONPATH")) if p
            )
            expected = reference(tmp)
            figures = []
            for rep in range(REPETITIONS):
                figures.append(one_run(tmp, rep, args.s3, expected))
                f = figures[-1]
                if not (f["ok"] and f["same"]):
                    print(f["output"], file=sys.stderr)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
    print(f"repetitions: {REPETITIONS}")
    print(f"checkpoints: {'s3 (moto on 127.0.0.1)' if args.s3 else 'local folder'}")
    print(f"tasks: {TASKS}")
    print(f"retry_backoff_s: {BACKOFF_S:.1f}")
    for name, key in (
        ("remove_to_detected_s", "detected"),
        ("remove_to_resume_s", "resume"),
        ("remove_to_next_task_s", "next_task"),
        ("remove_to_exit_s", "exit"),
        ("remove_node_call_s", "remove_call"),
    ):
        print(f"{name}: {summary([f[key] for f in figures])}")
    print(f"resumed_from_task: {min(f['resumed_from_task'] for f in figures)}")
    print(f"attempts: {max(f['attempts'] for f in figures)}")
    print(f"resumed_on_other_node: {all(f['other_node'] for f in figures)}")
    print(f"resumed_on_fresh_actor: {all(f['fresh_actor'] for f in figures)}")
    print(f"exit_code_zero: {all(f['ok'] for f in figures)}")
    print(f"r_identical: {all(f['same'] for f in figures)}")
    print(f"wall_s: {time.perf_counter() - started:.1f}")


if __name__ == "__main__":
    main()
