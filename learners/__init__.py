"""Continual learners in plain PyTorch: the Learner contract, backbones and one file per method.

Importing this package registers every method module in it (``learners/<method>.py`` files
that use ``@register``), so adding a method is adding a file.
"""

import importlib
import pkgutil

from learners.backbones import BACKBONES, ModelConfig, register_backbone
from learners.base import (
    EXTENSIONS,
    LEARNERS,
    Learner,
    TrainConfig,
    TrainingDiverged,
    TrainingStopped,
    build_learner,
    learner_class,
    register,
    register_extension,
)
from learners.hparams import ConfigError, hp
from learners.meta import MetaTrainingConfig, run_phase

_NOT_METHODS = {"base", "backbones", "hparams", "metrics", "evaluation", "meta"}

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _NOT_METHODS and not _module.name.startswith("_"):
        importlib.import_module(f"learners.{_module.name}")

__all__ = [
    "BACKBONES",
    "EXTENSIONS",
    "LEARNERS",
    "ConfigError",
    "Learner",
    "MetaTrainingConfig",
    "ModelConfig",
    "TrainConfig",
    "TrainingDiverged",
    "TrainingStopped",
    "build_learner",
    "hp",
    "learner_class",
    "register",
    "run_phase",
    "register_backbone",
    "register_extension",
]
