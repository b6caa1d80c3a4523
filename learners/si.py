"""Synaptic Intelligence (Zenke, Poole & Ganguli, 2017, "Continual learning through synaptic
intelligence", ICML).

Each parameter's importance is the share of the task loss's decrease it was responsible for,
measured online along the training trajectory. During task μ, at every step,

    ω_i += −g_i · Δθ_i

with g the gradient of the TASK LOSS ONLY (the cross-entropy, read from ``.grad`` before the
penalty's gradient is added) and Δθ the parameter change the optimizer actually made (momentum,
weight decay and the penalty included). −Σ g·Δθ is the path integral of the loss's decrease.
At the end of the task, with Δ_i = θ_i(end of task) − θ_i(start of task),

    Ω_i ← max(0, Ω_i + ω_i / (Δ_i² + ξ)),        ω ← 0,        θ* ← θ(end of task)

and later tasks minimise L(θ) = CE(θ) + c · Σ_i Ω_i · (θ_i − θ*_i)² (Eq. 4; no factor 1/2).
The clamp at 0 is the authors' code's (ganguli-lab/pathint, protocols.py: a relu on the
accumulated Ω): ω_i can be negative where momentum or the penalty moved θ_i against the task
gradient, and a negative Ω would push away from θ*.

Normalisation, on which the scale of c (``si_c``) depends: ω is a sum over steps of a batch
MEAN loss's gradient times the step, i.e. the decrease of the mean cross-entropy attributed to
θ_i, in nats; Ω = ω/(Δ² + ξ) is nats per squared weight change, and c is dimensionless (c = 1:
moving a parameter back by its whole task displacement costs about what it gained). The paper
used c = 0.1 (permuted MNIST) and c = 1 (split MNIST) with Adam; ξ is in squared weight units
(paper: 1e-3; 0.1 in the authors' permuted-MNIST runs) and bounds Ω for parameters that moved
little. With plain SGD the penalty's curvature is 2c·Ω (see ``learners/_importance.py``), and
a small ξ makes Ω large: on permuted and split digits (MLP 100-100, SGD lr 0.1, 5 epochs) ξ =
1e-3 diverged from c = 0.03 on, ξ = 0.1 was stable up to c = 0.1 (c = 0.3 diverged). The
defaults c = 0.1, ξ = 0.1 are therefore the paper's permuted-MNIST pair; there they raised
permuted digits' ACC from 0.54 to 0.70 (SGD lr 0.1) and from 0.58 to 0.63 (Adam lr 1e-3),
mean of seeds 0 and 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from learners._importance import ImportancePenalty
from learners.base import register
from learners.hparams import hp
from task_streams.base import Task


@dataclass
class SIHParams:
    """Hyperparameters of Synaptic Intelligence."""

    si_c: float = hp(
        0.1,
        help="penalty strength c in c·Σ Ω·(θ−θ*)², Ω the per-parameter path-integral importance",
        low=0.0,
        search=(1e-3, 1e3),
        log=True,
    )
    si_xi: float = hp(
        0.1,
        help="damping ξ in Ω = ω/(Δ²+ξ), in squared weight units (paper: 1e-3 and 0.1)",
        gt=0.0,
        search=(1e-4, 1.0),
        log=True,
    )


@register("si")
class SI(ImportancePenalty):
    """A quadratic pull towards the last task's weights, weighted by each weight's path integral."""

    HParams = SIHParams

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # per-task working state (allocated in before_task, freed in after_task; not saved:
        # checkpoints are taken between tasks, where it is empty); each dict in parameter
        # order, like the base's _params, for the fused per-step updates
        self.omega: dict[str, torch.Tensor] | None = None
        self._start: dict[str, torch.Tensor] = {}
        self._previous: dict[str, torch.Tensor] = {}
        self._task_grad: dict[str, torch.Tensor] = {}

    def strength(self) -> float:
        return self.hparams.si_c

    def before_task(self, task: Task) -> None:
        """Start a new path integral at the current weights."""
        self._start = self.snapshot()
        self._previous = self.snapshot()
        self._task_grad = {n: torch.zeros_like(p) for n, p in self._start.items()}
        self.omega = {n: torch.zeros_like(p) for n, p in self._start.items()}
        self._index()

    @torch.no_grad()
    def after_backward(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> None:
        """Record the task loss's gradient, then add the penalty's (closed form)."""
        grads = [p.grad for p in self._params]
        if any(g is None for g in grads):
            grads = [
                torch.zeros_like(p) if g is None else g
                for p, g in zip(self._params, grads, strict=True)
            ]
        torch._foreach_copy_(list(self._task_grad.values()), grads)
        super().after_backward(x, y, t)

    @torch.no_grad()
    def after_step(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> None:
        """ω += −g·Δθ for the step just taken."""
        previous = list(self._previous.values())
        moved = torch._foreach_sub(self._params, previous)
        torch._foreach_addcmul_(
            list(self.omega.values()), list(self._task_grad.values()), moved, value=-1
        )
        torch._foreach_copy_(previous, self._params)

    @torch.no_grad()
    def after_task(self, task: Task) -> None:
        """Ω ← max(0, Ω + ω/(Δ²+ξ)); anchor at the current weights; ω reset."""
        xi = self.hparams.si_xi
        total = {}
        for n, p in self._named_trainable():
            added = self.omega[n] / (p - self._start[n]).pow(2).add_(xi)
            previous = (self.importance or {}).get(n, 0.0)
            total[n] = (added + previous).clamp_(min=0.0)
        self.consolidate(total)
        self.omega, self._start, self._previous, self._task_grad = None, {}, {}, {}
