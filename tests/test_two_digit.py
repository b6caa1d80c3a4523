"""The two-digit verification pairs: honest number/image/instance splits, images, determinism."""

from __future__ import annotations

import pytest
import torch

from task_streams.sources import load_source
from task_streams.two_digit import TwoDigitData, build_two_digit

PAIRS = {"train": 600, "test": 400}


@pytest.fixture(scope="module")
def data() -> TwoDigitData:
    return build_two_digit("mnist5k", seed=0, test_numbers=20, pairs_per_split=PAIRS)


@pytest.fixture(scope="module")
def source():
    return load_source("mnist5k")


def _pools(data: TwoDigitData, source):
    return (
        (data.train, source.x_train, source.y_train),
        (data.test, source.x_test, source.y_test),
    )


def test_shapes_dtypes_and_pools(data):
    for split, n in ((data.train, 600), (data.test, 400)):
        assert split.support.shape == (n, 1, 28, 56)
        assert split.query.shape == (n, 1, 28, 56)
        assert split.support.dtype == split.query.dtype == torch.float32
        assert split.label.shape == (n,) and split.label.dtype == torch.int64
        assert 0.0 <= float(split.support.min()) and float(split.support.max()) <= 1.0
    assert data.train.pool == "train" and data.test.pool == "test"


def test_numbers_are_split(data):
    test_set, train_set = set(data.test_numbers), set(data.train_numbers)
    assert len(test_set) == 20 and len(train_set) == 80
    assert test_set.isdisjoint(train_set) and test_set | train_set == set(range(100))
    for split, allowed, other in (
        (data.test, test_set, train_set),
        (data.train, train_set, test_set),
    ):
        seen = set(split.support_number.tolist()) | set(split.query_number.tolist())
        assert seen <= allowed and seen.isdisjoint(other)
    # The test split really uses several of its numbers, not one.
    assert len(set(data.test.support_number.tolist())) == 20


def test_digit_images_come_from_their_own_pool(data, source):
    # Train indices are rows of the training pool, test indices rows of the test pool, and the
    # images really are those rows: re-derive every half from the recorded index.
    assert source.train_index is not None and source.test_index is not None
    assert set(source.train_index.tolist()).isdisjoint(source.test_index.tolist())
    for split, x, y in _pools(data, source):
        for image, number, left_idx, right_idx in (
            (split.support, split.support_number, split.support_left_idx, split.support_right_idx),
            (split.query, split.query_number, split.query_left_idx, split.query_right_idx),
        ):
            assert int(torch.cat([left_idx, right_idx]).max()) < len(x)
            assert torch.equal(image[:, 0, :, :28], x[left_idx].float() / 255)
            assert torch.equal(image[:, 0, :, 28:], x[right_idx].float() / 255)
            assert torch.equal(y[left_idx], number // 10)
            assert torch.equal(y[right_idx], number % 10)
    # Rows of the original file behind every image: none is used by both splits.
    train_rows = {
        int(source.train_index[i])
        for t in (data.train.support_left_idx, data.train.support_right_idx)
        + (data.train.query_left_idx, data.train.query_right_idx)
        for i in t
    }
    test_rows = {
        int(source.test_index[i])
        for t in (data.test.support_left_idx, data.test.support_right_idx)
        + (data.test.query_left_idx, data.test.query_right_idx)
        for i in t
    }
    assert train_rows.isdisjoint(test_rows)


def test_pair_never_reuses_a_digit_instance(data):
    for split in (data.train, data.test):
        idx = torch.stack(
            [
                split.support_left_idx,
                split.support_right_idx,
                split.query_left_idx,
                split.query_right_idx,
            ],
            dim=1,
        )
        assert all(len(set(row)) == 4 for row in idx.tolist())
        # Hence support and query never share pixels wholesale, even for the same number.
        same = split.label == 1
        assert not (split.support[same] == split.query[same]).flatten(1).all(dim=1).any()


def test_labels_balanced_and_consistent(data):
    for split in (data.train, data.test):
        n = len(split)
        assert int(split.label.sum()) == n // 2
        assert torch.equal(split.label, (split.support_number == split.query_number).long())


def test_deterministic_per_seed(data):
    again = build_two_digit("mnist5k", seed=0, test_numbers=20, pairs_per_split=PAIRS)
    assert again.test_numbers == data.test_numbers
    for a, b in ((again.train, data.train), (again.test, data.test)):
        assert torch.equal(a.support, b.support) and torch.equal(a.query, b.query)
        assert torch.equal(a.label, b.label)
        assert torch.equal(a.support_left_idx, b.support_left_idx)
    other = build_two_digit("mnist5k", seed=1, test_numbers=20, pairs_per_split=PAIRS)
    assert other.test_numbers != data.test_numbers
    assert not torch.equal(other.train.support_left_idx, data.train.support_left_idx)
    assert not torch.equal(other.test.label, data.test.label)


def test_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_two_digit(pairs_per_split={"train": 10, "test": 10})
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"test_numbers": 0}, "test_numbers=0"),
        ({"test_numbers": 1}, "test_numbers=1"),
        ({"test_numbers": 99}, "test_numbers=99"),
        ({"test_numbers": 2.5}, "test_numbers=2.5"),
        ({"test_numbers": True}, "test_numbers=True"),
        ({"pairs_per_split": {"train": 0}}, r"pairs_per_split\['train'\]=0.*>= 1"),
        ({"pairs_per_split": {"test": -3}}, r"pairs_per_split\['test'\]=-3"),
        ({"pairs_per_split": {"valid": 5}}, r"pairs_per_split has unknown keys \['valid'\]"),
        ({"pairs_per_split": [5, 5]}, "pairs_per_split=.*not a dict"),
        ({"seed": -1}, "seed=-1"),
        ({"source": "nope"}, "stream.source='nope'"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_two_digit(**kwargs)
