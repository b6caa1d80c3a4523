"""A quadratic pull towards one anchor, weighted per parameter: the common part of SI and MAS.

The two differ only in how they measure each parameter's importance Ω_i; both then train on

    L(θ) = CE(θ) + k · Σ_i Ω_i · (θ_i − θ*_i)²

with θ* the weights after the last learned task, Ω ≥ 0 the importances accumulated over the
tasks so far and k = :meth:`ImportancePenalty.strength` (SI: c, MAS: λ). Online EWC has the
same form with k = λ/2 but is EWC itself with one running pair (``learners/online_ewc.py``),
so that its Fisher, penalty and state stay EWC's.

The penalty's gradient 2k·Ω·(θ − θ*) is added to ``.grad`` in closed form in
:meth:`ImportancePenalty.after_backward`, not through autograd: no graph, two fused
element-wise operations over all parameter tensors, and ``loss()`` stays the task loss, so a
subclass that records the task loss's own gradient (SI) reads ``.grad`` before calling
``super().after_backward``.
:meth:`ImportancePenalty.penalty` gives the same term as a differentiable scalar, for tests and
logging. With k = 0 nothing is added, so the updates are those of fine-tuning bit for bit.

Stability, as for EWC: with plain SGD the penalty's curvature is 2k·Ω, so a step size lr with
lr·2k·max(Ω) > 2 diverges, and the loop stops the run with TrainingDiverged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from learners.base import Learner


# ---------------------------------------------------------------------- per-sample sums
def all_linear_layers(model: nn.Module) -> dict[str, nn.Linear] | None:
    """Module name -> layer when every trainable parameter belongs to an ``nn.Linear``; else
    None (then per-sample gradients need torch.func)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    owned = {
        f"{n}.{k}" if n else k
        for n, m in layers.items()
        for k, p in m.named_parameters(recurse=False)
        if p.requires_grad
    }
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return layers if owned == trainable else None


def linear_per_sample_sum(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    summed_loss: Callable[..., torch.Tensor],
    data: tuple[torch.Tensor, ...],
    transform: Callable[[torch.Tensor], torch.Tensor],
    chunk: int,
) -> dict[str, torch.Tensor]:
    """Σ_i transform(∂ℓ_i/∂θ) over the samples, for a network whose trainable parameters are
    all linear layers', from one ordinary backward pass per chunk (no per-sample gradients).

    ``summed_loss(*chunk)``, given the same rows of every tensor of ``data`` (inputs first),
    runs the model and returns Σ_i ℓ_i, sample i's loss
    depending on sample i only (eval mode: no batch coupling). Sample i's gradient of a linear
    layer's weight is the outer product g_i a_iᵀ of the gradient at the layer's output and the
    layer's input; for an elementwise ``transform`` that is multiplicative, T(g·a) = T(g)·T(a)
    (the square: EWC's Fisher; the absolute value: MAS), Σ_i T(g_i a_iᵀ) = T(G)ᵀ T(A): one
    matmul per layer. The bias's is Σ_i T(g_i). Returns sums, not means.
    """
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            inputs[name], outputs[name] = args[0], out

        return hook

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in trainable.items()}
    names = list(layers)
    handles = [m.register_forward_hook(keep(n)) for n, m in layers.items()]
    try:
        for start in range(0, int(data[0].shape[0]), chunk):
            with torch.enable_grad():
                loss = summed_loss(*(v[start : start + chunk] for v in data))
                grads = torch.autograd.grad(loss, [outputs[n] for n in names])
            for name, g in zip(names, grads, strict=True):
                a, tg = inputs[name].detach(), transform(g.detach())
                if a.dim() != 2:
                    raise RuntimeError(f"layer {name} saw {a.dim()}-D inputs")
                prefix = f"{name}." if name else ""
                if f"{prefix}weight" in total:
                    total[f"{prefix}weight"] += tg.T @ transform(a)
                if f"{prefix}bias" in total:
                    total[f"{prefix}bias"] += tg.sum(0)
    finally:
        for handle in handles:
            handle.remove()
    return total


class ImportancePenalty(Learner):
    """Base of the one-anchor quadratic regularisers (not registered: no method of its own).

    A subclass defines :meth:`strength` and computes its importances (usually in
    ``after_task``), then calls :meth:`consolidate` with the accumulated Ω.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.importance: dict[str, torch.Tensor] | None = None
        """Ω, name → tensor shaped like the parameter; None before the first task"""
        self.anchor: dict[str, torch.Tensor] | None = None
        """θ*, the weights after the last learned task; None before the first task"""
        # the same tensors as lists in parameter order, for the fused per-step update;
        # derived (by _index), not state
        self._params: list[torch.nn.Parameter] = []
        self._importance_list: list[torch.Tensor] = []
        self._pull_list: list[torch.Tensor] = []  # −Ω ⊙ θ*

    # ------------------------------------------------------------------ to define
    def strength(self) -> float:
        """k in k·Σ Ω·(θ − θ*)² (from the method's hyperparameters)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ parameters
    def _named_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A detached copy of the trainable parameters."""
        return {n: p.detach().clone() for n, p in self._named_trainable()}

    def consolidate(self, importance: dict[str, torch.Tensor]) -> None:
        """Make ``importance`` the Ω of the penalty and the current weights its anchor θ*."""
        self.importance = {n: v.detach() for n, v in importance.items()}
        self.anchor = self.snapshot()
        self._index()

    def _index(self) -> None:
        named = self._named_trainable()
        self._params = [p for _, p in named]
        if self.anchor is None:
            self._importance_list, self._pull_list = [], []
        else:
            # a parameter added after the last consolidation (a growing head's new units) has
            # no importance yet: no pull until the next consolidation
            self._importance_list = [
                self.importance[n] if n in self.importance else torch.zeros_like(p)
                for n, p in named
            ]
            self._pull_list = [
                -(self.importance[n] * self.anchor[n])
                if n in self.importance
                else torch.zeros_like(p)
                for n, p in named
            ]

    # ------------------------------------------------------------------ objective
    def penalty(self) -> torch.Tensor:
        """k·Σ_i Ω_i·(θ_i − θ*_i)²; a differentiable scalar, 0 before any task."""
        total = torch.zeros((), device=self.device)
        if self.anchor is None:
            return total
        for n, p in self._named_trainable():
            if n in self.importance:
                total = total + (self.importance[n] * (p - self.anchor[n]).pow(2)).sum()
        return self.strength() * total

    @torch.no_grad()
    def after_backward(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> None:
        """Add the penalty's gradient 2k·Ω·(θ − θ*) = 2k·(Ω ⊙ θ − Ω ⊙ θ*) to each parameter's
        gradient: two fused in-place operations (Ω ⊙ θ* is precomputed per task)."""
        k = self.strength()
        if self.anchor is None or k == 0:
            return
        for p in self._params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self._params]
        torch._foreach_addcmul_(grads, self._params, self._importance_list, value=2 * k)
        torch._foreach_add_(grads, self._pull_list, alpha=2 * k)

    # ------------------------------------------------------------------ state
    def method_state(self) -> dict[str, Any]:
        """Ω and θ* (name → tensor dicts; None before the first task)."""
        return {"importance": self.importance, "anchor": self.anchor}

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Restore Ω and θ*."""

        def moved(d: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
            return None if d is None else {n: v.to(self.device) for n, v in d.items()}

        self.importance = moved(state["importance"])
        self.anchor = moved(state["anchor"])
        self._index()

    def stored_memory(self) -> dict[str, int]:
        """No samples; the importance and anchor tensors, in bytes."""
        tensors = [*(self.importance or {}).values(), *(self.anchor or {}).values()]
        nbytes = sum(v.numel() * v.element_size() for v in tensors)
        return {"stored_samples": 0, "stored_bytes": nbytes}
