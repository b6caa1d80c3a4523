"""Learn to learn: a learner network that configures a predictor (issue 19, part A).

The task is two-digit one-shot verification (:mod:`task_streams.two_digit`): given ONE image
of a number 00..99 (the *support*, a training set of one example), decide whether an
unlabelled image (the *query*) shows the same number. Test numbers never occur in training,
so a model must adapt to a new number from its one example, with no fine-tuning and no
hyperparameter search at test time.

Three models, one encoder architecture (:class:`Encoder`: a small CNN, flattened without global
pooling; by default one trunk reads each 28x28 digit position, the codes concatenated in
order):

- ``weights`` (:class:`WeightGenerator`), the learner/predictor model: a *learner* network
  reads the support's encoding ``s`` and writes the weights of a *predictor* network on the
  query's encoding ``e``, ``logit = v·relu(W e + b) + w·e + u·(e ⊙ e) + c`` (the learner
  writes ``W``, ``b``, ``w``, ``c``; ``v``, ``u`` are meta-learned). Encoder, learner and
  predictor are trained together by gradient descent over a dataset of datasets: each
  *episode* is one training number's support and its queries.
- ``similarity`` (:class:`Similarity`), the baseline without weight generation: the same
  encoder, ``logit = τ·cos(e_s, e_q) + c``; same episodes, steps and optimiser.
- ``digits`` (:class:`DigitReference`), the strong reference: a per-digit classifier (the same
  convolutional trunk on one 28x28 digit) trained on the training pool's digit images with
  their labels; a pair is "same" when the predicted numbers of support and query are equal.

Meta-training is a :class:`learners.meta.Phase` (:class:`VerificationTraining`), so it has the
LSTM meta-learner's phase machinery: :func:`learners.meta.run_phase` caches the trained
weights by a key of the settings and the code, resumes a killed run from its partial state,
and reports a loss curve. Training episodes are drawn fresh at every step from the training
pool and the training numbers only (:func:`sample_episodes`); nothing of the test pool or the
test numbers is read before :func:`evaluate`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from learners.hparams import as_dict, hp
from learners.meta import Phase
from task_streams.sources import SourceData
from task_streams.two_digit import NUM_NUMBERS, DigitPool, VerificationPairs, compose

BUILDERS: dict[str, Callable[[VerificationConfig, tuple[int, int, int]], nn.Module]] = {
    "weights": lambda cfg, shape: WeightGenerator(
        shape, cfg.channels, cfg.embed, cfg.hidden, cfg.halves
    ),
    "similarity": lambda cfg, shape: Similarity(shape, cfg.channels, cfg.embed, cfg.halves),
    "digits": lambda cfg, shape: DigitReference(shape, cfg.channels),
}
"""model name -> its constructor from the config and the (C, H, 2W) image shape"""
MODELS = tuple(BUILDERS)


@dataclass
class VerificationConfig:
    """Settings of one model's training on two-digit verification (validated by ``hp()``)."""

    model: str = hp("weights", help="weights | similarity | digits (see the module)",
                    choices=MODELS)  # fmt: skip
    steps: int = hp(3000, help="gradient steps", low=1, search=(500, 20000), log=True)
    episodes: int = hp(16, help="episodes (support numbers) per step", low=1)
    queries: int = hp(8, help="queries per episode (half same number, half other)", low=2)
    hard: float = hp(
        0.5,
        help="share of different-number training queries that share one digit with the support "
        "(37 vs 38 or 97): the pairs that need both digits checked",
        low=0.0,
        high=1.0,
    )
    digit_batch: int = hp(128, help="digits: digit images per step", low=1)
    shift: int = hp(2, help="training images shifted by up to this many pixels (augmentation)",
                    low=0, high=8)  # fmt: skip
    channels: int = hp(32, help="encoder width (conv channels: c/2, c, 2c)", low=2)
    embed: int = hp(64, help="encoding size", low=2)
    halves: bool = hp(
        True,
        help="weights/similarity: encode the two digit positions with one shared trunk (as "
        "the reference reads them); false: one trunk over the whole 28x56 image",
    )
    hidden: int = hp(32, help="weights: predictor units written by the learner", low=1)
    lr: float = hp(1e-3, help="Adam learning rate", gt=0.0, search=(1e-4, 1e-2), log=True)
    seed: int = hp(0, help="seed of the weights' init and of the training episodes")


class Encoder(nn.Module):
    """Image (N, C, H, W) -> encoding (N, embed). Three conv-relu-maxpool stages, flattened.

    With ``halves`` the image is read as two digits side by side (as the reference reads it):
    one trunk, shared by both positions, encodes each half into ``embed // 2`` numbers and the
    two are concatenated in position order (tens, ones).
    """

    def __init__(self, in_shape: tuple[int, int, int], channels: int, embed: int,
                 halves: bool = False):  # fmt: skip
        super().__init__()
        c, h, w = in_shape
        self.halves = halves
        if halves:
            w, embed = w // 2, embed // 2
        widths = [max(1, channels // 2), channels, 2 * channels]
        layers: list[nn.Module] = []
        for width in widths:
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c, h, w = width, h // 2, w // 2
        self.trunk = nn.Sequential(*layers, nn.Flatten())
        self.out = nn.Linear(c * h * w, embed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.halves:
            return self.out(self.trunk(x))
        half = x.shape[-1] // 2
        both = self.out(self.trunk(torch.cat([x[..., :half], x[..., half:]])))
        return torch.cat(both.chunk(2), dim=-1)


class WeightGenerator(nn.Module):
    """The learner/predictor model. The predictor is a one-hidden-layer network on the query's
    encoding ``e`` (L2-normalised, scaled to unit entries on average)::

        logit = v · relu(W e + b) + w · e + u · (e ⊙ e) + c

    The *learner* network reads the support's encoding ``s`` and writes ``W``, ``b``, ``w`` and
    ``c``; ``v`` and ``u`` are meta-learned, shared by every episode. The learner sees ``[s,
    s ⊙ s]`` through a linear path plus a one-hidden-layer MLP, so "same number" (a weighted
    distance ``-Σ a_k (e_k - s_k)²``, i.e. ``w = 2a ⊙ s``, ``u = -a``, ``c = -Σ a_k s_k²``) is
    within its reach without being built in; the hidden layer lets the predictor be more.
    """

    def __init__(self, in_shape: tuple[int, int, int], channels: int, embed: int, hidden: int,
                 halves: bool = True):  # fmt: skip
        super().__init__()
        self.encoder = Encoder(in_shape, channels, embed, halves)
        embed = 2 * (embed // 2) if halves else embed
        self.embed, self.hidden = embed, hidden
        sizes = {"W": hidden * embed, "b": hidden, "w": embed, "c": 1}
        self.sizes = sizes
        n_out = sum(sizes.values())
        self.linear = nn.Linear(2 * embed, n_out)
        self.mlp = nn.Sequential(
            nn.Linear(2 * embed, 2 * embed), nn.ReLU(), nn.Linear(2 * embed, n_out)
        )  # fmt: skip
        with torch.no_grad():  # generated weights start small (fan-in scale of the predictor)
            for layer in (self.linear, self.mlp[-1]):
                layer.weight.mul_(1.0 / math.sqrt(embed))
                layer.bias.zero_()
        self.v = nn.Parameter(torch.randn(hidden) / math.sqrt(hidden))
        self.u = nn.Parameter(torch.zeros(embed))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder(x), dim=-1) * math.sqrt(self.embed)

    def generate(self, support: torch.Tensor) -> dict[str, torch.Tensor]:
        """Support images (B, ...) -> the predictor's generated weights: ``W`` (B, hidden,
        embed), ``b`` (B, hidden), ``w`` (B, embed), ``c`` (B,)."""
        s = self.encode(support)
        z = torch.cat([s, s * s], dim=-1)
        out = self.linear(z) + self.mlp(z)
        parts = dict(zip(self.sizes, out.split(list(self.sizes.values()), dim=-1), strict=True))
        parts["W"] = parts["W"].view(-1, self.hidden, self.embed)
        parts["c"] = parts["c"].squeeze(-1)
        return parts

    def predict(self, params: dict[str, torch.Tensor], query: torch.Tensor) -> torch.Tensor:
        """Logits (B, Q) of queries (B, Q, ...) under each episode's generated predictor."""
        b, q = query.shape[:2]
        e = self.encode(query.flatten(0, 1)).view(b, q, -1)
        h = torch.relu(torch.einsum("bhe,bqe->bqh", params["W"], e) + params["b"][:, None])
        return (
            h @ self.v
            + torch.einsum("be,bqe->bq", params["w"], e)
            + (e * e) @ self.u
            + params["c"][:, None]
        )

    def forward(self, support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        return self.predict(self.generate(support), query)


class Similarity(nn.Module):
    """The baseline: the same encoder, a scaled cosine similarity, no weight generation."""

    def __init__(self, in_shape: tuple[int, int, int], channels: int, embed: int,
                 halves: bool = True):  # fmt: skip
        super().__init__()
        self.encoder = Encoder(in_shape, channels, embed, halves)
        self.scale = nn.Parameter(torch.tensor(5.0))
        self.bias = nn.Parameter(torch.tensor(-2.5))

    def forward(self, support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        b, q = query.shape[:2]
        s = F.normalize(self.encoder(support), dim=-1)
        e = F.normalize(self.encoder(query.flatten(0, 1)).view(b, q, -1), dim=-1)
        return self.scale * torch.einsum("be,bqe->bq", s, e) + self.bias


class DigitReference(nn.Module):
    """The reference: a per-digit classifier; "same" iff both predicted numbers are equal."""

    def __init__(self, in_shape: tuple[int, int, int], channels: int):
        super().__init__()
        c, h, w = in_shape
        self.net = Encoder((c, h, w // 2), channels, 10)

    def numbers(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted numbers (N,) of two-digit images (N, C, H, 2W)."""
        half = images.shape[-1] // 2
        tens = self.net(images[..., :half]).argmax(-1)
        ones = self.net(images[..., half:]).argmax(-1)
        return 10 * tens + ones

    def forward(self, support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """±1 "logits" (B, Q): +1 where the query's predicted number is the support's."""
        b, q = query.shape[:2]
        same = self.numbers(query.flatten(0, 1)).view(b, q) == self.numbers(support)[:, None]
        return same.float() * 2 - 1


def build_model(cfg: VerificationConfig, in_shape: tuple[int, int, int]) -> nn.Module:
    """``cfg.model``'s network for images of ``in_shape``."""
    return BUILDERS[cfg.model](cfg, in_shape)


# ----------------------------------------------------------------------------- training data


def _shift(x: torch.Tensor, pixels: int, gen: torch.Generator) -> torch.Tensor:
    """Each image (N, C, H, W) translated by its own random (dy, dx) in [-pixels, pixels]."""
    if pixels == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (pixels, pixels, pixels, pixels))
    dy = torch.randint(0, 2 * pixels + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pixels + 1, (n,), generator=gen)
    return _crop(padded, dy, dx, h, w)


def _crop(padded: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, h: int, w: int) -> torch.Tensor:
    n, c = padded.shape[:2]
    iy = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, c, h, padded.shape[-1])
    taken = padded.gather(2, iy)
    ix = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, c, h, w)
    return taken.gather(3, ix)


@dataclass(frozen=True)
class EpisodeIndex:
    """What a batch of training episodes shows: numbers, labels and pool rows.

    ``support_number`` (B,), ``query_number``/``label`` (B, Q) (label 1 = same number),
    ``support_idx`` (B, 2) and ``query_idx`` (B, Q, 2): rows of the pool (tens, ones).
    """

    support_number: torch.Tensor
    query_number: torch.Tensor
    label: torch.Tensor
    support_idx: torch.Tensor
    query_idx: torch.Tensor


def draw_episodes(
    pool: DigitPool,
    numbers: torch.Tensor,
    episodes: int,
    queries: int,
    hard: float,
    gen: torch.Generator,
) -> EpisodeIndex:
    """Draw ``episodes`` training episodes of ``queries`` queries each.

    Every number is one of ``numbers`` (the training numbers), every image a row of ``pool``
    (the training pool). Half the queries of an episode (rounded down) show the support's
    number; the others another of ``numbers``: with probability ``hard`` (where ``numbers`` has
    one) a number sharing exactly one digit with the support, else any other. A query never
    reuses the support's digit image at the same position.
    """
    m = len(numbers)
    pick = torch.randint(0, m, (episodes,), generator=gen)
    s_num = numbers[pick]
    label = torch.zeros(episodes, queries, dtype=torch.int64)
    label[:, : queries // 2] = 1
    label = label.gather(1, torch.rand(episodes, queries, generator=gen).argsort(dim=1))

    other = numbers[(pick[:, None] + torch.randint(1, m, (episodes, queries), generator=gen)) % m]
    shares = ((numbers[None, :] // 10 == s_num[:, None] // 10)
              ^ (numbers[None, :] % 10 == s_num[:, None] % 10))  # fmt: skip
    weights = shares.float() + 1e-12  # rows where none shares a digit: uniform, and unused
    hard_num = numbers[torch.multinomial(weights, queries, replacement=True, generator=gen)]
    use_hard = (torch.rand(episodes, queries, generator=gen) < hard) & shares.any(1)[:, None]
    q_num = torch.where(label == 1, s_num[:, None], torch.where(use_hard, hard_num, other))

    s_idx = torch.stack([pool.draw(s_num // 10, gen), pool.draw(s_num % 10, gen)], dim=-1)
    q_idx = torch.stack([pool.draw(q_num // 10, gen), pool.draw(q_num % 10, gen)], dim=-1)
    while True:  # a query's digit image never repeats the support's at that position
        clash = q_idx == s_idx[:, None, :]
        if not bool(clash.any()):
            break
        q_digits = torch.stack([q_num // 10, q_num % 10], dim=-1)
        q_idx[clash] = pool.draw(q_digits[clash], gen)
    return EpisodeIndex(s_num, q_num, label, s_idx, q_idx)


def sample_episodes(
    pool: DigitPool,
    numbers: torch.Tensor,
    episodes: int,
    queries: int,
    hard: float,
    shift: int,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh training episodes (:func:`draw_episodes`) as images: support (B, C, H, 2W), query
    (B, Q, C, H, 2W), each digit image shifted by up to ``shift`` pixels, and label (B, Q)."""
    ep = draw_episodes(pool, numbers, episodes, queries, hard, gen)
    s_idx, q_idx = ep.support_idx, ep.query_idx.reshape(-1, 2)
    support = compose(
        _shift(pool.x[s_idx[:, 0]], shift, gen), _shift(pool.x[s_idx[:, 1]], shift, gen)
    )
    query = compose(
        _shift(pool.x[q_idx[:, 0]], shift, gen), _shift(pool.x[q_idx[:, 1]], shift, gen)
    )
    return support, query.view(episodes, queries, *query.shape[1:]), ep.label


# ------------------------------------------------------------------------------- the phase


class VerificationTraining(Phase):
    """Training of one model (``cfg.model``) on the training pool and training numbers."""

    name = "two_digit_verification"

    def __init__(
        self,
        cfg: VerificationConfig,
        data: SourceData,
        train_numbers: tuple[int, ...],
        device: str | torch.device = "cpu",
    ):
        self.cfg = cfg
        self.device = torch.device(device)
        self.source = data.name
        self.train_numbers = tuple(int(n) for n in train_numbers)
        if len(self.train_numbers) < 2 or not all(0 <= n < NUM_NUMBERS for n in self.train_numbers):
            raise ValueError(
                f"train_numbers={train_numbers!r}: expected at least two numbers in 0..99"
            )
        self.pool = DigitPool(data.x_train, data.y_train)  # the training pool only
        self.numbers = torch.tensor(self.train_numbers, dtype=torch.int64)
        in_shape = (int(self.pool.x.shape[1]), int(self.pool.x.shape[2]),
                    2 * int(self.pool.x.shape[3]))  # fmt: skip
        with torch.random.fork_rng(devices=[]):  # init from the config's seed, not the caller's
            torch.manual_seed(cfg.seed)
            self.model = build_model(cfg, in_shape).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)
        self._done = 0

    def total_steps(self) -> int:
        return self.cfg.steps

    @property
    def done_steps(self) -> int:
        return self._done

    def step(self) -> dict[str, float]:
        cfg, gen = self.cfg, self.generator
        self.model.train()
        if cfg.model == "digits":
            rows = torch.randint(0, len(self.pool.y), (cfg.digit_batch,), generator=gen)
            x = _shift(self.pool.x[rows], cfg.shift, gen).to(self.device).float() / 255.0
            y = self.pool.y[rows].to(self.device)
            logits = self.model.net(x)
            loss = F.cross_entropy(logits, y)
            accuracy = (logits.argmax(-1) == y).float().mean()
        else:
            support, query, label = sample_episodes(
                self.pool, self.numbers, cfg.episodes, cfg.queries, cfg.hard, cfg.shift, gen
            )
            support, query, label = (t.to(self.device) for t in (support, query, label))
            logits = self.model(support, query)
            loss = F.binary_cross_entropy_with_logits(logits, label.float())
            accuracy = ((logits > 0).long() == label).float().mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in self.optimizer.param_groups:  # cosine decay, a function of the step only
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * self._done / cfg.steps))
        self.optimizer.step()
        self._done += 1
        return {"loss": float(loss.detach()), "train_accuracy": float(accuracy)}

    def key_payload(self) -> dict[str, Any]:
        return {"config": as_dict(self.cfg), "source": self.source,
                "train_numbers": list(self.train_numbers)}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "done": self._done,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self._done = int(state["done"])

    def result(self) -> dict[str, Any]:
        return {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()}}

    def apply(self, result: dict[str, Any]) -> None:
        self.model.load_state_dict(result["model"])


@torch.no_grad()
def evaluate(model: nn.Module, pairs: VerificationPairs, batch: int = 500) -> dict[str, float]:
    """Accuracy on ``pairs`` (each pair a one-query episode), and on its same-number and
    different-number pairs separately. The model is put in eval mode."""
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device  # cpu for a parameterless model
    correct = []
    for i in range(0, len(pairs), batch):
        support = pairs.support[i : i + batch].to(device)
        query = pairs.query[i : i + batch, None].to(device)
        correct.append((model(support, query)[:, 0] > 0).long().cpu() == pairs.label[i : i + batch])
    hit = torch.cat(correct).float()
    same = pairs.label == 1
    return {
        "accuracy": float(hit.mean()),
        "same_accuracy": float(hit[same].mean()),
        "different_accuracy": float(hit[~same].mean()),
    }
