"""Averaged Gradient Episodic Memory (Chaudhry et al., 2019, "Efficient Lifelong Learning with
A-GEM").

A-GEM relaxes GEM's one constraint per past task to one constraint on the AVERAGE memory loss:
with g the current batch's gradient and g_ref the gradient of the loss on a random sample of
the episodic memory of all past tasks, the update is (the paper's Section 4)

    g̃ = g                                   if gᵀ g_ref ≥ 0,
    g̃ = g − (gᵀ g_ref / g_refᵀ g_ref) · g_ref   otherwise,

the projection of g onto the half-space {g̃ : g̃ᵀ g_ref ≥ 0}, in closed form (no QP).

Choices that fix the scale of the hyperparameters and the cost:

- Memory: ``memories_per_task`` samples per task, the LAST ones seen (a ring buffer per task,
  as GEM's; the authors' code rings per class within each task, this one per task), written
  after each step. Only tasks before the current one are sampled.
- Reference sample: ``sample_size`` (256 in the authors' experiments) samples drawn uniformly
  without replacement, with the learner's generator, from the union of the past tasks'
  memories at every step; all of them when the memory holds no more (as the authors' code
  does).
- g_ref is the gradient of the MEAN cross-entropy over that sample (the current batch's loss
  is a mean too), each sample on its own task's output units in task-incremental streams (the
  masking of ``Learner.logits``), all units otherwise; computed in eval mode.
- Weight decay is folded into g before the projection and the optimizer is built without it
  (see ``learners/_episodic.py``), so the constraint holds for the whole update direction.
- Cost: one forward and one backward of the sample per step; on the MLP fast path
  (``learners/_episodic.py``) gᵀg_ref comes from per-sample factors at rank-B cost and g_ref
  itself is only formed on steps where the constraint is violated. On the GEM protocol (10
  permuted-MNIST tasks, MLP 100-100, batch 10, one CPU thread) a run costs about 4.3×
  fine-tuning: the sample's first-layer product alone (256·784·100) takes about as long as a
  whole fine-tuning step on a batch of 10.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from learners._episodic import GradientProjectionLearner, MemoryPass, vmap_task_gradients
from learners.base import register
from learners.hparams import hp


@dataclass
class AGEMHParams:
    """Hyperparameters of A-GEM."""

    memories_per_task: int = hp(
        256,
        help="samples kept per task in the episodic memory (the last ones seen)",
        low=1,
        search=(16, 1024),
        log=True,
    )
    sample_size: int = hp(
        256,
        help="memory samples (over all past tasks) whose mean-loss gradient is g_ref, per step",
        low=1,
        search=(16, 1024),
        log=True,
    )


def agem_project(g: torch.Tensor, g_ref: torch.Tensor) -> torch.Tensor:
    """A-GEM's update for flat gradients: ``g`` itself (the same tensor) when gᵀg_ref ≥ 0,
    else g − (gᵀg_ref / g_refᵀg_ref)·g_ref."""
    dot = g @ g_ref
    if not bool(dot < 0):
        return g
    return g - (dot / (g_ref @ g_ref)) * g_ref


@register("agem")
class AGEM(GradientProjectionLearner):
    """Each step's gradient is projected so that the average past-task memory loss does not
    increase (to first order)."""

    HParams = AGEMHParams
    CAPTURE_BATCH = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # every past task's memories in one (x, y, t) triple, built at the start of each task
        self._pool: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def prepare_memories(self, past: list[int]) -> None:
        """Concatenate the past tasks' memories: the pool the reference samples come from."""
        self._pool = self.memories.concatenated(past)

    def reference_sample(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``sample_size`` distinct pool samples, uniformly (the whole pool if it is smaller)."""
        x, y, t = self._pool
        n = int(y.shape[0])
        if n <= self.hparams.sample_size:
            return x, y, t
        idx = torch.randperm(n, generator=self.generator)[: self.hparams.sample_size]
        idx = idx.to(y.device)
        return x.index_select(0, idx), y.index_select(0, idx), t.index_select(0, idx)

    def reference_gradient(
        self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor
    ) -> list[torch.Tensor]:
        """g_ref: the gradient of the mean memory loss over (x, y, t), per parameter."""
        n = int(y.shape[0])
        weight = torch.full((n,), 1.0 / n, dtype=x.dtype, device=x.device)
        if self._layers is not None:
            rows = MemoryPass(self, self._layers, x, y, t, weight, 1).gradients()
        else:
            rows = vmap_task_gradients(self, x[None], y[None], t[None], weight[None])
        return [r[0] for r in rows]

    def after_backward(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> None:
        """Fold in weight decay, then project the gradient if it conflicts with g_ref."""
        grads = self.fold_weight_decay()
        batch = self.take_batch_factors()
        if self._pool is None:
            return
        mx, my, mt = self.reference_sample()
        with torch.no_grad():
            if self._layers is not None:  # gᵀg_ref first, g_ref itself only on a conflict
                n = int(my.shape[0])
                weight = torch.full((n,), 1.0 / n, dtype=mx.dtype, device=mx.device)
                memory = MemoryPass(self, self._layers, mx, my, mt, weight, 1)
                dots, _ = memory.dots(batch, self.train_config.weight_decay)
                if not bool(dots[0] < 0):
                    return
                ref = [r[0] for r in memory.gradients()]
            else:
                ref = self.reference_gradient(mx, my, mt)
            dot = sum(
                torch.dot(r.reshape(-1), g.reshape(-1)) for r, g in zip(ref, grads, strict=True)
            )
            if not bool(dot < 0):
                return
            scale = dot / sum(torch.dot(r.reshape(-1), r.reshape(-1)) for r in ref)
            for r, g in zip(ref, grads, strict=True):
                g.sub_(scale * r)
        self.projected_steps += 1
