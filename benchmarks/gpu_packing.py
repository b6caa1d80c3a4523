"""GPU packing: runs per hour on one GPU at 1, 2, 4 and 8 runs per GPU, and GPU vs CPU R.

Small continual-learning runs (an MLP on permuted MNIST) leave a GPU mostly idle: a step is a
few kernel launches. Packing several runs on one GPU (``resources.gpus_per_run`` = 1/k) lets
their launches overlap. For each k in RUNS_PER_GPU this runs the same experiment of RUNS runs
(fine-tuning, seeds 0..RUNS-1) through ``lia run``'s driver on a Ray instance given one GPU,
and measures its wall time (start-up excluded: Ray is started once), hence runs per hour;
from MLflow, each run's peak GPU memory and the GPU's utilisation while its tasks trained.
Then one seed on the GPU and on the CPU: how close their R matrices are (CUDA kernels round
differently; bit-identity is not expected, closeness is).

Prints a table, then ``name: value`` lines:
  runs_per_hour_k{1,2,4,8}     runs finished per hour at k runs per GPU
  speedup_k8                   runs per hour at 8 per GPU / at 1 per GPU (target >= 6)
  peak_gpu_mb_k{k}             median over runs of their peak allocated GPU memory
  gpu_util_pct_k{k}            median over tasks of NVML's device utilisation (all runs)
  r_max_abs_diff_gpu_cpu       max |R_gpu - R_cpu| over the matrix (accuracy, 0..1)

Without a CUDA GPU it says so and exits 0 (nothing to measure). ``--logical-gpus N`` runs
the packing mechanics on the CPU with N logical GPUs (Ray schedules by them, torch stays on
the CPU), to check the scheduling path on a machine without one: its timings mean nothing.

    python benchmarks/gpu_packing.py           # full: 10 tasks x 1,000 samples, 16 runs
    python benchmarks/gpu_packing.py --quick   # 3 tasks x 300 samples, 8 runs (< 2 minutes)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# ---------------------------------------------------------------- settings
RUNS_PER_GPU = [1, 2, 4, 8]
RUNS = 16  # runs per setting: two waves at 8 per GPU
TASKS = 10
TRAIN_PER_TASK = 1000
TEST_PER_TASK = 1000
HIDDEN = [100, 100]
EPOCHS = 1
BATCH = 10
QUICK = {"RUNS": 8, "TASKS": 3, "TRAIN_PER_TASK": 300, "TEST_PER_TASK": 300}
# ------------------------------------------------------------------------


def experiment(name: str, tmp: Path, gpus_per_run: float, seeds: list[int]) -> dict:
    per_gpu = round(1 / gpus_per_run) if gpus_per_run else 1
    cpus = max(1, min(4, (os.cpu_count() or 2) // per_gpu)) if gpus_per_run else 1
    return {
        "name": name,
        "methods": {"finetune": {}},
        "seeds": seeds,
        "stream": {
            "name": "permuted",
            "source": "mnist5k",
            "num_tasks": TASKS,
            "train_per_task": TRAIN_PER_TASK,
            "test_per_task": TEST_PER_TASK,
        },
        "model": {"hidden": HIDDEN},
        "train": {"epochs": EPOCHS, "batch_size": BATCH, "optimizer": "sgd", "lr": 0.01},
        "resources": {"gpus_per_run": gpus_per_run, "cpus_per_run": cpus},
        "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db"},
        "checkpoints": {"dir": str(tmp / "checkpoints")},
    }


def per_task(uri: str, experiment_name: str, key: str) -> list[float]:
    """Every value of a per-task metric over the experiment's runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment_name)
    values = []
    for run in client.search_runs([exp.experiment_id], "tags.run_key != ''", max_results=1000):
        values += [m.value for m in client.get_metric_history(run.info.run_id, key)]
    return values


def main() -> int:
    global RUNS, TASKS, TRAIN_PER_TASK, TEST_PER_TASK
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, smaller runs")
    parser.add_argument(
        "--logical-gpus", type=int, default=0,
        help="no GPU: schedule by N logical GPUs on the CPU (mechanics only)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        RUNS, TASKS = QUICK["RUNS"], QUICK["TASKS"]
        TRAIN_PER_TASK, TEST_PER_TASK = QUICK["TRAIN_PER_TASK"], QUICK["TEST_PER_TASK"]
    import torch

    has_gpu = torch.cuda.is_available()
    if not has_gpu and not args.logical_gpus:
        print("gpu: none (torch.cuda.is_available() is False): nothing to measure here")
        print("runs_per_hour_k1: n/a")
        return 0
    import ray

    from orchestrator.config import load_config
    from orchestrator.driver import execute

    device = torch.cuda.get_device_name(0) if has_gpu else f"{args.logical_gpus} logical GPUs"
    print(f"device: {device}; torch {torch.__version__}; {os.cpu_count()} CPU cores")
    ray.init(num_gpus=1 if has_gpu else args.logical_gpus, include_dashboard=False,
             logging_level="WARNING")  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        uri = f"sqlite:///{tmp}/mlflow.db"
        for k in RUNS_PER_GPU:
            name = f"packing-k{k}"
            config = load_config(experiment(name, tmp, 1.0 / k, list(range(RUNS))))
            started = time.perf_counter()
            result = execute(config, progress=False)
            wall = time.perf_counter() - started
            finished = int((result.runs["status"] == "FINISHED").sum())
            memory = per_task(uri, name, "task_peak_memory_bytes")
            util = per_task(uri, name, "task_gpu_utilization_pct")
            rows.append({
                "k": k, "runs": finished, "wall_s": wall, "per_hour": finished / wall * 3600,
                "peak_mb": statistics.median(memory) / 2**20 if memory else float("nan"),
                "util": statistics.median(util) if util else float("nan"),
            })  # fmt: skip
            print(f"k={k}: {finished}/{RUNS} runs in {wall:.1f} s", flush=True)
        gpu = load_config(experiment("same-seed-gpu", tmp, 1.0, [0]))
        cpu = load_config(experiment("same-seed-cpu", tmp, 0.0, [0]))
        r_gpu = execute(gpu, progress=False).runs.loc[0, "R"]
        r_cpu = execute(cpu, progress=False).runs.loc[0, "R"]
    ray.shutdown()
    diff = max(abs(a - b) for ra, rb in zip(r_gpu, r_cpu, strict=True)
               for a, b in zip(ra, rb, strict=True))  # fmt: skip
    print()
    print("| runs per GPU | runs | wall (s) | runs per hour | peak GPU MiB | GPU util % |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {r['runs']} | {r['wall_s']:.1f} | {r['per_hour']:.0f} | "
              f"{r['peak_mb']:.1f} | {r['util']:.0f} |")  # fmt: skip
    print()
    for r in rows:
        print(f"runs_per_hour_k{r['k']}: {r['per_hour']:.0f}")
    base = rows[0]["per_hour"]
    print(f"speedup_k8: {rows[-1]['per_hour'] / base:.2f}")
    for r in rows:
        print(f"peak_gpu_mb_k{r['k']}: {r['peak_mb']:.1f}")
        print(f"gpu_util_pct_k{r['k']}: {r['util']:.0f}")
    print(f"r_max_abs_diff_gpu_cpu: {diff:.4f}")
    if not has_gpu:
        print("note: logical GPUs on the CPU: the mechanics ran; the timings mean nothing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
