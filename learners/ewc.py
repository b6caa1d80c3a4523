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
The penalty's gradient, λ·(F̄ ⊙ δ + G), is added to the parameters' gradients in closed form
in ``after_backward`` with fused per-tensor operations, not through autograd, so ``loss()``
is the cross-entropy alone and a step costs little more than fine-tuning's; ``penalty()``
gives the penalty's value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

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
        # the penalty re-expanded around the last anchor (see _consolidate); derived, not state
        self._anchor: torch.Tensor | None = None
        self._fisher_sum: torch.Tensor | None = None
        self._linear: torch.Tensor | None = None
        self._constant: torch.Tensor | None = None
        self._params: list[torch.nn.Parameter] = []
        self._fisher_parts: list[torch.Tensor] = []
        self._offset_parts: list[torch.Tensor] = []

    # ------------------------------------------------------------------ parameters
    def _named_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _flat(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[n].reshape(-1) for n, _ in self._named_trainable()])

    def _consolidate(self) -> None:
        """Precompute the penalty as a quadratic around the last anchor θ*_L.

        With δ = θ − θ*_L and c_t = θ*_L − θ*_t (Eq. 3 of the paper, summed over tasks):
        Σ_t F_t (θ − θ*_t)² = Σ_i [F̄_i δ_i² + 2 G_i δ_i] + K, where F̄ = Σ_t F_t,
        G = Σ_t F_t c_t and K = Σ_t Σ_i F_t,i c_t,i². Per-step cost no longer grows with the
        number of tasks, and the value at θ*_L is K exactly (0 after the first task).
        """
        if not self.fishers:
            self._anchor = self._fisher_sum = self._linear = self._constant = None
            self._params, self._fisher_parts, self._offset_parts = [], [], []
            return
        fishers = torch.stack([self._flat(f) for f in self.fishers])
        offsets = self._flat(self.anchors[-1]).unsqueeze(0) - torch.stack(
            [self._flat(a) for a in self.anchors]
        )
        self._anchor = self._flat(self.anchors[-1])
        self._fisher_sum = fishers.sum(0)
        self._linear = 2 * (fishers * offsets).sum(0)
        self._constant = (fishers * offsets.pow(2)).sum()
        shapes = [p.shape for _, p in self._named_trainable()]
        sizes = [shape.numel() for shape in shapes]

        def parts(flat: torch.Tensor) -> list[torch.Tensor]:
            return [v.view(shape) for v, shape in zip(flat.split(sizes), shapes, strict=True)]

        # the penalty's gradient λ·(F̄ ⊙ (θ − θ*_L) + G/2) = λ·(F̄ ⊙ θ + C), with
        # C = G/2 − F̄ ⊙ θ*_L: two fused in-place operations per step (after_backward)
        self._params = [p for _, p in self._named_trainable()]
        self._fisher_parts = parts(self._fisher_sum)
        self._offset_parts = parts(self._linear / 2 - self._fisher_sum * self._anchor)

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
        layers = {n: m for n, m in self.model.named_modules() if isinstance(m, nn.Linear)}
        owned = {
            f"{n}.{k}" if n else k
            for n, m in layers.items()
            for k, p in m.named_parameters(recurse=False)
            if p.requires_grad
        }
        return layers if owned == {n for n, _ in self._named_trainable()} else None

    def _linear_fisher(
        self, layers: dict[str, nn.Linear], x: torch.Tensor, y: torch.Tensor, t: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The Fisher of an all-linear network in closed form: Σ_i g_i² a_i²ᵀ = (g²)ᵀ(a²)."""
        inputs: dict[str, torch.Tensor] = {}
        outputs: dict[str, torch.Tensor] = {}

        def keep(name: str):
            def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
                inputs[name], outputs[name] = args[0], out

            return hook

        handles = [m.register_forward_hook(keep(n)) for n, m in layers.items()]
        total = {n: torch.zeros_like(p) for n, p in self._named_trainable()}
        n_samples = int(y.shape[0])
        try:
            for start in range(0, n_samples, LINEAR_FISHER_CHUNK):
                xc, yc, tc = (v[start : start + LINEAR_FISHER_CHUNK] for v in (x, y, t))
                if self.hparams.fisher_type == "true":
                    yc = self._sample_labels(xc, tc)
                with torch.enable_grad():
                    out = self.logits(xc, tc)
                    loss = F.cross_entropy(out, yc, reduction="sum")  # sample i's loss is term i
                    names = list(layers)
                    grads = torch.autograd.grad(loss, [outputs[n] for n in names])
                for name, g in zip(names, grads, strict=True):
                    a, g2 = inputs[name].detach(), g.detach().pow(2)
                    if a.dim() != 2:
                        raise RuntimeError(f"layer {name} saw {a.dim()}-D inputs")
                    prefix = f"{name}." if name else ""
                    if f"{prefix}weight" in total:
                        total[f"{prefix}weight"] += g2.T @ a.pow(2)
                    if f"{prefix}bias" in total:
                        total[f"{prefix}bias"] += g2.sum(0)
        finally:
            for handle in handles:
                handle.remove()
        return {n: v / max(n_samples, 1) for n, v in total.items()}

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
        self._consolidate()

    # ------------------------------------------------------------------ objective
    def penalty(self) -> torch.Tensor:
        """(λ/2)·Σ_tasks Σ_i F_i·(θ_i − θ*_i)²; a differentiable scalar, 0 before any task."""
        if self._anchor is None:
            return torch.zeros((), device=self.device)
        delta = torch.cat([p.reshape(-1) for _, p in self._named_trainable()]) - self._anchor
        quadratic = ((self._fisher_sum * delta + self._linear) * delta).sum() + self._constant
        return 0.5 * self.hparams.ewc_lambda * quadratic

    def after_backward(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> None:
        """Add the penalty's gradient, λ·(F̄ ⊙ δ + G/2) with δ = θ − θ*_L (the derivative of
        :meth:`penalty`), to each parameter's gradient."""
        strength = self.hparams.ewc_lambda
        if self._anchor is None or strength == 0:
            return
        grads = []
        for p in self._params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        with torch.no_grad():
            torch._foreach_addcmul_(grads, self._params, self._fisher_parts, value=strength)
            torch._foreach_add_(grads, self._offset_parts, alpha=strength)

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
