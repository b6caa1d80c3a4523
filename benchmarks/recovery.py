"""Recovery: the time from a SIGKILLed worker to its run resuming on a fresh actor.

A run of fine-tuning whose worker process is SIGKILLed (as the kernel's OOM killer does) when
it reaches task KILL_AT, the first time only. The driver sees the actor die, waits the retry
backoff (`retries.backoff_s`, default 1 s), starts a fresh actor, and the run resumes from the
checkpoint written after its last finished task. A second, undisturbed fine-tuning run with
the same seed checks the resumed R matrix bit for bit.

Prints, as `name: value` lines (median over REPETITIONS, with min and max):
  kill_to_resume_s      SIGKILL -> the fresh actor has loaded the checkpoint
  kill_to_next_task_s   SIGKILL -> the first task finished after resuming
  retry_backoff_s       the configured wait before the retry (part of the above)
  exit_code_zero        every invocation ended with all runs FINISHED
  r_identical           the killed-and-resumed R equals the undisturbed run's

    python benchmarks/recovery.py          # full: 3 repetitions
    python benchmarks/recovery.py --quick  # 1 repetition, smaller tasks (< 2 minutes)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import textwrap
from pathlib import Path

# ---------------------------------------------------------------- settings
TASKS = 5
KILL_AT = 2
TRAIN_PER_TASK = 1000
EPOCHS = 3
BACKOFF_S = 1.0
REPETITIONS = 3
QUICK = {"REPETITIONS": 1, "EPOCHS": 1}
# ------------------------------------------------------------------------

PLUGIN = '''
"""Benchmark plugin: fine-tuning whose worker is SIGKILLed once at task KILL_AT."""
import os
import signal
import time
from pathlib import Path

from learners.base import register
from learners.finetune import FineTune

MARKERS = Path(os.environ["LIA_BENCH_MARKERS"])


@register("killed_once")
class KilledOnce(FineTune):
    """Fine-tuning; its worker is SIGKILLed at task {kill_at} the first time."""

    def before_task(self, task):
        if task.id == {kill_at} and not (MARKERS / "killed").exists():
            (MARKERS / "killed").write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)

    def load_state_dict(self, state):
        super().load_state_dict(state)
        (MARKERS / "resumed").write_text(repr(time.time()))

    def after_task(self, task):
        super().after_task(task)
        resumed = MARKERS / "resumed"
        if resumed.exists() and not (MARKERS / "next_task").exists():
            (MARKERS / "next_task").write_text(repr(time.time()))
'''


def one_run(tmp: Path, rep: int) -> tuple[float, float, bool, bool]:
    """(kill->resume, kill->next task, all finished, R identical) for one invocation."""
    from orchestrator.config import load_config
    from orchestrator.driver import execute

    markers = Path(os.environ["LIA_BENCH_MARKERS"])
    for name in ("killed", "resumed", "next_task"):
        (markers / name).unlink(missing_ok=True)
    config = load_config(
        {
            "name": f"recovery{rep}",
            "plugins": ["lia_bench_recovery"],
            "methods": {"finetune": {}, "killed": {"method": "killed_once"}},
            "seeds": [0],
            "stream": {
                "name": "permuted",
                "source": "mnist5k",
                "num_tasks": TASKS,
                "train_per_task": TRAIN_PER_TASK,
                "test_per_task": 500,
            },
            "model": {"hidden": [100, 100]},
            "train": {"epochs": EPOCHS, "batch_size": 32, "optimizer": "adam", "lr": 0.001},
            "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db"},
            "checkpoints": {"dir": str(tmp / "checkpoints")},
            "retries": {"backoff_s": BACKOFF_S},
        }
    )
    result = execute(config, progress=False)
    killed = float((markers / "killed").read_text())
    resumed = float((markers / "resumed").read_text())
    next_task = float((markers / "next_task").read_text())
    runs = result.runs.set_index("label")
    ok = bool((result.runs["status"] == "FINISHED").all())
    same = runs.loc["killed", "R"] == runs.loc["finetune", "R"]
    return resumed - killed, next_task - killed, ok, same


def main() -> None:
    global REPETITIONS, EPOCHS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repetition, smaller tasks")
    if parser.parse_args().quick:
        REPETITIONS, EPOCHS = QUICK["REPETITIONS"], QUICK["EPOCHS"]
    if os.getloadavg()[0] > 0.5:
        print(f"warning: load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        (tmp / "plugin").mkdir()
        (tmp / "markers").mkdir()
        source = textwrap.dedent(PLUGIN).replace("{kill_at}", str(KILL_AT))
        (tmp / "plugin" / "lia_bench_recovery.py").write_text(source)
        # the actors import the plugin too: it must be on their path before Ray starts
        sys.path.insert(0, str(tmp / "plugin"))
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(tmp / "plugin"), os.environ.get("PYTHONPATH")) if p
        )
        os.environ["LIA_BENCH_MARKERS"] = str(tmp / "markers")
        import ray

        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
        figures = [one_run(tmp, rep) for rep in range(REPETITIONS)]
        ray.shutdown()
    resume = [f[0] for f in figures]
    next_task = [f[1] for f in figures]
    print(f"repetitions: {REPETITIONS}")
    print(f"retry_backoff_s: {BACKOFF_S:.1f}")
    print(
        f"kill_to_resume_s: {statistics.median(resume):.3f} "
        f"(min {min(resume):.3f}, max {max(resume):.3f})"
    )
    print(
        f"kill_to_next_task_s: {statistics.median(next_task):.3f} "
        f"(min {min(next_task):.3f}, max {max(next_task):.3f})"
    )
    print(f"exit_code_zero: {all(f[2] for f in figures)}")
    print(f"r_identical: {all(f[3] for f in figures)}")


if __name__ == "__main__":
    main()
