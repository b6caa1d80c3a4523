"""Two-digit one-shot verification pairs (issue 19, part A), built with honest splits.

An image of a *number* 00..99 is two digit images of a source side by side (MNIST: 28x56; the
left digit is the tens, the right the ones). A verification example (a *pair*) is a support
image (the one labelled example of a number), a query image and ``label`` 1 when the query
shows the same number as the support, 0 when it shows another number of the same split. Half
the pairs of a split are same-number pairs (``n // 2``), the rest different-number pairs.

Splits, and why: the 88% the issue's source reports was measured without any of them, so a
model could score by recognising numbers, or even the very digit images, it had already seen.
Here

- **numbers** are split: a seeded random ``test_numbers`` of the 100 numbers are test numbers,
  the rest training numbers; a test pair's support and query are both test numbers, so test
  measures one-shot verification of numbers never seen in training;
- **digit images** are split: training pairs are composed only of the source's training pool,
  test pairs only of its test pool, so no digit image appears in both splits (a test number
  such as 37 shares its digits with training numbers, but never their images);
- **instances** are split within a pair: the four digit images of a pair (support left/right,
  query left/right) are four different images of the pool, so a same-number pair never
  matches pixel for pixel (support and query of 11 are four different images of a 1).

Every random choice comes from a ``torch.Generator`` seeded from ``(seed, "two_digit",
purpose, split)`` (:func:`task_streams.builders.generator`); the global RNGs are never
touched, so the same arguments always give the same tensors.
"""

from __future__ import annotations

import numbers
import os
import zlib
from dataclasses import dataclass

import torch

from task_streams.builders import generator
from task_streams.sources import SourceData, load_source

NUM_NUMBERS = 100
"""Numbers 00..99."""
DEFAULT_PAIRS = {"train": 2000, "test": 1000}
"""Pairs per split when ``pairs_per_split`` leaves a split out."""
SPLITS = ("train", "test")
MIN_PER_DIGIT = 4
"""Images each digit needs in each pool: a same-number pair of 11 uses four images of a 1."""

_TAG = zlib.crc32(b"two_digit")
_NUMBER_SPLIT, _LABELS, _NUMBERS, _INSTANCES = 0, 1, 2, 3
_SPLIT_KEY = {"train": 0, "test": 1}


@dataclass(frozen=True)
class VerificationPairs:
    """One split's pairs. Index ``i`` of every tensor describes pair ``i``.

    ``support``/``query``: float32 (N, C, H, 2W) in [0, 1]; ``label``: int64, 1 = same number.
    ``support_number``/``query_number``: int64 numbers 0..99. ``*_left_idx``/``*_right_idx``:
    int64 row numbers into the source pool named by ``pool`` (``"train"`` -> ``x_train``,
    ``"test"`` -> ``x_test``) of the digit image shown in that half.
    """

    support: torch.Tensor
    query: torch.Tensor
    label: torch.Tensor
    support_number: torch.Tensor
    query_number: torch.Tensor
    support_left_idx: torch.Tensor
    support_right_idx: torch.Tensor
    query_left_idx: torch.Tensor
    query_right_idx: torch.Tensor
    pool: str

    def __len__(self) -> int:
        return int(self.label.shape[0])


@dataclass(frozen=True)
class TwoDigitData:
    """Training and test pairs plus the number split they were drawn under."""

    source: str
    seed: int
    train: VerificationPairs
    test: VerificationPairs
    train_numbers: tuple[int, ...]
    test_numbers: tuple[int, ...]


def build_two_digit(
    source: str = "mnist5k",
    seed: int = 0,
    test_numbers: int = 20,
    pairs_per_split: dict[str, int] | None = None,
    path: str | os.PathLike | None = None,
) -> TwoDigitData:
    """Build the two-digit verification pairs of ``source`` (see the module docstring).

    ``test_numbers``: how many of the 100 numbers are held out for test (2..98: each split
    needs two numbers to form different-number pairs). ``pairs_per_split``: pairs per split,
    keys ``"train"``/``"test"`` (a missing key takes :data:`DEFAULT_PAIRS`). ``path`` is passed
    to :func:`load_source` (for the ``idx``/``npz`` sources).
    """
    n_test_numbers = _check_test_numbers(test_numbers)
    pairs = _check_pairs(pairs_per_split)
    generator(seed)  # validates seed (ValueError naming it) before the source is read
    data = load_source(source, path)
    _check_source(data)

    order = torch.randperm(NUM_NUMBERS, generator=generator(seed, _TAG, _NUMBER_SPLIT))
    test_set = torch.sort(order[:n_test_numbers]).values
    train_set = torch.sort(order[n_test_numbers:]).values
    split_numbers = {"train": train_set, "test": test_set}
    built = {
        split: _build_split(data, split, split_numbers[split], pairs[split], seed)
        for split in SPLITS
    }
    return TwoDigitData(
        source=data.name,
        seed=int(seed),
        train=built["train"],
        test=built["test"],
        train_numbers=tuple(int(n) for n in train_set),
        test_numbers=tuple(int(n) for n in test_set),
    )


def compose(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """uint8 digit images (N,H,W) or (N,C,H,W), side by side -> float32 (N,C,H,2W) in [0, 1]."""
    left = left.unsqueeze(1) if left.dim() == 3 else left
    right = right.unsqueeze(1) if right.dim() == 3 else right
    return torch.cat([left, right], dim=-1).to(torch.float32) / 255.0


# ------------------------------------------------------------------------------------ internals


def _build_split(
    data: SourceData, split: str, numbers_: torch.Tensor, n: int, seed: int
) -> VerificationPairs:
    x, y = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
    key = _SPLIT_KEY[split]

    label = torch.zeros(n, dtype=torch.int64)
    label[: n // 2] = 1
    label = label[torch.randperm(n, generator=generator(seed, _TAG, _LABELS, key))]

    gen = generator(seed, _TAG, _NUMBERS, key)
    m = len(numbers_)
    support_pos = torch.randint(0, m, (n,), generator=gen)
    offset = torch.randint(1, m, (n,), generator=gen)  # uniform over the other m-1 numbers
    query_pos = torch.where(label == 1, support_pos, (support_pos + offset) % m)
    support_number = numbers_[support_pos]
    query_number = numbers_[query_pos]

    digits = torch.stack(
        [support_number // 10, support_number % 10, query_number // 10, query_number % 10], dim=1
    )
    idx = _draw_instances(DigitPool(x, y), digits, generator(seed, _TAG, _INSTANCES, key))
    return VerificationPairs(
        support=compose(x[idx[:, 0]], x[idx[:, 1]]),
        query=compose(x[idx[:, 2]], x[idx[:, 3]]),
        label=label,
        support_number=support_number,
        query_number=query_number,
        support_left_idx=idx[:, 0],
        support_right_idx=idx[:, 1],
        query_left_idx=idx[:, 2],
        query_right_idx=idx[:, 3],
        pool=split,
    )


class DigitPool:
    """One source pool's digit images (uint8, (N, C, H, W)) and labels, indexed by digit, for
    drawing the digit images of numbers."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x = x if x.dim() == 4 else x.unsqueeze(1)
        self.y = y.to(torch.int64)
        rows = [torch.nonzero(self.y == d).flatten() for d in range(10)]
        self.counts = torch.tensor([len(r) for r in rows])
        self.table = torch.full((10, int(self.counts.max())), -1, dtype=torch.int64)
        for d, r in enumerate(rows):
            self.table[d, : len(r)] = r

    def draw(self, digits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Random pool rows (the shape of ``digits``), each an image of its digit."""
        rank = (torch.rand(digits.shape, generator=gen) * self.counts[digits]).long()
        return self.table[digits, torch.minimum(rank, self.counts[digits] - 1)]


def _draw_instances(pool: DigitPool, digits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Pool row numbers (n, 4) of images of ``digits`` (n, 4), the 4 of a row all different."""
    idx = pool.draw(digits, gen)
    # Redraw a column while it repeats an earlier column of its row. Images of different
    # digits never collide, and each digit has >= MIN_PER_DIGIT images, so this terminates.
    while True:
        clash = torch.zeros_like(idx, dtype=torch.bool)
        for j in range(1, idx.shape[1]):
            clash[:, j] = (idx[:, :j] == idx[:, j : j + 1]).any(dim=1)
        if not bool(clash.any()):
            return idx
        idx[clash] = pool.draw(digits[clash], gen)


def _check_test_numbers(test_numbers: object) -> int:
    if (
        isinstance(test_numbers, bool)
        or not isinstance(test_numbers, numbers.Integral)
        or not 2 <= test_numbers <= NUM_NUMBERS - 2
    ):
        raise ValueError(
            f"test_numbers={test_numbers!r} is out of range; expected an integer in "
            f"2..{NUM_NUMBERS - 2} (each of the train and test splits needs at least two of the "
            "100 numbers to form different-number pairs)"
        )
    return int(test_numbers)


def _check_pairs(pairs_per_split: object) -> dict[str, int]:
    if pairs_per_split is None:
        return dict(DEFAULT_PAIRS)
    if not isinstance(pairs_per_split, dict):
        raise ValueError(
            f"pairs_per_split={pairs_per_split!r} is not a dict; expected e.g. "
            "{'train': 2000, 'test': 1000} or None"
        )
    unknown = sorted(str(k) for k in pairs_per_split if k not in SPLITS)
    if unknown:
        raise ValueError(
            f"pairs_per_split has unknown keys {unknown}; expected keys among {list(SPLITS)}"
        )
    out = dict(DEFAULT_PAIRS)
    for split, count in pairs_per_split.items():
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 1:
            raise ValueError(
                f"pairs_per_split[{split!r}]={count!r} is out of range; expected an integer >= 1"
            )
        out[split] = int(count)
    return out


def _check_source(data: SourceData) -> None:
    for pool, y in (("train", data.y_train), ("test", data.y_test)):
        counts = torch.bincount(y.to(torch.int64).flatten(), minlength=10)
        if len(counts) > 10 or int(counts.min()) < MIN_PER_DIGIT:
            raise ValueError(
                f"source={data.name!r} cannot form two-digit numbers: its {pool} pool needs "
                f"labels 0..9 only, with at least {MIN_PER_DIGIT} images each (found per-label "
                f"counts {counts.tolist()})"
            )
