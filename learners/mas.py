"""Memory Aware Synapses (Aljundi, Babiloni, Elhoseiny, Rohrbach & Tuytelaars, 2018, "Memory
aware synapses: learning what (not) to forget", ECCV).

A parameter is important if the network's OUTPUT is sensitive to it, whatever the labels: after
each task t, over its training inputs x_1..x_N (Eq. 4 of the paper, with the squared ℓ2 norm of
the outputs as the function, Sec. 4.2),

    Ω_t,i = (1/N) · Σ_k | ∂ ||f_θ(x_k)||²₂ / ∂θ_i |

f the logits (task-incremental streams: the task's own output units only; domain- and
class-incremental: every output unit). The importances are SUMMED over tasks, as the paper
and the authors' code (``accumelate_reg_params``: prev_omega + new_omega) do, Ω = Σ_t Ω_t, and
later tasks minimise

    L(θ) = CE(θ) + λ · Σ_i Ω_i · (θ_i − θ*_i)²       (Eq. 3; no factor 1/2)

with θ* the weights after the last task.

Normalisation, on which the scale of λ (``mas_lambda``) depends: Ω_t is the MEAN over the
importance samples of the per-sample absolute gradient (the authors' code does this with its
batch-of-one option and otherwise takes the absolute value of each batch's summed gradient, a
cheaper approximation); it is not a sum over samples, and grows with the logits' magnitude
(∂||f||²/∂b = 2f for an output bias) and with the number of tasks (a sum). The authors set
λ = 1 for object recognition (AlexNet); here Ω is far larger (max 26 after one permuted-digits
task with an MLP 100-100, 150 after five), so the default is λ = 0.01: with plain SGD the
penalty's curvature is 2λ·Ω (see ``learners/_importance.py``), and on permuted digits (SGD
lr 0.1, 5 epochs) λ = 0.1 gained nothing over fine-tuning and λ ≥ 0.3 diverged, while λ = 0.01
raised ACC from 0.54 to 0.67 (and from 0.58 to 0.69 with Adam lr 1e-3, where λ = 1 fell to
0.45), mean of seeds 0 and 1.

Cost, as for EWC's Fisher: when every trainable parameter is a linear layer's (the MLP), the
per-sample sum comes in closed form from one backward per chunk, Σ_k |g_k a_kᵀ| = |G|ᵀ|A|
(``learners/_importance.py``); other networks use torch.func (vmap of grad of a functional
call), chunked. Never a Python loop over samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call, grad, vmap

from learners._importance import ImportancePenalty, all_linear_layers, linear_per_sample_sum
from learners.base import register
from learners.hparams import hp
from task_streams.base import Task

CHUNK = 256  # samples per vmap call at most
CHUNK_BYTES = 2**28  # and at most this much memory for the chunk's per-sample gradients
LINEAR_CHUNK = 2048  # samples per forward/backward in the closed-form (all-linear) case


@dataclass
class MASHParams:
    """Hyperparameters of Memory Aware Synapses."""

    mas_lambda: float = hp(
        0.01,
        help="penalty strength λ in λ·Σ Ω·(θ−θ*)², Ω the mean |∂||f(x)||²/∂θ| summed over tasks",
        low=0.0,
        search=(1e-4, 1e2),
        log=True,
    )
    importance_samples: int = hp(
        1024, help="training inputs of each task used for its importance; 0 = all of them", low=0
    )


@register("mas")
class MAS(ImportancePenalty):
    """A quadratic pull towards the last task's weights, weighted by the output's sensitivity."""

    HParams = MASHParams

    def strength(self) -> float:
        return self.hparams.mas_lambda

    def output_sensitivity(self, x: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Mean over the samples of |∂ ||f(x)||²₂ / ∂θ| (no labels involved)."""
        layers = all_linear_layers(self.model)
        if layers is None:
            return self._vmap_sensitivity(x, t)
        masked = self.class_mask is not None

        def summed_squared_norm(xc: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
            out = self.model(xc)
            if masked:  # the task's own output units only
                out = out.masked_fill(~self.class_mask[tc], 0.0)
            return out.pow(2).sum()

        was_training = self.model.training
        self.model.eval()
        try:
            total = linear_per_sample_sum(
                self.model, layers, summed_squared_norm, (x, t), torch.abs, LINEAR_CHUNK
            )
        finally:
            self.model.train(was_training)
        return {n: v / max(int(x.shape[0]), 1) for n, v in total.items()}

    def _vmap_sensitivity(self, x: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """The same for any network: per-sample gradients with torch.func, chunked."""
        named = self._named_trainable()
        params = {n: p.detach() for n, p in named}
        frozen = {n: p.detach() for n, p in self.model.named_parameters() if not p.requires_grad}
        buffers = {n: b.detach() for n, b in self.model.named_buffers()}
        model = self.model

        def squared_norm(
            p: dict[str, torch.Tensor], xi: torch.Tensor, mi: torch.Tensor | None
        ) -> torch.Tensor:
            out = functional_call(model, (p, frozen, buffers), (xi.unsqueeze(0),))
            if mi is not None:  # the task's own output units only
                out = out.masked_fill(~mi.unsqueeze(0), 0.0)
            return out.pow(2).sum()

        masked = self.class_mask is not None
        per_sample = vmap(grad(squared_norm), in_dims=(None, 0, 0 if masked else None))
        total = {n: torch.zeros_like(p) for n, p in params.items()}
        n_samples = int(x.shape[0])
        per_sample_bytes = sum(p.numel() * p.element_size() for p in params.values())
        chunk = max(1, min(CHUNK, CHUNK_BYTES // max(per_sample_bytes, 1)))
        was_training = model.training
        model.eval()
        try:
            for start in range(0, n_samples, chunk):
                xc, tc = x[start : start + chunk], t[start : start + chunk]
                grads = per_sample(params, xc, self.class_mask[tc] if masked else None)
                for n in total:
                    total[n] += grads[n].abs().sum(0)
        finally:
            model.train(was_training)
        return {n: v / max(n_samples, 1) for n, v in total.items()}

    def task_importance(self, task: Task) -> dict[str, torch.Tensor]:
        """Ω_t of ``task``: the output sensitivity on (a sample of) its training inputs."""
        x = task.x_train
        t = torch.full((int(x.shape[0]),), task.id, dtype=torch.long, device=x.device)
        k = self.hparams.importance_samples
        if 0 < k < x.shape[0]:
            idx = torch.randperm(int(x.shape[0]), generator=self.generator)[:k].to(x.device)
            x, t = x[idx], t[idx]
        return self.output_sensitivity(x, t)

    def after_task(self, task: Task) -> None:
        """Ω ← Ω + Ω_t; anchor at the current weights."""
        new = self.task_importance(task)
        if self.importance is not None:
            new = {n: self.importance.get(n, 0.0) + v for n, v in new.items()}
        self.consolidate(new)
