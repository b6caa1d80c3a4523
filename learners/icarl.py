"""iCaRL (Rebuffi et al., 2017, "iCaRL: Incremental Classifier and Representation Learning").

A class-incremental learner with three parts:

Representation learning. At task k the network trains on the task's data joined with the
stored exemplars of every earlier class. Each output unit is an independent sigmoid g_y, and
the loss is binary cross-entropy over the classes seen so far (Eq. in Alg. 3 of the paper):

    ℓ(x, y) = − Σ_{c ∈ new}  [ δ_{c=y} log g_c(x) + δ_{c≠y} log(1 − g_c(x)) ]
              − w · Σ_{c ∈ old} [ q_c(x) log g_c(x) + (1 − q_c(x)) log(1 − g_c(x)) ]

where "new" are the current task's classes, "old" the classes seen before it, and
q_c(x) = g_c(x) under the network as it stood after the previous task (a frozen copy, the
"teacher": distillation). Old-class units are never trained on labels, exemplars included, as
in the paper. The loss is summed over classes and averaged over the batch (so each output
unit's gradient is (g_c − target)/B, as for softmax cross-entropy); w is ``distill_weight``
(1 = the paper).

Exemplars (herding, Alg. 4). A memory of K = ``memory_size`` samples is split equally over the
classes seen: m = ⌊K / s⌋ each for s seen classes. After a task, every old class keeps the first
m of its exemplars (they are stored in herding order, so this is Alg. 5), and each new class
selects m by herding on L2-normalised penultimate features φ: with μ the class mean of φ, the
k-th exemplar is the not yet chosen sample p minimising ‖μ − (φ(p) + Σ_{j<k} φ(p_j)) / k‖,
so the running exemplar mean approaches μ as fast as greedily possible.

Classification (nearest mean of exemplars, Alg. 1). After each task the class means
μ_y = normalise(mean of φ over P_y's exemplars) are recomputed with the current network, and
``predict`` answers argmin_y ‖φ(x) − μ_y‖ over the classes that have exemplars, not the
network's outputs. Before any task is learned, it answers by the network's outputs.

Scenarios: class-incremental (the paper's), and task-incremental where the nearest mean is
restricted to the given task's classes. Domain-incremental streams are refused: there the same
classes recur with other inputs, so exemplar means kept from one domain do not describe the
class in another, and the equal per-class split gives no room per domain.

Differences from the paper: no data augmentation (no random crops/flips, so the class means
do not average flipped images); the backbone is this project's MLP (or small CNN), not a
ResNet-32, and φ is the output of its last hidden layer (everything but the final Linear); the
optimiser and schedule are the project's ``train`` settings. A class recurring in a later task
re-herds its exemplars from the new samples joined with its old exemplars. Herding never picks
a sample twice.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from learners.backbones import MLP, SmallCNN
from learners.base import Learner, register
from learners.hparams import ConfigError, hp
from task_streams.base import Task


def feature_extractor(model: nn.Module) -> nn.Module:
    """The backbone up to its penultimate layer: every module but the final Linear.

    The returned module shares its layers (and so its weights and train/eval mode) with
    ``model``; ``model(x) == model's last Linear(feature_extractor(model)(x))``.
    """
    if isinstance(model, MLP):
        layers = list(model.net)
    elif isinstance(model, SmallCNN):
        layers = [model.features, *model.head]
    else:
        raise TypeError(f"iCaRL cannot find the feature layer of a {type(model).__name__}")
    if not isinstance(layers[-1], nn.Linear):
        raise TypeError(f"the last layer of the {type(model).__name__} is not a Linear classifier")
    return nn.Sequential(*layers[:-1])


def herding(features: torch.Tensor, m: int) -> torch.Tensor:
    """Indices of ``m`` rows of ``features`` chosen by herding (iCaRL Alg. 4), in choice order.

    ``features`` are L2-normalised (n, d). The k-th choice is the row not chosen yet that brings
    the mean of the chosen rows closest to the mean of all rows; ties go to the lower index.
    """
    n = int(features.shape[0])
    m = min(int(m), n)
    if m <= 0:
        return torch.empty(0, dtype=torch.long, device=features.device)
    mu = features.mean(0)
    running = torch.zeros_like(mu)
    available = torch.ones(n, dtype=torch.bool, device=features.device)
    chosen = []
    for k in range(1, m + 1):
        distance = (mu - (running + features) / k).pow(2).sum(1)
        distance = distance.masked_fill(~available, float("inf"))
        i = int(torch.argmin(distance))
        chosen.append(i)
        available[i] = False
        running = running + features[i]
    return torch.tensor(chosen, dtype=torch.long, device=features.device)


@dataclass
class ICaRLHParams:
    """Hyperparameters of iCaRL."""

    memory_size: int = hp(
        500,
        help="exemplars kept in all (K), split equally over the classes seen; at least the "
        "number of classes in the stream",
        low=1,
        search=(50, 5000),
        log=True,
    )
    distill_weight: float = hp(
        1.0,
        help="weight of the old classes' distillation BCE against the new classes' BCE "
        "(1 = the paper)",
        low=0.0,
        search=(0.1, 10.0),
        log=True,
    )


@register("icarl")
class ICaRL(Learner):
    """Sigmoid BCE with distillation on data plus herded exemplars; answers by class means."""

    HParams = ICaRLHParams
    SCENARIOS = ("class", "task")
    SCENARIO_NOTE = (
        "in domain-incremental streams the same classes recur with other inputs, so the means of "
        "exemplars kept from one domain do not describe the class in another"
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        classes = {c for group in self.info.task_classes for c in group}
        if self.hparams.memory_size < len(classes):
            raise ConfigError(
                f"methods.{self.name}.memory_size={self.hparams.memory_size} is too small: the "
                f"stream has {len(classes)} classes and iCaRL keeps at least one exemplar of "
                f"each; use memory_size >= {len(classes)}"
            )
        self.features = feature_extractor(self.model)
        self.seen: list[int] = []  # classes of the learned tasks, sorted
        # per class, in herding order: exemplar inputs and the task id they came with
        self.exemplars: dict[int, torch.Tensor] = {}
        self.exemplar_task: dict[int, int] = {}
        self.mean_classes: list[int] = []  # classes that have a mean, sorted
        self.means: torch.Tensor | None = None  # (len(mean_classes), d), L2-normalised
        self.teacher: nn.Module | None = None  # the network after the previous task, frozen
        # columns of the loss for the current task (set in before_task; derived, not state)
        self._new: torch.Tensor | None = None
        self._old: torch.Tensor | None = None

    # ------------------------------------------------------------------ features
    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised penultimate features φ(x), in eval mode, in evaluation-sized chunks."""
        was_training = self.model.training
        self.model.eval()
        try:
            bs = self.train_config.eval_batch_size
            parts = [self.features(x[s : s + bs]) for s in range(0, x.shape[0], bs)]
        finally:
            self.model.train(was_training)
        if not parts:
            return torch.empty(0, 0, device=x.device)
        return F.normalize(torch.cat(parts).flatten(1), dim=1)

    # ------------------------------------------------------------------ training
    def before_task(self, task: Task) -> None:
        """Which output units take label targets (this task's) and which distillation (older)."""
        new = sorted(set(task.classes))
        old = sorted(set(self.seen) - set(new))
        self._new = torch.tensor(new, dtype=torch.long, device=self.device)
        self._old = torch.tensor(old, dtype=torch.long, device=self.device)

    def training_data(self, task: Task) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The task's training data followed by every class's exemplars (class order)."""
        x, y, t = super().training_data(task)
        if not self.exemplars:
            return x, y, t
        xs, ys, ts = [x], [y], [t]
        for c in sorted(self.exemplars):
            ex = self.exemplars[c].to(x.device)
            xs.append(ex)
            ys.append(torch.full((ex.shape[0],), c, dtype=y.dtype, device=y.device))
            ts.append(
                torch.full((ex.shape[0],), self.exemplar_task[c], dtype=t.dtype, device=t.device)
            )
        return torch.cat(xs), torch.cat(ys), torch.cat(ts)

    def loss(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """BCE with label targets on the new classes, distillation targets on the old ones."""
        out = self.model(x)
        new, old = self._new, self._old
        onehot = F.one_hot(y, self.info.num_classes).to(out.dtype)
        loss = F.binary_cross_entropy_with_logits(
            out[:, new], onehot[:, new], reduction="none"
        ).sum(1)
        if old.numel() and self.teacher is not None and self.hparams.distill_weight > 0:
            with torch.no_grad():
                target = torch.sigmoid(self.teacher(x)[:, old])
            distill = F.binary_cross_entropy_with_logits(out[:, old], target, reduction="none")
            loss = loss + self.hparams.distill_weight * distill.sum(1)
        return loss.mean()

    # ------------------------------------------------------------------ exemplars and means
    def after_task(self, task: Task) -> None:
        """Shrink old exemplar sets, herd the new classes', recompute means, keep a teacher.

        Stoppable between classes (check_stop); nothing is changed until the pass finishes.
        """
        seen = sorted(set(self.seen) | set(task.classes))
        m = self.hparams.memory_size // len(seen)
        exemplars = {c: ex[:m] for c, ex in self.exemplars.items() if c not in task.classes}
        exemplar_task = {c: self.exemplar_task[c] for c in exemplars}
        x_all, y_all = task.x_train, task.y_train
        for c in sorted(set(task.classes)):
            self.check_stop(f"building the exemplars of class {c} after task {task.name!r}")
            candidates = x_all[y_all == c]
            if c in self.exemplars:  # a recurring class: its old exemplars compete too
                candidates = torch.cat([candidates, self.exemplars[c].to(candidates.device)])
            if candidates.shape[0] == 0:
                continue
            chosen = herding(self.embed(candidates), m)
            exemplars[c] = candidates[chosen].clone()
            exemplar_task[c] = task.id
        mean_classes = sorted(c for c, ex in exemplars.items() if ex.shape[0] > 0)
        means = []
        for c in mean_classes:
            self.check_stop(f"computing the mean of class {c} after task {task.name!r}")
            means.append(F.normalize(self.embed(exemplars[c]).mean(0), dim=0))
        teacher = copy.deepcopy(self.model).eval()
        teacher.requires_grad_(False)

        self.seen = seen
        self.exemplars, self.exemplar_task = exemplars, exemplar_task
        self.mean_classes = mean_classes
        self.means = torch.stack(means) if means else None
        self.teacher = teacher

    # ------------------------------------------------------------------ inference
    def class_means(self) -> tuple[list[int], torch.Tensor | None]:
        """The classes that have a mean and their L2-normalised means (rows)."""
        return list(self.mean_classes), self.means

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id: int | None = None) -> torch.Tensor:
        """Nearest mean of exemplars on φ(x); task-incremental: among the task's classes only.

        Falls back to the network's outputs where no candidate class has a mean yet.
        """
        if self.class_mask is not None and task_id is None:
            raise ValueError("this is a task-incremental stream: predict() needs task_id")
        classes = self.mean_classes
        rows = list(range(len(classes)))
        if self.class_mask is not None:
            allowed = set(self.info.task_classes[task_id])
            rows = [i for i in rows if classes[i] in allowed]
        if not rows or self.means is None:
            return super().predict(x, task_id)
        if x.shape[0] == 0:
            return torch.empty(0, dtype=torch.long, device=x.device)
        means = self.means[rows].to(x.device)
        labels = torch.tensor([classes[i] for i in rows], dtype=torch.long, device=x.device)
        # ‖φ − μ‖² = ‖φ‖² − 2 φ·μ + ‖μ‖², and ‖φ‖² does not depend on the class
        distance = means.pow(2).sum(1) - 2 * self.embed(x) @ means.T
        return labels[distance.argmin(1)]

    # ------------------------------------------------------------------ state
    def method_state(self) -> dict[str, Any]:
        """Seen classes, exemplars (herding order), class means and the teacher's weights."""
        classes = sorted(self.exemplars)
        return {
            "seen": list(self.seen),
            "exemplar_classes": classes,
            "exemplars": [self.exemplars[c].clone() for c in classes],
            "exemplar_tasks": [self.exemplar_task[c] for c in classes],
            "mean_classes": list(self.mean_classes),
            "means": self.means.clone() if self.means is not None else torch.empty(0),
            "teacher": self.teacher.state_dict() if self.teacher is not None else {},
        }

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`method_state` returned."""
        self.seen = [int(c) for c in state["seen"]]
        classes = [int(c) for c in state["exemplar_classes"]]
        self.exemplars = {
            c: x.to(self.device) for c, x in zip(classes, state["exemplars"], strict=True)
        }
        self.exemplar_task = {
            c: int(t) for c, t in zip(classes, state["exemplar_tasks"], strict=True)
        }
        self.mean_classes = [int(c) for c in state["mean_classes"]]
        self.means = state["means"].to(self.device) if self.mean_classes else None
        self.teacher = None
        if state["teacher"]:
            teacher = copy.deepcopy(self.model)
            teacher.load_state_dict(state["teacher"])
            teacher.eval().requires_grad_(False)
            self.teacher = teacher

    def stored_memory(self) -> dict[str, int]:
        """Exemplars (inputs, labels, task ids), plus the class means and the teacher in bytes."""
        samples = sum(int(ex.shape[0]) for ex in self.exemplars.values())
        per_label = 2 * torch.tensor(0, dtype=torch.long).element_size()  # label + task id
        nbytes = sum(ex.numel() * ex.element_size() for ex in self.exemplars.values())
        nbytes += samples * per_label
        if self.means is not None:
            nbytes += self.means.numel() * self.means.element_size()
        if self.teacher is not None:
            nbytes += sum(p.numel() * p.element_size() for p in self.teacher.parameters())
        return {"stored_samples": samples, "stored_bytes": nbytes}
