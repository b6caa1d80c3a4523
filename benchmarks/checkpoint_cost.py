"""Checkpoint cost: the size of a run's per-task checkpoint, and the time to write and read it.

EWC, replay and joint training learn permuted MNIST (bundled 5k subset; 10 tasks x 1,000
training samples, MLP 784-100-100-10, one pass, batch 10, SGD lr 0.1) through the learners
API, as the StreamRunner actor does. After each task the learner's ``state_dict()`` and the
run's events so far (the ``init`` event and one ``task`` event per finished task, exactly
what ``iter_stream`` yields) are saved with ``orchestrator.checkpoints.save`` - the call
the actor makes - to (a) a local folder and (b) an ``s3://`` URI on a moto S3 server this
benchmark starts on 127.0.0.1 (skipped, with the reason printed, when moto_server is not
installed). Each write is timed WRITES times (the median is kept), and so is
``checkpoints.load``. Hyperparameters are each method's defaults (EWC: lambda 10, 1,024
Fisher samples; replay: a 500-sample reservoir).

What grows: joint keeps every seen training sample (1,000 x 784 float32 per task), EWC one
Fisher and one anchor per task (two copies of the 89,610 weights); replay's reservoir is
full after the first task and stays that size.

The S3 figures are for a server on this machine: they measure the client path (serialise,
HTTP PUT/GET through s3fs and botocore, checksums, moto's handling), not a network.

Prints a per-task table, then, as `name: value` lines:
  <method>_bytes_task1 / _task<N>   checkpoint size after the first / last task (the local
                                    file; the S3 object differs by a few hundred bytes: the
                                    zip's record names come from the file name)
  <method>_bytes_per_task           slope of a least-squares line through size vs task
  <method>_write_ms_local_median    median over tasks of the per-task median write time
  <method>_write_ms_s3_median       the same to the S3 URI
  <method>_load_ms_local_median     checkpoints.load from the folder (median over tasks)
  <method>_load_ms_s3_median        checkpoints.load from the S3 URI
  s3_first_write_ms                 the process's first (tiny) S3 write: starts the client,
                                    a cost each fresh actor pays once; not in the above

    python benchmarks/checkpoint_cost.py          # full: 10 tasks x 1,000, 3 writes per task
    python benchmarks/checkpoint_cost.py --quick  # 3 tasks x 200, 1 write per task (< 2 min)
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# ---------------------------------------------------------------- settings
METHODS = ("ewc", "replay", "joint")
TASKS = 10
TRAIN_PER_TASK = 1000
TEST_PER_TASK = 500  # evaluation only: the test sets are never checkpointed
HIDDEN = [100, 100]
EPOCHS = 1
BATCH = 10
WRITES = 3  # timed writes (and loads) per task and destination; the median is kept
SEED = 0
BUCKET = "lia-checkpoints"
QUICK = {"TASKS": 3, "TRAIN_PER_TASK": 200, "TEST_PER_TASK": 200, "WRITES": 1}
# ------------------------------------------------------------------------


def start_moto() -> tuple[subprocess.Popen | None, str]:
    """moto's S3 server on a free loopback port with a bucket, and fsspec pointed at it; or
    (None, why not)."""
    exe = Path(sys.executable).parent / "moto_server"
    if not exe.exists():
        return None, f"moto_server not found at {exe} (pip install 'moto[server]')"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    # fsspec reads FSSPEC_S3_* when it is imported: set them before anything imports it
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
                return None, "moto_server did not start within 30 s"
            time.sleep(0.2)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    return server, endpoint


def timed_ms(repeat: int, fn, *args) -> tuple[float, object]:
    """Median wall time of ``fn(*args)`` over ``repeat`` calls, in ms, and its last result."""
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn(*args)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), result


def measure(method: str, roots: dict[str, str]) -> list[dict]:
    """Learn the stream with ``method``; after each task write/load its checkpoint to every
    root. One row per task: bytes, and per root the median write and load ms."""
    from learners import ModelConfig, TrainConfig, build_learner, storage
    from learners.evaluation import iter_stream
    from orchestrator import checkpoints
    from task_streams import StreamConfig, build_stream

    stream = build_stream(
        StreamConfig(
            name="permuted",
            source="mnist5k",
            num_tasks=TASKS,
            train_per_task=TRAIN_PER_TASK,
            test_per_task=TEST_PER_TASK,
        ),
        SEED,
    )
    learner = build_learner(
        method,
        stream.info,
        seed=SEED,
        model=ModelConfig(hidden=HIDDEN),
        train=TrainConfig(epochs=EPOCHS, batch_size=BATCH),
    )
    run_key = f"{method}-seed{SEED}"
    rows, events = [], []
    for event in iter_stream(learner, stream):
        events.append(event)  # what StreamRunner.run keeps and checkpoints
        if event["kind"] != "task":
            continue
        state = learner.state_dict()
        row = {"method": method, "task": event["task"] + 1}
        for where, root in roots.items():
            write_ms, path = timed_ms(WRITES, checkpoints.save, root, run_key, state, events)
            row["bytes" if where == "local" else f"bytes_{where}"] = storage.size(path)
            load_ms, loaded = timed_ms(WRITES, checkpoints.load, root, run_key)
            if loaded is None or loaded["learner"]["tasks_learned"] != row["task"]:
                raise RuntimeError(f"{path} did not load back what was written")
            row[f"write_ms_{where}"], row[f"load_ms_{where}"] = write_ms, load_ms
        # not equal to the byte: torch.save names the zip's records after the file, here the
        # local write's temporary name, "archive" for the in-memory buffer sent to S3
        if "bytes_s3" in row and abs(row["bytes_s3"] - row["bytes"]) > 0.01 * row["bytes"]:
            raise RuntimeError(f"local {row['bytes']} bytes but S3 {row['bytes_s3']} bytes")
        rows.append(row)
    return rows


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys on xs (0 for fewer than two points)."""
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} (min {min(values):.2f}, max {max(values):.2f})"


def main() -> None:
    global TASKS, TRAIN_PER_TASK, TEST_PER_TASK, WRITES
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 small tasks, 1 write per task")
    if parser.parse_args().quick:
        TASKS, TRAIN_PER_TASK = QUICK["TASKS"], QUICK["TRAIN_PER_TASK"]
        TEST_PER_TASK, WRITES = QUICK["TEST_PER_TASK"], QUICK["WRITES"]
    if os.getloadavg()[0] > 0.5:
        print(f"warning: load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
    started = time.perf_counter()
    server, endpoint = start_moto()  # before torch, fsspec and the learners are imported
    import torch

    torch.set_num_threads(1)  # as an actor with one CPU runs
    try:
        with tempfile.TemporaryDirectory() as folder:
            roots = {"local": str(Path(folder) / "checkpoints")}
            if server is not None:
                roots["s3"] = f"s3://{BUCKET}/checkpoint-cost"
                from learners import storage

                # a process's first S3 write starts the client (session, credentials, event
                # loop): timed apart, so that the per-task figures are all warm
                first_ms, _ = timed_ms(1, storage.save, {"probe": 1}, roots["s3"] + "/probe")
            rows = [row for method in METHODS for row in measure(method, roots)]
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)

    s3 = server is not None
    print(f"{'method':<8}{'task':>5}{'bytes':>12}{'local w ms':>12}{'s3 w ms':>10}"
          f"{'local r ms':>12}{'s3 r ms':>10}")  # fmt: skip
    for r in rows:
        s3_cells = f"{r['write_ms_s3']:>10.1f}" if s3 else f"{'-':>10}"
        s3_load = f"{r['load_ms_s3']:>10.1f}" if s3 else f"{'-':>10}"
        print(f"{r['method']:<8}{r['task']:>5}{r['bytes']:>12,}{r['write_ms_local']:>12.1f}"
              f"{s3_cells}{r['load_ms_local']:>12.1f}{s3_load}")  # fmt: skip
    print()
    print(f"tasks: {TASKS}")
    print(f"train_per_task: {TRAIN_PER_TASK}")
    print(f"writes_per_task: {WRITES}")
    print(f"s3_server: {'moto on ' + endpoint if s3 else 'skipped: ' + endpoint}")
    if s3:
        print(f"s3_first_write_ms: {first_ms:.1f}")
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        print(f"{method}_bytes_task1: {mine[0]['bytes']}")
        print(f"{method}_bytes_task{TASKS}: {mine[-1]['bytes']}")
        per_task = slope([r["task"] for r in mine], [r["bytes"] for r in mine])
        print(f"{method}_bytes_per_task: {per_task:.0f}")
        for where in ("local", "s3") if s3 else ("local",):
            for what in ("write", "load"):
                values = [r[f"{what}_ms_{where}"] for r in mine]
                print(f"{method}_{what}_ms_{where}_median: {summary(values)}")
    print(f"wall_s: {time.perf_counter() - started:.1f}")


if __name__ == "__main__":
    main()
