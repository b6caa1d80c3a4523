"""Elastic Weight Consolidation (Kirkpatrick et al., 2017, "Overcoming catastrophic forgetting").

After each task t the diagonal Fisher information F_t and the weights θ*_t are stored. Later
tasks minimise

    L(θ) = CE(θ) + (λ / 2) · Σ_t Σ_i F_t,i · (θ_i − θ*_t,i)²

with one (F_t, θ*_t) pair per learned task (the original formulation, not online EWC).

Normalisation, on which the scale of λ (``ewc_lambda``) depends: F_t,i is the MEAN over the
Fisher samples of the squared per-sample gradient of the negative log-likelihood
−log softmax(f_θ(x))_y (task-incremental streams: softmax over the task's own output units
only). It is not summed over samples and not multiplied by the dataset size, so λ plays the
role of "number of samples the old task is worth"; papers report useful λ from 1 to 1e4.

Stability: with plain SGD the penalty's curvature is λ·F, so a step size lr with
lr·λ·max(F) > 2 diverges. On permuted MNIST with SGD lr 0.1 (the GEM protocol), λ = 10 helps
(ACC 75.1% vs 72.3% for fine-tuning, seed 0) and λ ≥ 30 diverges; the training loop then
stops the run with TrainingDiverged instead of reporting chance accuracy.
``fisher_type="empirical"`` uses the true labels y; ``"true"`` samples y from the model's own
predictive distribution (the Fisher proper), with the learner's generator.

Cost. The Fisher needs squared PER-SAMPLE gradients. When every trainable parameter belongs
to an ``nn.Linear`` (the MLP backbone), they come in closed form from one ordinary backward
pass of the summed loss: sample i's gradient of a linear layer's weight is the outer product
g_i a_iᵀ of the gradient at the layer's output and the layer's input, so
Σ_i (g_i a_iᵀ)² = (g²)ᵀ (a²), one matmul per layer (bias: Σ_i g_i²). Other backbones (the
CNN) use torch.func (vmap of grad of a functional call), chunked; both give the same numbers.
The penalty's gradient, λ·Σ_t F_t ⊙ (θ − θ*_t) = λ·(F̄ ⊙ θ + P) with the running sums
F̄ = Σ_t F_t and P = −Σ_t F_t ⊙ θ*_t (updated once per task), is added to the parameters'
gradients in closed form in ``after_backward`` with two fused operations, not through
autograd, so ``loss()`` is the cross-entropy alone and a step costs little more than
fine-tuning's whatever the number of tasks; ``penalty()`` gives the penalty's value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from learners._importance import all_linear_layers, linear_per_sample_sum
from learners.base import Learner, register
from learners.hparams import hp
from task_streams.base import Task

FISHER_TYPES = ("empirical", "true")
FISHER_CHUNK = 256  # samples per vmap call at most
FISHER_CHUNK_BYTES = 2**28  # and at most this much memory for the chunk's per-sample gradients
LINEAR_FISHER_CHUNK = 2048  # samples per forward/backward in the closed-form (all-linear) case


@dataclass
class EWCHParams:
    """Hyperparameters of EWC."""

    ewc_lambda: float = hp(
        10.0,
        help="penalty strength λ in (λ/2)·Σ F·(θ−θ*)², F the mean squared per-sample gradient",
        low=0.0,
        search=(1e-1, 1e5),
        log=True,
    )
    fisher_samples: int = hp(
        1024, help="training samples of each task used for its Fisher; 0 = all of them", low=0
    )
    fisher_type: str = hp(
        "empirical",
        help="empirical: gradients at the true labels; true: at labels sampled from the model",
        choices=FISHER_TYPES,
    )


@register("ewc")
class EWC(Learner):
    """Cross-entropy plus a quadratic pull towards each old task's weights, weighted by Fisher."""

    HParams = EWCHParams

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fishers: list[dict[str, torch.Tensor]] = []
        self.anchors: list[dict[str, torch.Tensor]] = []
        # running sums over the stored pairs (see _accumulate); derived, not state
        self._params: list[torch.nn.Parameter] = []
        self._fisher_sum: list[torch.Tensor] = []
        self._pull: list[torch.Tensor] = []

    # ------------------------------------------------------------------ parameters
    def _named_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _consolidate(self) -> None:
        """Recompute the running sums from the stored (Fisher, anchor) pairs, in task order
        (after loading a checkpoint, or when a subclass replaced the pairs)."""
        self._params, self._fisher_sum, self._pull = [], [], []
        for fisher, anchor in zip(self.fishers, self.anchors, strict=True):
            self._accumulate(fisher, anchor)

    @torch.no_grad()
    def _accumulate(self, fisher: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor]) -> None:
        """Fold one pair into F̄ = Σ_t F_t and P = −Σ_t F_t ⊙ θ*_t, per parameter tensor.

        The penalty's gradient is λ·Σ_t F_t ⊙ (θ − θ*_t) = λ·(F̄ ⊙ θ + P): two fused in-place
        operations per step whatever the number of tasks (:meth:`after_backward`), and O(1)
        work per new task instead of re-summing every stored pair.
        """
        known = {id(p) for p in self._params}
        for _, p in self._named_trainable():  # the first pair, or parameters added since
            if id(p) not in known:  # (a growing head's new units: no penalty until now)
                self._params.append(p)
                self._fisher_sum.append(torch.zeros_like(p))
                self._pull.append(torch.zeros_like(p))
        names = {id(p): n for n, p in self._named_trainable()}
        rows = [k for k, p in enumerate(self._params) if names.get(id(p)) in fisher]
        if not rows:
            return
        sums, pulls = [self._fisher_sum[k] for k in rows], [self._pull[k] for k in rows]
        f = [fisher[names[id(self._params[k])]] for k in rows]
        a = [anchor[names[id(self._params[k])]] for k in rows]
        torch._foreach_add_(sums, f)
        torch._foreach_addcmul_(pulls, f, a, value=-1.0)

    # ------------------------------------------------------------------ Fisher
    def fisher(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Diagonal Fisher: mean over samples of the squared per-sample NLL gradient."""
        was_training = self.model.training
        self.model.eval()
        try:
            linear = self._linear_layers()
            if linear is not None:
                return self._linear_fisher(linear, x, y, t)
            return self._vmap_fisher(x, y, t)
        finally:
            self.model.train(was_training)

    def _linear_layers(self) -> dict[str, nn.Linear] | None:
        """Module name -> layer when every trainable parameter is a Linear's; else None."""
        return all_linear_layers(self.model)

    def _linear_fisher(
        self, layers: dict[str, nn.Linear], x: torch.Tensor, y: torch.Tensor, t: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The Fisher of an all-linear network in closed form: Σ_i g_i² a_i²ᵀ = (g²)ᵀ(a²)."""

        def summed_nll(xc: torch.Tensor, yc: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
            if self.hparams.fisher_type == "true":
                yc = self._sample_labels(xc, tc)
            return F.cross_entropy(self.logits(xc, tc), yc, reduction="sum")

        total = linear_per_sample_sum(
            self.model, layers, summed_nll, (x, y, t), torch.square, LINEAR_FISHER_CHUNK
        )
        return {n: v / max(int(y.shape[0]), 1) for n, v in total.items()}

    def _vmap_fisher(
        self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The Fisher of any network: per-sample gradients with torch.func, chunked."""
        named = self._named_trainable()
        params = {n: p.detach() for n, p in named}
        frozen = {n: p.detach() for n, p in self.model.named_parameters() if not p.requires_grad}
        buffers = {n: b.detach() for n, b in self.model.named_buffers()}
        model = self.model

        def nll(
            p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor, mi: torch.Tensor | None
        ) -> torch.Tensor:
            out = functional_call(model, (p, frozen, buffers), (xi.unsqueeze(0),))
            if mi is not None:  # the same masking as Learner.logits
                out = out.masked_fill(~mi.unsqueeze(0), float("-inf"))
            return F.cross_entropy(out, yi.unsqueeze(0))

        masked = self.class_mask is not None
        per_sample = vmap(grad(nll), in_dims=(None, 0, 0, 0 if masked else None))
        total = {n: torch.zeros_like(p) for n, p in params.items()}
        n_samples = int(y.shape[0])
        per_sample_bytes = sum(p.numel() * p.element_size() for p in params.values())
        chunk = max(1, min(FISHER_CHUNK, FISHER_CHUNK_BYTES // max(per_sample_bytes, 1)))
        for start in range(0, n_samples, chunk):
            xc, yc, tc = (v[start : start + chunk] for v in (x, y, t))
            if self.hparams.fisher_type == "true":
                yc = self._sample_labels(xc, tc)
            mc = self.class_mask[tc] if masked else None
            grads = per_sample(params, xc, yc, mc)
            for n in total:
                total[n] += grads[n].pow(2).sum(0)
        return {n: v / max(n_samples, 1) for n, v in total.items()}

    @torch.no_grad()
    def _sample_labels(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Labels drawn from the model's predictive distribution (with the learner's generator)."""
        probs = torch.softmax(self.logits(x, t), dim=1).float().cpu()
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1).to(x.device)

    def after_task(self, task: Task) -> None:
        """Store this task's Fisher and the weights it was learned at."""
        x, y = task.x_train, task.y_train
        t = torch.full_like(y, task.id)
        k = self.hparams.fisher_samples
        if 0 < k < y.shape[0]:
            idx = torch.randperm(int(y.shape[0]), generator=self.generator)[:k].to(y.device)
            x, y, t = x[idx], y[idx], t[idx]
        self.fishers.append(self.fisher(x, y, t))
        self.anchors.append({n: p.detach().clone() for n, p in self._named_trainable()})
        self._accumulate(self.fishers[-1], self.anchors[-1])

    # ------------------------------------------------------------------ objective
    def penalty(self) -> torch.Tensor:
        """(λ/2)·Σ_tasks Σ_i F_i·(θ_i − θ*_i)², summed pair by pair (exactly 0 at the last
        anchor after one task); a differentiable scalar, 0 before any task. Not used by the
        training step, which adds the penalty's gradient in closed form."""
        total = torch.zeros((), device=self.device)
        for fisher, anchor in zip(self.fishers, self.anchors, strict=True):
            for n, p in self._named_trainable():
                if n in fisher:  # parameters added after the task carry no penalty for it
                    total = total + (fisher[n] * (p - anchor[n]).pow(2)).sum()
        return 0.5 * self.hparams.ewc_lambda * total

    def after_backward(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> None:
        """Add the penalty's gradient, λ·(F̄ ⊙ θ + P) = λ·Σ_t F_t ⊙ (θ − θ*_t) (the derivative
        of :meth:`penalty`), to each parameter's gradient."""
        strength = self.hparams.ewc_lambda
        if not self._fisher_sum or strength == 0:
            return
        grads = []
        for p in self._params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        with torch.no_grad():
            torch._foreach_addcmul_(grads, self._params, self._fisher_sum, value=strength)
            torch._foreach_add_(grads, self._pull, alpha=strength)

    # ------------------------------------------------------------------ state
    def method_state(self) -> dict[str, Any]:
        """Per-task Fisher and anchor weights (lists of name → tensor dicts)."""
        return {"fishers": self.fishers, "anchors": self.anchors}

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Restore the per-task Fisher and anchor weights."""
        self.fishers = [{n: v.to(self.device) for n, v in f.items()} for f in state["fishers"]]
        self.anchors = [{n: v.to(self.device) for n, v in a.items()} for a in state["anchors"]]
        self._consolidate()

    def stored_memory(self) -> dict[str, int]:
        """No samples; the Fisher and anchor tensors, in bytes."""
        nbytes = sum(
            v.numel() * v.element_size() for d in self.fishers + self.anchors for v in d.values()
        )
        return {"stored_samples": 0, "stored_bytes": nbytes}
