"""Net2Net (Chen, Goodfellow & Shlens, 2016, "Net2Net: Accelerating Learning via Knowledge
Transfer", ICLR): one MLP that grows by function-preserving transformations while it learns
the stream, so every growth starts from the function learned so far.

- **Net2WiderNet** widens hidden layer i from n to n' units. Unit j < n is kept; each new
  unit j ≥ n copies a random existing unit g(j) (drawn uniformly with the learner's
  generator): its incoming weights and bias. In the next layer, the outgoing weight of every
  unit of a replicated group {j : g(j) = k} is divided by the group's size |g⁻¹(k)|, so the
  next layer's input sum Σ_j W'[:, j]·h'_j = Σ_k W[:, k]·h_k is unchanged (the paper's
  equation (4)). Every hidden layer is widened at once, to ceil(n·``widen_factor``) units,
  at most ``max_width``.
- **Net2DeeperNet** inserts Linear(h, h) + ReLU with identity weights and zero bias after the
  last hidden layer (just below the output layer). ReLU(I·a + 0) = a because the input a is
  itself a ReLU output (non-negative), so the function is unchanged. With ``model.dropout``
  > 0 the new block ends with a Dropout too, as :class:`learners.backbones.MLP` builds every
  hidden block, so a grown network is exactly ``MLP(hidden=widths)``; in train mode the new
  Dropout is a second random mask, so only the eval-mode function is preserved exactly.
  At most ``max_layers`` hidden layers.
- ``grow="both"`` widens every hidden layer, then adds a layer of the (new) top width.

``noise`` > 0 breaks the symmetry between a unit and its copies, which otherwise receive the
same gradient forever: Gaussian noise of standard deviation ``noise`` × (the standard
deviation of the layer's weights before growth) is added to the new units' incoming weights
(the copies only; the kept units and every bias are exact), and ``noise`` × (the standard
deviation of the identity matrix, ≈ 1/√h) to a new layer's weights. ``noise=0`` preserves
the function exactly (up to float rounding: the divided outgoing weights).

When it grows (``trigger``):

- ``"every"``: before every ``every_tasks``-th task (k: before the tasks at positions k, 2k,
  …; never before the first). A task that is learned again after a stop does not grow twice.
- ``"plateau"``: during a task, when the mean training loss of the last ``patience`` steps is
  not below (1 − ``min_improvement``) × the mean of the ``patience`` steps before them, and is
  still above ``loss_threshold``; the window then restarts (it also restarts at each task),
  at most ``max_growths_per_task`` times per task. Mini-batch losses are averaged over a
  window rather than compared step to step, because single batches are noisy.

A growth that would change nothing (every layer at ``max_width``, ``max_layers`` reached) is a
no-op: no event, no optimizer rebuild. Each growth is recorded in :attr:`Net2Net.growth_log`
(task id, step within the task — 0 for ``"every"`` —, kind, widths before and after).

Deviations from the paper. The paper grows a trained teacher once into a student that is then
trained on the same task; here the same network grows repeatedly along a stream. The paper
widens convolutional and fully connected layers of a chosen layer; here every hidden layer
of an MLP is widened together (the ``cnn`` backbone is refused). The paper suggests noise
only as an option and does not fix its scale; the relative scale above is this file's choice.
After growth the optimizer is rebuilt (:meth:`Learner.model_grew`): tensors replaced by the
growth (every Linear of a widened network; none when only a layer is added) lose their
optimizer state (momentum, Adam's moments start from zero), the others keep it.

Stored memory: nothing besides the model; the growth shows in ``resources()``'s parameter
count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from learners.backbones import MLP, ModelConfig
from learners.base import Learner, register
from learners.hparams import ConfigError, hp
from task_streams.base import StreamInfo, Task

TRIGGERS = ("every", "plateau")
GROWTHS = ("wider", "deeper", "both")


@dataclass
class Net2NetHParams:
    """Hyperparameters of Net2Net."""

    trigger: str = hp(
        "every",
        help="when to grow: every = before every every_tasks-th task; plateau = during a task "
        "when the training loss stops improving",
        choices=TRIGGERS,
    )
    every_tasks: int = hp(
        1, help="trigger=every: grow before the tasks at positions k, 2k, ... (k = this)", low=1
    )
    grow: str = hp(
        "wider",
        help="wider: widen every hidden layer (Net2WiderNet); deeper: add an identity layer on "
        "top (Net2DeeperNet); both: widen, then add a layer",
        choices=GROWTHS,
    )
    widen_factor: float = hp(
        1.5,
        help="widening takes each hidden layer from n to ceil(n * widen_factor) units",
        gt=1.0,
        search=(1.1, 3.0),
    )
    max_width: int = hp(1024, help="no hidden layer is widened beyond this many units", low=1)
    max_layers: int = hp(4, help="no layer is added beyond this many hidden layers", low=1)
    noise: float = hp(
        0.01,
        help="std of the noise added to new weights, relative to the layer's weight std "
        "(breaks the symmetry of copied units); 0 = exactly function-preserving",
        low=0.0,
        search=(0.0, 0.1),
    )
    patience: int = hp(
        50,
        help="trigger=plateau: steps per window; the last window's mean loss is compared with "
        "the window before it",
        low=1,
    )
    min_improvement: float = hp(
        0.01,
        help="trigger=plateau: grow when the mean loss fell by less than this fraction between "
        "the two windows",
        low=0.0,
        high=1.0,
    )
    loss_threshold: float = hp(
        0.05,
        help="trigger=plateau: never grow while the window's mean loss is at or below this",
        low=0.0,
    )
    max_growths_per_task: int = hp(
        1, help="trigger=plateau: growths allowed within one task", low=0
    )


def _expanded_width(width: int, factor: float, cap: int) -> int:
    """ceil(width · factor), at most ``cap``, never below ``width``; rounded to 9 decimals first
    so that 10 × 1.1 = 11.000000000000002 gives 11, not 12."""
    return max(width, min(cap, math.ceil(round(width * factor, 9))))


def _linear_like(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    """An nn.Linear holding copies of ``weight`` and ``bias`` (no random initialisation, so no
    draw from the global generator)."""
    out_features, in_features = weight.shape
    layer = nn.utils.skip_init(
        nn.Linear, in_features, out_features, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


@register("net2net")
class Net2Net(Learner):
    """An MLP grown by function-preserving widening (Net2WiderNet) and deepening
    (Net2DeeperNet), before chosen tasks or when the training loss plateaus."""

    HParams = Net2NetHParams

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.growth_log: list[dict[str, Any]] = []
        """one entry per growth: task, step, kind, widths before and after"""
        self._every_grown_at = -1  # tasks_learned at the last "every" growth (no double growth)
        self._task_id = -1
        self._task_steps = 0
        self._growths_this_task = 0
        self._window: list[float] = []  # plateau: the step losses since the window restarted
        self._last_loss: torch.Tensor | None = None

    # ------------------------------------------------------------------ setup
    @classmethod
    def check_model(cls, model: ModelConfig, info: StreamInfo, where: str) -> None:
        """ConfigError unless the backbone is an MLP with at least one hidden layer."""
        if model.backbone != "mlp":
            raise ConfigError(
                f"{where}: model.backbone={model.backbone!r} is not accepted by {cls.name}; "
                "accepted: 'mlp' (Net2Net widens and deepens the hidden layers of an MLP)"
            )
        if not list(model.hidden):
            raise ConfigError(
                f"{where}: model.hidden=[] is not accepted by {cls.name}; expected at least "
                "one hidden layer to widen, or to add an identity layer after"
            )

    def build_model(self) -> nn.Module:
        """The configured MLP; ConfigError for any other backbone."""
        self.check_model(self.model_config, self.info, f"method {self.name}")
        return self._mlp(list(self.model_config.hidden))

    def _mlp(self, hidden: list[int]) -> MLP:
        inputs, dropout = math.prod(self.info.input_shape), self.model_config.dropout
        return MLP(inputs, hidden, self.info.num_classes, dropout)

    # ------------------------------------------------------------------ architecture
    def _linears(self) -> list[nn.Linear]:
        return [m for m in self.model.net if isinstance(m, nn.Linear)]

    def widths(self) -> list[int]:
        """The current hidden layer widths."""
        return [layer.out_features for layer in self._linears()[:-1]]

    def architecture(self) -> dict[str, Any]:
        """{"hidden": the current hidden widths}."""
        return {"hidden": self.widths()}

    def rebuild(self, architecture: dict[str, Any]) -> None:
        """Give the network the recorded hidden widths (an MLP of those widths; the weights
        are loaded afterwards)."""
        hidden = [int(w) for w in architecture["hidden"]]
        if hidden != self.widths():
            self.model.net = self._mlp(hidden).net.to(self.device)

    # ------------------------------------------------------------------ growth
    @torch.no_grad()
    def widen(self, layer: int, width: int) -> None:
        """Net2WiderNet: hidden layer ``layer`` gets ``width`` units; new units copy random
        existing ones, the next layer's outgoing weights are split among each copied group."""
        modules = list(self.model.net)
        positions = [i for i, m in enumerate(modules) if isinstance(m, nn.Linear)]
        incoming, outgoing = modules[positions[layer]], modules[positions[layer + 1]]
        n = incoming.out_features
        if width <= n:
            return
        device = incoming.weight.device
        copies = torch.randint(0, n, (width - n,), generator=self.generator)
        mapping = torch.cat([torch.arange(n), copies]).to(device)
        group_size = torch.bincount(mapping, minlength=n).to(incoming.weight.dtype)
        weight = incoming.weight[mapping]
        if self.hparams.noise > 0:
            scale = self.hparams.noise * incoming.weight.std().item()
            noise = torch.randn(width - n, weight.shape[1], generator=self.generator)
            weight[n:] += scale * noise.to(device, weight.dtype)
        modules[positions[layer]] = _linear_like(weight, incoming.bias[mapping])
        modules[positions[layer + 1]] = _linear_like(
            outgoing.weight[:, mapping] / group_size[mapping], outgoing.bias
        )
        self.model.net = nn.Sequential(*modules)

    @torch.no_grad()
    def deepen(self) -> None:
        """Net2DeeperNet: an identity Linear(h, h) + ReLU (+ Dropout, as the MLP builds every
        hidden block) below the output layer; the existing layers are kept as they are."""
        modules = list(self.model.net)
        output = len(modules) - 1
        width = modules[output].in_features
        device, dtype = modules[output].weight.device, modules[output].weight.dtype
        weight = torch.eye(width, device=device, dtype=dtype)
        if self.hparams.noise > 0:
            scale = self.hparams.noise * weight.std().item()
            noise = torch.randn(width, width, generator=self.generator)
            weight += scale * noise.to(device, dtype)
        block: list[nn.Module] = [
            _linear_like(weight, torch.zeros(width, device=device, dtype=dtype)),
            nn.ReLU(),
        ]
        if self.model_config.dropout > 0:
            block.append(nn.Dropout(self.model_config.dropout))
        self.model.net = nn.Sequential(*modules[:output], *block, modules[output])

    def grow(self, kind: str | None = None) -> bool:
        """Grow once by ``kind`` (default: the ``grow`` hyperparameter) within the limits;
        rebuild the optimizer and log the event (its kind: what actually changed). False when
        the limits left nothing to do."""
        kind = kind or self.hparams.grow
        limits = self.hparams
        before = self.widths()
        if kind in ("wider", "both"):
            for layer, width in enumerate(before):
                self.widen(layer, _expanded_width(width, limits.widen_factor, limits.max_width))
        widened = self.widths() != before
        deepened = kind in ("deeper", "both") and len(before) < limits.max_layers
        if deepened:
            self.deepen()
        if not (widened or deepened):
            return False
        after = self.widths()
        self.model.train(self.model.training)  # new modules take the network's mode
        self.model_grew()
        self.growth_log.append(
            {
                "task": self._task_id,
                "step": self._task_steps,
                "kind": "both" if widened and deepened else "wider" if widened else "deeper",
                "before": before,
                "after": after,
            }
        )
        return True

    # ------------------------------------------------------------------ triggers
    def before_task(self, task: Task) -> None:
        """Restart the plateau window; trigger=every: grow before every every_tasks-th task."""
        self._task_id = int(task.id)
        self._task_steps = 0
        self._growths_this_task = 0
        self._window = []
        k = self.tasks_learned
        if (
            self.hparams.trigger == "every"
            and k > 0
            and k % self.hparams.every_tasks == 0
            and self._every_grown_at != k
        ):
            self._every_grown_at = k
            self.grow()

    def loss(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The cross-entropy; trigger=plateau keeps its value for the window."""
        value = super().loss(x, y, t)
        if self.hparams.trigger == "plateau":
            self._last_loss = value.detach()
        return value

    def after_step(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> None:
        """trigger=plateau: add the step's loss to the window; grow on a plateau."""
        self._task_steps += 1
        if self.hparams.trigger != "plateau" or self._last_loss is None:
            return
        settings, patience = self.hparams, self.hparams.patience
        self._window.append(float(self._last_loss))
        self._last_loss = None
        if len(self._window) < 2 * patience:
            return
        self._window = self._window[-2 * patience :]
        previous = sum(self._window[:patience]) / patience
        recent = sum(self._window[patience:]) / patience
        plateau = (
            recent > (1 - settings.min_improvement) * previous and recent > settings.loss_threshold
        )
        if plateau and self._growths_this_task < settings.max_growths_per_task:
            self._window = []
            if self.grow():
                self._growths_this_task += 1

    # ------------------------------------------------------------------ state
    def method_state(self) -> dict[str, Any]:
        """The growth log, the triggers' bookkeeping and the plateau window."""
        return {
            "growth_log": [dict(event) for event in self.growth_log],
            "every_grown_at": self._every_grown_at,
            "task_id": self._task_id,
            "task_steps": self._task_steps,
            "growths_this_task": self._growths_this_task,
            "window": list(self._window),
        }

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`method_state` returned."""
        self.growth_log = [dict(event) for event in state["growth_log"]]
        self._every_grown_at = int(state["every_grown_at"])
        self._task_id = int(state["task_id"])
        self._task_steps = int(state["task_steps"])
        self._growths_this_task = int(state["growths_this_task"])
        self._window = [float(v) for v in state["window"]]
