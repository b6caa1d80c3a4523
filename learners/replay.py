"""Experience replay (Chaudhry et al., 2019, "On tiny episodic memories in continual learning").

Every incoming batch is extended with a uniform sample from a fixed-size memory, and then
inserted into that memory by reservoir sampling (Vitter, 1985, Algorithm R), so the memory is at
all times a uniform sample of everything seen, whatever the task boundaries.

:class:`ReservoirBuffer` is shared by the replay family (DER++ and ER-ACE use it too): besides
(x, y, task id) an item may carry named extra tensors (DER++ stores the logits it had when it
was inserted), given as keywords to :meth:`ReservoirBuffer.add` and returned by
:meth:`ReservoirBuffer.sample_items`. A buffer without extras behaves, samples and saves exactly
as before they existed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from learners.base import Learner, register
from learners.hparams import hp


class ReservoirBuffer:
    """A fixed-capacity uniform sample of a stream of (x, y, task id) items (Algorithm R).

    Items may carry named extra tensors (``add(..., logits=z)``); the names are fixed by the
    first batch added and every later batch must give the same ones.
    """

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = int(capacity)
        self.seen = 0
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.t: torch.Tensor | None = None
        self.extras: dict[str, torch.Tensor] = {}
        """name -> storage (capacity, ...) of each extra per-item tensor"""

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    def _allocate(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        t: torch.Tensor,
        extras: dict[str, torch.Tensor] | None = None,
    ) -> None:
        cap = self.capacity

        def storage(v: torch.Tensor) -> torch.Tensor:
            return torch.empty((cap, *v.shape[1:]), dtype=v.dtype, device=v.device)

        self.x, self.y, self.t = storage(x), storage(y), storage(t)
        self.extras = {name: storage(v) for name, v in sorted((extras or {}).items())}

    def _check_extras(self, b: int, extras: dict[str, torch.Tensor]) -> None:
        for name, v in extras.items():
            if int(v.shape[0]) != b:
                raise ValueError(f"extra {name!r} has {v.shape[0]} rows for a batch of {b}")
        if self.x is not None and set(extras) != set(self.extras):
            raise ValueError(
                f"this buffer stores extras {sorted(self.extras)}, was given {sorted(extras)}"
            )

    def add(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        t: torch.Tensor,
        generator: torch.Generator,
        **extras: torch.Tensor,
    ) -> None:
        """Offer a batch, item by item in order, to the reservoir.

        Item number i of the stream (0-based) fills slot i while i < capacity; afterwards it
        draws r uniform in [0, i] and replaces slot r if r < capacity. The draws do not depend
        on the buffer's content, so a batch is processed at once: where several items of the
        batch pick the same slot, the last one wins, exactly as one at a time. ``extras``
        (name=tensor, one row per item) are stored with their items; they draw nothing.
        """
        b = int(y.shape[0])
        self._check_extras(b, extras)
        if b == 0:
            return
        if self.capacity == 0:
            self.seen += b
            return
        if self.x is None:
            self._allocate(x, y, t, extras)
        index = torch.arange(self.seen, self.seen + b, dtype=torch.float64)
        draw = torch.floor(torch.rand(b, generator=generator, dtype=torch.float64) * (index + 1))
        slot = torch.where(index < self.capacity, index, draw).long()
        self.seen += b
        kept = torch.nonzero(slot < self.capacity).squeeze(1)
        if kept.numel() == 0:
            return
        slot = slot[kept]
        # one write per slot: the last batch item that picked it (batch position, in slot order)
        slots, inverse = torch.unique(slot, return_inverse=True)
        kept = torch.full_like(slots, -1).scatter_reduce_(0, inverse, kept, reduce="amax")
        device = self.x.device
        slots, kept = slots.to(device), kept.to(device)
        self.x[slots] = x[kept]
        self.y[slots] = y[kept]
        self.t[slots] = t[kept]
        for name, storage in self.extras.items():
            value = extras[name].to(device=storage.device, dtype=storage.dtype)
            storage[slots.to(storage.device)] = value[kept.to(storage.device)]

    def sample_items(
        self, n: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """min(n, len(self)) distinct stored items, uniformly without replacement, with their
        extras: (x, y, t, {name: tensor}). The same draws as :meth:`sample`."""
        filled = len(self)
        if filled == 0 or n <= 0:
            raise ValueError(
                "cannot sample from an empty buffer"
                if filled == 0
                else f"sample size must be positive, got {n}"
            )
        idx = torch.randperm(filled, generator=generator)[: min(n, filled)].to(self.x.device)
        extras = {name: v[idx.to(v.device)] for name, v in self.extras.items()}
        return self.x[idx], self.y[idx], self.t[idx], extras

    def sample(
        self, n: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """min(n, len(self)) distinct stored items, uniformly without replacement."""
        x, y, t, _ = self.sample_items(n, generator)
        return x, y, t

    def nbytes(self) -> int:
        """Bytes taken by the stored items (inputs, labels, task ids and any extras)."""
        if self.x is None:
            return 0
        columns = (self.x, self.y, self.t, *self.extras.values())
        per_item = sum(v[0].numel() * v.element_size() for v in columns)
        return len(self) * per_item

    def state_dict(self) -> dict[str, Any]:
        """Capacity, items seen and the filled part of the storage (extras under "extras",
        present only when the buffer stores some)."""
        filled = len(self)
        state: dict[str, Any] = {"capacity": self.capacity, "seen": self.seen}
        if self.x is not None:
            state.update(
                x=self.x[:filled].clone(), y=self.y[:filled].clone(), t=self.t[:filled].clone()
            )
            if self.extras:
                state["extras"] = {n: v[:filled].clone() for n, v in self.extras.items()}
        return state

    def load_state_dict(
        self, state: dict[str, Any], device: torch.device | str | None = None
    ) -> None:
        """Restore what :meth:`state_dict` returned (storage moved to ``device`` if given)."""
        if int(state["capacity"]) != self.capacity:
            raise ValueError(
                f"buffer state has capacity {state['capacity']}, this buffer {self.capacity}"
            )
        self.seen = int(state["seen"])
        self.x = self.y = self.t = None
        self.extras = {}
        if "x" in state:
            x, y, t = (state[k] if device is None else state[k].to(device) for k in "xyt")
            extras = {
                n: v if device is None else v.to(device) for n, v in state.get("extras", {}).items()
            }
            self._allocate(x, y, t, extras)
            filled = int(y.shape[0])
            self.x[:filled], self.y[:filled], self.t[:filled] = x, y, t
            for name, v in extras.items():
                self.extras[name][:filled] = v


@dataclass
class ReplayHParams:
    """Hyperparameters of experience replay."""

    buffer_size: int = hp(
        500,
        help="samples the reservoir memory holds (0 = no replay)",
        low=0,
        search=(50, 5000),
        log=True,
    )
    replay_batch_size: int = hp(
        0, help="memory samples added to each batch; 0 = the training batch size", low=0
    )


@register("replay")
class Replay(Learner):
    """Each batch is joined by a uniform sample of a reservoir memory of all past batches."""

    HParams = ReplayHParams

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.buffer = ReservoirBuffer(self.hparams.buffer_size)

    def augment_batch(
        self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch plus a memory sample, once the memory holds anything."""
        if len(self.buffer) == 0:
            return x, y, t
        n = self.hparams.replay_batch_size or self.train_config.batch_size
        mx, my, mt = self.buffer.sample(n, self.generator)
        return torch.cat([x, mx]), torch.cat([y, my]), torch.cat([t, mt])

    def after_step(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> None:
        """Offer the incoming batch to the reservoir."""
        self.buffer.add(x, y, t, self.generator)

    def method_state(self) -> dict[str, Any]:
        """The reservoir memory."""
        return {"buffer": self.buffer.state_dict()}

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Restore the reservoir memory."""
        self.buffer.load_state_dict(state["buffer"], device=self.device)

    def stored_memory(self) -> dict[str, int]:
        """Samples in the memory and the bytes they take."""
        return {"stored_samples": len(self.buffer), "stored_bytes": self.buffer.nbytes()}
