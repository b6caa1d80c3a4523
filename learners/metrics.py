"""The accuracy matrix R and every transfer metric computed from it — in one place.

Definitions (Lopez-Paz & Ranzato 2017), with T tasks, 0-based task indices,
``R[i][j]`` = accuracy on task j after learning tasks 0..i and ``b[j]`` = accuracy of the
untrained (random-init) model on task j:

- ACC         = mean_j R[T-1][j]
- BWT         = mean_{i<T-1} (R[T-1][i] - R[i][i])
- FWT         = mean_{i>=1} (R[i-1][i] - b[i])
- forgetting  = mean_{j<T-1} f_j,  f_j = max_{l<T-1} R[l][j] - R[T-1][j]  (Chaudhry et al. 2018)

A metric that has no meaning for a stream is ``None`` with the reason in ``undefined``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # task_streams imports torch; metrics stays importable without it
    from task_streams.base import StreamInfo

CLASS_IL_FWT_REASON = (
    "FWT is undefined for class-incremental streams: a task's classes are never trained "
    "before that task, so its accuracy before learning it is ~0 by construction"
)
ONE_TASK_REASON = "needs at least 2 tasks"


@dataclass
class RMatrix:
    """Accuracy matrix of one run; rows are appended as tasks finish (possibly partial)."""

    tasks: list[str]
    random_init: list[float]
    R: list[list[float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        t = len(self.tasks)
        if len(self.random_init) != t:
            raise ValueError(f"random_init has {len(self.random_init)} entries, expected {t}")
        if len(self.R) > t:
            raise ValueError(f"R has {len(self.R)} rows, more than the {t} tasks")
        for i, row in enumerate(self.R):
            if len(row) != t:
                raise ValueError(f"R row {i} has {len(row)} entries, expected {t}")

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def complete(self) -> bool:
        return len(self.R) == self.num_tasks

    def append(self, row: list[float]) -> None:
        """Add the row measured after learning the next task."""
        if len(row) != self.num_tasks:
            raise ValueError(f"row has {len(row)} entries, expected {self.num_tasks}")
        if self.complete:
            raise ValueError("R is already complete")
        self.R.append([float(v) for v in row])

    def avg_acc_seen(self, i: int) -> float:
        """Mean accuracy over tasks 0..i after learning task i."""
        return sum(self.R[i][: i + 1]) / (i + 1)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """The ``r_matrix.json`` shape: {"tasks", "random_init", "R"}."""
        return {
            "tasks": list(self.tasks),
            "random_init": list(self.random_init),
            "R": [list(r) for r in self.R],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RMatrix:
        missing = {"tasks", "random_init", "R"} - set(data)
        if missing:
            raise ValueError(f"r_matrix data lacks keys {sorted(missing)}")
        return cls(
            list(data["tasks"]),
            [float(v) for v in data["random_init"]],
            [[float(v) for v in row] for row in data["R"]],
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load_json(cls, path: str | Path) -> RMatrix:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_csv(self) -> str:
        """CSV with one row per state (random_init, after_<task>) and one column per task."""
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["after", *self.tasks])
        writer.writerow(["random_init", *self.random_init])
        for name, row in zip(self.tasks, self.R, strict=False):
            writer.writerow([f"after_{name}", *row])
        return buf.getvalue()


@dataclass
class Metrics:
    """Transfer metrics of one run; ``None`` where undefined, with the reason."""

    acc: float
    bwt: float | None
    fwt: float | None
    forgetting: float | None
    forgetting_per_task: list[float]
    undefined: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float | None]:
        return {"ACC": self.acc, "BWT": self.bwt, "FWT": self.fwt, "forgetting": self.forgetting}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def compute_metrics(r: RMatrix, scenario: str) -> Metrics:
    """ACC, BWT, FWT and forgetting of a complete R matrix (see the module docstring)."""
    if not r.complete:
        raise ValueError(f"R has {len(r.R)} of {r.num_tasks} rows; metrics need all of them")
    t = r.num_tasks
    R, b = r.R, r.random_init
    last = R[t - 1]
    undefined: dict[str, str] = {}
    acc = _mean(last)
    if t < 2:
        for name in ("BWT", "FWT", "forgetting"):
            undefined[name] = ONE_TASK_REASON
        return Metrics(acc, None, None, None, [], undefined)
    bwt = _mean([last[i] - R[i][i] for i in range(t - 1)])
    forgetting_per_task = [max(R[row][j] for row in range(t - 1)) - last[j] for j in range(t - 1)]
    if scenario == "class":
        fwt = None
        undefined["FWT"] = CLASS_IL_FWT_REASON
    else:
        fwt = _mean([R[i - 1][i] - b[i] for i in range(1, t)])
    return Metrics(acc, bwt, fwt, _mean(forgetting_per_task), forgetting_per_task, undefined)


# ---------------------------------------------------------------------- chance level
AT_CHANCE_Z = 3.0
"""How many standard errors above chance a final accuracy must be not to count as chance."""


def chance_accuracy(info: StreamInfo) -> list[float]:
    """Per task, the accuracy of a classifier that guesses uniformly among its outputs.

    Task-incremental streams mask the outputs to the task's classes, so chance on task t is
    ``1 / len(task_classes[t])``; domain- and class-incremental streams predict over every
    output unit, so chance is ``1 / num_classes`` on every task.
    """
    if info.scenario == "task":
        return [1.0 / len(classes) if classes else 0.0 for classes in info.task_classes]
    return [1.0 / info.num_classes if info.num_classes else 0.0] * info.num_tasks


def at_chance(final_row: list[float], chance: list[float], test_counts: list[int]) -> bool:
    """True when the mean final accuracy is not significantly above the mean chance level.

    One-sided test against a chance-level classifier. Under chance, task t's accuracy is a
    binomial proportion with mean ``p_t = chance[t]`` over ``n_t = test_counts[t]`` test
    samples, so the mean over the T tasks (the ACC of ``final_row``) has mean
    ``p = mean_t p_t`` and standard error ``se = sqrt(sum_t p_t (1 - p_t) / n_t) / T``
    (normal approximation). The run is flagged when ``ACC <= p + 3 * se``: a chance-level
    classifier exceeds that bound with probability about 0.13%.

    Example: 10 classes, 5 tasks of 500 test samples: se = sqrt(5 * 0.09 / 500) / 5 = 0.006,
    so the bound is 0.118; a final ACC of 0.11 is flagged, 0.15 is not. Tasks with no test
    samples are left out; with none at all, the bound is the chance level itself.
    """
    if not len(final_row) == len(chance) == len(test_counts):
        raise ValueError(
            f"final_row, chance and test_counts have {len(final_row)}, {len(chance)} and "
            f"{len(test_counts)} entries; expected one per task"
        )
    used = [(a, p, n) for a, p, n in zip(final_row, chance, test_counts, strict=True) if n > 0]
    if not used:
        return bool(final_row) and _mean(final_row) <= _mean(chance)
    t = len(used)
    acc = sum(a for a, _, _ in used) / t
    p = sum(c for _, c, _ in used) / t
    se = math.sqrt(sum(c * (1 - c) / n for _, c, n in used)) / t
    return acc <= p + AT_CHANCE_Z * se


# ---------------------------------------------------------------------- continual evaluation
@dataclass
class ContinualEval:
    """Metrics of accuracy measured *during* training (``train.eval_every_steps``), not only
    after each task (De Lange et al. 2023, "Continual evaluation for lifelong learning").

    - ``stability_gap``: mean over task switches t >= 1 and old tasks j < t of
      R[t-1][j] - min(acc_j while task t trains): how far an old task dips right after a
      switch, even when it recovers by the end of the task (which R cannot show);
    - ``min_acc``: mean over tasks j < T-1 of the lowest accuracy on j measured at any point
      after j was learned (during later tasks and at their ends): the worst case a deployed
      model would have shown.
    """

    stability_gap: float | None
    min_acc: float | None
    gap_per_switch: list[float]
    undefined: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float | None]:
        return {"stability_gap": self.stability_gap, "min_acc": self.min_acc}


NO_CURVE_REASON = (
    "needs accuracy measured during training: set train.eval_every_steps (and a method that "
    "trains by gradient steps)"
)


def continual_eval(R: list[list[float]], curves: list[list[list[float]]]) -> ContinualEval:
    """Stability gap and min-ACC from R and, per task t, the rows measured while t trained.

    ``curves[t]`` is the list of R-like rows (accuracy on every task) evaluated during the
    training of task t, in order (the row at the end of t is ``R[t]``, not in ``curves[t]``).
    """
    t_count = len(R)
    undefined: dict[str, str] = {}
    if t_count < 2:
        reason = ONE_TASK_REASON
        return ContinualEval(None, None, [], {"stability_gap": reason, "min_acc": reason})
    during = [list(curves[t]) if t < len(curves) else [] for t in range(t_count)]
    if not any(during[1:]):
        undefined["stability_gap"] = NO_CURVE_REASON
    gaps: list[float] = []
    for t in range(1, t_count):
        if not during[t]:
            continue
        switch = [R[t - 1][j] - min(row[j] for row in during[t]) for j in range(t)]
        gaps.append(_mean(switch))
    lows = []
    for j in range(t_count - 1):
        seen = [row[j] for t in range(j + 1, t_count) for row in during[t]]
        seen += [R[t][j] for t in range(j + 1, t_count)]
        lows.append(min(seen))
    gap = _mean(gaps) if gaps else None
    return ContinualEval(gap, _mean(lows), gaps, undefined)


def recency_bias(predicted_old: list[int], newest_classes: set[int]) -> float | None:
    """Share of old tasks' test samples a class-incremental model assigns to the classes of
    the task it learned last: about (newest classes / classes seen) for an unbiased model,
    near 1 for one that forgot everything but the last task. None without old samples."""
    if not predicted_old:
        return None
    return sum(p in newest_classes for p in predicted_old) / len(predicted_old)
