"""Backbone networks, registered by name: an MLP and a small CNN, sized from a ModelConfig and
the stream's shape.

A backbone is a function ``(ModelConfig, StreamInfo) -> nn.Module`` registered with
:func:`register_backbone`; ``model.backbone`` accepts every registered name (the registry is
the list of choices, so a plugin's backbone is accepted, listed and validated like the
built-in ones)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from learners.hparams import ConfigError, hp
from task_streams.base import StreamInfo

BACKBONES: dict[str, Callable[[ModelConfig, StreamInfo], nn.Module]] = {}
"""name -> builder; ``model.backbone``'s accepted values (a live view: later registrations
count)"""


def register_backbone(
    name: str,
) -> Callable[[Callable[[ModelConfig, StreamInfo], nn.Module]], Callable]:
    """Decorator: ``@register_backbone("name")`` on a ``(ModelConfig, StreamInfo) ->
    nn.Module`` function makes ``model.backbone=name`` build it."""

    def decorate(builder: Callable[[ModelConfig, StreamInfo], nn.Module]) -> Callable:
        if name in BACKBONES and BACKBONES[name] is not builder:
            raise ValueError(f"backbone {name!r} is already registered")
        BACKBONES[name] = builder
        return builder

    return decorate


@dataclass
class ModelConfig:
    """Which network a learner trains."""

    backbone: str = hp("mlp", help="network family", choices=BACKBONES)
    hidden: list[int] = field(
        default_factory=lambda: [100, 100],
        metadata={
            "help": "MLP hidden layer widths",
            "low": None,
            "high": None,
            "choices": None,
            "search": None,
            "log": False,
        },
    )
    cnn_channels: list[int] = field(
        default_factory=lambda: [32, 64],
        metadata={
            "help": "CNN conv channels, one 3x3 conv + 2x2 max-pool per entry",
            "low": None,
            "high": None,
            "choices": None,
            "search": None,
            "log": False,
        },
    )
    cnn_fc: int = hp(128, help="CNN fully connected width before the classifier", low=1)
    dropout: float = hp(
        0.0, help="dropout before each hidden activation's successor", low=0.0, high=0.9
    )

    def __post_init__(self) -> None:
        for name in ("hidden", "cnn_channels"):
            widths = getattr(self, name)
            if any(int(w) < 1 for w in widths):
                raise ConfigError(
                    f"model.{name}={list(widths)} is not accepted; "
                    "expected a list of positive integers"
                )


class MLP(nn.Module):
    """Fully connected ReLU network on flattened inputs."""

    def __init__(self, input_size: int, hidden: list[int], num_classes: int, dropout: float):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = input_size
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Conv(3x3)+ReLU+MaxPool blocks, then one hidden fully connected layer."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        channels: list[int],
        fc: int,
        num_classes: int,
        dropout: float,
    ):
        super().__init__()
        in_ch, height, width = input_shape
        blocks: list[nn.Module] = []
        for ch in channels:
            blocks += [nn.Conv2d(in_ch, ch, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            in_ch, height, width = ch, height // 2, width // 2
            if height < 1 or width < 1:
                raise ValueError(
                    f"model.cnn_channels={channels} pools a {input_shape} input "
                    "below 1x1; use fewer conv blocks"
                )
        head: list[nn.Module] = [nn.Flatten(), nn.Linear(in_ch * height * width, fc), nn.ReLU()]
        if dropout > 0:
            head.append(nn.Dropout(dropout))
        head.append(nn.Linear(fc, num_classes))
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_backbone("mlp")
def _mlp(config: ModelConfig, info: StreamInfo) -> nn.Module:
    return MLP(math.prod(info.input_shape), list(config.hidden), info.num_classes, config.dropout)


@register_backbone("cnn")
def _cnn(config: ModelConfig, info: StreamInfo) -> nn.Module:
    if len(info.input_shape) != 3:
        raise ValueError(f"the cnn backbone needs (C, H, W) inputs, got {info.input_shape}")
    return SmallCNN(
        tuple(info.input_shape),
        list(config.cnn_channels),
        config.cnn_fc,
        info.num_classes,
        config.dropout,
    )


def build_backbone(config: ModelConfig, info: StreamInfo) -> nn.Module:
    """Build the network named by ``config`` for the stream described by ``info``."""
    builder = BACKBONES.get(config.backbone)
    if builder is None:
        raise ConfigError(
            f"model.backbone={config.backbone!r} is unknown; accepted: {', '.join(BACKBONES)}"
        )
    return builder(config, info)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(number of parameters, bytes they occupy)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)
