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
  bare_eval_s               median time of a bare evaluator (eval mode, no grad, batches of
                            2,048, argmax) filling R's rows — before the first task (the
                            row FWT needs) and after each task, all test sets — in the same
                            fresh process as bare_train_s
  orchestrated_eval_s       median eval_time_s of the run (the same rows, inside the actor)
  eval_time_ratio           orchestrated / bare evaluation (target <= 1.10)
  continual_eval_cost       (train + eval time) with train.eval_every_steps=EVAL_EVERY over
                            the same without: what continual evaluation costs (it evaluates
                            every task 1,000 / EVAL_EVERY more times per task)

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
EVAL_EVERY = 100  # continual evaluation: every task every 100 steps (10 times per task)
EVAL_BATCH = 2048  # the learners' train.eval_batch_size default
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


@torch.no_grad()
def bare_evaluate(model, stream) -> list[float]:
    """The reference evaluator: one R row, plain PyTorch."""
    model.eval()
    row = []
    for task in stream:
        hits = 0
        for i in range(0, task.num_test, EVAL_BATCH):
            x, y = task.x_test[i : i + EVAL_BATCH], task.y_test[i : i + EVAL_BATCH]
            hits += int((model(x).argmax(dim=1) == y).sum())
        row.append(hits / task.num_test)
    return row


def bare_loop(stream, seed: int, timings: dict | None = None) -> float:
    """The reference: a plain PyTorch loop with data as tensors and batches by index;
    ``timings["eval"]`` gets the bare evaluator's time (R's rows: before the first task, as
    the actor fills it for FWT, and after each task)."""
    torch.manual_seed(seed)
    layers, width = [nn.Flatten()], 784
    for h in HIDDEN:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    model = nn.Sequential(*layers, nn.Linear(width, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    if timings is not None:  # R's first row, before any task (FWT's baseline), as the actor does
        start = time.perf_counter()
        bare_evaluate(model, stream)
        timings["eval"] = time.perf_counter() - start
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
        if timings is not None:
            start = time.perf_counter()
            bare_evaluate(model, stream)
            timings["eval"] = timings.get("eval", 0.0) + time.perf_counter() - start
    return total


def orchestrated(tmp: str, rep: int, eval_every: int = 0) -> tuple[float, float, float]:
    """(actor train time, actor eval time, invocation wall time) of one `lia run`."""
    config = load_config(
        {
            "name": f"overhead{rep}-e{eval_every}",
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
            "train": {
                "epochs": 1,
                "batch_size": BATCH,
                "lr": LR,
                "optimizer": "sgd",
                "eval_every_steps": eval_every,
            },  # fmt: skip
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


def bare_in_fresh_process(quick: bool) -> tuple[float, float]:
    """(train, eval) seconds of the bare loop in a new Python process: cold, like the actor's
    one run per process."""
    command = [sys.executable, __file__, "--bare-once", *(["--quick"] if quick else [])]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    train, evaluation = out.strip().splitlines()[-1].split()
    return float(train), float(evaluation)


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
        timings: dict = {}
        train = bare_loop(make_stream(), seed=0, timings=timings)
        print(train, timings["eval"])
        return
    check_idle()
    stream = make_stream()
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    ray_start = time.perf_counter() - start
    bare, warm, orch, overhead = [], [], [], []
    bare_eval, orch_eval, continual = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(REPETITIONS):
            train_cold, eval_cold = bare_in_fresh_process(args.quick)
            bare.append(train_cold)
            bare_eval.append(eval_cold)
            warm.append(bare_loop(stream, seed=0))
            train, evaluation, wall = orchestrated(tmp, rep)
            orch.append(train)
            orch_eval.append(evaluation)
            overhead.append(wall - train - evaluation)
            train_c, evaluation_c, _ = orchestrated(tmp, rep, EVAL_EVERY)
            continual.append((train_c + evaluation_c) / (train + evaluation))
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
    be, oe = statistics.median(bare_eval), statistics.median(orch_eval)
    print(f"bare_eval_s: {be:.3f} (min {min(bare_eval):.3f}, max {max(bare_eval):.3f})")
    print(f"orchestrated_eval_s: {oe:.3f} (min {min(orch_eval):.3f}, max {max(orch_eval):.3f})")
    print(f"eval_time_ratio: {oe / be:.3f}")
    print(
        f"continual_eval_cost: {statistics.median(continual):.2f} "
        f"(min {min(continual):.2f}, max {max(continual):.2f}; every {EVAL_EVERY} steps)"
    )


if __name__ == "__main__":
    main()
