"""Learning without Forgetting (Li & Hoiem, 2017, "Learning without Forgetting", TPAMI).

After each task a frozen copy f_old of the network is kept. Training on a later task minimises

    L(θ) = CE(f_θ(x), y) + λ · T² · KL( softmax(f_old(x)_U / T) ‖ softmax(f_θ(x)_U / T) )

on the CURRENT task's batches x: no old data is stored, the old model's responses to the new
inputs are the targets ("knowledge distillation", Hinton et al. 2015). KL is averaged over the
batch ("batchmean"). The paper writes the distillation term as a cross-entropy with the soft
targets; it differs from the KL by the targets' entropy, a constant, so the gradients are the
same and the KL is 0 when the outputs agree.

What is distilled (the units U) depends on the scenario:

- task-incremental: every previously learned task's head, i.e. the units of its classes
  (``class_mask``), each with its own softmax; the terms are summed over the old tasks, as the
  paper sums one distillation loss per old task. The current task's units are not distilled.
- class-incremental: the units of the classes seen in the tasks learned so far (before the
  current one), in one softmax over those units; new classes' units are left to CE.
- domain-incremental: all units (every task shares the label space).

Choices that fix the scale of the hyperparameters:

- T² (Hinton et al.) keeps the distillation gradient's size roughly independent of the
  temperature T (``temperature``, the paper's T = 2), so λ (``lwf_weight``, the paper's λ_o =
  1) weighs distillation against CE the same way at any T.
- The frozen copy is taken after each completed task (``after_task``) and evaluated in eval
  mode (no dropout), so a task that is stopped and learned again still distils from the model
  as it was after the previous task. It is part of ``method_state``, so resuming is exact.
- λ = 0 is fine-tuning bit for bit: the distillation term is then not computed at all.
- The paper's warm-up (training the new head alone first) is not used: with a shared output
  layer there is no separate new head.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from learners.base import Learner, register
from learners.hparams import hp
from task_streams.base import Task


@dataclass
class LwFHParams:
    """Hyperparameters of Learning without Forgetting."""

    lwf_weight: float = hp(
        1.0,
        help="λ: weight of the distillation term λ·T²·KL(old ‖ new) added to the cross-entropy",
        low=0.0,
        search=(0.1, 10.0),
        log=True,
    )
    temperature: float = hp(
        2.0,
        help="T: softmax temperature of the distilled outputs (the paper's 2)",
        gt=0.0,
        search=(1.0, 8.0),
        log=True,
    )


def distillation(old: torch.Tensor, new: torch.Tensor, temperature: float) -> torch.Tensor:
    """T²·KL(softmax(old/T) ‖ softmax(new/T)), averaged over the rows."""
    target = F.log_softmax(old / temperature, dim=1)
    log_probs = F.log_softmax(new / temperature, dim=1)
    kl = F.kl_div(log_probs, target, reduction="batchmean", log_target=True)
    return temperature**2 * kl


@register("lwf")
class LwF(Learner):
    """Cross-entropy on the current task plus distillation towards the previous model's outputs
    on the same inputs."""

    HParams = LwFHParams

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.old_model: torch.nn.Module | None = None
        self.learned_tasks: list[int] = []
        self._units: list[torch.Tensor] = []  # fixed at each task's start

    # ------------------------------------------------------------------ what is distilled
    def distilled_units(self) -> list[torch.Tensor]:
        """Index tensors of the output units distilled together (one softmax each)."""
        if self.info.scenario == "task":
            return [
                self.class_mask[k].nonzero().squeeze(1) for k in sorted(set(self.learned_tasks))
            ]
        if self.info.scenario == "class":
            seen = sorted({c for k in self.learned_tasks for c in self.info.task_classes[k]})
            return [torch.tensor(seen, dtype=torch.long, device=self.device)]
        return [torch.arange(self.info.num_classes, device=self.device)]

    def before_task(self, task: Task) -> None:
        """Fix the distilled unit groups for this task."""
        self._units = self.distilled_units() if self.old_model is not None else []

    # ------------------------------------------------------------------ objective
    def loss(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """CE plus λ·T²·KL over the distilled units (CE alone before the second task or λ = 0)."""
        if self.old_model is None or self.hparams.lwf_weight == 0:
            return super().loss(x, y, t)
        out = self.model(x)
        masked = out
        if self.class_mask is not None:
            masked = out.masked_fill(~self.class_mask[t], float("-inf"))
        ce = F.cross_entropy(masked, y)
        with torch.no_grad():
            old = self.old_model(x)
        temperature = self.hparams.temperature
        kd = sum(distillation(old[:, u], out[:, u], temperature) for u in self._units)
        return ce + self.hparams.lwf_weight * kd

    def after_task(self, task: Task) -> None:
        """Freeze a copy of the model as it is after this task."""
        self.learned_tasks.append(task.id)
        self.old_model = self._frozen_copy()

    def _frozen_copy(self) -> torch.nn.Module:
        old = copy.deepcopy(self.model)
        old.eval()
        for p in old.parameters():
            p.requires_grad_(False)
        return old

    # ------------------------------------------------------------------ state
    def method_state(self) -> dict[str, Any]:
        """The frozen previous model's weights and the tasks learned."""
        return {
            "old_model": None if self.old_model is None else self.old_model.state_dict(),
            "learned_tasks": list(self.learned_tasks),
        }

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Restore the frozen previous model and the tasks learned."""
        self.learned_tasks = [int(k) for k in state["learned_tasks"]]
        self.old_model = None
        if state["old_model"] is not None:
            self.old_model = self._frozen_copy()
            self.old_model.load_state_dict(state["old_model"])

    def stored_memory(self) -> dict[str, int]:
        """No samples; the frozen previous model, in bytes."""
        if self.old_model is None:
            return {"stored_samples": 0, "stored_bytes": 0}
        nbytes = sum(v.numel() * v.element_size() for v in self.old_model.state_dict().values())
        return {"stored_samples": 0, "stored_bytes": nbytes}
