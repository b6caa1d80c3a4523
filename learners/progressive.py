"""Progressive Neural Networks (Rusu et al., 2016, "Progressive Neural Networks", arXiv:1606.04671).

One column (a network shaped like the configured backbone) per task. When task k starts, the
columns of the earlier tasks are frozen and column k is added; its layer i receives, besides
its own previous activation, the same-depth activations of every earlier column through
lateral connections (the paper's eq. 1, linear laterals):

    h_i^(k) = f( W_i^(k) h_{i-1}^(k) + Σ_{j<k} U_i^(k:j) h_{i-1}^(j) )

for every layer after the first, the output layer included (h_0 = x is the same for every
column, so the first layer has no laterals). Only column k and its laterals are trained on
task k, so the earlier columns, and therefore every earlier task's answers, stay bit-for-bit
what they were when that task finished: no forgetting (BWT = 0 exactly), at the price of a
network that grows with the number of tasks (one column plus k lateral sets for task k; the
parameter count is what ``resources()`` reports, laterals included).

Columns mirror the backbone (``model.backbone``):

- ``mlp``: Linear layers with ReLU (and ``model.dropout`` after each ReLU); the laterals are
  Linear maps from the earlier columns' hidden activations.
- ``cnn``: the SmallCNN's stages, 3x3 conv + ReLU + 2x2 max-pool per ``model.cnn_channels``
  entry, then a fully connected layer of ``model.cnn_fc`` units and the output layer; laterals
  into a conv stage are 3x3 convolutions (same padding) of the earlier columns' pooled feature
  maps, laterals into the fully connected layers are Linear maps of the flattened ones.

Any other backbone is refused with a ConfigError (``check_model``, and ``build_model`` when
built directly). Each column has its own output layer over all ``num_classes`` units; the
task-incremental class mask selects the task's units.

Which column answers: task t's samples, in training and at test time, go through column t
(task ids are positions in the stream, so column t is the one added when task t started).
A task id beyond the newest column, i.e. a task not learned yet (the R matrix's entries above
the diagonal), is answered by the newest column. Hence the task-incremental scenario only:
the task identity picks the column.

Choices and deviations from the paper:

- Laterals have no bias (the layer's own W_i^(k) has one) and the default PyTorch init; the
  paper's non-linear adapters (a learned scale and a projection, used for its Atari columns)
  are not used: ``lateral="linear"`` is eq. 1, ``lateral="none"`` removes the laterals
  (independent columns, the paper's "baseline 1"-like ablation).
- Frozen columns always run in eval mode (no dropout), so the features a new column reads from
  them are the ones the old column answers its own task with.
- A new column's initial weights are drawn with the learner's generator (same seed, same
  columns; resuming from a checkpoint draws the same ones). Column 0 is built with the
  learner's seeded global generator, like every backbone.
- Nothing is stored besides ``self.model``: columns and laterals are model parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from learners.backbones import ModelConfig
from learners.base import Learner, register
from learners.hparams import ConfigError, hp
from task_streams.base import StreamInfo, Task

LATERALS = ("linear", "none")
BACKBONES = ("mlp", "cnn")


@dataclass
class ProgressiveHParams:
    """Hyperparameters of Progressive Neural Networks."""

    lateral: str = hp(
        "linear",
        help="lateral connections from earlier columns: linear (the paper's U·h) or none "
        "(independent columns)",
        choices=LATERALS,
        search=list(LATERALS),  # a list: categorical (a 2-tuple would be a range)
    )


@dataclass(frozen=True)
class Stage:
    """One weighted layer of a column: a 3x3 conv (then ReLU and 2x2 max-pool) or a linear
    layer (then ReLU and dropout, except the output layer)."""

    kind: str  # "conv" or "linear"
    fan_in: int  # input channels or features
    fan_out: int  # output channels or features
    output: bool = False


def column_stages(config: ModelConfig, info: StreamInfo, where: str = "") -> list[Stage]:
    """The stages of one column for ``config``'s backbone; ConfigError for other backbones."""
    prefix = f"{where}: " if where else ""
    if config.backbone == "mlp":
        width, stages = math.prod(info.input_shape), []
        for h in config.hidden:
            stages.append(Stage("linear", width, int(h)))
            width = int(h)
    elif config.backbone == "cnn":
        if len(info.input_shape) != 3:
            raise ConfigError(
                f"{prefix}model.backbone='cnn' needs (C, H, W) inputs, got {info.input_shape}"
            )
        channels, height, width = info.input_shape
        stages = []
        for ch in config.cnn_channels:
            stages.append(Stage("conv", channels, int(ch)))
            channels, height, width = int(ch), height // 2, width // 2
            if height < 1 or width < 1:
                raise ConfigError(
                    f"{prefix}model.cnn_channels={list(config.cnn_channels)} pools a "
                    f"{tuple(info.input_shape)} input below 1x1; use fewer conv blocks"
                )
        stages.append(Stage("linear", channels * height * width, config.cnn_fc))
        width = config.cnn_fc
    else:
        raise ConfigError(
            f"{prefix}model.backbone={config.backbone!r} is not accepted by progressive "
            f"(it grows one column per task and knows how to build columns and laterals for "
            f"these only); accepted: {', '.join(BACKBONES)}"
        )
    return [*stages, Stage("linear", width, info.num_classes, output=True)]


def _layer(stage: Stage, bias: bool = True) -> nn.Module:
    if stage.kind == "conv":
        return nn.Conv2d(stage.fan_in, stage.fan_out, 3, padding=1, bias=bias)
    return nn.Linear(stage.fan_in, stage.fan_out, bias=bias)


class Column(nn.Module):
    """One task's network: the stages' layers plus, for each stage after the first, one
    lateral layer per earlier column (``laterals[i][j]`` feeds column j's activation after
    stage i-1 into stage i)."""

    def __init__(self, stages: list[Stage], earlier: int, dropout: float):
        super().__init__()
        self.stages = stages
        self.layers = nn.ModuleList(_layer(s) for s in stages)
        self.laterals = nn.ModuleList(
            nn.ModuleList(_layer(s, bias=False) for _ in range(earlier if i > 0 else 0))
            for i, s in enumerate(stages)
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(
        self, x: torch.Tensor, earlier: list[list[torch.Tensor]]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(output, activations after each hidden stage); ``earlier[j]`` is column j's list."""
        h, hidden = x, []
        for i, (stage, layer) in enumerate(zip(self.stages, self.layers, strict=True)):
            z = layer(h.flatten(1) if stage.kind == "linear" else h)
            for j, lateral in enumerate(self.laterals[i]):
                inp = earlier[j][i - 1]
                z = z + lateral(inp.flatten(1) if stage.kind == "linear" else inp)
            if stage.output:
                return z, hidden
            h = F.max_pool2d(z.relu(), 2) if stage.kind == "conv" else self.dropout(z.relu())
            hidden.append(h)
        raise AssertionError("a column ends with its output stage")


class ProgressiveNet(nn.Module):
    """The columns; ``forward(x, column)`` answers with one column (the newest by default)."""

    def __init__(self, stages: list[Stage], dropout: float, lateral: bool):
        super().__init__()
        self.stages, self.dropout, self.lateral = stages, dropout, lateral
        self.columns = nn.ModuleList([Column(stages, 0, dropout)])

    def add_column(self) -> Column:
        """Freeze every column and add a new, trainable one with laterals from all of them."""
        for p in self.parameters():
            p.requires_grad_(False)
        earlier = len(self.columns) if self.lateral else 0
        column = Column(self.stages, earlier, self.dropout)
        self.columns.append(column)
        self.train(self.training)
        return column

    def train(self, mode: bool = True) -> ProgressiveNet:
        """Set the mode of the newest column; frozen columns stay in eval mode."""
        super().train(mode)
        for column in self.columns[:-1]:
            column.eval()
        return self

    def forward(self, x: torch.Tensor, column: int | None = None) -> torch.Tensor:
        k = len(self.columns) - 1 if column is None else column
        if not self.lateral:
            return self.columns[k](x, [])[0]
        activations: list[list[torch.Tensor]] = []
        for j in range(k):
            activations.append(self.columns[j](x, activations)[1])
        return self.columns[k](x, activations)[0]


@register("progressive")
class Progressive(Learner):
    """One frozen column per learned task, a new column with lateral inputs for each new task."""

    HParams = ProgressiveHParams
    SCENARIOS = ("task",)
    SCENARIO_NOTE = "the task identity picks the column that answers"

    @classmethod
    def check_model(cls, model: ModelConfig, info: StreamInfo, where: str) -> None:
        """ConfigError for a backbone other than mlp or cnn (or a CNN the input cannot fit)."""
        column_stages(model, info, where)

    def build_model(self) -> nn.Module:
        """Column 0, shaped like the configured backbone."""
        stages = column_stages(self.model_config, self.info, f"method {self.name}")
        return ProgressiveNet(stages, self.model_config.dropout, self.hparams.lateral == "linear")

    @property
    def num_columns(self) -> int:
        return len(self.model.columns)

    def _add_column(self) -> None:
        """A new column whose initial weights come from the learner's generator."""
        seed = int(torch.randint(2**62, (1,), generator=self.generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model.add_column()

    def architecture(self) -> dict[str, Any]:
        """{"columns": n}."""
        return {"columns": self.num_columns}

    def rebuild(self, architecture: dict[str, Any]) -> None:
        """Add columns (freezing the earlier ones, as training does) until there are n."""
        n = int(architecture["columns"])
        if n < self.num_columns:
            raise ValueError(f"cannot rebuild {n} columns: this network has {self.num_columns}")
        while self.num_columns < n:
            self._add_column()

    def before_task(self, task: Task) -> None:
        """Task t > 0: freeze the columns and add column t (once: a retried task reuses it)."""
        if self.num_columns <= task.id:
            while self.num_columns <= task.id:
                self._add_column()
            self.model_grew()

    def logits(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Each sample through its task's column (the newest for a task not learned yet),
        outside its task's classes masked."""
        newest = self.num_columns - 1
        if task_ids is None:
            return self.model(x)
        columns = task_ids.clamp(max=newest)
        first = int(columns[0]) if columns.numel() else newest
        if bool((columns == first).all()):
            out = self.model(x, first)
        else:
            out = x.new_empty(x.shape[0], self.info.num_classes)
            for k in columns.unique().tolist():
                rows = columns == k
                out[rows] = self.model(x[rows], k)
        if self.class_mask is not None:
            out = out.masked_fill(~self.class_mask[task_ids], float("-inf"))
        return out
