"""The Learner contract, its one training loop, the training config and the registry.

A method subclasses :class:`Learner` and overrides only the steps it changes:

- ``training_data(task)``   what the task's batches are drawn from (joint: all data so far)
- ``augment_batch(x, y, t)`` what is added to each batch (replay: buffer samples)
- ``loss(x, y, t)``          the objective (EWC: cross-entropy + penalty)
- ``after_backward(...)``    gradient surgery between backward() and step() (GEM)
- ``after_step(x, y, t)``    bookkeeping on the incoming batch (replay: reservoir insert)
- ``before_task`` / ``after_task``  per-task work (EWC: Fisher estimate)
- ``method_state`` / ``load_method_state``  everything extra needed to resume
- ``predict(x, task_id)``   what the method answers (iCaRL: nearest mean of exemplars)

Growing networks (``learners/progressive.py``, ``expert_gate.py``, ``net2net.py``,
``packnet.py``, ``expanding_head.py``) also use:

- ``build_model()``          the network at the start (the configured backbone by default)
- ``architecture()``         a record of how the network has grown (columns, widths, head
                             groups): plain numbers, strings, lists and dicts
- ``rebuild(architecture)``  grow a freshly built network to match a record, before weights load
- ``model_grew()``           call after adding, replacing or freezing parameters: the optimizer
                             is rebuilt over the current trainable parameters, keeping the state
                             (momentum, Adam moments) of those that survived

Resume order (``load_state_dict``): the architecture is rebuilt first, then the method state,
then the weights, then the optimizer (rebuilt over the rebuilt network, then its state), then
the random generators. A method can rely on the grown network existing when its
``load_method_state`` runs.

Class attributes: ``HParams`` (the hyperparameter dataclass, ``hp()`` fields) and
``SCENARIOS`` (the scenarios the method supports; others are refused before any work, with
``SCENARIO_NOTE`` saying why). A hook that trains something besides the model for a while (a
generator, an exemplar pass) calls :meth:`Learner.check_stop` now and then, so a stop request
reaches it as it reaches the loop.

Weight decay: SGD and Adam add ``weight_decay · θ`` to the gradient inside ``step()``, i.e.
after ``after_backward``. A method whose gradient surgery must see the whole update (GEM,
A-GEM) folds the decay into the gradient itself, before its projection, and builds its
optimizer without it (see ``learners/gem.py``).
"""

from __future__ import annotations

import dataclasses
import random
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from learners.backbones import ModelConfig, build_backbone, count_parameters
from learners.hparams import ConfigError, as_dict, build_dataclass, hp
from learners.meta import MetaTrainingConfig, Phase
from task_streams.base import StreamInfo, Task

OPTIMIZERS = ("sgd", "adam")
SCENARIOS = ("task", "domain", "class")
STATE_FORMAT = 1


@dataclass
class TrainConfig:
    """How every learner trains on a task."""

    epochs: int = hp(1, help="passes over each task's training data", low=1)
    batch_size: int = hp(10, help="samples per gradient step from the current task", low=1)
    optimizer: str = hp("sgd", help="optimizer", choices=OPTIMIZERS)
    lr: float = hp(0.1, help="learning rate", gt=0.0, search=(1e-4, 0.5), log=True)
    momentum: float = hp(0.0, help="SGD momentum", low=0.0, high=1.0)
    weight_decay: float = hp(0.0, help="L2 weight decay", low=0.0)
    reset_optimizer: bool = hp(False, help="rebuild the optimizer (fresh state) at each task")
    eval_batch_size: int = hp(2048, help="samples per forward pass when evaluating", low=1)
    eval_every_steps: int = hp(
        0,
        help="also evaluate every task every N gradient steps during training (continual "
        "evaluation: accuracy during training, the stability gap, min-ACC); 0 = off",
        low=0,
    )


class TrainingStopped(RuntimeError):
    """learn() was asked to stop between batches; the task was not finished."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite during a task."""


@dataclass
class NoHParams:
    """Hyperparameters of a method that has none of its own."""


LEARNERS: dict[str, type[Learner]] = {}


def register(name: str) -> Callable[[type[Learner]], type[Learner]]:
    """Class decorator: make a Learner subclass available under ``name``."""

    def decorate(cls: type[Learner]) -> type[Learner]:
        if name in LEARNERS and LEARNERS[name] is not cls:
            raise ValueError(f"learner name {name!r} is already registered")
        cls.name = name
        LEARNERS[name] = cls
        return cls

    return decorate


EXTENSIONS: dict[str, type] = {}
"""name -> mixin class that adds a capability to other methods (``<method>+<extension>``)"""
_COMPOSED: dict[str, type[Learner]] = {}


def register_extension(name: str) -> Callable[[type], type]:
    """Class decorator: make a mixin available as ``<method>+name`` (e.g. ``ewc+expanding_head``).

    The mixin comes first in the composed class's bases, so its hooks run before the method's
    and reach it with ``super()``; its ``HParams`` fields join the method's (one dataclass,
    validated as usual). A classmethod ``check_base(base)`` raises ConfigError for a method the
    extension cannot be combined with.
    """

    def decorate(mixin: type) -> type:
        if name in EXTENSIONS and EXTENSIONS[name] is not mixin:
            raise ValueError(f"extension name {name!r} is already registered")
        mixin.extension_name = name
        EXTENSIONS[name] = mixin
        return mixin

    return decorate


def _merged_hparams(name: str, first: type, second: type) -> type:
    """One hyperparameter dataclass with the fields of both (types resolved; no clashes)."""
    fields: list[tuple[str, Any, Any]] = []
    seen: set[str] = set()
    for cls in (first, second):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in seen:
                raise ConfigError(f"method {name}: both parts have a hyperparameter {f.name!r}")
            seen.add(f.name)
            if f.default_factory is not dataclasses.MISSING:
                spec = dataclasses.field(default_factory=f.default_factory, metadata=f.metadata)
            else:
                spec = dataclasses.field(default=f.default, metadata=f.metadata)
            fields.append((f.name, hints[f.name], spec))
    merged = dataclasses.make_dataclass(f"{first.__name__}_{second.__name__}", fields)
    merged.__module__ = first.__module__
    merged.__doc__ = f"Hyperparameters of {name}."
    return merged


def _compose(name: str) -> type[Learner]:
    base_name, _, ext_name = name.partition("+")
    base = learner_class(base_name)
    if ext_name not in EXTENSIONS:
        accepted = ", ".join(f"<method>+{e}" for e in sorted(EXTENSIONS)) or "(none)"
        raise ConfigError(f"unknown method {name!r}: {ext_name!r} is not an extension; "
                          f"accepted combinations: {accepted}")  # fmt: skip
    mixin = EXTENSIONS[ext_name]
    check = getattr(mixin, "check_base", None)
    if check is not None:
        check(base, name)
    allowed = getattr(mixin, "EXTENSION_SCENARIOS", SCENARIOS)
    attrs = {
        "HParams": _merged_hparams(name, base.HParams, mixin.HParams),
        "SCENARIOS": tuple(s for s in base.SCENARIOS if s in allowed),
        "__module__": mixin.__module__,
        "__doc__": f"{base.__name__} with {mixin.__name__}: {(mixin.__doc__ or '').strip()}",
    }
    cls = type(f"{base.__name__}_{mixin.__name__}", (mixin, base), attrs)
    cls.name = name
    return cls


def learner_class(name: str) -> type[Learner]:
    """The Learner class called ``name``: a registered method, or ``<method>+<extension>``
    composed on first use; ConfigError listing the valid names if unknown."""
    if name in LEARNERS:
        return LEARNERS[name]
    if "+" in name:
        if name not in _COMPOSED:
            _COMPOSED[name] = _compose(name)
        return _COMPOSED[name]
    combos = f"; or <method>+<extension> with {', '.join(sorted(EXTENSIONS))}" if EXTENSIONS else ""
    raise ConfigError(
        f"unknown method {name!r}; accepted methods: {', '.join(sorted(LEARNERS))}{combos}"
    )


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (
            n["name"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class Learner:
    """A continual learner: sees tasks one at a time, predicts on any task seen or not."""

    name: ClassVar[str] = "learner"
    HParams: ClassVar[type] = NoHParams
    SCENARIOS: ClassVar[tuple[str, ...]] = SCENARIOS
    """the scenarios this method supports (task, domain, class)"""
    SCENARIO_NOTE: ClassVar[str] = ""
    """why the others are not supported (printed when one is refused)"""
    TRAINS_ON_STREAM: ClassVar[bool] = True
    """the method takes gradient steps on the stream's tasks (the ``train`` section applies);
    False for a method whose weights are fixed before the stream (lstm_meta)"""
    FIXED_NETWORK: ClassVar[bool] = False
    """the method keeps state shaped by the network's parameters or outputs (stored logits,
    gradient memories), so the network must not grow (``+expanding_head`` refuses it)"""
    META_TRAINED: ClassVar[bool] = False
    """the method has a phase before the stream configured by the ``meta_training`` section
    (:meth:`phase`); its runs' configurations then include that section"""

    @classmethod
    def check_scenario(cls, scenario: str, where: str = "") -> None:
        """ConfigError when ``scenario`` is not one of :attr:`SCENARIOS`."""
        if scenario not in cls.SCENARIOS:
            note = f" ({cls.SCENARIO_NOTE})" if cls.SCENARIO_NOTE else ""
            raise ConfigError(
                f"{where or 'method ' + cls.name}: {cls.name} does not support the "
                f"{scenario}-incremental scenario{note}; supported: {', '.join(cls.SCENARIOS)}"
            )

    def __init__(
        self,
        info: StreamInfo,
        hparams: Any = None,
        model: ModelConfig | None = None,
        train: TrainConfig | None = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
        meta: MetaTrainingConfig | None = None,
    ):
        if hparams is None or isinstance(hparams, dict):
            hparams = build_dataclass(self.HParams, hparams, prefix=f"methods.{self.name}.")
        self.check_scenario(info.scenario)
        self.info = info
        self.hparams = hparams
        self.model_config = model or ModelConfig()
        self.train_config = train or TrainConfig()
        self.meta_config = meta or MetaTrainingConfig()
        self.device = torch.device(device)
        self.seed = int(seed)
        torch.manual_seed(self.seed)
        np.random.seed(self.seed % 2**32)
        random.seed(self.seed)
        self.model = self.build_model().to(self.device)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.class_mask = info.class_mask().to(self.device) if info.scenario == "task" else None
        self.optimizer = self.make_optimizer()
        self.tasks_learned = 0
        self._should_stop: Callable[[], bool] | None = None
        self.step_hook: Callable[[int], None] | None = None
        """called with the task's step count after each gradient step of the base loop (the
        continual evaluation of ``train.eval_every_steps``; see learners/evaluation.py)"""

    @classmethod
    def check_setup(
        cls,
        info: StreamInfo,
        meta: MetaTrainingConfig,
        where: str = "",
        model: ModelConfig | None = None,
    ) -> None:
        """ConfigError when this method cannot run on a stream described by ``info`` with these
        settings (beyond the scenario); called before any work. By default: the ``model``
        section, through :meth:`check_model`."""
        cls.check_model(model or ModelConfig(), info, where or f"method {cls.name}")

    @classmethod
    def check_model(cls, model: ModelConfig, info: StreamInfo, where: str) -> None:
        """ConfigError (prefixed with ``where``) when this method cannot build its network from
        ``model`` for this stream, e.g. a backbone a growing method cannot grow. Nothing by
        default."""

    # ----------------------------------------------------------------- building blocks
    def build_model(self) -> nn.Module:
        """The network this learner trains: the configured backbone, sized for the stream."""
        return build_backbone(self.model_config, self.info)

    def architecture(self) -> dict[str, Any]:
        """How this learner's network has grown since :meth:`build_model` (columns, widths, head
        groups), enough for :meth:`rebuild` on a fresh learner; {} for a fixed network."""
        return {}

    def rebuild(self, architecture: dict[str, Any]) -> None:
        """Grow the freshly built network to match ``architecture`` (from :meth:`architecture`);
        the weights are loaded afterwards. Nothing to do for a fixed network."""

    def model_grew(self) -> None:
        """Call after the network's parameters changed (added, replaced, frozen or unfrozen):
        moves it to the learner's device and rebuilds the optimizer over the current trainable
        parameters. Parameters that survived keep their optimizer state (momentum, Adam's
        moments); new ones start fresh."""
        self.model.to(self.device)
        old = self.optimizer
        self.optimizer = self.make_optimizer()
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p in old.state:
                    self.optimizer.state[p] = old.state[p]

    def phase(self) -> Phase | None:
        """Work to do before the stream (meta-training: ``learners/meta.py``), or None. The
        runner runs it, cached by its own key, before the first task."""
        return None

    def make_optimizer(self) -> torch.optim.Optimizer:
        """A fresh optimizer over the model's current parameters."""
        cfg = self.train_config
        params = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def logits(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Network outputs; task-incremental streams mask units outside each sample's task."""
        out = self.model(x)
        if self.class_mask is not None and task_ids is not None:
            out = out.masked_fill(~self.class_mask[task_ids], float("-inf"))
        return out

    def check_stop(self, where: str = "") -> None:
        """Raise TrainingStopped if the run was asked to stop (between batches of the loop,
        and wherever a hook that trains something else calls it)."""
        if self._should_stop is not None and self._should_stop():
            raise TrainingStopped(f"stopped{' ' + where if where else ''}")

    # ----------------------------------------------------------------- overridable steps
    def before_task(self, task: Task) -> None:
        """Called once before training on ``task``."""

    def training_data(self, task: Task) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, y, task ids) the task's batches are drawn from."""
        task_ids = torch.full_like(task.y_train, task.id)
        return task.x_train, task.y_train, task_ids

    def augment_batch(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor):
        """Extend a batch of the current task (replay adds stored samples)."""
        return x, y, t

    def loss(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The training objective for one batch."""
        return F.cross_entropy(self.logits(x, t), y)

    def after_backward(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> None:
        """Between backward() and optimizer.step(): gradient surgery goes here."""

    def after_step(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> None:
        """After each step, with the incoming (un-augmented) batch."""

    def after_task(self, task: Task) -> None:
        """Called once after training on ``task``."""

    def method_state(self) -> dict[str, Any]:
        """Method-specific state needed to resume (tensors, numbers, strings, lists, dicts)."""
        return {}

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`method_state` returned."""

    def stored_memory(self) -> dict[str, int]:
        """What the method keeps besides the model: samples and bytes."""
        return {"stored_samples": 0, "stored_bytes": 0}

    # ----------------------------------------------------------------- the loop
    def learn(self, task: Task, should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Train on one task; checks ``should_stop`` between batches (raises TrainingStopped)."""
        cfg = self.train_config
        if cfg.reset_optimizer and self.tasks_learned > 0:
            self.optimizer = self.make_optimizer()
        self.model.train()
        self._should_stop = should_stop
        try:
            return self._learn(task)
        finally:
            self._should_stop = None

    def _learn(self, task: Task) -> dict[str, Any]:
        cfg = self.train_config
        self.before_task(task)
        x_all, y_all, t_all = self.training_data(task)
        n = int(y_all.shape[0])
        steps = 0
        loss = None
        for epoch in range(cfg.epochs):
            order = torch.randperm(n, generator=self.generator).to(x_all.device)
            for start in range(0, n, cfg.batch_size):
                self.check_stop(f"during task {task.name!r} after {steps} steps")
                idx = order[start : start + cfg.batch_size]
                x, y, t = x_all[idx], y_all[idx], t_all[idx]
                xb, yb, tb = self.augment_batch(x, y, t)
                self.optimizer.zero_grad(set_to_none=True)
                loss = self.loss(xb, yb, tb)
                loss.backward()
                self.after_backward(xb, yb, tb)
                self.optimizer.step()
                self.after_step(x, y, t)
                steps += 1
                if self.step_hook is not None:
                    self.step_hook(steps)
            # Once weights are NaN every later loss is too, so the epoch's last loss tells; one
            # check per epoch keeps device syncs out of the hot loop.
            if loss is not None and not bool(torch.isfinite(loss.detach())):
                raise TrainingDiverged(
                    f"the loss became NaN/inf during task {task.name!r} (epoch {epoch + 1}); "
                    f"lower train.lr (now {cfg.lr}) or the method's regularisation strength"
                )
        self.model.eval()
        self.after_task(task)
        self.tasks_learned += 1
        return {"steps": steps, "train_samples": n}

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id: int | None = None) -> torch.Tensor:
        """Predicted class labels for ``x``; task-incremental streams need ``task_id``."""
        if self.class_mask is not None and task_id is None:
            raise ValueError("this is a task-incremental stream: predict() needs task_id")
        was_training = self.model.training
        self.model.eval()
        out = []
        bs = self.train_config.eval_batch_size
        for start in range(0, x.shape[0], bs):
            chunk = x[start : start + bs]
            t = None
            if task_id is not None and self.class_mask is not None:
                t = torch.full((chunk.shape[0],), task_id, dtype=torch.long, device=chunk.device)
            out.append(self.logits(chunk, t).argmax(dim=1))
        self.model.train(was_training)
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=x.device)

    # ----------------------------------------------------------------- resources
    def resources(self) -> dict[str, int]:
        """Model size and stored memory, counted."""
        n_params, n_bytes = count_parameters(self.model)
        return {"model_parameters": n_params, "model_bytes": n_bytes, **self.stored_memory()}

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after the last learned task; loads with weights_only."""
        return {
            "format": STATE_FORMAT,
            "learner": self.name,
            "hparams": as_dict(self.hparams),
            "architecture": {"model": as_dict(self.model_config), "growth": self.architecture()},
            "tasks_learned": self.tasks_learned,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "rng": _rng_state(),
            "method": self.method_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict` of the same method, in the order the
        module docstring gives: architecture, method state, weights, optimizer, generators."""
        if state.get("learner") != self.name:
            raise ValueError(f"state is for learner {state.get('learner')!r}, not {self.name!r}")
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"state format {state.get('format')} is not {STATE_FORMAT}")
        growth = (state.get("architecture") or {}).get("growth") or {}
        if growth:
            self.rebuild(growth)
            self.model.to(self.device)
        self.load_method_state(state["method"])
        self.model.load_state_dict(state["model"])
        self.optimizer = self.make_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        _set_rng_state(state["rng"])
        self.tasks_learned = int(state["tasks_learned"])


def build_learner(
    name: str,
    info: StreamInfo,
    hparams: dict[str, Any] | Any = None,
    model: ModelConfig | None = None,
    train: TrainConfig | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    meta: MetaTrainingConfig | None = None,
) -> Learner:
    """Instantiate the learner registered as ``name`` (hyperparameters validated)."""
    cls = learner_class(name)
    if hparams is None or isinstance(hparams, dict):
        hparams = build_dataclass(cls.HParams, hparams, prefix=f"methods.{name}.")
    return cls(info, hparams, model=model, train=train, device=device, seed=seed, meta=meta)
