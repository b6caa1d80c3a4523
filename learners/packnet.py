"""PackNet (Mallya & Lazebnik, 2018, "PackNet: Adding Multiple Tasks to a Single Network by
Iterative Pruning", CVPR).

Several tasks are packed into one fixed network. Every prunable weight (the ``weight`` of each
``nn.Linear`` and ``nn.Conv2d`` layer, the classifier included) has an owner: the task that
kept it, or none (free). For task t:

1. train: only the free weights change; weights owned by earlier tasks are frozen. Their
   gradients are zeroed in ``after_backward`` and, because momentum, Adam's moments and weight
   decay would still move them inside ``step()``, their values are restored bit for bit after
   every step (``after_step``);
2. prune: in every layer, the smallest-magnitude of t's candidate weights (below) are set to
   0 and released for later tasks (ties broken by position);
3. retrain briefly (``retrain_epochs``): the kept weights only, released ones held at 0;
4. the kept weights become owned by t.

At test time task t answers with its subnetwork: the weights owned by tasks learned up to and
including t, every other prunable weight zeroed (:meth:`task_weights`). Later tasks change
neither those weights nor anything else t's forward reads, so t's answers never change after it
is learned (no forgetting, by construction). A task not learned yet is answered by the whole
network: every weight owned so far plus the free ones. This needs the task identity at test
time, hence the task-incremental scenario only (permuted and rotated streams give it with
``scenario: task``).

Task t's candidates are the free weights its forward reads (all trained by t): every free
weight of the hidden layers and, in the classifier (the last ``nn.Linear`` with one output per
class), the free weights into the units of t's classes; weights into other units stay free
(neither kept nor zeroed). A candidate is shared by r tasks, t and the later tasks of the
stream that read it: r = N − t in the hidden layers (t the 0-based position of the task among
N), 1 + the number of later tasks with class u for the classifier's unit u. Per layer and per
r, of F candidates ``prune_schedule`` releases:

- ``equal`` (default): ⌊F·(r − 1)/r⌋, i.e. t keeps ⌈F/r⌉, an equal share for each task that
  can still use them: task t of N keeps 1/(N − t) of the free hidden weights, the free fraction
  after t is (N − 1 − t)/N up to rounding and the last task keeps all that is left.
  ``prune_fraction`` is not used.
- ``fixed``: ⌊F · prune_fraction⌋ when r > 1, none when r = 1: every task but the last
  releases that fraction of the free hidden weights (the paper prunes 50% or 75% per task).

Weights no later task reads (r = 1) are never released, as that would only hurt t: on a split
(task-incremental) stream each task keeps all of its classes' output weights.

The free fraction now is :meth:`free_fraction`; after each task it is appended to
``free_after_task`` and returned by :meth:`learn` as ``free_fraction``.

Biases (and any parameter that is not a prunable weight) are trained on the first task only and
frozen after it, as in the paper. Stored memory: the owner of each prunable weight, an int8
tensor per layer (int16 for streams of 127 tasks or more); it is not part of the model's parameters.

Deviations from the paper: the backbone's classifier is one shared layer whose units a task's
class mask selects, packed like the other layers (the paper gives each task its own head);
pruning is per layer by magnitude with the schedules above; retraining uses the training
optimizer and learning rate (the paper fine-tunes for more epochs with a lower rate); released
weights start the next task at 0 (as the reference code does). Backbones with buffers (e.g.
BatchNorm running statistics, which every task would change) are refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from learners.backbones import ModelConfig, build_backbone
from learners.base import Learner, register
from learners.hparams import ConfigError, hp
from task_streams.base import StreamInfo, Task

PRUNE_SCHEDULES = ("equal", "fixed")
FREE = -1
PRUNABLE = (nn.Linear, nn.Conv2d)


@dataclass
class PackNetHParams:
    """Hyperparameters of PackNet."""

    prune_fraction: float = hp(
        0.5,
        help="fixed schedule: fraction of the free weights of each layer a task releases "
        "after training (smallest magnitudes), in (0, 0.99]; not used by the equal schedule",
        gt=0.0,
        high=0.99,
        search=(0.3, 0.9),
    )
    prune_schedule: str = hp(
        "equal",
        help="equal: a task keeps 1/r of the free weights it shares with r-1 later tasks "
        "(task t of N keeps 1/(N-t) of the free hidden weights, the last keeps all); fixed: "
        "every task but the last releases prune_fraction of them",
        choices=PRUNE_SCHEDULES,
    )
    retrain_epochs: int = hp(
        1,
        help="epochs of retraining the kept weights after pruning (released ones held at 0); "
        "0 = no retraining",
        low=0,
    )


def prunable_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(parameter name, weight) of every nn.Linear and nn.Conv2d layer of ``model``."""
    return [
        (f"{name}.weight" if name else "weight", module.weight)
        for name, module in model.named_modules()
        if isinstance(module, PRUNABLE)
    ]


def classifier_name(model: nn.Module, num_classes: int) -> str | None:
    """Name of the weight of the last nn.Linear with one output per class, if any."""
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == num_classes:
            found = f"{name}.weight" if name else "weight"
    return found


def _check_network(network: nn.Module, backbone: str, where: str) -> None:
    """ConfigError when PackNet cannot pack ``network``."""
    if not prunable_weights(network):
        raise ConfigError(
            f"{where}: model.backbone={backbone!r} has no nn.Linear or nn.Conv2d layer for "
            "packnet to pack; accepted: a backbone built of such layers (mlp, cnn)"
        )
    buffers = [name for name, _ in network.named_buffers()]
    if buffers:
        raise ConfigError(
            f"{where}: model.backbone={backbone!r} has buffers ({', '.join(buffers[:3])}), "
            "e.g. BatchNorm running statistics, which every task would change so that earlier "
            "tasks' answers drift; packnet accepts backbones without buffers (mlp, cnn)"
        )


@register("packnet")
class PackNet(Learner):
    """Each task trains the free weights, keeps the largest and releases the rest; it answers
    with the weights it and earlier tasks own."""

    HParams = PackNetHParams
    FIXED_NETWORK = True  # an owner per weight: the network must not grow
    SCENARIOS = ("task",)
    SCENARIO_NOTE = (
        "PackNet answers task t with the weights owned by tasks up to t, so it needs the task "
        "identity at test time; permuted and rotated streams give it with scenario: task"
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.layers = prunable_weights(self.model)
        self._classifier = classifier_name(self.model, self.info.num_classes)
        dtype = torch.int8 if self.info.num_tasks < 127 else torch.int16
        self.owners = {
            name: torch.full(p.shape, FREE, dtype=dtype, device=self.device)
            for name, p in self.layers
        }
        """owner of each prunable weight: the position (0, 1, ...) of the task that kept it in
        ``learned_tasks``, or FREE"""
        self.learned_tasks: list[int] = []
        """task ids in the order learned; a task's position here is its owner value"""
        self.free_after_task: list[float] = []
        """free fraction of the prunable weights after each learned task"""
        self.extras_frozen = False
        """biases and other non-prunable parameters are frozen (after the first task)"""
        # entries that must not change in the current training phase and their values
        self._held: list[torch.Tensor] | None = None
        self._held_values: list[torch.Tensor] = []

    @classmethod
    def check_model(cls, model: ModelConfig, info: StreamInfo, where: str) -> None:
        """ConfigError for a backbone without Linear/Conv2d layers or with buffers."""
        try:
            network = build_backbone(model, info)
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None
        _check_network(network, model.backbone, where)

    def build_model(self) -> nn.Module:
        """The configured backbone; ConfigError if PackNet cannot pack it."""
        network = super().build_model()
        _check_network(network, self.model_config.backbone, f"method {self.name}")
        return network

    # ------------------------------------------------------------------ subnetworks
    def free_fraction(self) -> float:
        """Fraction of the prunable weights owned by no task."""
        free = sum(int((owner == FREE).sum()) for owner in self.owners.values())
        return free / sum(owner.numel() for owner in self.owners.values())

    def _position(self, task_id: int) -> int | None:
        """Position of ``task_id`` in the learning order (its latest), None if not learned."""
        for position in range(len(self.learned_tasks) - 1, -1, -1):
            if self.learned_tasks[position] == task_id:
                return position
        return None

    def task_weights(self, task_id: int) -> dict[str, torch.Tensor]:
        """The prunable weights task ``task_id`` answers with: those owned by it and by the
        tasks learned before it, every other entry 0 (all weights for a task not learned)."""
        position = self._position(task_id)
        weights = {}
        for name, p in self.layers:
            if position is None:
                weights[name] = p
                continue
            owner = self.owners[name]
            mine = (owner != FREE) & (owner <= position)
            weights[name] = torch.where(mine, p, torch.zeros((), dtype=p.dtype, device=p.device))
        return weights

    def logits(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Training (train mode): the whole network. Evaluation: each sample's task subnetwork
        (:meth:`task_weights`); outside the task's units masked as usual."""
        if self.model.training or task_ids is None:
            return super().logits(x, task_ids)
        ids = task_ids.unique().tolist()
        if len(ids) == 1:
            out = functional_call(self.model, self.task_weights(ids[0]), (x,))
        else:
            parts = {
                k: functional_call(self.model, self.task_weights(k), (x[task_ids == k],))
                for k in ids
            }
            first = next(iter(parts.values()))
            out = first.new_empty((x.shape[0], *first.shape[1:]))
            for k, part in parts.items():
                out[task_ids == k] = part
        return out.masked_fill(~self.class_mask[task_ids], float("-inf"))

    # ------------------------------------------------------------------ holding weights
    def _hold(self, masks: list[torch.Tensor]) -> None:
        """From now on, keep the entries of ``masks`` (one per prunable weight) at their
        current values: no gradient, restored after every step."""
        if not any(bool(m.any()) for m in masks):
            self._held, self._held_values = None, []
            return
        self._held = masks
        self._held_values = [p.detach().clone() for _, p in self.layers]

    def before_task(self, task: Task) -> None:
        """Hold every weight an earlier task owns."""
        self._hold([owner != FREE for owner in self.owners.values()])

    def after_backward(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> None:
        """Zero the gradients of the held weights."""
        if self._held is None:
            return
        for (_, p), held in zip(self.layers, self._held, strict=True):
            if p.grad is not None:
                p.grad.masked_fill_(held, 0.0)

    @torch.no_grad()
    def after_step(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> None:
        """Restore the held weights exactly (momentum, Adam and weight decay moved them)."""
        if self._held is None:
            return
        for (_, p), held, value in zip(self.layers, self._held, self._held_values, strict=True):
            p.copy_(torch.where(held, value, p))

    # ------------------------------------------------------------------ prune, retrain, own
    def _release_count(self, free: int, sharers: int) -> int:
        """How many of ``free`` candidate weights to release when ``sharers`` tasks (this one
        and the later ones) can use them."""
        if sharers <= 1:
            return 0
        if self.hparams.prune_schedule == "fixed":
            # round first: 640 · 0.7 is 447.99999999999994 in floating point
            return math.floor(round(free * self.hparams.prune_fraction, 9))
        return free * (sharers - 1) // sharers

    def _sharers(self, name: str, task: Task, position: int) -> torch.Tensor:
        """Per weight of layer ``name``: how many tasks, this one and the later ones, read it;
        0 for a classifier weight into a unit outside this task's classes (not its to keep)."""
        shape = self.owners[name].shape
        if name != self._classifier:
            remaining = max(self.info.num_tasks - position, 1)
            return torch.full(shape, remaining, dtype=torch.long, device=self.device)
        learned = set(self.learned_tasks) | {task.id}
        later = [k for k in range(self.info.num_tasks) if k not in learned]
        users = self.class_mask[later].sum(0) + 1  # per output unit
        users = users.masked_fill(~self.class_mask[task.id], 0)
        return users.unsqueeze(1).expand(shape)

    @torch.no_grad()
    def _prune(self, task: Task, position: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Zero the smallest-magnitude candidate weights of each layer, per group of weights
        shared by as many tasks; (the candidates, the released entries), per layer."""
        candidates, released = [], []
        for name, p in self.layers:
            free = self.owners[name] == FREE
            sharers = self._sharers(name, task, position)
            mine = free & (sharers > 0)
            mask = torch.zeros_like(free)
            for count in sharers[mine].unique().tolist():
                group = (mine & (sharers == count)).flatten().nonzero().squeeze(1)
                release = self._release_count(int(group.numel()), int(count))
                if release:
                    magnitude = p.detach().flatten()[group].abs()
                    order = torch.argsort(magnitude, stable=True)
                    mask.view(-1)[group[order[:release]]] = True
            p.masked_fill_(mask, 0.0)
            candidates.append(mine)
            released.append(mask)
        return candidates, released

    def _retrain(self, task: Task) -> None:
        """``retrain_epochs`` passes over the task with the base loop's batches (the held
        weights, released ones included, stay as they are)."""
        cfg = self.train_config
        x_all, y_all, t_all = self.training_data(task)
        n = int(y_all.shape[0])
        self.model.train()
        for _ in range(self.hparams.retrain_epochs):
            order = torch.randperm(n, generator=self.generator).to(x_all.device)
            for start in range(0, n, cfg.batch_size):
                self.check_stop(f"while retraining task {task.name!r} after pruning")
                idx = order[start : start + cfg.batch_size]
                x, y, t = x_all[idx], y_all[idx], t_all[idx]
                self.optimizer.zero_grad(set_to_none=True)
                self.loss(x, y, t).backward()
                self.after_backward(x, y, t)
                self.optimizer.step()
                self.after_step(x, y, t)
        self.model.eval()

    def after_task(self, task: Task) -> None:
        """Prune, retrain the kept weights, make them this task's; freeze the biases after the
        first task."""
        position = len(self.learned_tasks)
        candidates, released = self._prune(task, position)
        if self.hparams.retrain_epochs > 0 and any(bool(r.any()) for r in released):
            owned = [owner != FREE for owner in self.owners.values()]
            self._hold([o | r for o, r in zip(owned, released, strict=True)])
            self._retrain(task)
        for owner, mine, gone in zip(self.owners.values(), candidates, released, strict=True):
            owner[mine & ~gone] = position
        self.learned_tasks.append(task.id)
        self.free_after_task.append(self.free_fraction())
        self._held, self._held_values = None, []
        if not self.extras_frozen:
            self._freeze_extras()
            self.model_grew()

    def _freeze_extras(self) -> None:
        """Stop training every parameter that is not a prunable weight (biases)."""
        prunable = {id(p) for _, p in self.layers}
        for p in self.model.parameters():
            if id(p) not in prunable:
                p.requires_grad_(False)
                p.grad = None
        self.extras_frozen = True

    def learn(self, task: Task, should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
        """The base loop's statistics plus ``free_fraction`` after the task."""
        stats = super().learn(task, should_stop)
        return {**stats, "free_fraction": self.free_fraction()}

    # ------------------------------------------------------------------ state
    def method_state(self) -> dict[str, Any]:
        """Owners, the learning order, the free fractions and whether biases are frozen."""
        return {
            "owners": dict(self.owners),
            "learned_tasks": list(self.learned_tasks),
            "free_after_task": list(self.free_after_task),
            "extras_frozen": self.extras_frozen,
        }

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Restore the owners and bookkeeping; freeze the biases if they were."""
        self.owners = {n: o.to(self.device) for n, o in state["owners"].items()}
        self.learned_tasks = [int(k) for k in state["learned_tasks"]]
        self.free_after_task = [float(f) for f in state["free_after_task"]]
        if state["extras_frozen"] and not self.extras_frozen:
            self._freeze_extras()
            self.model_grew()

    def stored_memory(self) -> dict[str, int]:
        """No samples; the owner tensors, in bytes."""
        nbytes = sum(o.numel() * o.element_size() for o in self.owners.values())
        return {"stored_samples": 0, "stored_bytes": nbytes}
