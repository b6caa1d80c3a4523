"""Expert Gate (Aljundi, Chakravarty & Tuytelaars, 2017, "Expert Gate: Lifelong Learning with a
Network of Experts", CVPR).

One expert network per task and one undercomplete autoencoder, the task's *gate*, that learns
to reconstruct that task's inputs. At test time no task identity is used: each sample goes to
the expert whose gate reconstructs it best (lowest error), so a sample from a task the gates
tell apart is answered by its own expert, which later tasks never change.

- Gate k: x ↦ σ(W₂ · a(W₁ · x + b₁) + b₂) on the flattened input (d values in [0, 1]), with a
  code of ``code_size`` units (at most d/2) and a = ReLU (the paper's) or sigmoid
  (``gate_activation``). It is trained in ``before_task`` on the task's training inputs with
  the mean squared reconstruction error, Adam (``gate_lr``), ``gate_epochs`` passes in batches
  of ``train.batch_size`` shuffled with the learner's generator, and is frozen afterwards.
- Relatedness (the paper's): with Er_k the new gate's mean reconstruction error on the
  new task's training data and Er_a that of old gate a on the same data,
  Rel(a) = 1 − (Er_a − Er_k) / Er_k. With ``init_from="related"`` the new expert starts as a
  copy of the expert of the most related gate and is fine-tuned; ``"scratch"`` builds a fresh
  backbone. The values are recorded per task (:attr:`ExpertGate.relatedness`, with the expert
  copied in :attr:`ExpertGate.initialised_from`), in the method state.
- Training task k trains expert k alone (its logits, masked to task k's classes: in the class
  scenario too, since an expert is a task's expert). Every earlier expert and every gate is
  frozen (``requires_grad=False``), so they stay bit for bit as they were.
- Prediction: :meth:`ExpertGate.route` gives each sample the expert of the gate with the
  lowest reconstruction error among the tasks begun so far; that expert's logits, masked to
  its task's classes, answer. The task id that task-incremental evaluation passes is not used.

Experts and gates live in ``self.model`` (two ``nn.ModuleList``s), so ``resources()`` counts
both as model parameters and :meth:`ExpertGate.stored_memory` is zero. The first expert is the
backbone the learner is built with (its untrained answers are the "before any task" row); an
untrained first gate exists from the start too, replaced by the one trained on task 0.
``architecture()`` is ``{"experts": n}`` (n experts and n gates); :meth:`ExpertGate.rebuild`
adds both.

Deviations from the paper: the gates read raw pixels, not the features of an ImageNet-trained
AlexNet (there is no pretrained network here), and are trained with Adam (the authors' code:
Adagrad); the relatedness is measured on the new task's training data (the paper uses its
validation data); the new expert is always fine-tuned from the most related one (the paper
switches to LwF above a relatedness threshold); routing takes the single best gate, as the
paper's hard selection does, without the softmax over errors (the same argmax).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from learners.backbones import build_backbone
from learners.base import Learner, register
from learners.hparams import hp
from task_streams.base import Task

INIT_FROM = ("related", "scratch")
GATE_ACTIVATIONS = ("relu", "sigmoid")


@dataclass
class ExpertGateHParams:
    """Hyperparameters of Expert Gate."""

    code_size: int = hp(
        64,
        help="units in each gate's code, at most half the input's values (undercomplete)",
        low=1,
        search=(8, 256),
        log=True,
    )
    gate_epochs: int = hp(10, help="passes over a task's training inputs to train its gate", low=1)
    gate_lr: float = hp(
        1e-2, help="Adam learning rate of the gates", gt=0.0, search=(1e-3, 3e-2), log=True
    )
    gate_activation: str = hp(
        "relu", help="the gates' code activation (the paper: relu)", choices=GATE_ACTIVATIONS
    )
    init_from: str = hp(
        "related",
        help="a new expert starts as a copy of the most related task's expert, or from scratch",
        choices=INIT_FROM,
    )


class Gate(nn.Module):
    """An undercomplete autoencoder on flattened inputs: Linear + ReLU/sigmoid, Linear + sigmoid."""

    def __init__(self, features: int, code: int, activation: str):
        super().__init__()
        act = nn.ReLU() if activation == "relu" else nn.Sigmoid()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(features, code), act)
        self.decoder = nn.Sequential(nn.Linear(code, features), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of ``x``, flattened."""
        return self.decoder(self.encoder(x))

    def errors(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample mean squared reconstruction error."""
        return (self(x) - x.flatten(1)).pow(2).mean(dim=1)


class ExpertGateNetwork(nn.Module):
    """The experts and their gates; ``forward`` answers each sample with its gate's expert."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList()
        self.gates = nn.ModuleList()

    def reconstruction_errors(self, x: torch.Tensor) -> torch.Tensor:
        """(N, gates): each gate's reconstruction error on each sample."""
        return torch.stack([gate.errors(x) for gate in self.gates], dim=1)

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the expert each sample goes to: its best-reconstructing gate's."""
        if len(self.gates) <= 1:
            return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return self.reconstruction_errors(x).argmin(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of each sample's routed expert (unmasked)."""
        return routed_logits(self.experts, self.route(x), x)


def routed_logits(
    experts: nn.ModuleList,
    route: torch.Tensor,
    x: torch.Tensor,
    masks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Row i: expert ``route[i]``'s logits for x[i]; with ``masks`` (one bool row per expert)
    the units outside that expert's task are -inf. Each expert sees only its own samples."""
    out: torch.Tensor | None = None
    for k in torch.unique(route).tolist():
        rows = (route == k).nonzero().squeeze(1)
        part = experts[k](x[rows])
        if masks is not None:
            part = part.masked_fill(~masks[k], float("-inf"))
        if out is None:
            out = part.new_full((x.shape[0], part.shape[1]), float("-inf"))
        out[rows] = part
    assert out is not None, "routed_logits needs at least one sample"
    return out


@register("expert_gate")
class ExpertGate(Learner):
    """A network of task experts; an autoencoder gate per task picks the expert per sample."""

    HParams = ExpertGateHParams

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.task_masks = self.info.class_mask().to(self.device)
        """bool (num_tasks, num_classes): the output units of each task"""
        self.expert_tasks: list[int] = []
        """the task id each expert was trained on (expert k: the k-th task learned)"""
        self.relatedness: list[list[float]] = []
        """per task learned: Rel(a) of every earlier task's gate a (empty for the first)"""
        self.initialised_from: list[int | None] = []
        """per task learned: the expert its expert was copied from (None: built from scratch)"""

    # ------------------------------------------------------------------ the network
    def code_units(self) -> int:
        """The gates' code size: ``code_size``, at most half the input's values."""
        return max(1, min(self.hparams.code_size, math.prod(self.info.input_shape) // 2))

    def _new_gate(self) -> Gate:
        features = math.prod(self.info.input_shape)
        gate = Gate(features, self.code_units(), self.hparams.gate_activation).to(self.device)
        gate.requires_grad_(False)
        return gate

    def build_model(self) -> nn.Module:
        """One expert (the configured backbone) and its gate, untrained."""
        network = ExpertGateNetwork()
        network.experts.append(build_backbone(self.model_config, self.info))
        network.gates.append(self._new_gate())
        return network

    def _freeze(self) -> None:
        """Only the newest expert trains: earlier experts and every gate are frozen."""
        experts = self.model.experts
        for k, expert in enumerate(experts):
            expert.requires_grad_(k == len(experts) - 1)
        self.model.gates.requires_grad_(False)

    def architecture(self) -> dict[str, Any]:
        """``{"experts": n}``: n experts, each with its gate."""
        return {"experts": len(self.model.experts)}

    def rebuild(self, architecture: dict[str, Any]) -> None:
        """Add experts and gates up to ``architecture["experts"]`` (weights load afterwards)."""
        while len(self.model.experts) < int(architecture["experts"]):
            self.model.experts.append(build_backbone(self.model_config, self.info))
            self.model.gates.append(self._new_gate())
        self._freeze()

    # ------------------------------------------------------------------ gates
    def _train_gate(self, gate: Gate, task: Task) -> None:
        """Fit ``gate`` to the task's training inputs (MSE, Adam), then freeze it."""
        x = task.x_train
        gate.requires_grad_(True)
        optimizer = torch.optim.Adam(gate.parameters(), lr=self.hparams.gate_lr)
        batch = self.train_config.batch_size
        n = int(x.shape[0])
        for _ in range(self.hparams.gate_epochs):
            order = torch.randperm(n, generator=self.generator).to(x.device)
            for start in range(0, n, batch):
                self.check_stop(f"while training the gate of task {task.name!r}")
                xb = x[order[start : start + batch]]
                optimizer.zero_grad(set_to_none=True)
                F.mse_loss(gate(xb), xb.flatten(1)).backward()
                optimizer.step()
        gate.requires_grad_(False)
        gate.eval()

    @torch.no_grad()
    def mean_errors(self, x: torch.Tensor) -> list[float]:
        """Each gate's mean reconstruction error over ``x``."""
        total = torch.zeros(len(self.model.gates), dtype=torch.float64, device=x.device)
        bs = self.train_config.eval_batch_size
        for start in range(0, x.shape[0], bs):
            errors = self.model.reconstruction_errors(x[start : start + bs])
            total += errors.to(torch.float64).sum(dim=0)
        return (total / max(int(x.shape[0]), 1)).tolist()

    def before_task(self, task: Task) -> None:
        """Train the task's gate; from the second task on, add its expert (a copy of the most
        related task's expert, or fresh) and freeze the earlier ones. A task learned again
        after a stop replaces what its stopped attempt added."""
        k = self.tasks_learned
        del self.expert_tasks[k:], self.relatedness[k:], self.initialised_from[k:]
        del self.model.experts[max(k, 1) :], self.model.gates[max(k, 1) :]
        gate = self._new_gate()
        self._train_gate(gate, task)
        relatedness: list[float] = []
        source: int | None = None
        if k == 0:  # the first expert is the one built with the learner; its gate is replaced
            self.model.gates[0] = gate
        else:
            self.model.gates.append(gate)
            *old_errors, new_error = self.mean_errors(task.x_train)
            new_error = max(new_error, torch.finfo(torch.float32).tiny)
            relatedness = [1.0 - (error - new_error) / new_error for error in old_errors]
            source = max(range(k), key=relatedness.__getitem__)
            if self.hparams.init_from == "related":
                expert = copy.deepcopy(self.model.experts[source])
            else:
                expert, source = build_backbone(self.model_config, self.info), None
            self.model.experts.append(expert)
        self._freeze()
        self.model_grew()
        self.expert_tasks.append(task.id)
        self.relatedness.append(relatedness)
        self.initialised_from.append(source)

    # ------------------------------------------------------------------ training and answers
    def loss(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the newest expert, masked to its task's classes."""
        mask = self.task_masks[self.expert_tasks[-1]]
        out = self.model.experts[-1](x).masked_fill(~mask, float("-inf"))
        return F.cross_entropy(out, y)

    @torch.no_grad()
    def route(self, x: torch.Tensor) -> torch.Tensor:
        """The expert index each sample is answered by (its best-reconstructing gate's; no
        task id); :attr:`expert_tasks` maps it to a task id."""
        was_training = self.model.training
        self.model.eval()
        bs = self.train_config.eval_batch_size
        parts = [self.model.route(x[s : s + bs]) for s in range(0, x.shape[0], bs)]
        self.model.train(was_training)
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long, device=x.device)

    def logits(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The routed expert's logits, masked to its task's classes; ``task_ids`` unused."""
        experts = len(self.expert_tasks)
        if experts == 0:  # before any task: the untrained first expert
            return self.model.experts[0](x)
        masks = self.task_masks[torch.tensor(self.expert_tasks, device=self.device)]
        route = self.model.route(x) if experts > 1 else x.new_zeros(x.shape[0], dtype=torch.long)
        return routed_logits(self.model.experts, route, x, masks)

    # ------------------------------------------------------------------ state
    def method_state(self) -> dict[str, Any]:
        """The task of each expert, the relatedness values and the experts copied."""
        return {
            "expert_tasks": list(self.expert_tasks),
            "relatedness": [list(r) for r in self.relatedness],
            "initialised_from": list(self.initialised_from),
        }

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`method_state` returned."""
        self.expert_tasks = [int(t) for t in state["expert_tasks"]]
        self.relatedness = [[float(v) for v in r] for r in state["relatedness"]]
        self.initialised_from = [None if s is None else int(s) for s in state["initialised_from"]]

    def stored_memory(self) -> dict[str, int]:
        """Nothing besides the model: the gates are part of it (counted as model parameters)."""
        return {"stored_samples": 0, "stored_bytes": 0}
