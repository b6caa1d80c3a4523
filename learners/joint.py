"""Joint training: multi-task training on all data seen so far — the upper bound (no forgetting).

At task k the batches are drawn from the union of the training sets of tasks 0..k, so the
steps per task grow with k. Every seen task's training tensors are kept (and checkpointed).
"""

from __future__ import annotations

from typing import Any

import torch

from learners.base import Learner, register
from task_streams.base import Task


@register("joint")
class Joint(Learner):
    """Trains on the concatenation of every seen task's training data."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # task id -> (x, y, task ids); keyed so that a retried task is not stored twice
        self.seen: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def training_data(self, task: Task) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All seen tasks' (x, y, task ids), the current task included, in task order."""
        self.seen[task.id] = super().training_data(task)
        parts = [self.seen[k] for k in sorted(self.seen)]
        if len(parts) == 1:
            return parts[0]
        device = parts[-1][0].device
        xs, ys, ts = zip(*parts, strict=True)
        return (
            torch.cat([x.to(device) for x in xs]),
            torch.cat([y.to(device) for y in ys]),
            torch.cat([t.to(device) for t in ts]),
        )

    def method_state(self) -> dict[str, Any]:
        """The stored training data of every seen task."""
        return {
            "tasks": [
                {"id": k, "x": x.clone(), "y": y.clone(), "t": t.clone()}
                for k, (x, y, t) in sorted(self.seen.items())
            ]
        }

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Restore the stored training data."""
        self.seen = {
            int(e["id"]): (e["x"].to(self.device), e["y"].to(self.device), e["t"].to(self.device))
            for e in state["tasks"]
        }

    def stored_memory(self) -> dict[str, int]:
        """Every seen training sample, with its label and task id."""
        samples = sum(int(y.shape[0]) for _, y, _ in self.seen.values())
        nbytes = sum(
            sum(v.numel() * v.element_size() for v in parts) for parts in self.seen.values()
        )
        return {"stored_samples": samples, "stored_bytes": nbytes}
