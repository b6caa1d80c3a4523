"""The domains stream: one task per stream.domains entry (a source, rotated or pixel-permuted),
one shared label space, every random choice seeded per task; its validation."""

from __future__ import annotations

import pytest
import torch

from learners.hparams import ConfigError
from task_streams import StreamConfig, build_stream, validate_stream_config
from task_streams.builders import (
    _PERMUTATION,
    _draw,
    _tag,
    _to_float,
    generator,
    permute_pixels,
    rotate_images,
)
from task_streams.sources import load_source

SMALL = {"name": "domains", "train_per_task": 60, "test_per_task": 30}
DIGITS = ["digits", "digits:rot90", "digits:perm", "digits:perm"]


def need_fashion_mnist() -> None:
    """Skip (saying why) where the Debian package dataset-fashion-mnist is not installed."""
    try:
        load_source("fashion_mnist")
    except (OSError, ValueError) as err:
        pytest.skip(f"fashion_mnist is not available: {err}")


def test_one_task_per_entry_named_after_it_in_one_label_space():
    stream = build_stream({**SMALL, "domains": DIGITS}, seed=0)
    assert [t.name for t in stream] == ["digits", "digits_rot90", "digits_perm_2", "digits_perm_3"]
    assert stream.scenario == "domain" and stream.num_classes == 10
    assert stream.input_shape == (1, 8, 8)
    for task in stream:
        assert task.x_train.shape == (60, 1, 8, 8) and task.x_test.shape == (30, 1, 8, 8)
        assert task.classes == tuple(range(10))
    assert stream.metadata["domains"]["digits_rot90"] == "digits:rot90"
    task_scenario = build_stream({**SMALL, "domains": DIGITS, "scenario": "task"}, seed=0)
    assert task_scenario.scenario == "task"
    assert torch.equal(task_scenario[1].x_train, stream[1].x_train)


def test_num_tasks_is_the_list_length_whatever_was_written():
    config = StreamConfig(name="domains", domains=DIGITS, num_tasks=9)
    assert config.num_tasks == 4  # what progress and reports read
    assert validate_stream_config({**SMALL, "domains": DIGITS[:2]}).num_tasks == 2
    assert StreamConfig(name="permuted", num_tasks=9).num_tasks == 9


def test_each_task_is_its_seeded_draw_transformed():
    """Task t draws with the generator of (seed, "domains", purpose, t), then rotates or
    permutes; a plain entry is the drawn images as they are."""
    seed = 3
    config = validate_stream_config({**SMALL, "domains": DIGITS})
    stream = build_stream(config, seed)
    source = load_source("digits")
    drawn = [_draw(config, source, seed, "domains", t) for t in range(len(DIGITS))]

    assert torch.equal(stream[0].x_train, _to_float(drawn[0][0]))
    assert torch.equal(stream[0].y_train, drawn[0][1])
    assert torch.equal(stream[1].x_test, rotate_images(_to_float(drawn[1][2]), 90.0))
    assert torch.equal(stream[1].y_test, drawn[1][3])
    orders = []
    for t in (2, 3):  # each :perm task: one pixel order of its own, for train and test alike
        perm = torch.randperm(64, generator=generator(seed, _tag("domains"), _PERMUTATION, t))
        assert torch.equal(stream[t].x_train, permute_pixels(_to_float(drawn[t][0]), perm))
        assert torch.equal(stream[t].x_test, permute_pixels(_to_float(drawn[t][2]), perm))
        assert not torch.equal(perm, torch.arange(64))
        orders.append(perm)
    assert not torch.equal(orders[0], orders[1])  # two :perm entries, two permutations


def test_same_seed_same_tensors_other_seed_other_samples():
    first = build_stream({**SMALL, "domains": DIGITS}, seed=1)
    again = build_stream({**SMALL, "domains": DIGITS}, seed=1)
    other = build_stream({**SMALL, "domains": DIGITS}, seed=2)
    for a, b, c in zip(first, again, other, strict=True):
        assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
        assert not torch.equal(a.x_train, c.x_train)


def test_a_task_order_reorders_the_same_tasks():
    natural = build_stream({**SMALL, "domains": DIGITS[:3]}, seed=0)
    ordered = build_stream({**SMALL, "domains": DIGITS[:3], "task_order": [2, 0, 1]}, seed=0)
    assert [t.name for t in ordered] == ["digits_perm", "digits", "digits_rot90"]
    for position, natural_id in enumerate([2, 0, 1]):
        assert ordered[position].id == position
        assert torch.equal(ordered[position].x_train, natural[natural_id].x_train)


def test_evaluate_on_validation_never_reads_the_test_pool():
    stream = build_stream({**SMALL, "domains": DIGITS[:2], "evaluate_on": "validation"}, 0)
    test_pool = _to_float(load_source("digits").x_test.unsqueeze(1)).flatten(1)
    images = stream[0].x_test.flatten(1)
    assert not any(bool((test_pool == image).all(dim=1).any()) for image in images)


def test_mnist_and_fashion_mnist_and_rotated_mnist():
    need_fashion_mnist()
    domains = ["mnist5k", "fashion_mnist", "mnist5k:rot90"]
    stream = build_stream({**SMALL, "domains": domains}, seed=0)
    assert [t.name for t in stream] == ["mnist5k", "fashion_mnist", "mnist5k_rot90"]
    assert stream.name == "domains-mnist5k+fashion_mnist"
    assert all(t.x_train.shape == (60, 1, 28, 28) for t in stream)
    assert stream.metadata["source"] == "mnist5k+fashion_mnist"


@pytest.mark.parametrize(
    ("stream", "says"),
    [
        ({"domains": None}, ["stream.domains is required", "mnist5k:rot90"]),
        ({"domains": []}, ["stream.domains=[] is empty"]),
        ({"domains": "mnist5k"}, ["stream.domains='mnist5k' is not a list"]),
        (
            {"domains": ["mnist5k", "cifar10"]},
            ["stream.domains", "'cifar10'", "not a built-in source", "'fashion_mnist'"],
        ),
        ({"domains": ["idx"]}, ["stream.domains", "'idx'", "not a built-in source"]),
        (
            {"domains": ["mnist5k:flip"]},
            ["stream.domains", "'mnist5k:flip'", "'flip'", "<source>:rot<degrees>", ":perm"],
        ),
        ({"domains": ["mnist5k:rot"]}, ["'mnist5k:rot'", "rot<degrees>"]),
        ({"domains": ["mnist5k:rot90:perm"]}, ["'mnist5k:rot90:perm'", "<source>:perm"]),
        ({"domains": ["mnist5k", 7]}, ["stream.domains entry 7", "<source>"]),
        (
            {"domains": ["mnist5k", "digits:rot90"]},
            ["stream.domains", "mixes input shapes", "'digits:rot90': (1, 8, 8)"],
        ),
        ({"domains": ["digits"], "source": "digits"}, ["stream.source='digits'", "not used"]),
        ({"domains": ["digits"], "scenario": "class"}, ["stream.scenario='class'", "'task'"]),
        (
            {"name": "permuted", "domains": ["digits"]},
            ["stream.domains=['digits']", "only used by the domains stream", "'permuted'"],
        ),
    ],
)
def test_bad_settings_name_the_key_the_entry_and_what_is_accepted(stream, says):
    with pytest.raises(ValueError) as err:
        validate_stream_config({"name": "domains", **stream})
    for part in says:
        assert part in str(err.value)


def test_load_config_accepts_it_and_turns_a_bad_entry_into_one_config_error():
    from orchestrator.config import load_config

    stream = {**SMALL, "domains": ["digits", "digits:rot45", "digits:perm"]}
    config = load_config({"methods": {"finetune": {}}, "stream": stream})
    assert config.stream.num_tasks == 3 and config.stream.domains == stream["domains"]
    overrides = ["stream.name=domains", "stream.domains=[digits,digits:perm]"]
    config = load_config({"methods": {"finetune": {}}}, overrides)
    assert config.stream.num_tasks == 2 and config.stream.domains == ["digits", "digits:perm"]
    with pytest.raises(ConfigError) as err:
        load_config(
            {"methods": {"finetune": {}}, "stream": {**stream, "domains": ["digits:rotate"]}}
        )
    message = str(err.value)
    assert message.startswith("stream.domains entry 'digits:rotate'")
    assert "'<source>:rot<degrees>'" in message and "\n" not in message
