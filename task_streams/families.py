"""Task families for meta-learning: episodes of (input, ground truth) pairs drawn offline.

A meta-learner (``learners/lstm_meta.py``) is trained on many short tasks of one family and then
learns a new task of that family from feedback alone. A family samples **episodes**: a batch
of sequences of T samples; an episode holds ``segments`` tasks one after the other (T =
segments × length), switched without announcement, so that a meta-learner must also detect
a switch, re-adapt and retain. Every family is registered by name (:data:`FAMILIES`).

- ``random_labels`` (Santoro et al. 2016's protocol, on digit images instead of Omniglot):
  each segment draws ``ways`` image classes and a fresh random mapping of them onto ``ways`` of
  the ``num_outputs`` label slots; each class appears ``length // ways`` times, shuffled. The
  label of an image means nothing until feedback shows it. With ``queries`` > 0 an episode is
  a class-incremental stream in small: its tasks use distinct classes and distinct labels,
  and after each task come ``queries`` fresh images (never shown in the episode) of the
  classes of every task so far, with their labels — what the stream's R matrix asks of a
  learner after each task, retention included.
- ``sine`` (MAML's ranges, Finn et al. 2017): y = A·sin(x − φ), A ~ U[0.1, 5], φ ~ U[0, π],
  x ~ U[−5, 5].
- ``linear``: y = wᵀx + b, w ~ N(0, I_d), b ~ N(0, 1), x ~ U[−1, 1]^d (d = ``dim``).

**Held out means never seen.** ``split="meta"`` (meta-training) and ``split="heldout"``
(evaluation) never share an image, a mapping or a function:

- images: meta-training draws from the source's training pool, held-out episodes from its
  test pool;
- class combinations, hence mappings: the sets of ``ways`` classes are cut in two by a fixed
  hash of the set (its parity); meta-training draws only even sets, held-out episodes only odd
  ones, so a held-out task's classes never appeared together in meta-training. Every class is
  in sets of both halves, and the labels are a uniformly random assignment in every episode,
  so no class → label rule can be memorised (cutting the *mappings* instead would be a trap:
  with few classes the network learns "in meta-training, 3 before 7 means label 0" and the
  held-out half is exactly the reverse). With ``ways`` = all the source's classes there is
  one set only: then images alone are held out, and mappings are drawn fresh;
- functions (sine, linear): drawn from continuous distributions, so a held-out function equals
  a meta-training one with probability 0; each split also has its own generator stream.

Regression families also give what an oracle needs: a basis φ(x) in which every function of
the family is linear, with the prior mean and covariance of its coefficients, so that
:func:`bayes_linear_predictions` is the Bayes-optimal estimator (linear: exact; sine: under a
Gaussian approximation of the coefficients' prior) — the floor a meta-learner is measured
against.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from task_streams.sources import load_source

SPLITS = ("meta", "heldout")
_HASH_PRIME = 1_000_003
_HASH_MODULUS = 2**31 - 1


@dataclass
class Episodes:
    """A batch of episodes: B sequences of T samples.

    ``presentation[b, i]`` is, for classification, how many earlier samples of the same class
    the current segment showed before sample i (0 = the class's first appearance); for
    regression, how many samples of the current function came before (the feedbacks received).
    """

    x: torch.Tensor  # (B, T, *input_shape), float32
    y: torch.Tensor  # (B, T): int64 labels (classification) or float32 targets (regression)
    segment: torch.Tensor  # (B, T) int64: which task of the episode sample i belongs to
    presentation: torch.Tensor  # (B, T) int64
    kind: str  # "classification" | "regression"
    params: torch.Tensor | None = None  # regression: (B, segments, basis) true coefficients
    query_x: torch.Tensor | None = None  # (B, segments, Q, *input_shape): see RandomLabels
    query_y: torch.Tensor | None = None  # (B, segments, Q) int64

    @property
    def batch(self) -> int:
        return int(self.y.shape[0])

    @property
    def length(self) -> int:
        return int(self.y.shape[1])

    def to(self, device: torch.device | str) -> Episodes:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Episodes(
            move(self.x), move(self.y), move(self.segment), move(self.presentation),
            self.kind, move(self.params), move(self.query_x), move(self.query_y),
        )  # fmt: skip

    @property
    def segment_ends(self) -> list[int]:
        """The sample index at which each task of the episodes ends (the same for every row)."""
        changes = (self.segment[0, 1:] != self.segment[0, :-1]).nonzero().squeeze(1) + 1
        return [*changes.tolist(), self.length]


class TaskFamily:
    """A distribution over tasks; :meth:`sample` draws episodes from it."""

    kind: str = "classification"
    input_shape: tuple[int, ...] = ()
    num_outputs: int = 1

    def sample(
        self,
        batch: int,
        length: int,
        segments: int,
        generator: torch.Generator,
        split: str = "meta",
        queries: int = 0,
    ) -> Episodes:
        """``batch`` episodes of ``segments`` tasks of ``length`` samples each; ``queries``:
        see :class:`RandomLabels` (classification only)."""
        raise NotImplementedError

    def check_episodes(self, length: int, segments: int, queries: int) -> None:
        """ValueError unless episodes of this shape can be drawn (also run before any work)."""


FAMILIES: dict[str, Callable[..., TaskFamily]] = {}


def register_family(name: str) -> Callable:
    """Decorator: make a TaskFamily subclass buildable as ``meta_training.family=name``."""

    def decorate(cls):
        FAMILIES[name] = cls
        return cls

    return decorate


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not accepted; expected one of {SPLITS}")


def class_set_parity(classes: torch.Tensor | list[int]) -> torch.Tensor | int:
    """0 or 1: a fixed hash of each set of classes (rows of a 2-D tensor, or one list), which
    cuts the sets in two halves. Exact in int64 (modulus 2^31 − 1)."""
    single = not isinstance(classes, torch.Tensor)
    rows = torch.as_tensor(classes, dtype=torch.int64)
    rows = rows.unsqueeze(0) if single else rows
    h = torch.zeros(rows.shape[0], dtype=torch.int64)
    for c in rows.sort(dim=1).values.T:
        h = (h * _HASH_PRIME + c * 997 + 1) % _HASH_MODULUS
    parity = (h >> 7) & 1
    return int(parity[0]) if single else parity


# ---------------------------------------------------------------------- random labels
@register_family("random_labels")
class RandomLabels(TaskFamily):
    """Few-shot classification of images whose labels are a fresh random mapping per task."""

    kind = "classification"

    def __init__(
        self,
        source: str = "mnist5k",
        ways: int = 5,
        num_outputs: int | None = None,
        path: str | None = None,
    ):
        data = load_source(source, path)
        self.source = source
        self.ways = int(ways)
        self.num_outputs = int(num_outputs if num_outputs is not None else ways)
        if not 2 <= self.ways <= data.num_classes:
            raise ValueError(
                f"meta_training.ways={ways} is not accepted for source {source!r}; expected "
                f"2 to {data.num_classes} (its number of classes)"
            )
        if self.num_outputs < self.ways:
            raise ValueError(
                f"meta_training.ways={self.ways} is more than the {self.num_outputs} labels a "
                f"task's classes can be mapped to (the stream's classes); expected ways <= "
                f"{self.num_outputs}"
            )
        self.num_classes = data.num_classes
        self.input_shape = tuple(data.input_shape)
        self._pools = {
            "meta": self._by_class(data.x_train, data.y_train),
            "heldout": self._by_class(data.x_test, data.y_test),
        }

    def _by_class(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pool as (classes, most per class, *shape), zero-padded, and each class's count."""
        x = x.reshape(x.shape[0], *self.input_shape)
        counts = torch.bincount(y, minlength=self.num_classes)
        padded = x.new_zeros(self.num_classes, int(counts.max()), *self.input_shape)
        for c in range(self.num_classes):
            padded[c, : int(counts[c])] = x[y == c]
        return padded, counts

    def _mappings(
        self, batch: int, segments: int, generator: torch.Generator, split: str, distinct: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For each of the batch × segments tasks, a set of ``ways`` classes of the split's half,
        (n, ways), and a uniformly random assignment of label slots, (n, ways). ``distinct``:
        the tasks of an episode share no class and no label."""
        want = 0 if split == "meta" else 1
        per = segments if distinct else 1  # tasks drawn together (their classes disjoint)
        need = batch * segments // per
        rows: list[torch.Tensor] = []
        kept = 0
        for _ in range(10_000):  # rejection, vectorised
            draw = torch.rand(4 * need * 2**per + 8, self.num_classes, generator=generator)
            draw = draw.argsort(1)[:, : per * self.ways].reshape(-1, per, self.ways)
            if self.ways < self.num_classes:
                parity = class_set_parity(draw.reshape(-1, self.ways)).view(-1, per)
                draw = draw[(parity == want).all(1)]
            rows.append(draw)
            kept += draw.shape[0]
            if kept >= need:
                break
        else:
            raise ValueError(
                f"no {segments} disjoint sets of {self.ways} classes of {self.source!r} fall in "
                f"the {split} half; use fewer meta_training.segments or ways"
            )
        classes = torch.cat(rows)[:need].reshape(batch * segments, self.ways)
        labels = torch.rand(need, self.num_outputs, generator=generator).argsort(1)
        labels = labels[:, : per * self.ways].reshape(batch * segments, self.ways)
        return classes, labels

    def check_episodes(self, length: int, segments: int, queries: int) -> None:
        """ValueError unless episodes of this shape can be drawn (also run before any work)."""
        if length < self.ways:
            raise ValueError(
                f"meta_training.episode_length={length} is shorter than ways={self.ways}; "
                f"expected at least {self.ways} samples per task"
            )
        if queries and segments * self.ways > min(self.num_classes, self.num_outputs):
            raise ValueError(
                f"meta_training.queries needs the {segments} tasks of an episode to have "
                f"distinct classes and labels: segments × ways = {segments * self.ways} is more "
                f"than the {min(self.num_classes, self.num_outputs)} available; expected "
                "segments × ways <= the number of classes"
            )

    def sample(self, batch, length, segments, generator, split="meta", queries=0) -> Episodes:
        _check_split(split)
        self.check_episodes(length, segments, queries)
        pool, counts = self._pools[split]
        n = batch * segments  # tasks to draw, each `length` samples
        classes, labels = self._mappings(batch, segments, generator, split, queries > 0)
        # balanced: slot k (the task's k-th class) appears length // ways or one more times
        order = torch.rand(n, length, generator=generator).argsort(1)
        slots = (torch.arange(length) % self.ways)[order]  # (n, length)
        onehot = F.one_hot(slots, self.ways)
        presentation = ((onehot.cumsum(1) - onehot) * onehot).sum(-1)  # earlier same-slot
        # distinct images per (task, class): a random order of the class's pool, read in turn;
        # the images after the first `need` are never shown, so queries draw from them
        need = int(onehot.sum(1).max())
        have = counts[classes]  # (n, ways)
        if need + (queries > 0) > int(have.min()):
            raise ValueError(
                f"a class of {self.source!r} ({split} pool) has fewer than "
                f"{need + (queries > 0)} images; shorten meta_training.episode_length"
            )
        keys = torch.rand(n, self.ways, pool.shape[1], generator=generator)
        keys[torch.arange(pool.shape[1]) >= have.unsqueeze(-1)] = 2.0  # padding last
        picks = keys.argsort(dim=-1)  # (n, ways, pool), a random order of each class's images
        image = picks[torch.arange(n).unsqueeze(1), slots, presentation]  # (n, length)
        x = pool[classes.gather(1, slots), image]  # (n, length, *shape)
        shape = (batch, segments * length)
        x = x.reshape(*shape, *self.input_shape).to(torch.float32).div_(255.0)
        y = labels.gather(1, slots).reshape(shape)
        segment = torch.arange(segments).repeat_interleave(length).expand(batch, -1).clone()
        episodes = Episodes(x, y, segment, presentation.reshape(shape), self.kind)
        if queries:
            episodes.query_x, episodes.query_y = self._queries(
                pool, classes, labels, picks, have, need, batch, segments, queries, generator
            )
        return episodes

    def _queries(self, pool, classes, labels, picks, have, need, batch, segments, q, generator):
        """After each task s of each episode, q unseen images of the classes of tasks 0..s."""
        seen = (torch.arange(segments) + 1) * self.ways  # classes known after each task
        u = (torch.rand(batch, segments, q, generator=generator) * seen.view(1, -1, 1)).long()
        task = torch.arange(batch).view(-1, 1, 1) * segments + u // self.ways  # row of the task
        slot = u % self.ways
        spare = (have[task, slot] - need).clamp(min=1)
        pos = need + (torch.rand(batch, segments, q, generator=generator) * spare).long()
        x = pool[classes[task, slot], picks[task, slot, pos]].to(torch.float32).div_(255.0)
        return x, labels[task, slot]


# ---------------------------------------------------------------------- regression
class RegressionFamily(TaskFamily):
    """Functions linear in a fixed basis φ(x): y = φ(x)ᵀβ, β drawn per task."""

    kind = "regression"
    num_outputs = 1
    dim = 1

    def basis(self, x: torch.Tensor) -> torch.Tensor:
        """φ(x): (..., dim) -> (..., basis size)."""
        raise NotImplementedError

    def draw_coefficients(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """β for n functions: (n, basis size)."""
        raise NotImplementedError

    def draw_inputs(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def prior(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and covariance of β (estimated once from 200,000 draws, fixed seed)."""
        if not hasattr(self, "_prior"):
            beta = self.draw_coefficients(200_000, torch.Generator().manual_seed(0)).double()
            mean = beta.mean(0)
            centred = beta - mean
            self._prior = (mean, centred.T @ centred / (beta.shape[0] - 1))
        return self._prior

    def check_episodes(self, length: int, segments: int, queries: int) -> None:
        if queries:
            raise ValueError(
                "meta_training.queries is for classification families (random_labels): a "
                "regression query cannot say which earlier function it is about"
            )

    def sample(self, batch, length, segments, generator, split="meta", queries=0) -> Episodes:
        _check_split(split)
        self.check_episodes(length, segments, queries)
        # each split its own stream of draws: a held-out episode never replays a meta one
        offset = torch.randint(2**62, (1,), generator=generator).item()
        g = torch.Generator().manual_seed((offset * 2 + SPLITS.index(split)) % 2**63)
        beta = self.draw_coefficients(batch * segments, g).view(batch, segments, -1)
        x = self.draw_inputs((batch, segments * length, self.dim), g)
        phi = self.basis(x).view(batch, segments, length, -1)
        y = (phi * beta.unsqueeze(2)).sum(-1).reshape(batch, segments * length)
        segment = torch.arange(segments).repeat_interleave(length).expand(batch, -1).clone()
        presentation = torch.arange(length).repeat(segments).expand(batch, -1).clone()
        return Episodes(x, y.float(), segment, presentation, self.kind, beta)


@register_family("sine")
class Sine(RegressionFamily):
    """y = A·sin(x − φ) = (A cos φ)·sin x − (A sin φ)·cos x: basis (sin x, cos x)."""

    input_shape = (1,)
    dim = 1
    amplitude = (0.1, 5.0)
    phase = (0.0, math.pi)
    x_range = (-5.0, 5.0)

    def basis(self, x):
        return torch.cat([torch.sin(x), torch.cos(x)], dim=-1)

    def draw_coefficients(self, n, generator):
        a = self.amplitude[0] + (self.amplitude[1] - self.amplitude[0]) * torch.rand(
            n, generator=generator
        )
        p = self.phase[0] + (self.phase[1] - self.phase[0]) * torch.rand(n, generator=generator)
        return torch.stack([a * torch.cos(p), -a * torch.sin(p)], dim=1)

    def draw_inputs(self, shape, generator):
        low, high = self.x_range
        return low + (high - low) * torch.rand(shape, generator=generator)


@register_family("linear")
class Linear(RegressionFamily):
    """y = wᵀx + b: basis (x, 1), w ~ N(0, I), b ~ N(0, 1), x ~ U[−1, 1]^dim."""

    def __init__(self, dim: int = 4):
        if dim < 1:
            raise ValueError(f"meta_training.dim={dim} is not accepted; expected >= 1")
        self.dim = int(dim)
        self.input_shape = (self.dim,)

    def basis(self, x):
        return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)

    def draw_coefficients(self, n, generator):
        return torch.randn(n, self.dim + 1, generator=generator)

    def draw_inputs(self, shape, generator):
        return 2 * torch.rand(shape, generator=generator) - 1

    def prior(self):
        size = self.dim + 1
        return torch.zeros(size, dtype=torch.float64), torch.eye(size, dtype=torch.float64)


def bayes_linear_predictions(
    family: RegressionFamily, episodes: Episodes, noise: float = 1e-4
) -> torch.Tensor:
    """The oracle's prediction for every sample from the samples of its segment seen before it.

    Posterior mean of β under the family's Gaussian prior N(m, S) and observation noise
    ``noise`` (variance), given the k earlier (x, y) of the same segment; at k = 0 the prior
    mean's prediction. Returns (B, T).
    """
    mean, cov = family.prior()
    precision0 = torch.linalg.inv(cov)
    phi = family.basis(episodes.x.double())  # (B, T, P)
    y = episodes.y.double()
    out = torch.empty_like(y)
    for b in range(episodes.batch):
        for t in range(episodes.length):
            same = (episodes.segment[b, :t] == episodes.segment[b, t]).nonzero().squeeze(1)
            f = phi[b, same]
            precision = precision0 + f.T @ f / noise
            rhs = precision0 @ mean + f.T @ y[b, same] / noise
            beta = torch.linalg.solve(precision, rhs)
            out[b, t] = phi[b, t] @ beta
    return out.float()


def build_family(name: str, **kwargs) -> TaskFamily:
    """The family registered as ``name``, built with the keyword arguments it accepts."""
    if name not in FAMILIES:
        raise ValueError(
            f"meta_training.family={name!r} is unknown; accepted: {', '.join(FAMILIES)}"
        )
    cls = FAMILIES[name]
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in kwargs.items() if k in accepted})
