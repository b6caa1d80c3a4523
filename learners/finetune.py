"""Sequential fine-tuning: plain SGD on each task in turn — the lower bound (it forgets)."""

from __future__ import annotations

from learners.base import Learner, register


@register("finetune")
class FineTune(Learner):
    """No protection against forgetting: the base loop, unchanged."""
