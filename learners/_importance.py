"""A quadratic pull towards one anchor, weighted per parameter: the common part of SI and MAS.

The two differ only in how they measure each parameter's importance Ω_i; both then train on

    L(θ) = CE(θ) + k · Σ_i Ω_i · (θ_i − θ*_i)²

with θ* the weights after the last learned task, Ω ≥ 0 the importances accumulated over the
tasks so far and k = :meth:`ImportancePenalty.strength` (SI: c, MAS: λ). Online EWC has the
same form with k = λ/2 but is EWC itself with one running pair (``learners/online_ewc.py``),
so that its Fisher, penalty and state stay EWC's.

The penalty's gradient 2k·Ω·(θ − θ*) is added to ``.grad`` in closed form in
:meth:`ImportancePenalty.after_backward`, not through autograd: no graph, three fused
element-wise operations over all parameter tensors, and ``loss()`` stays the task loss, so a
subclass that records the task loss's own gradient (SI) reads ``.grad`` before calling
``super().after_backward``.
:meth:`ImportancePenalty.penalty` gives the same term as a differentiable scalar, for tests and
logging. With k = 0 nothing is added, so the updates are those of fine-tuning bit for bit.

Stability, as for EWC: with plain SGD the penalty's curvature is 2k·Ω, so a step size lr with
lr·2k·max(Ω) > 2 diverges, and the loop stops the run with TrainingDiverged.
"""

from __future__ import annotations

from typing import Any

import torch

from learners.base import Learner


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
        self._anchor_list: list[torch.Tensor] = []
        self._importance_list: list[torch.Tensor] = []

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
            self._anchor_list, self._importance_list = [], []
        else:
            self._anchor_list = [self.anchor[n] for n, _ in named]
            self._importance_list = [self.importance[n] for n, _ in named]

    # ------------------------------------------------------------------ objective
    def penalty(self) -> torch.Tensor:
        """k·Σ_i Ω_i·(θ_i − θ*_i)²; a differentiable scalar, 0 before any task."""
        total = torch.zeros((), device=self.device)
        if self.anchor is None:
            return total
        for n, p in self._named_trainable():
            total = total + (self.importance[n] * (p - self.anchor[n]).pow(2)).sum()
        return self.strength() * total

    @torch.no_grad()
    def after_backward(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> None:
        """Add the penalty's gradient 2k·Ω·(θ − θ*) to each parameter's gradient."""
        k = self.strength()
        if self.anchor is None or k == 0:
            return
        for p in self._params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        pull = torch._foreach_sub(self._params, self._anchor_list)
        torch._foreach_mul_(pull, self._importance_list)
        torch._foreach_add_([p.grad for p in self._params], pull, alpha=2 * k)

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
