"""Scaling: 8 runs on 1 actor vs 2 actors on this 2-core machine.

Each run: permuted MNIST (bundled 5k subset), TASKS tasks x 1,000 training samples, MLP
784-HIDDEN-10, batch BATCH, SGD 0.1, EPOCHS passes; one CPU and one torch thread per actor.
Both configurations go through the full `lia` path (Ray actors, MLflow logging by the
driver); the wall time of each invocation is measured from submission to the last run
logged, with Ray already started and the MLflow store already created (both one-off costs,
measured by overhead.py). Each run is ~8 s of work (6,400 SGD steps ~7 s, evaluation
~1.2 s); the one-off actor start-up (~2 s: a Python process importing torch) is in both.

Prints, as `name: value` lines:
  wall_1_actor_s, wall_2_actors_s   invocation wall times
  speedup                           wall_1_actor_s / wall_2_actors_s (target >= 1.7)
  actor_start_1_s, actor_start_2_s  submission to the first run's start (actor start-up)
  run_phase_speedup                 the same ratio over the run phase only: from the first
                                    run's start to the last run's last event

    python benchmarks/scaling.py          # full
    python benchmarks/scaling.py --quick  # 4 runs of 5 tasks (< 2 minutes)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

# ---------------------------------------------------------------- settings
RUNS = 8
TASKS = 10
TRAIN_PER_TASK = 1000
TEST_PER_TASK = 1000
EPOCHS = 20
HIDDEN = [400, 400]
BATCH = 32
QUICK = {"RUNS": 4, "TASKS": 5, "EPOCHS": 1}
# ------------------------------------------------------------------------

import ray  # noqa: E402

from orchestrator.config import load_config  # noqa: E402
from orchestrator.driver import execute  # noqa: E402
from orchestrator.tracking import Tracker  # noqa: E402


def invocation(tmp: str, actors: int) -> tuple[float, float, float]:
    """(wall time, time to the first run's start, run phase) of one `lia run` on ``actors``.

    The run phase spans from the first run starting on an actor to the last run's last event.
    """
    config = load_config(
        {
            "name": f"scaling{actors}",
            "methods": {"finetune": {}},
            "seeds": list(range(RUNS)),
            "stream": {
                "name": "permuted",
                "source": "mnist5k",
                "num_tasks": TASKS,
                "train_per_task": TRAIN_PER_TASK,
                "test_per_task": TEST_PER_TASK,
            },
            "model": {"hidden": HIDDEN},
            "train": {"epochs": EPOCHS, "batch_size": BATCH, "lr": 0.1},
            "resources": {"cpus_per_run": 1, "max_concurrent_runs": actors},
            "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db"},
            "checkpoints": {"dir": f"{tmp}/checkpoints"},
        }
    )
    start = time.perf_counter()
    result = execute(config, progress=False)
    wall = time.perf_counter() - start
    assert (result.runs["status"] == "FINISHED").all(), result.runs["error"].tolist()
    first_start = min(t for t, _, kind, _ in result.arrivals if kind == "start")
    last_event = max(t for t, _, _, _ in result.arrivals)
    return wall, first_start, last_event - first_start


def main() -> None:
    global RUNS, TASKS, EPOCHS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller work, same figures")
    if parser.parse_args().quick:
        RUNS, TASKS, EPOCHS = QUICK["RUNS"], QUICK["TASKS"], QUICK["EPOCHS"]
    if os.getloadavg()[0] > 0.5:
        print(
            f"warning: load average {os.getloadavg()[0]:.2f}; timings may be inflated",
            file=sys.stderr,
        )
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    with tempfile.TemporaryDirectory() as tmp:
        # the one-off MLflow store creation is start-up cost (see overhead.py), not scaling
        Tracker(f"sqlite:///{tmp}/mlflow.db", "warm-up").ensure_experiment()
        one, boot_one, phase_one = invocation(tmp, 1)
        two, boot_two, phase_two = invocation(tmp, 2)
    ray.shutdown()
    print(f"runs: {RUNS}")
    print(f"wall_1_actor_s: {one:.2f}")
    print(f"wall_2_actors_s: {two:.2f}")
    print(f"speedup: {one / two:.2f}")
    print(f"actor_start_1_s: {boot_one:.2f}")
    print(f"actor_start_2_s: {boot_two:.2f}")
    print(f"run_phase_speedup: {phase_one / phase_two:.2f}")


if __name__ == "__main__":
    main()
