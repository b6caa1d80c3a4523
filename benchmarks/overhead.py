"""Orchestrator overhead: the same fine-tune run through `lia` vs a bare PyTorch loop.

Work (GEM protocol sizes): permuted MNIST (bundled 5k subset), 10 tasks x 1,000 training
samples, MLP 784-100-100-10, batch 10, one pass, SGD lr 0.1 — 1,000 steps. Both sides use one
torch thread and identical math (same batches, same initialisation). Repetitions alternate
bare / orchestrated so drift hits both alike.

Prints, as `name: value` lines:
  bare_train_s              median training time of the bare loop (all tasks), each in a new
                            process: cold, as the actor's run is (first-step set-up included)
  bare_warm_train_s         the same loop repeated in this (warm) process
  orchestrated_train_s      median training time inside the StreamRunner actor
  train_time_ratio          orchestrated / bare (target <= 1.05)
  train_time_ratio_vs_warm  orchestrated / bare_warm (what earlier versions printed)
  ray_start_s               one-off ray.init on this machine
  invocation_overhead_s     median per-invocation fixed cost: MLflow store, actor start,
                            stream build, logging (wall time - actor train - actor eval)
  startup_cost_s            ray_start_s + invocation_overhead_s

    python benchmarks/overhead.py          # full: 5 repetitions
    python benchmarks/overhead.py --quick  # 2 repetitions, 5 tasks (< 2 minutes)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

# ---------------------------------------------------------------- settings
TASKS = 10
TRAIN_PER_TASK = 1000
TEST_PER_TASK = 1000
HIDDEN = [100, 100]
BATCH = 10
LR = 0.1
REPETITIONS = 5
QUICK = {"TASKS": 5, "REPETITIONS": 2}
# ------------------------------------------------------------------------

import ray  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from orchestrator.config import load_config  # noqa: E402
from orchestrator.driver import execute  # noqa: E402
from task_streams import StreamConfig, build_stream  # noqa: E402


def check_idle() -> None:
    load1 = os.getloadavg()[0]
    if load1 > 0.5:
        print(
            f"warning: 1-minute load average is {load1:.2f}; timings may be inflated",
            file=sys.stderr,
        )


def bare_loop(stream, seed: int) -> float:
    """The reference: a plain PyTorch loop with data as tensors and batches by index."""
    torch.manual_seed(seed)
    layers, width = [nn.Flatten()], 784
    for h in HIDDEN:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    model = nn.Sequential(*layers, nn.Linear(width, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for task in stream:
        start = time.perf_counter()
        model.train()
        order = torch.randperm(task.num_train, generator=generator)
        for i in range(0, task.num_train, BATCH):
            idx = order[i : i + BATCH]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(task.x_train[idx]), task.y_train[idx]).backward()
            optimizer.step()
        total += time.perf_counter() - start
    return total


def orchestrated(tmp: str, rep: int) -> tuple[float, float, float]:
    """(actor train time, actor eval time, invocation wall time) of one `lia run`."""
    config = load_config(
        {
            "name": f"overhead{rep}",
            "methods": {"finetune": {}},
            "seeds": [0],
            "stream": {
                "name": "permuted",
                "source": "mnist5k",
                "num_tasks": TASKS,
                "train_per_task": TRAIN_PER_TASK,
                "test_per_task": TEST_PER_TASK,
            },
            "model": {"hidden": HIDDEN},
            "train": {"epochs": 1, "batch_size": BATCH, "lr": LR, "optimizer": "sgd"},
            "resources": {"cpus_per_run": 1, "max_concurrent_runs": 1},
            "tracking": {"uri": f"sqlite:///{tmp}/mlflow{rep}.db"},
            "checkpoints": {"dir": f"{tmp}/checkpoints"},
        }
    )
    start = time.perf_counter()
    result = execute(config, progress=False)
    wall = time.perf_counter() - start
    row = result.runs.iloc[0]
    assert row["status"] == "FINISHED", row["error"]
    from mlflow.tracking import MlflowClient

    metrics = MlflowClient(result.tracking_uri).get_run(row["mlflow_run_id"]).data.metrics
    return float(metrics["train_time_s"]), float(metrics["eval_time_s"]), wall


def make_stream():
    return build_stream(
        StreamConfig(
            name="permuted",
            source="mnist5k",
            num_tasks=TASKS,
            train_per_task=TRAIN_PER_TASK,
            test_per_task=TEST_PER_TASK,
        ),
        seed=0,
    )


def bare_in_fresh_process(quick: bool) -> float:
    """The bare loop in a new Python process: cold, like the actor's one run per process."""
    command = [sys.executable, __file__, "--bare-once", *(["--quick"] if quick else [])]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    global TASKS, REPETITIONS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller work, same figures")
    parser.add_argument("--bare-once", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        TASKS, REPETITIONS = QUICK["TASKS"], QUICK["REPETITIONS"]
    torch.set_num_threads(1)
    if args.bare_once:
        print(bare_loop(make_stream(), seed=0))
        return
    check_idle()
    stream = make_stream()
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    ray_start = time.perf_counter() - start
    bare, warm, orch, overhead = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(REPETITIONS):
            bare.append(bare_in_fresh_process(args.quick))
            warm.append(bare_loop(stream, seed=0))
            train, evaluation, wall = orchestrated(tmp, rep)
            orch.append(train)
            overhead.append(wall - train - evaluation)
    ray.shutdown()
    bare_s, orch_s = statistics.median(bare), statistics.median(orch)
    invocation = statistics.median(overhead)
    print(f"steps_per_run: {TASKS * TRAIN_PER_TASK // BATCH}")
    warm_s = statistics.median(warm)
    print(f"bare_train_s: {bare_s:.3f} (min {min(bare):.3f}, max {max(bare):.3f})")
    print(f"bare_warm_train_s: {warm_s:.3f} (min {min(warm):.3f}, max {max(warm):.3f})")
    print(f"orchestrated_train_s: {orch_s:.3f} (min {min(orch):.3f}, max {max(orch):.3f})")
    print(f"train_time_ratio: {orch_s / bare_s:.3f}")
    print(f"train_time_ratio_vs_warm: {orch_s / warm_s:.3f}")
    print(f"ray_start_s: {ray_start:.2f}")
    print(f"invocation_overhead_s: {invocation:.2f}")
    print(f"startup_cost_s: {ray_start + invocation:.2f}")


if __name__ == "__main__":
    main()
