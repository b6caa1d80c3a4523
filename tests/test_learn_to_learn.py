"""Issue 19, part A: the learner network that writes a predictor, its baseline and reference.

The accuracy figures are benchmarks/learn_to_learn.py's; these tests pin what they rest on:
training reads only training numbers and the training pool, the predictor's weights come from
the support, the reference compares predicted numbers, and the training phase resumes and
caches bit-identically (for every model).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from learners import ConfigError, run_phase
from learners.base import TrainingStopped
from learners.hparams import build_dataclass
from learners.learn_to_learn import (
    MODELS,
    DigitPool,
    DigitReference,
    VerificationConfig,
    VerificationTraining,
    WeightGenerator,
    draw_episodes,
    evaluate,
)
from task_streams.sources import load_source
from task_streams.two_digit import VerificationPairs

TRAIN_NUMBERS = (12, 13, 17, 18, 45, 47, 60, 98)  # 60 alone shares no digit with the others
TINY = {"steps": 4, "episodes": 2, "queries": 2, "digit_batch": 4, "channels": 2, "embed": 4,
        "hidden": 2}  # fmt: skip


@pytest.fixture(scope="module")
def mnist():
    return load_source("mnist5k")


def test_episodes_use_only_training_numbers_and_pool_rows(mnist):
    pool = DigitPool(mnist.x_train, mnist.y_train)
    numbers = torch.tensor(TRAIN_NUMBERS)
    ep = draw_episodes(pool, numbers, 300, 8, 1.0, torch.Generator().manual_seed(0))

    assert set(ep.support_number.tolist()) | set(ep.query_number.flatten().tolist()) <= set(
        TRAIN_NUMBERS
    )
    assert torch.equal(ep.label == 1, ep.query_number == ep.support_number[:, None])
    assert torch.equal(ep.label.sum(1), torch.full((300,), 4))
    # every row is a training-pool image of the digit it stands for
    y = mnist.y_train.to(torch.int64)
    assert torch.equal(y[ep.support_idx[:, 0]], ep.support_number // 10)
    assert torch.equal(y[ep.support_idx[:, 1]], ep.support_number % 10)
    assert torch.equal(y[ep.query_idx[..., 0]], ep.query_number // 10)
    assert torch.equal(y[ep.query_idx[..., 1]], ep.query_number % 10)
    # a query never shows the support's own digit image at the same position
    assert not bool((ep.query_idx == ep.support_idx[:, None, :]).any())
    # hard = 1: a different number shares exactly one digit with the support, where one does
    diff = ep.label == 0
    s = ep.support_number[:, None].expand_as(ep.query_number)[diff]
    q = ep.query_number[diff]
    shares_one = (s // 10 == q // 10) ^ (s % 10 == q % 10)
    assert bool(shares_one[s != 60].all()) and not bool(shares_one[s == 60].any())
    assert (s == 60).any() and set(q[s == 60].tolist()) == set(TRAIN_NUMBERS) - {60}


def test_training_never_reads_the_test_pool(mnist):
    """The phase is given a source without its test pool: training still runs."""
    blind = dataclasses.replace(mnist, x_test=None, y_test=None)
    for model in MODELS:
        cfg = build_dataclass(VerificationConfig, {**TINY, "model": model, "steps": 1})
        phase = VerificationTraining(cfg, blind, TRAIN_NUMBERS)
        assert set(phase.step()) >= {"loss"}


def test_the_predictor_s_weights_are_written_from_the_support():
    torch.manual_seed(0)
    model = WeightGenerator((1, 28, 56), channels=2, embed=4, hidden=3)
    a, b = torch.rand(1, 1, 28, 56), torch.rand(1, 1, 28, 56)
    queries = torch.rand(1, 5, 1, 28, 56)
    wa, wb = model.generate(a), model.generate(b)
    assert wa["W"].shape == (1, 3, 4) and wa["w"].shape == (1, 4)
    assert not torch.allclose(wa["W"], wb["W"])
    # the same queries get other answers from the predictor another support configured
    assert not torch.allclose(model.predict(wa, queries), model.predict(wb, queries))
    assert torch.equal(model(a, queries), model.predict(wa, queries))


class _OracleDigits(torch.nn.Module):
    """Reads a digit from the top-left pixel (digit / 10): a perfect per-digit classifier."""

    def forward(self, x):
        return torch.nn.functional.one_hot((x[:, 0, 0, 0] * 10).round().long(), 10).float()


def _number_images(numbers):
    x = torch.zeros(len(numbers), 1, 28, 56)
    for i, n in enumerate(numbers):
        x[i, 0, 0, 0], x[i, 0, 0, 28] = (n // 10) / 10, (n % 10) / 10
    return x


def test_reference_says_same_only_when_both_predicted_digits_match():
    ref = DigitReference((1, 28, 56), channels=2)
    ref.net = _OracleDigits()
    support = [37, 37, 37, 37, 5]
    query = [37, 38, 97, 73, 5]
    label = torch.tensor([1, 0, 0, 0, 1])
    out = ref(_number_images(support), _number_images(query)[:, None])[:, 0]
    assert out.tolist() == [1.0, -1.0, -1.0, -1.0, 1.0]

    idx = torch.zeros(5, dtype=torch.int64)
    pairs = VerificationPairs(
        _number_images(support), _number_images(query), label, torch.tensor(support),
        torch.tensor(query), idx, idx, idx, idx, "test",
    )  # fmt: skip
    assert evaluate(ref, pairs, batch=2) == {
        "accuracy": 1.0, "same_accuracy": 1.0, "different_accuracy": 1.0,
    }  # fmt: skip
    flipped = dataclasses.replace(pairs, label=1 - label)
    assert evaluate(ref, flipped)["accuracy"] == 0.0


@pytest.mark.parametrize("model", MODELS)
def test_training_resumes_and_caches_bit_identically(model, mnist, tmp_path):
    cfg = build_dataclass(VerificationConfig, {**TINY, "model": model})

    straight = VerificationTraining(cfg, mnist, TRAIN_NUMBERS)
    list(run_phase(straight, None))

    first = VerificationTraining(cfg, mnist, TRAIN_NUMBERS)
    with pytest.raises(TrainingStopped):  # stopped after 2 of 4 steps: partial state kept
        list(run_phase(first, tmp_path, should_stop=lambda: first.done_steps >= 2))
    resumed = VerificationTraining(cfg, mnist, TRAIN_NUMBERS)
    done = [e for e in run_phase(resumed, tmp_path) if e["event"] == "done"][-1]
    assert done["resumed_from"] == 2 and not done["cached"]
    cached = VerificationTraining(cfg, mnist, TRAIN_NUMBERS)
    again = [e for e in run_phase(cached, tmp_path) if e["event"] == "done"][-1]
    assert again["cached"]
    for other in (resumed, cached):
        for (name, value), ref in zip(
            other.model.state_dict().items(), straight.model.state_dict().values(), strict=True
        ):
            assert torch.equal(value, ref), name


def test_bad_settings_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match="model"):
        build_dataclass(VerificationConfig, {"model": "lstm"})
    with pytest.raises(ConfigError, match="hard"):
        build_dataclass(VerificationConfig, {"hard": 1.5})
    mnist = load_source("mnist5k")
    cfg = build_dataclass(VerificationConfig, TINY)
    with pytest.raises(ValueError, match="train_numbers"):
        VerificationTraining(cfg, mnist, (12,))
