"""An output layer that grows when a task brings classes the network has not seen.

A fixed classifier has a unit for every class of the stream from the start: in a
class-incremental stream the units of future classes are trained (pushed down by the softmax)
long before their classes arrive, and the model's size is decided before the stream is known.
Here the backbone's last ``nn.Linear`` is replaced by a list of head groups: the first task adds
a group with its classes' units, each later task that brings unseen classes adds a group for
those only (the usual "expanding head" of class-incremental libraries; the additional-neural-
resources family of the lecture notes this project follows). Old groups are kept as they are —
expanding changes no existing logit (tests/test_growth.py checks it); a class not yet seen has
no unit, and its logit is ``-inf``.

Two ways to use it:

- ``expanding_head``: fine-tuning with the growing head;
- ``<method>+expanding_head`` in ``methods`` (e.g. ``ewc_head: {method: ewc+expanding_head,
  ewc_lambda: 100}``): any method that trains the configured backbone, with the growing head.
  Its regulariser sees the new units as parameters that did not exist when earlier tasks were
  consolidated: they carry no penalty until the next consolidation.

The new units' initialisation (``head_init``): ``default`` (PyTorch's ``nn.Linear`` init, drawn
from the run's seeded torch generator) or ``zeros`` (new classes start at logit 0, bias 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from learners.base import Learner, register, register_extension
from learners.finetune import FineTune
from learners.hparams import ConfigError, hp
from task_streams.base import Task

HEAD_INITS = ("default", "zeros")


def detach_classifier(model: nn.Module, num_classes: int) -> int:
    """Replace ``model``'s last ``nn.Linear`` with ``num_classes`` outputs by an identity (in
    place); return its number of inputs. ValueError when there is none."""
    found: tuple[nn.Module, str, nn.Linear] | None = None
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Linear) and child.out_features == num_classes:
                found = (parent, child_name, child)
    if found is None:
        raise ValueError(f"the backbone has no nn.Linear layer with {num_classes} outputs")
    parent, child_name, layer = found
    setattr(parent, child_name, nn.Identity())
    return layer.in_features


class ExpandingHeadNet(nn.Module):
    """A backbone without its classifier, and head groups that each own some classes' units."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.in_features = detach_classifier(backbone, num_classes)
        self.body = backbone
        self.heads = nn.ModuleList()
        self.groups: list[list[int]] = []

    @property
    def seen_classes(self) -> set[int]:
        return {c for group in self.groups for c in group}

    def add_group(self, classes: list[int], init: str = "default") -> nn.Linear:
        """Add a unit for each of ``classes`` (none of them seen before)."""
        if not classes or self.seen_classes & set(classes):
            raise ValueError(
                f"head group {classes} is empty or overlaps {sorted(self.seen_classes)}"
            )
        param = next(self.body.parameters(), None)
        head = nn.Linear(self.in_features, len(classes))
        if init == "zeros":
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        if param is not None:
            head = head.to(param.device)
        self.heads.append(head)
        self.groups.append([int(c) for c in classes])
        index = torch.tensor(self.groups[-1], dtype=torch.long)
        device = param.device if param is not None else None
        # not persistent: the groups are the architecture record, rebuilt before weights load
        self.register_buffer(f"index_{len(self.groups) - 1}", index.to(device), persistent=False)
        return head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.body(x)
        out = features.new_full((features.shape[0], self.num_classes), float("-inf"))
        for k, head in enumerate(self.heads):
            out = out.index_copy(1, getattr(self, f"index_{k}"), head(features))
        return out


@dataclass
class ExpandingHeadHParams:
    """Hyperparameters of the expanding head."""

    head_init: str = hp(
        "default",
        help="new class units: default (nn.Linear's init) or zeros (start at logit 0)",
        choices=HEAD_INITS,
        search=list(HEAD_INITS),
    )


@register_extension("expanding_head")
class ExpandingHead:
    """The classifier grows a unit per new class when a task brings unseen classes."""

    HParams = ExpandingHeadHParams

    @classmethod
    def check_base(cls, base: type[Learner], name: str) -> None:
        """ConfigError unless ``base`` trains the configured backbone through Learner.logits."""
        if not _combinable(base):
            accepted = sorted(
                n for n, c in _learners().items() if _combinable(c) and n != "expanding_head"
            )
            raise ConfigError(
                f"method {name!r}: {base.name} builds or reads its own output layer, so "
                f"expanding_head cannot be added to it; accepted: "
                + ", ".join(f"{n}+expanding_head" for n in accepted)
            )

    def build_model(self) -> nn.Module:
        """The configured backbone with its classifier replaced by (no) head groups."""
        return ExpandingHeadNet(super().build_model(), self.info.num_classes)

    def before_task(self, task: Task) -> None:
        """Add units for the task's unseen classes (then the method's own before_task)."""
        new = [c for c in task.classes if c not in self.model.seen_classes]
        if new:
            self.model.add_group(new, self.hparams.head_init)
            self.model_grew()
        super().before_task(task)

    def architecture(self) -> dict[str, Any]:
        """The head groups, in the order they were added."""
        return {**super().architecture(), "head_groups": [list(g) for g in self.model.groups]}

    def rebuild(self, architecture: dict[str, Any]) -> None:
        """Add the recorded head groups to a fresh network."""
        super().rebuild(architecture)
        for group in architecture.get("head_groups", []):
            self.model.add_group(list(group), self.hparams.head_init)
        self.model_grew()


def _learners() -> dict[str, type[Learner]]:
    from learners.base import LEARNERS

    return LEARNERS


def _combinable(cls: type[Learner]) -> bool:
    """A method that trains the configured backbone through Learner.logits and keeps nothing
    shaped by the output layer (``FIXED_NETWORK``: stored logits, gradient memories)."""
    own = ("build_model", "logits", "predict", "architecture")
    return (
        all(getattr(cls, m) is getattr(Learner, m) for m in own)
        and cls.TRAINS_ON_STREAM
        and not cls.FIXED_NETWORK
    )


@register("expanding_head")
class ExpandingHeadFineTune(ExpandingHead, FineTune):
    """Fine-tuning whose output layer grows a unit per new class (``<method>+expanding_head``
    adds the same head to another method)."""

    HParams = ExpandingHeadHParams
