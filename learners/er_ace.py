"""ER with asymmetric cross-entropy, ER-ACE (Caccia et al., 2022, "New insights on reducing
abrupt representation change in online continual learning").

A reservoir memory as in ``replay``. Each step minimises

    L(θ) = CE_{C_in}(f_θ(x), y)  +  CE_{C_seen}(f_θ(x_m), y_m)

where (x, y) is the incoming batch, (x_m, y_m) a uniform memory sample of ``replay_batch_size``
items, and CE_C is the cross-entropy of the softmax over the classes C only (the other logits
are set to -inf, so they get no gradient): C_in is the set of classes present in the incoming
batch, C_seen every class seen so far in the stream, incoming batches included (C_in ⊆ C_seen).
Each term is the mean over its own batch, as in the authors' code (``replay`` uses one
concatenated batch instead). The incoming samples thus never push down the logits of old
classes (the source of the abrupt representation change when new classes arrive), while the
replayed ones are trained against every class seen.

Choices and scenarios:

- C_seen is tracked from the labels of the incoming batches (a per-class flag, saved with the
  state), not from the stream's task list: classes of later tasks stay outside the replay
  softmax until their first batch arrives.
- Class-incremental: the setting the method is made for.
- Task-incremental: the task masks apply as well (each sample's softmax is over its own task's
  units, intersected with C_in or C_seen). C_in is within the task, so the incoming term only
  hides the task's classes absent from the batch; the asymmetry across tasks is already given
  by the task masks, and ER-ACE is close to ER with separate means.
- Domain-incremental: every class belongs to every task, so C_seen soon holds all classes and
  C_in is the set of classes a given batch happens to contain; with batches that contain every
  class the method is ER with separate means. It is supported and harmless, but brings little.
- A batch holding one class only has an incoming term of exactly 0 (a one-class softmax).
- Memory draws (one sample per step once the memory holds anything, then the reservoir
  insertion) use the learner's generator, in the same order as ``replay``.
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
class ERACEHParams:
    """Hyperparameters of ER-ACE."""

    buffer_size: int = hp(
        500,
        help="samples the reservoir memory holds (0 = no replay term)",
        low=0,
        search=(50, 5000),
        log=True,
    )
    replay_batch_size: int = hp(
        0, help="memory samples in each step's replay term; 0 = the training batch size", low=0
    )


@register("er_ace")
class ERACE(Learner):
    """Incoming batch: CE over its own classes; replayed samples: CE over all seen classes."""

    HParams = ERACEHParams

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.buffer = ReservoirBuffer(self.hparams.buffer_size)
        self.seen_classes = torch.zeros(self.info.num_classes, dtype=torch.bool, device=self.device)

    def _restrict(self, out: torch.Tensor, t: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """``out`` with units outside ``allowed`` (and outside each sample's task) at -inf."""
        keep = allowed.unsqueeze(0)
        if self.class_mask is not None:
            keep = keep & self.class_mask[t]
        return out.masked_fill(~keep, float("-inf"))

    def loss_terms(
        self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The two terms, ``incoming`` and ``replay`` (present once the memory holds anything);
        marks the incoming classes as seen and draws the memory sample."""
        present = torch.zeros_like(self.seen_classes)
        present[y] = True
        self.seen_classes |= present
        replay = None
        if len(self.buffer) > 0:
            n = self.hparams.replay_batch_size or self.train_config.batch_size
            replay = self.buffer.sample(n, self.generator)
        raw = self.model(torch.cat([x, replay[0]]) if replay is not None else x)
        b = int(y.shape[0])
        terms = {"incoming": F.cross_entropy(self._restrict(raw[:b], t, present), y)}
        if replay is not None:
            _, my, mt = replay
            terms["replay"] = F.cross_entropy(self._restrict(raw[b:], mt, self.seen_classes), my)
        return terms

    def loss(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Asymmetric CE on the incoming batch plus full (seen-class) CE on a memory sample."""
        terms = self.loss_terms(x, y, t)
        return terms["incoming"] + terms["replay"] if "replay" in terms else terms["incoming"]

    def after_step(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> None:
        """Offer the incoming batch to the reservoir."""
        self.buffer.add(x, y, t, self.generator)

    def method_state(self) -> dict[str, Any]:
        """The reservoir memory and the classes seen so far."""
        return {"buffer": self.buffer.state_dict(), "seen_classes": self.seen_classes.clone()}

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Restore the reservoir memory and the seen classes."""
        self.buffer.load_state_dict(state["buffer"], device=self.device)
        self.seen_classes = state["seen_classes"].to(self.device, dtype=torch.bool)

    def stored_memory(self) -> dict[str, int]:
        """Samples in the memory and the bytes they take."""
        return {"stored_samples": len(self.buffer), "stored_bytes": self.buffer.nbytes()}
