"""The LSTM meta-learner: an LSTM that learns at inference time from feedback in its hidden state.

The source's idea (Hochreiter, Younger & Conwell 2001; Santoro et al. 2016): an LSTM whose
weights are fixed by meta-training (its "instinct") is shown a new task's samples one at a
time, each followed by its ground truth, and gets better at the task with **no weight
update** — what it learns lives in its hidden state.

The interface keeps the source's two kinds of step:

- an **input step** sees the input x and no feedback; its output is the prediction o;
- a **feedback step** sees the ground truth y (one-hot for classification, the value for
  regression) and no input. Each sample gets ``feedback_steps`` identical feedback steps
  (the source's "for i in 0..n" exposures).

A step's vector is [x, feedback, is_feedback]; the prediction for sample i is read out at its
input step, which comes before its feedback, so no ground truth can leak into the prediction
it is scored on.

**Meta-training** (:class:`MetaTraining`, a :class:`learners.meta.Phase` configured by the
``meta_training`` section): Adam on the **prequential loss** — the mean over an episode of the
loss on each *new* input before its feedback arrives — by truncated backpropagation through
time (``truncation`` samples per chunk, the state carried across chunks with the gradient
cut). Not on "Loss_0 − Loss_n", which is maximised by making Loss_0 huge (a prototype here
reached ~2×10^5), and never by re-showing an input after its label (that measures copying).
The loss on each episode's first sample (Loss_0) and on its last (Loss_n) are logged beside
it as diagnostics only (``meta_training.first_loss`` / ``.last_loss``).

**As a learner** (``lstm_meta``): ``learn(task)`` feeds ``samples_per_task`` (by default
``meta_training.episode_length``: the task length it learned to learn from) of the task's
training samples (input step, then feedback steps), in a random order drawn with the learner's
generator, and changes no weight; the hidden state carries over from task to task (no reset).
``predict`` answers every query from a snapshot of that state: one input step each, batched,
with no feedback, and no query's state reaches another's. The run's seed changes which
samples are fed and their order; the meta-trained weights depend on ``meta_training`` only
(seed included), so runs of several seeds share one meta-training (``learners/meta.py``).
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
from learners.hparams import ConfigError, as_dict, hp
from learners.meta import MetaTrainingConfig, Phase
from task_streams.base import StreamInfo, Task
from task_streams.families import Episodes, TaskFamily, build_family

FEEDBACK_MODES = ("given", "withheld", "shuffled")


@dataclass
class LSTMMetaHParams:
    """Hyperparameters of the LSTM meta-learner (its meta-training: the meta_training section)."""

    hidden: int = hp(128, help="LSTM hidden units per layer", low=1, search=(32, 512), log=True)
    layers: int = hp(1, help="stacked LSTM layers", low=1, high=4, search=(1, 3))
    feedback_steps: int = hp(
        1, help="feedback steps after each input (exposures to its ground truth)", low=1,
        high=8, search=(1, 3),
    )  # fmt: skip
    samples_per_task: int = hp(
        0,
        help="training samples of each task fed with feedback at learn(); 0 = "
        "meta_training.episode_length, the task length it was meta-trained on (measured on "
        "split digits: 30 gives ACC 80%, 10 or 60 fall to 13-32%)",
        low=0,
    )


PHASE_HPARAMS = ("hidden", "layers", "feedback_steps")
"""the hyperparameters meta-training depends on (samples_per_task is deployment only)"""


class FeedbackLSTM(nn.Module):
    """An LSTM over input and feedback steps, with a linear readout at input steps."""

    def __init__(self, input_size: int, num_outputs: int, hidden: int, layers: int, kind: str):
        super().__init__()
        self.input_size, self.num_outputs, self.kind = int(input_size), int(num_outputs), kind
        self.lstm = nn.LSTM(self.input_size + self.num_outputs + 1, hidden, layers,
                            batch_first=True)  # fmt: skip
        self.readout = nn.Linear(hidden, self.num_outputs)

    def feedback(self, y: torch.Tensor) -> torch.Tensor:
        """The ground truth as a feedback vector: one-hot labels, or the regression value."""
        if self.kind == "classification":
            return F.one_hot(y.long(), self.num_outputs).to(torch.float32)
        return y.to(torch.float32).unsqueeze(-1)

    def steps(
        self, x: torch.Tensor, y: torch.Tensor | None, feedback_steps: int, mode: str = "given"
    ) -> torch.Tensor:
        """(B, T, *in) inputs and (B, T) ground truths -> (B, T·(1 + feedback_steps), D) steps:
        each sample's input step, then its feedback steps (zeros when ``y`` is None)."""
        b, t = x.shape[0], x.shape[1]
        x = x.reshape(b, t, -1).to(torch.float32)
        zeros_fb = x.new_zeros(b, t, self.num_outputs + 1)
        inputs = torch.cat([x, zeros_fb], dim=-1)
        if feedback_steps == 0:
            return inputs
        if y is None or mode == "withheld":
            fb = x.new_zeros(b, t, self.num_outputs + 1)
        else:
            value = self.feedback(y)
            if mode == "shuffled":  # the same feedback values, attached to the wrong samples
                perm = torch.argsort(torch.rand(b, t, device=x.device), dim=1)
                value = value.gather(1, perm.unsqueeze(-1).expand_as(value))
            fb = torch.cat([value, x.new_ones(b, t, 1)], dim=-1)
        feedbacks = torch.cat([x.new_zeros(b, t, x.shape[-1]), fb], dim=-1)
        seq = torch.stack([inputs] + [feedbacks] * feedback_steps, dim=2)
        return seq.reshape(b, t * (1 + feedback_steps), -1)

    def forward(
        self, seq: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Hidden outputs (B, L, H) for the steps, and the state after the last one."""
        return self.lstm(seq, state)

    def predict_steps(self, hidden: torch.Tensor, feedback_steps: int) -> torch.Tensor:
        """The readout at the input steps: (B, T, num_outputs) (regression: (B, T))."""
        out = self.readout(hidden[:, :: 1 + feedback_steps])
        return out.squeeze(-1) if self.kind == "regression" else out


def sample_losses(model: FeedbackLSTM, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample loss of predictions ``out`` against ``y``: cross-entropy or squared error."""
    if model.kind == "classification":
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1).long(),
                               reduction="none").view(y.shape)  # fmt: skip
    return (out - y).pow(2)


def prequential(
    model: FeedbackLSTM,
    episodes: Episodes,
    feedback_steps: int,
    mode: str = "given",
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Predictions for every sample of ``episodes`` before its own feedback: (B, T[, C])."""
    seq = model.steps(episodes.x, episodes.y, feedback_steps, mode)
    hidden, state = model(seq, state)
    return model.predict_steps(hidden, feedback_steps), state


def query_logits(
    model: FeedbackLSTM, state: tuple[torch.Tensor, torch.Tensor] | None, x: torch.Tensor
) -> torch.Tensor:
    """(B, Q, *in) queries answered from a snapshot of each row's state, one input step each,
    no feedback, no query seeing another: (B, Q, num_outputs)."""
    b, q = x.shape[0], x.shape[1]
    seq = model.steps(x.reshape(b * q, 1, *x.shape[2:]), None, 0)
    if state is not None:
        state = tuple(s.repeat_interleave(q, dim=1) for s in state)
    hidden, _ = model(seq, state)
    return model.readout(hidden[:, 0]).view(b, q, -1)


def meta_step(
    model: FeedbackLSTM,
    optimizer: torch.optim.Optimizer,
    episodes: Episodes,
    feedback_steps: int,
    truncation: int,
    clip: float,
    mode: str = "given",
) -> dict[str, float]:
    """One meta-gradient pass over a batch of episodes by truncated BPTT: an Adam step per
    chunk of ``truncation`` samples on the chunk's mean prequential loss, plus, when the
    episodes carry queries, the mean loss of the queries asked at the ends of the chunk's
    tasks. Returns the mean prequential loss, the mean query loss (when any) and the
    diagnostics (first-exposure loss, last-sample loss)."""
    model.train()
    state = None
    total, count, q_total, q_count = 0.0, 0, 0.0, 0
    first = last = float("nan")
    ends = episodes.segment_ends
    cuts = sorted({*range(truncation, episodes.length, truncation), *ends})
    start, pending, pending_q = 0, [], []
    for stop in cuts:
        part = Episodes(
            episodes.x[:, start:stop], episodes.y[:, start:stop],
            episodes.segment[:, start:stop], episodes.presentation[:, start:stop], episodes.kind,
        )  # fmt: skip
        out, state = prequential(model, part, feedback_steps, mode, state)
        losses = sample_losses(model, out, part.y)
        pending.append(losses.reshape(-1))
        if start == 0:
            first = float(losses[:, 0].mean().detach())
        last = float(losses[:, -1].mean().detach())
        if episodes.query_x is not None and stop in ends:
            task = ends.index(stop)
            answers = query_logits(model, state, episodes.query_x[:, task])
            pending_q.append(sample_losses(model, answers, episodes.query_y[:, task]).reshape(-1))
        start = stop
        if stop % truncation and stop != episodes.length:
            continue  # the truncation chunk goes on: the gradient flows across task ends
        chunk = torch.cat(pending)
        loss = chunk.mean()
        if pending_q:
            asked = torch.cat(pending_q)
            loss = loss + asked.mean()
            q_total += float(asked.detach().sum())
            q_count += asked.numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        state = (state[0].detach(), state[1].detach())
        total += float(chunk.detach().sum())
        count += chunk.numel()
        pending, pending_q = [], []
    stats = {"loss": total / count, "first_loss": first, "last_loss": last}
    if q_count:
        stats["query_loss"] = q_total / q_count
    return stats


def family_for(meta: MetaTrainingConfig, info: StreamInfo | None = None) -> TaskFamily:
    """The task family ``meta`` names; for a stream (``info``), with its label slots."""
    return build_family(
        meta.family,
        source=meta.source,
        ways=meta.ways,
        dim=meta.dim,
        num_outputs=None if info is None else info.num_classes,
    )


def family_settings(meta: MetaTrainingConfig) -> dict[str, Any]:
    """The meta_training settings that matter for its family (others are not hashed)."""
    settings = as_dict(meta)
    unused = {"random_labels": ("dim",), "linear": ("source", "ways"), "sine": ("source", "ways",
                                                                            "dim")}  # fmt: skip
    for key in unused.get(meta.family, ()):
        settings.pop(key, None)
    if not settings.get("queries"):
        settings.pop("queries_from", None)  # no queries: when they would start is moot
    return settings


class MetaTraining(Phase):
    """Meta-training of an :class:`LSTMMeta`'s network on its ``meta_training`` family."""

    name = "meta_training"

    def __init__(self, learner: LSTMMeta):
        self.learner = learner
        self.config = learner.meta_config
        self._family: TaskFamily | None = None  # built at the first step: not when cached
        with torch.random.fork_rng(devices=[]):  # weights from the meta seed, not the run's
            torch.manual_seed(self.config.seed)
            learner.model = learner.build_model().to(learner.device)
        self.optimizer = torch.optim.Adam(learner.model.parameters(), lr=self.config.lr)
        self.generator = torch.Generator().manual_seed(self.config.seed + 1)
        self._done = 0

    def total_steps(self) -> int:
        return math.ceil(self.config.episodes / self.config.batch)

    @property
    def done_steps(self) -> int:
        return self._done

    def step(self) -> dict[str, float]:
        """One meta-gradient pass over a batch of episodes: the prequential loss, and the
        first- and last-exposure losses (Loss_0 and Loss_n, diagnostics only)."""
        cfg = self.config
        if self._family is None:
            self._family = family_for(cfg, self.learner.info)
        asked = cfg.queries if self._done >= cfg.queries_from * self.total_steps() else 0
        episodes = self._family.sample(
            cfg.batch, cfg.episode_length, cfg.segments, self.generator, "meta", asked
        ).to(self.learner.device)
        stats = meta_step(
            self.learner.model, self.optimizer, episodes, self.learner.hparams.feedback_steps,
            cfg.truncation, cfg.clip,
        )  # fmt: skip
        self._done += 1
        return stats

    def key_payload(self) -> dict[str, Any]:
        hparams = as_dict(self.learner.hparams)
        return {
            "method": self.learner.name,
            "hparams": {k: hparams[k] for k in PHASE_HPARAMS},
            "meta_training": family_settings(self.config),
            "input_shape": list(self.learner.info.input_shape),
            "num_classes": self.learner.info.num_classes,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.learner.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "done": self._done,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.learner.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self._done = int(state["done"])

    def result(self) -> dict[str, Any]:
        return {"model": {k: v.detach().clone() for k, v in
                          self.learner.model.state_dict().items()}}  # fmt: skip

    def apply(self, result: dict[str, Any]) -> None:
        self.learner.model.load_state_dict(result["model"])
        self.learner.meta_trained = True


@register("lstm_meta")
class LSTMMeta(Learner):
    """Learns each task from feedback in its hidden state; its weights change only in
    meta-training, before the stream."""

    HParams = LSTMMetaHParams
    META_TRAINED = True
    TRAINS_ON_STREAM = False  # the train section does not apply: no step on the stream

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.state: tuple[torch.Tensor, torch.Tensor] | None = None
        self.meta_trained = False

    @classmethod
    def check_setup(
        cls,
        info: StreamInfo,
        meta: MetaTrainingConfig,
        where: str = "",
        model: ModelConfig | None = None,
    ) -> None:
        """ConfigError unless ``meta``'s family can train a learner for this stream."""
        try:
            family = family_for(meta, info)
            family.check_episodes(meta.episode_length, meta.segments, meta.queries)
        except (ValueError, OSError) as err:
            text = str(err)
            if not text.startswith("meta_training."):
                text = f"meta_training: {text}"
            raise ConfigError(f"{where}: {text}") from None
        if family.kind != "classification":
            raise ConfigError(
                f"{where}: meta_training.family={meta.family!r} is a regression family; a "
                "stream is classification, so lstm_meta needs a classification family "
                "(accepted: random_labels); regression families are for benchmarks/"
                "meta_learning.py"
            )
        if tuple(family.input_shape) != tuple(info.input_shape):
            raise ConfigError(
                f"{where}: meta_training.source={meta.source!r} has inputs of shape "
                f"{tuple(family.input_shape)} but the stream's are {tuple(info.input_shape)}; "
                "meta-train on a source with the stream's input shape"
            )

    def build_model(self) -> nn.Module:
        return FeedbackLSTM(
            math.prod(self.info.input_shape), self.info.num_classes, self.hparams.hidden,
            self.hparams.layers, "classification",
        )  # fmt: skip

    def phase(self) -> Phase | None:
        """Meta-training, unless the weights already came from it (a resumed run)."""
        return None if self.meta_trained else MetaTraining(self)

    # ------------------------------------------------------------------ the stream
    @torch.no_grad()
    def _learn(self, task: Task) -> dict[str, Any]:
        """Feed (input, feedback) for the task's samples; no weight changes."""
        self.model.eval()
        n = int(task.y_train.shape[0])
        k = self.hparams.samples_per_task or self.meta_config.episode_length
        order = torch.randperm(n, generator=self.generator)[:k]
        order = order.to(task.x_train.device)
        chunk = 8  # samples per call: a stop request is seen within a few samples
        for start in range(0, order.numel(), chunk):
            self.check_stop(f"during task {task.name!r} after {start} samples")
            idx = order[start : start + chunk]
            seq = self.model.steps(task.x_train[idx].unsqueeze(0), task.y_train[idx].unsqueeze(0),
                                   self.hparams.feedback_steps)  # fmt: skip
            _, self.state = self.model(seq, self.state)
        self.tasks_learned += 1
        return {"steps": 0, "train_samples": int(order.numel())}

    def logits(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One input step per query from the current state's snapshot (no feedback, no query
        sees another); task-incremental streams mask units outside each query's task."""
        out = query_logits(self.model, self.state, x.unsqueeze(0))[0]
        if self.class_mask is not None and task_ids is not None:
            out = out.masked_fill(~self.class_mask[task_ids], float("-inf"))
        return out

    # ------------------------------------------------------------------ state
    def method_state(self) -> dict[str, Any]:
        """The hidden state (what the learner knows of the stream) and whether the weights are
        meta-trained."""
        return {"state": None if self.state is None else list(self.state),
                "meta_trained": self.meta_trained}  # fmt: skip

    def load_method_state(self, state: dict[str, Any]) -> None:
        s = state["state"]
        self.state = None if s is None else (s[0].to(self.device), s[1].to(self.device))
        self.meta_trained = bool(state["meta_trained"])

    def stored_memory(self) -> dict[str, int]:
        """No samples; the hidden state, in bytes."""
        nbytes = 0 if self.state is None else sum(s.numel() * s.element_size() for s in self.state)
        return {"stored_samples": 0, "stored_bytes": nbytes}
