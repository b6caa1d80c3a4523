"""Gradient Episodic Memory (Lopez-Paz & Ranzato, 2017, "Gradient Episodic Memory for Continual
Learning", NeurIPS).

GEM keeps an episodic memory M_k of every past task k and only takes steps that do not increase
any past task's memory loss ℓ(f_θ, M_k), to first order. With g the gradient of the current
batch and g_k = ∇θ ℓ(f_θ, M_k), the update g̃ solves the primal QP (Section 3 of the paper)

    min_g̃ ½‖g − g̃‖²   s.t.   ⟨g̃, g_k⟩ ≥ 0   for every past task k.

When every ⟨g, g_k⟩ ≥ 0 the gradient is used unchanged; otherwise the dual QP over the t past
tasks is solved, exactly as in the authors' code (``project2cone2``): with M the (t, p) matrix
whose rows are the g_k,

    min_v ½ vᵀ (M Mᵀ + ε I) v + gᵀ Mᵀ v   s.t.   v ≥ γ,        g̃ = Mᵀ v + g,

solved in float64 with ``quadprog.solve_qp``. The margin γ (``margin``, the authors'
``memory_strength``, default 0.5) is a lower bound on every multiplier (the paper adds γ to the
dual solution), which biases g̃ towards directions that also decrease the old losses; γ = 0 is
the plain projection. ε (``eps``, the authors' 1e-3) keeps M Mᵀ + εI positive definite when
memory gradients are (nearly) collinear; by the QP's optimality conditions it relaxes
constraint k by ε·v_k: ⟨g̃, g_k⟩ ≥ −ε·v_k. ε is absolute, in the units of ⟨g_k, g_k⟩ (squared
gradient norms), so it only matters when memory gradients are about that small.

Choices that fix the scale of the hyperparameters and the cost:

- Memory: the LAST ``memories_per_task`` samples seen of each task (a ring buffer per task, as
  the authors' code keeps; with several epochs, the last ones of the last epoch), written after
  each step. The current task's memory is not a constraint; a task learned again (a retry)
  starts its memory afresh.
- Loss on a memory: the MEAN cross-entropy over the task's memory (as the current batch's loss
  is a mean), so g and the g_k have comparable scales. Task-incremental streams use each
  task's own output units (the same masking as ``Learner.logits``); class- and
  domain-incremental streams use all units. Memory gradients are computed in eval mode.
- Weight decay is folded into g before the projection and the optimizer is built without it
  (see ``learners/_episodic.py``), so the constraint holds for the whole update direction.
  Momentum (and Adam) then act on the projected gradients; the constraint is on the gradient,
  not on the momentum-smoothed step.

Cost (``learners/_episodic.py``): the memory gradients of all past tasks come from ONE batched
pass, never one backward per task. For the project's MLP it is a manual forward and backward
of all memories, and the conflict test ⟨g, g_k⟩ < 0 runs at rank-B cost (B = batch size) from
the batch's per-layer factors, so the widest layer's per-task gradients are only formed on
steps that violate a constraint; the first layer's X Wᵀ for the fixed memory inputs X is kept
current across plain-SGD steps rather than recomputed. Other models use
``vmap(grad(·))`` over the task axis. On the GEM protocol (10 permuted-MNIST tasks of 1,000
samples, MLP 100-100, batch 10, SGD lr 0.1, 256 memories per task, one CPU thread) a run costs
about 8.6× fine-tuning (the generic vmap path: about 16×); projected steps are 4–36% of a
task's steps, and each costs two N·784·100 products (the per-task first-layer gradients and
recomputing X W1ᵀ afterwards), N = 256 × the number of past tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import quadprog
import torch

from learners._episodic import (
    GradientProjectionLearner,
    InputLayerTracker,
    MemoryPass,
    task_gradients,
    vmap_task_gradients,
)
from learners.base import register
from learners.hparams import hp


@dataclass
class GEMHParams:
    """Hyperparameters of GEM."""

    memories_per_task: int = hp(
        256,
        help="samples kept per task in the episodic memory (the last ones seen)",
        low=1,
        search=(16, 1024),
        log=True,
    )
    margin: float = hp(
        0.5,
        help="γ: lower bound on the QP's multipliers (the authors' memory_strength); 0 = plain "
        "projection",
        low=0.0,
        search=(0.0, 1.0),
    )
    eps: float = hp(
        1e-3,
        help="ε added to the diagonal of the memory gradients' Gram matrix (keeps the QP "
        "positive definite)",
        gt=0.0,
    )


def gem_multipliers(
    gram: torch.Tensor, dots: torch.Tensor, margin: float, eps: float
) -> torch.Tensor:
    """The dual solution v of min ½vᵀ(gram + εI)v + dotsᵀv s.t. v ≥ margin (float64).

    ``gram`` is M Mᵀ (t, t) and ``dots`` is M g (t,), M's rows the memory gradients.
    """
    p = gram.detach().double().cpu().numpy()
    p = 0.5 * (p + p.T) + eps * np.eye(p.shape[0])
    q = -dots.detach().double().cpu().numpy()
    constraints = np.eye(p.shape[0])
    bounds = np.full(p.shape[0], float(margin))
    v = quadprog.solve_qp(p, q, constraints, bounds)[0]
    return torch.from_numpy(v)


def gem_project(
    g: torch.Tensor, memories: torch.Tensor, margin: float = 0.5, eps: float = 1e-3
) -> torch.Tensor:
    """GEM's update for a flat gradient ``g`` (p,) and memory gradients ``memories`` (t, p).

    ``g`` itself (the same tensor) when no ⟨g, g_k⟩ is negative; otherwise Mᵀv + g.
    """
    dots = memories @ g
    if not bool((dots < 0).any()):
        return g
    v = gem_multipliers(memories @ memories.T, dots, margin, eps).to(g.dtype).to(g.device)
    return g + v @ memories


@register("gem")
class GEM(GradientProjectionLearner):
    """Each step's gradient is projected so that no past task's memory loss increases."""

    HParams = GEMHParams
    CAPTURE_BATCH = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # the past tasks' memories stacked (t, m, ...), built at the start of each task
        self._past: tuple[torch.Tensor, ...] | None = None
        self._tracker: InputLayerTracker | None = None

    def prepare_memories(self, past: list[int]) -> None:
        """Stack the past tasks' memories for the batched gradient pass."""
        self._past = self.memories.stacked(past)
        self._tracker = None
        if self._past is not None and self._layers is not None:
            self._tracker = InputLayerTracker(self._past[0].flatten(0, 1), self._layers[0])

    def memory_gradients(self) -> list[torch.Tensor]:
        """Every past task's memory-loss gradient, per parameter, shaped (t, *param.shape)."""
        return task_gradients(self, *self._past)

    def after_backward(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> None:
        """Fold in weight decay, then project the gradient if it conflicts with a past task."""
        grads = self.fold_weight_decay()
        batch = self.take_batch_factors()
        if self._past is None:
            return
        with torch.no_grad():
            if self._tracker is not None:
                mx, my, mt, mw = self._past
                memory = MemoryPass(
                    self,
                    self._layers,
                    mx.flatten(0, 1),
                    my.flatten(),
                    mt.flatten(),
                    mw.flatten(),
                    int(my.shape[0]),
                    first=self._tracker.current(),
                )
                dots, xg = memory.dots(batch, self.train_config.weight_decay)
                conflict = bool((dots < 0).any())
                self._tracker.before_step(None if conflict else xg, self.optimizer)
                if not conflict:
                    return
                rows = memory.gradients()
            else:
                rows = vmap_task_gradients(self, *self._past)
            memory_rows = [r.flatten(1) for r in rows]
            dots = sum(m @ g.reshape(-1) for m, g in zip(memory_rows, grads, strict=True))
            if not bool((dots < 0).any()):
                return
            gram = sum(m @ m.T for m in memory_rows)
            hp = self.hparams
            v = gem_multipliers(gram, dots, hp.margin, hp.eps).to(grads[0])
            for m, g in zip(memory_rows, grads, strict=True):
                g.add_((v @ m).view_as(g))
        self.projected_steps += 1

    def after_step(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> None:
        """Store the batch; keep the memories' first-layer products current."""
        super().after_step(x, y, t)
        if self._tracker is not None and self._uses_memory:
            self._tracker.after_step(self.optimizer)
