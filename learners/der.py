"""Dark Experience Replay++ (Buzzega et al., 2020, "Dark experience for general continual
learning: a strong, simple baseline").

A reservoir memory (as in ``replay``) keeps, for each stored sample, its input x, label y, task
id and the network's logits z at the time it was inserted. Each step minimises

    L(θ) = CE(f_θ(x), y)  +  α · MSE(h_θ(x'), z')  +  β · CE(f_θ(x''), y'')

where (x, y) is the incoming batch, (x', z') and (x'', y'') are two independent uniform samples
of the memory (each of ``replay_batch_size`` items, drawn in that order with the learner's
generator), h_θ the logits and each term the mean over its own batch (Algorithm 1 of the paper;
not one concatenated batch as ``replay`` does). β = 0 is DER; α = 0 is experience replay with
the incoming and the replayed losses as separate means, i.e. twice the loss ``replay``
minimises when both batches have the same size (so from a state whose memory holds anything,
DER++ with α = 0, β = 1 at SGD learning rate η follows ``replay`` at 2η, with the same memory
draws in the same order; while the memory is empty both are CE(x)); α = β = 0 is fine-tuning.

Choices:

- What is stored: z is the incoming batch's logits from the step's own forward pass, i.e. the
  weights before that step's update and the model in training mode (dropout active), as in the
  paper's Algorithm 1 (z ← h_θ(x) is computed for the loss, then stored after the update). It is
  stored raw (unmasked), so the memory never holds -inf.
- Task-incremental streams: the CE terms use the task masks as every method does, and the MSE
  is taken over the stored sample's own task units only (the mean over those entries), never
  over -inf. The other units take no part in what the method answers for that sample, so they
  are not distilled. Class- and domain-incremental: the MSE is the mean over all output units,
  future classes' units included (the paper distils the whole output).
- A term whose coefficient is 0 is not computed and draws nothing; with α = β = 0 nothing reads
  the memory, so nothing is stored (0 bytes) and the run is fine-tuning bit for bit.
- The incoming batch and both memory samples go through the network in one forward pass.
- Defaults α = 0.2, β = 0.5: the DER++ setting of the authors' code base (Mammoth) for
  Seq-CIFAR-10 with a 500-sample memory; the paper's grids span roughly 0.1 to 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from learners.base import Learner, register
from learners.hparams import hp
from learners.replay import ReservoirBuffer


@dataclass
class DERHParams:
    """Hyperparameters of DER++."""

    buffer_size: int = hp(
        500,
        help="samples (with their logits) the reservoir memory holds (0 = fine-tuning)",
        low=0,
        search=(50, 5000),
        log=True,
    )
    alpha: float = hp(
        0.2,
        help="weight α of the MSE between memory samples' logits and their stored logits",
        low=0.0,
        search=(0.01, 1.0),
        log=True,
    )
    beta: float = hp(
        0.5,
        help="weight β of the cross-entropy on a second memory sample (0 = DER, not DER++)",
        low=0.0,
        search=(0.01, 1.0),
        log=True,
    )
    replay_batch_size: int = hp(
        0, help="memory samples in each of the two replay terms; 0 = the training batch size", low=0
    )


@register("der")
class DER(Learner):
    """Cross-entropy plus logit distillation and replay on a reservoir memory with logits."""

    HParams = DERHParams
    FIXED_NETWORK = True  # its memory stores logits over the whole output layer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.buffer = ReservoirBuffer(self.hparams.buffer_size)
        # the incoming batch and its logits from the last loss() (stored by after_step); not state
        self._incoming: tuple[torch.Tensor, torch.Tensor] | None = None

    def _uses_memory(self) -> bool:
        return self.hparams.alpha > 0 or self.hparams.beta > 0

    def _mask(self, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``out`` with units outside each sample's task at -inf (task-incremental only)."""
        if self.class_mask is None:
            return out
        return out.masked_fill(~self.class_mask[t], float("-inf"))

    def loss_terms(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> dict[str, Any]:
        """The unweighted terms: ``ce`` (incoming batch), ``logit_mse`` and ``replay_ce`` (each
        present only if its coefficient is positive and the memory holds anything); draws the
        memory samples."""
        n = self.hparams.replay_batch_size or self.train_config.batch_size
        draw = len(self.buffer) > 0
        distil = (
            self.buffer.sample_items(n, self.generator) if draw and self.hparams.alpha else None
        )
        replay = self.buffer.sample_items(n, self.generator) if draw and self.hparams.beta else None
        parts = [x] + [s[0] for s in (distil, replay) if s is not None]
        raw = self.model(torch.cat(parts) if len(parts) > 1 else x)
        b = int(y.shape[0])
        terms: dict[str, Any] = {"ce": F.cross_entropy(self._mask(raw[:b], t), y)}
        self._incoming = (x, raw[:b].detach())
        start = b
        if distil is not None:
            _, _, dt, extras = distil
            out = raw[start : start + dt.shape[0]]
            start += dt.shape[0]
            squared = (out - extras["logits"]).pow(2)
            if self.class_mask is not None:
                squared = squared[self.class_mask[dt]]  # own task's units only
            terms["logit_mse"] = squared.mean()
        if replay is not None:
            _, ry, rt, _ = replay
            terms["replay_ce"] = F.cross_entropy(self._mask(raw[start:], rt), ry)
        return terms

    def loss(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """CE + α·MSE(logits, stored logits) + β·CE on the memory (terms that are present)."""
        terms = self.loss_terms(x, y, t)
        loss = terms["ce"]
        if "logit_mse" in terms:
            loss = loss + self.hparams.alpha * terms["logit_mse"]
        if "replay_ce" in terms:
            loss = loss + self.hparams.beta * terms["replay_ce"]
        return loss

    def after_step(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> None:
        """Offer the incoming batch with the logits of this step's forward pass to the
        reservoir (outside the training loop, without a loss() on ``x``: the current logits)."""
        incoming, self._incoming = self._incoming, None
        if not self._uses_memory():
            return
        if incoming is not None and incoming[0] is x:
            logits = incoming[1]
        else:
            with torch.no_grad():
                logits = self.model(x)
        self.buffer.add(x, y, t, self.generator, logits=logits)

    def method_state(self) -> dict[str, Any]:
        """The reservoir memory, stored logits included."""
        return {"buffer": self.buffer.state_dict()}

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Restore the reservoir memory."""
        self.buffer.load_state_dict(state["buffer"], device=self.device)

    def stored_memory(self) -> dict[str, int]:
        """Samples in the memory and the bytes they take (logits included)."""
        return {"stored_samples": len(self.buffer), "stored_bytes": self.buffer.nbytes()}
