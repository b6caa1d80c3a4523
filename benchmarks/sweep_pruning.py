"""Sweep pruning: the task-trainings a pruner saves, and what it costs in best ACC.

TRIALS trials of `lia sweep` tuning EWC's λ (log-uniform in LAMBDA) and Adam's learning rate
(log-uniform in LR) on permuted MNIST (bundled 5k subset, TASKS tasks x 1,000 training /
500 test samples, MLP 784-100-100-10, batch 32, 1 epoch, one seed per trial), objective
final ACC, TPE with the same sampler seed: once with PRUNER (median; `--pruner NAME` for
another), once with pruner none. Each study has its own temporary Optuna SQLite storage,
MLflow store and checkpoint folder. Both run one trial at a time
(resources.max_concurrent_runs=1), so a study's trials see the same history whatever the
timing; TPE's first 10 trials are its random
start-up, so both studies try the same first 10 parameter sets.

A task-training is one run training one task to the end. They are counted from the MLflow
child runs: the length of each run's `acc_task_0` history (logged once per finished task, by
every run, pruned, failed or complete, whatever the number of seeds per trial). The Optuna
count (intermediate values per trial: one per finished task, with one seed per trial) is
printed beside it as a check. Neither counts the batch or two a pruned run trains on its
next task before the stop reaches it.

Then trials per hour, pruning off, THROUGHPUT_TRIALS trials on 1 actor, then on 2 actors
(resources.max_concurrent_runs 1 vs 2), one after the other in this process, each from the
call to `sweep()` to its return, with Ray started and the MLflow store created beforehand.

Prints, as `name: value` lines:
  trials, tasks                          the size of each pruning study
  task_trainings_pruned                  task-trainings run by the median-pruner study
  task_trainings_unpruned                the same with pruner none (at most trials x tasks)
  optuna_counts_agree                    the Optuna count equals the MLflow count, both studies
  compute_saved                          1 - pruned / unpruned (target >= 0.50)
  trials_pruned                          complete / pruned / failed trials of each study
  trials_unpruned
  best_acc_pruned, best_acc_unpruned     each study's best final ACC
  best_acc_difference                    pruned - unpruned (target |difference| <= 0.02)
  best_params_pruned, best_params_unpruned
  wall_pruned_s, wall_unpruned_s         each study's wall time
  throughput_trials                      trials of each throughput study
  trials_per_hour_1_actor, trials_per_hour_2_actors, throughput_speedup

    python benchmarks/sweep_pruning.py          # full: 24 trials of 10 tasks (~7 minutes here)
    python benchmarks/sweep_pruning.py --quick  # 6 (and 4) trials of 3 tasks (< 2 minutes)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

# ---------------------------------------------------------------- settings
TRIALS = 24
TASKS = 10
TRAIN_PER_TASK = 1000
TEST_PER_TASK = 500
HIDDEN = [100, 100]
BATCH = 32
EPOCHS = 1
LAMBDA = (1.0, 1e5)
LR = (1e-4, 1e-2)
SAMPLER_SEED = 0
PRUNER = "median"  # --pruner: any of sweep.pruner's names
PRUNE_FROM_TASK = 1  # --prune-from-task: sweep.prune_from_task
THROUGHPUT_TRIALS = 6
QUICK = {"TRIALS": 6, "TASKS": 3, "THROUGHPUT_TRIALS": 4}
# ------------------------------------------------------------------------

import optuna  # noqa: E402
import ray  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from rich.console import Console  # noqa: E402

from orchestrator.tracking import Tracker  # noqa: E402
from sweeps.config import load_sweep_config  # noqa: E402
from sweeps.driver import StudyResult, sweep  # noqa: E402


def config(folder: Path, name: str, pruner: str, trials: int, actors: int) -> dict:
    """The sweep config of one study, everything it writes kept under ``folder``."""
    return {
        "name": name,
        "methods": {"ewc": {}},
        "seeds": [0],
        "stream": {
            "name": "permuted",
            "source": "mnist5k",
            "num_tasks": TASKS,
            "train_per_task": TRAIN_PER_TASK,
            "test_per_task": TEST_PER_TASK,
        },
        "model": {"hidden": HIDDEN},
        "train": {"epochs": EPOCHS, "batch_size": BATCH, "optimizer": "adam", "lr": 0.001},
        "resources": {"cpus_per_run": 1, "max_concurrent_runs": actors},
        "tracking": {"uri": f"sqlite:///{folder}/mlflow.db"},
        "checkpoints": {"dir": str(folder / "checkpoints")},
        "sweep": {
            "n_trials": trials,
            "space": {
                "ewc_lambda": {"type": "log", "low": LAMBDA[0], "high": LAMBDA[1]},
                "train.lr": {"type": "log", "low": LR[0], "high": LR[1]},
            },
            "objective": ["ACC"],
            "sampler": "tpe",
            "sampler_seed": SAMPLER_SEED,
            "pruner": pruner,
            "prune_from_task": PRUNE_FROM_TASK,
            "protocol": "full",
            "storage": f"sqlite:///{folder}/optuna.db",
        },
    }


def study(
    folder: Path, name: str, pruner: str, trials: int, actors: int
) -> tuple[StudyResult, float]:
    """Run one study in ``folder`` (created); return its result and wall time."""
    folder.mkdir()
    cfg = load_sweep_config(config(folder, name, pruner, trials, actors))
    # the MLflow store's one-off creation is start-up cost (see overhead.py), not the sweep's
    Tracker(cfg.tracking.uri, "warm-up").ensure_experiment()
    start = time.perf_counter()
    (result,) = sweep(cfg, progress=False, console=Console(stderr=True, quiet=True))
    return result, time.perf_counter() - start


def task_trainings(folder: Path, name: str, result: StudyResult) -> tuple[int, int]:
    """(MLflow count, Optuna count) of the task-trainings study ``name`` ran."""
    client = MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
    experiment = client.get_experiment_by_name(f"{name}-sweep")
    runs = client.search_runs(
        [experiment.experiment_id], "tags.`lia.kind` = 'run'", max_results=10_000
    )
    mlflow_count = sum(len(client.get_metric_history(r.info.run_id, "acc_task_0")) for r in runs)
    loaded = optuna.load_study(study_name=result.study_name, storage=result.storage)
    optuna_count = sum(len(t.intermediate_values) for t in loaded.trials)
    return mlflow_count, optuna_count


def states(result: StudyResult) -> str:
    c = result.counts
    return f"{c['complete']} complete, {c['pruned']} pruned, {c['failed']} failed"


def best(result: StudyResult) -> tuple[float, str]:
    if result.best_values is None:
        return float("nan"), "none"
    params = ", ".join(f"{k}={v:.4g}" for k, v in (result.best_params or {}).items())
    return result.best_values[0], params


def main() -> None:
    global TRIALS, TASKS, THROUGHPUT_TRIALS, PRUNER, PRUNE_FROM_TASK, SAMPLER_SEED
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 trials of 3 tasks")
    parser.add_argument("--pruner", default=PRUNER, help="the pruner to compare with none")
    parser.add_argument("--prune-from-task", type=int, default=PRUNE_FROM_TASK)
    parser.add_argument("--sampler-seed", type=int, default=SAMPLER_SEED)
    parser.add_argument("--no-throughput", action="store_true", help="skip trials per hour")
    args = parser.parse_args()
    PRUNER, PRUNE_FROM_TASK = args.pruner, args.prune_from_task
    SAMPLER_SEED = args.sampler_seed
    if args.quick:
        TRIALS, TASKS = QUICK["TRIALS"], QUICK["TASKS"]
        THROUGHPUT_TRIALS = QUICK["THROUGHPUT_TRIALS"]
    if os.getloadavg()[0] > 0.5:
        print(
            f"warning: load average {os.getloadavg()[0]:.2f}; timings may be inflated",
            file=sys.stderr,
        )
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        pruned, wall_pruned = study(tmp / "pruned", "pruned", PRUNER, TRIALS, 1)
        unpruned, wall_unpruned = study(tmp / "unpruned", "unpruned", "none", TRIALS, 1)
        count_pruned, optuna_pruned = task_trainings(tmp / "pruned", "pruned", pruned)
        count_unpruned, optuna_unpruned = task_trainings(tmp / "unpruned", "unpruned", unpruned)
        wall_one = wall_two = float("nan")
        if not args.no_throughput:
            _, wall_one = study(tmp / "one", "one", "none", THROUGHPUT_TRIALS, 1)
            _, wall_two = study(tmp / "two", "two", "none", THROUGHPUT_TRIALS, 2)
    ray.shutdown()
    acc_pruned, params_pruned = best(pruned)
    acc_unpruned, params_unpruned = best(unpruned)
    per_hour_one = THROUGHPUT_TRIALS / wall_one * 3600
    per_hour_two = THROUGHPUT_TRIALS / wall_two * 3600
    print(f"pruner: {PRUNER} (from task {PRUNE_FROM_TASK}), sampler seed {SAMPLER_SEED}")
    print(f"trials: {TRIALS}")
    print(f"tasks: {TASKS}")
    print(f"task_trainings_pruned: {count_pruned}")
    print(f"task_trainings_unpruned: {count_unpruned}")
    agree = count_pruned == optuna_pruned and count_unpruned == optuna_unpruned
    print(
        f"optuna_counts_agree: {agree} (Optuna: {optuna_pruned} pruned, {optuna_unpruned} unpruned)"
    )
    print(f"compute_saved: {1 - count_pruned / count_unpruned:.3f}")
    print(f"trials_pruned: {states(pruned)}")
    print(f"trials_unpruned: {states(unpruned)}")
    print(f"best_acc_pruned: {acc_pruned:.4f}")
    print(f"best_acc_unpruned: {acc_unpruned:.4f}")
    print(f"best_acc_difference: {acc_pruned - acc_unpruned:+.4f}")
    print(f"best_params_pruned: {params_pruned}")
    print(f"best_params_unpruned: {params_unpruned}")
    print(f"wall_pruned_s: {wall_pruned:.1f}")
    print(f"wall_unpruned_s: {wall_unpruned:.1f}")
    print(f"throughput_trials: {THROUGHPUT_TRIALS}")
    print(f"trials_per_hour_1_actor: {per_hour_one:.0f}")
    print(f"trials_per_hour_2_actors: {per_hour_two:.0f}")
    print(f"throughput_speedup: {per_hour_two / per_hour_one:.2f}")


if __name__ == "__main__":
    main()
