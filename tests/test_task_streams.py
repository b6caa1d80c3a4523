"""Defining properties of the offline sources and the stream builders in task_streams."""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from task_streams import (
    STREAM_BUILDERS,
    StreamConfig,
    build_stream,
    sources,
    validate_stream_config,
)
from task_streams.builders import pixel_permutations, rotate_images, rotation_angles
from task_streams.config import SOURCES
from task_streams.sources import load_source, read_idx

SMALL = {"source": "digits", "num_tasks": 3, "train_per_task": 200, "test_per_task": 100}
BUILDERS = {
    "permuted": {},
    "rotated": {},
    "split": {"classes_per_task": 2, "test_per_task": 50},
    "noisy_clean": {"num_tasks": 2},
}


def small(name: str, **overrides) -> StreamConfig:
    """A fast digits config of builder ``name``."""
    return StreamConfig(name=name, **{**SMALL, **BUILDERS[name], **overrides})


def rows(x: torch.Tensor) -> list[bytes]:
    """Each image (float in [0, 1] or uint8) as the bytes of its uint8 pixels."""
    if x.dtype != torch.uint8:
        x = (x * 255).round().to(torch.uint8)
    flat = x.reshape(len(x), -1).numpy()
    return [r.tobytes() for r in flat]


def pool(source: str) -> set[bytes]:
    """Every image of a source's train and test pools, as bytes."""
    data = load_source(source)
    return set(rows(data.x_train)) | set(rows(data.x_test))


def tensors(stream) -> list[torch.Tensor]:
    return [t for task in stream for t in (task.x_train, task.y_train, task.x_test, task.y_test)]


# ------------------------------------------------------------------------------------- sources


def test_mnist5k_split_4000_1000_stratified_disjoint_and_fast():
    sources.clear_source_cache()
    started = time.perf_counter()
    data = load_source("mnist5k")
    elapsed = time.perf_counter() - started
    assert elapsed < 3.0, f"loading mnist5k took {elapsed:.2f} s (target < 1 s)"
    assert data.x_train.shape == (4000, 28, 28) and data.x_test.shape == (1000, 28, 28)
    assert data.x_train.dtype == torch.uint8 and data.y_train.dtype == torch.int64
    assert data.num_classes == 10
    assert torch.bincount(data.y_train).tolist() == [400] * 10
    assert torch.bincount(data.y_test).tolist() == [100] * 10
    train, test = set(data.train_index.tolist()), set(data.test_index.tolist())
    assert not train & test and train | test == set(range(5000))
    assert not set(rows(data.x_train)) & set(rows(data.x_test))
    assert load_source("mnist5k") is data  # cached per process
    sources.clear_source_cache()
    again = load_source("mnist5k")  # the split never depends on anything but SPLIT_SEED
    assert torch.equal(again.train_index, data.train_index)
    assert torch.equal(again.x_test, data.x_test)


def test_digits_source_scaled_to_uint8_and_split():
    data = load_source("digits")
    assert data.x_train.shape[1:] == (8, 8) and len(data.y_train) + len(data.y_test) == 1797
    assert int(data.x_train.max()) == 255 and data.num_classes == 10
    assert set(data.y_test.tolist()) == set(range(10))
    assert not set(data.train_index.tolist()) & set(data.test_index.tolist())
    assert len(pool("digits")) == 1797  # no duplicate images: byte checks below are exact


def test_fashion_mnist_loads_when_installed():
    if not sources.FASHION_MNIST_DIR.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(
                f"{sources.FASHION_MNIST_DIR} missing: apt-get install dataset-fashion-mnist"
            )
        pytest.skip("dataset-fashion-mnist is not installed")
    data = load_source("fashion_mnist")
    assert data.x_train.shape == (60000, 28, 28) and data.x_test.shape == (10000, 28, 28)
    assert data.num_classes == 10 and data.train_index is None


def test_fashion_mnist_missing_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "FASHION_MNIST_DIR", tmp_path / "absent")
    sources.clear_source_cache()
    try:
        with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
            load_source("fashion_mnist")
    finally:
        sources.clear_source_cache()


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_folder(folder: Path, gz: bool, dotted: bool = False, n: int = 12, m: int = 5):
    rng = np.random.RandomState(0)
    arrays = {
        "train-images": rng.randint(0, 256, (n, 4, 5)),
        "train-labels": np.arange(n) % 3,
        "t10k-images": rng.randint(0, 256, (m, 4, 5)),
        "t10k-labels": np.arange(m) % 3,
    }
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        kind = "idx3" if array.ndim == 3 else "idx1"
        name = f"{stem}{'.' if dotted else '-'}{kind}-ubyte" + (".gz" if gz else "")
        data = idx_bytes(array)
        (folder / name).write_bytes(gzip.compress(data) if gz else data)
    return arrays


@pytest.mark.parametrize("gz,dotted", [(False, False), (True, False), (True, True)])
def test_idx_folder_round_trip(tmp_path, gz, dotted):
    arrays = write_idx_folder(tmp_path / "data", gz, dotted)
    data = load_source("idx", tmp_path / "data")
    assert data.x_train.dtype == torch.uint8
    assert np.array_equal(data.x_train.numpy(), arrays["train-images"])
    assert np.array_equal(data.y_test.numpy(), arrays["t10k-labels"])
    assert data.num_classes == 3 and data.input_shape == (1, 4, 5)
    stream = build_stream(
        {"name": "permuted", "source": "idx", "path": str(tmp_path / "data"), "num_tasks": 2,
         "train_per_task": 0, "test_per_task": 0}, seed=1,
    )  # fmt: skip
    assert stream[0].x_train.shape == (12, 1, 4, 5) and stream.num_classes == 3


def test_idx_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="stream.path"):
        load_source("idx", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="stream.path is required"):
        load_source("idx")
    folder = tmp_path / "d"
    write_idx_folder(folder, gz=False)
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_source("idx", folder)

    good = idx_bytes(np.zeros((3, 2, 2)))
    bad_magic = tmp_path / "bad_magic"
    bad_magic.write_bytes(b"\x01\x02" + good[2:])
    with pytest.raises(ValueError, match="magic"):
        read_idx(bad_magic)
    truncated = tmp_path / "truncated.gz"
    truncated.write_bytes(gzip.compress(good[:-3]))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(truncated)
    short_header = tmp_path / "short"
    short_header.write_bytes(good[:6])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(short_header)
    floats = tmp_path / "floats"
    floats.write_bytes(idx_bytes(np.zeros(4), code=0x0D)[:-4] + bytes(12))
    with pytest.raises(ValueError, match="unsigned byte"):
        read_idx(floats)

    mismatch = tmp_path / "mismatch"
    write_idx_folder(mismatch, gz=False)
    (mismatch / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(7)))
    with pytest.raises(ValueError, match="12 images but .* 7 labels"):
        load_source("idx", mismatch)


def test_npz_round_trip_and_pool_split(tmp_path):
    rng = np.random.RandomState(0)
    split = {
        "x_train": rng.randint(0, 256, (20, 6, 6)).astype(np.uint8),
        "y_train": np.arange(20) % 4,
        "x_test": rng.randint(0, 256, (8, 6, 6)).astype(np.uint8),
        "y_test": np.arange(8) % 4,
    }
    np.savez(tmp_path / "split.npz", **split)
    data = load_source("npz", tmp_path / "split.npz")
    assert np.array_equal(data.x_train.numpy(), split["x_train"]) and data.num_classes == 4

    x = rng.rand(50, 16).astype(np.float32)  # flat, 16 = 4x4, floats in [0, 1]
    y = np.arange(50) % 5
    np.savez(tmp_path / "pool.npz", x=x, y=y)
    data = load_source("npz", str(tmp_path / "pool.npz"))
    assert data.x_train.shape == (40, 1, 4, 4) and data.x_test.shape == (10, 1, 4, 4)
    assert torch.bincount(data.y_test).tolist() == [2] * 5
    assert not set(data.train_index.tolist()) & set(data.test_index.tolist())
    expected = np.rint(x * 255).astype(np.uint8).reshape(50, 1, 4, 4)
    assert np.array_equal(data.x_test.numpy(), expected[data.test_index.numpy()])
    stream = build_stream(
        {"name": "split", "source": "npz", "path": str(tmp_path / "pool.npz"), "num_tasks": 2,
         "train_per_task": 0, "test_per_task": 0, "scenario": "class"}, seed=0,
    )  # fmt: skip
    assert stream.info.task_classes == ((0, 1), (2, 3)) and stream.input_shape == (1, 4, 4)


@pytest.mark.parametrize(
    "arrays,message",
    [
        ({"images": np.zeros((4, 2, 2)), "labels": np.zeros(4)}, r"found arrays.*expected"),
        ({"x": np.zeros((4, 2, 2)), "y": np.zeros(3, dtype=int)}, "3 labels"),
        ({"x": np.zeros((4, 2, 2)), "y": np.array([0, 1, -1, 0])}, "negative"),
        ({"x": np.full((4, 2, 2), 2.0), "y": np.zeros(4, dtype=int)}, r"\[0, 1\]"),
        ({"x": np.zeros((4, 5)), "y": np.zeros(4, dtype=int)}, "perfect square"),
        ({"x": np.zeros((4, 5, 5, 3)), "y": np.zeros(4, dtype=int)}, "channels-last"),
    ],
)
def test_npz_errors(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message) as err:
        load_source("npz", tmp_path / "bad.npz")
    assert "stream.path" in str(err.value)


def test_npz_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="stream.path"):
        load_source("npz", tmp_path / "absent.npz")


# ------------------------------------------------------------------------------------- streams


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_stream_contract_and_determinism(name):
    config = small(name)
    stream = build_stream(config, seed=3)
    assert [t.id for t in stream] == list(range(config.num_tasks))
    assert stream.input_shape == (1, 8, 8)
    for task in stream:
        assert task.x_train.dtype == torch.float32 and task.y_train.dtype == torch.int64
        assert task.x_train.shape == (config.train_per_task, 1, 8, 8)
        assert task.x_test.shape == (config.test_per_task, 1, 8, 8)
        assert 0.0 <= float(task.x_train.min()) and float(task.x_train.max()) <= 1.0
        assert set(task.y_train.tolist()) <= set(task.classes)
        assert not set(rows(task.x_test)) & set(rows(task.x_train)), task.name
    again = build_stream(dataclasses.asdict(config), seed=3)
    assert all(torch.equal(a, b) for a, b in zip(tensors(stream), tensors(again), strict=True))
    other = build_stream(config, seed=4)
    assert not all(torch.equal(a, b) for a, b in zip(tensors(stream), tensors(other), strict=True))


def test_permuted_task0_original_then_true_permutations():
    stream = build_stream(small("permuted"), seed=0)
    perms = pixel_permutations(3, 64, seed=0)
    originals = pool("digits")
    assert set(rows(stream[0].x_train)) <= originals
    assert torch.equal(perms[0], torch.arange(64))
    for t in (1, 2):
        assert torch.equal(perms[t].sort().values, torch.arange(64))
        assert not torch.equal(perms[t], perms[0])
        x = stream[t].x_train.reshape(-1, 64)
        assert not set(rows(x)) & originals  # the images really are scrambled
        unpermuted = torch.empty_like(x)
        unpermuted[:, perms[t]] = x
        assert set(rows(unpermuted)) <= originals
        assert torch.equal(x[0].sort().values, unpermuted[0].sort().values)
    assert not torch.equal(perms[1], perms[2])


def test_rotated_angles_identity_and_half_turn():
    stream = build_stream(small("rotated", num_tasks=5, min_angle=0, max_angle=180), seed=0)
    assert stream.info.task_names == ("rot0", "rot45", "rot90", "rot135", "rot180")
    assert rotation_angles(1, 30.0, 90.0) == [30.0]
    assert set(rows(stream[0].x_train)) <= pool("digits")
    one = {"num_tasks": 1, "min_angle": 180.0, "max_angle": 180.0}
    upright = build_stream(small("rotated", num_tasks=1, max_angle=0.0), seed=7)[0]
    turned = build_stream(small("rotated", **one), seed=7)[0]
    assert torch.allclose(turned.x_train, torch.flip(upright.x_train, dims=(-2, -1)), atol=1e-5)
    x = torch.rand(4, 2, 8, 8)
    assert torch.allclose(rotate_images(x, 90.0), torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5)
    assert torch.equal(rotate_images(x, 0.0), x)


@pytest.mark.parametrize("name", ["permuted", "rotated"])
def test_shared_label_streams_may_give_the_task_identity(name):
    """scenario task on a permuted / rotated stream: the same images and labels as the
    domain-incremental stream, only the learner is told which task a sample is from."""
    domain = build_stream(small(name), seed=3)
    task = build_stream(small(name, scenario="task"), seed=3)
    assert domain.scenario == "domain" and task.scenario == "task"
    assert all(torch.equal(a, b) for a, b in zip(tensors(domain), tensors(task), strict=True))
    assert bool(task.info.class_mask().all())  # every task uses every output unit
    with pytest.raises(ValueError, match="expected 'domain'.*or 'task'"):
        build_stream(small(name, scenario="class"), seed=3)


@pytest.mark.parametrize("scenario", [None, "task", "class"])
def test_split_classes_disjoint_and_labels_kept(scenario):
    stream = build_stream(small("split", num_tasks=5, scenario=scenario), seed=0)
    assert stream.scenario == (scenario or "task") and stream.num_classes == 10
    assert stream.info.task_classes == ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))
    assert stream[1].name == "split_2_3"
    for task in stream:
        assert set(task.y_train.tolist()) == set(task.classes)
        assert set(task.y_test.tolist()) <= set(task.classes)


def test_split_domain_relabels_to_position_in_group():
    kept = build_stream(small("split", num_tasks=3, scenario="task"), seed=5)
    domain = build_stream(small("split", num_tasks=3, scenario="domain"), seed=5)
    assert domain.scenario == "domain" and domain.num_classes == 2
    assert domain.info.task_classes == ((0, 1),) * 3
    for t, (a, b) in enumerate(zip(kept, domain, strict=True)):
        assert torch.equal(a.x_train, b.x_train)
        assert torch.equal(b.y_train, a.y_train - 2 * t) and torch.equal(b.y_test, a.y_test - 2 * t)
    assert domain.metadata["class_groups"]["split_2_3"] == [2, 3]


def test_noisy_clean_two_tasks_disjoint_training_samples():
    stream = build_stream(small("noisy_clean", noise_std=0.5), seed=0)
    noisy, clean = stream
    assert stream.info.task_names == ("noisy", "clean") and stream.scenario == "domain"
    assert not torch.equal(noisy.x_test, clean.x_test)
    assert torch.equal(noisy.y_test, clean.y_test)  # same test samples, with and without noise
    originals = pool("digits")
    assert set(rows(clean.x_train)) <= originals and set(rows(clean.x_test)) <= originals
    assert not set(rows(noisy.x_train)) & originals
    assert 0.0 <= float(noisy.x_train.min()) and float(noisy.x_train.max()) <= 1.0
    plain = build_stream(small("noisy_clean", noise_std=0.0), seed=0)
    assert set(rows(plain[0].x_train)) <= originals
    assert not set(rows(plain[0].x_train)) & set(rows(plain[1].x_train))
    assert torch.equal(plain[1].x_train, clean.x_train)


def test_task_order_reorders_same_tasks():
    natural = build_stream(small("split", num_tasks=3), seed=2)
    ordered = build_stream(small("split", num_tasks=3, task_order=[2, 0, 1]), seed=2)
    assert ordered.info.task_names == ("split_4_5", "split_0_1", "split_2_3")
    assert [t.id for t in ordered] == [0, 1, 2]
    assert ordered.info.task_classes == ((4, 5), (0, 1), (2, 3))
    for position, natural_id in enumerate([2, 0, 1]):
        assert torch.equal(ordered[position].x_train, natural[natural_id].x_train)
    assert ordered.metadata["task_order"] == [2, 0, 1]


def test_longer_stream_starts_with_the_same_tasks():
    short = build_stream(small("permuted", num_tasks=2), seed=9)
    long = build_stream(small("permuted", num_tasks=4), seed=9)
    assert all(torch.equal(a.x_train, b.x_train) for a, b in zip(short, long[:2], strict=True))


def test_mnist5k_streams_build():
    stream = build_stream(StreamConfig(name="permuted", num_tasks=5), seed=0)
    assert (
        stream.input_shape == (1, 28, 28) and stream[4].num_train == 4000
    )  # 0 = every training image
    for task in stream:
        assert not set(rows(task.x_test)) & set(rows(task.x_train))


# ------------------------------------------------------------------------------------ validation


def test_validate_normalizes_dict_and_keeps_dataclass_fields():
    checked = validate_stream_config({"name": "split", "num_tasks": 2, "task_order": (1, 0)})
    assert isinstance(checked, StreamConfig)
    assert checked.task_order == [1, 0] and checked.source == "mnist5k"
    assert validate_stream_config(StreamConfig()) == StreamConfig()


@pytest.mark.parametrize(
    "overrides,key",
    [
        ({"name": "shuffled"}, "stream.name"),
        ({"source": "cifar"}, "stream.source"),
        ({"num_tasks": 0}, "stream.num_tasks"),
        ({"num_tasks": 2.5}, "stream.num_tasks"),
        ({"train_per_task": -1}, "stream.train_per_task"),
        ({"test_per_task": -5}, "stream.test_per_task"),
        ({"name": "split", "scenario": "online"}, "stream.scenario"),
        ({"name": "permuted", "scenario": "class"}, "stream.scenario"),
        ({"classes_per_task": 0}, "stream.classes_per_task"),
        ({"min_angle": 90.0, "max_angle": 45.0}, "stream.min_angle"),
        ({"noise_std": -0.1}, "stream.noise_std"),
        ({"source": "idx"}, "stream.path"),
        ({"source": "npz"}, "stream.path"),
        ({"path": "/tmp/x.npz"}, "stream.path"),
        ({"task_order": [0, 0, 1]}, "stream.task_order"),
        ({"task_order": [0, 1]}, "stream.task_order"),
        ({"task_order": "012"}, "stream.task_order"),
        ({"name": "noisy_clean", "num_tasks": 3}, "stream.num_tasks"),
        ({"name": "split", "num_tasks": 4, "classes_per_task": 3}, "stream.classes_per_task"),
        ({"train_per_task": 2000}, "stream.train_per_task"),
        ({"test_per_task": 400}, "stream.test_per_task"),
        ({"name": "split", "train_per_task": 300}, "stream.train_per_task"),
        ({"name": "noisy_clean", "num_tasks": 2, "train_per_task": 800}, "stream.train_per_task"),
        ({"colour": True}, "stream.colour"),
    ],
)
def test_bad_configs_name_the_key(overrides, key):
    config = {**SMALL, **overrides}
    with pytest.raises(ValueError) as err:
        build_stream(config, seed=0)
    assert key in str(err.value)
    assert str(err.value).startswith("stream.")


def test_error_messages_list_the_choices():
    with pytest.raises(ValueError, match="permuted") as err:
        validate_stream_config({"name": "shuffled"})
    assert all(name in str(err.value) for name in STREAM_BUILDERS)
    with pytest.raises(ValueError) as err:
        validate_stream_config({"source": "cifar"})
    assert all(source in str(err.value) for source in SOURCES)
    with pytest.raises(ValueError, match="accepted keys") as err:
        validate_stream_config({"colour": True})
    with pytest.raises(ValueError, match="seed"):
        build_stream(small("permuted"), seed=-1)


def test_validation_streams_never_read_the_test_pool():
    """stream.evaluate_on=validation: train and test samples both come from the source's
    training pool, disjoint, the same split for every seed; the default keys are unchanged."""
    from orchestrator import identity
    from task_streams.builders import build_stream, validate_stream_config
    from task_streams.sources import load_source, validation_view

    source = load_source("digits")
    view = validation_view(source)
    train_rows, val_rows = set(view.train_index.tolist()), set(view.test_index.tolist())
    assert not train_rows & val_rows
    assert train_rows | val_rows == set(source.train_index.tolist())  # no test-pool row
    assert len(val_rows) == pytest.approx(0.2 * len(source.y_train), abs=10)
    assert validation_view(source).test_index.tolist() == view.test_index.tolist()  # fixed

    def images(x: torch.Tensor) -> set[bytes]:
        as_bytes = x if x.dtype == torch.uint8 else (x * 255).round().to(torch.uint8)
        return {row.numpy().tobytes() for row in as_bytes.reshape(len(x), -1)}

    val_images, train_images = images(view.x_test), images(view.x_train)
    config = {"name": "split", "source": "digits", "num_tasks": 2, "evaluate_on": "validation"}
    for seed in (0, 1):
        stream = build_stream(config, seed)
        assert stream.metadata["source"] == "digits[validation]"
        for task in stream.tasks:
            assert images(task.x_test) <= val_images
            assert images(task.x_train) <= train_images
    # the default (test) hashes as before the setting existed; validation is another config
    resolved = {"label": "a", "method": "finetune", "hparams": {}, "seed": 0, "train": {}}
    key = identity.config_key({**resolved, "stream": {"name": "split"}})
    default = {"name": "split", "evaluate_on": "test"}
    validation = {"name": "split", "evaluate_on": "validation"}
    assert identity.config_key({**resolved, "stream": default}) == key
    assert identity.config_key({**resolved, "stream": validation}) != key
    with pytest.raises(ValueError, match="stream.evaluate_on='train'"):
        validate_stream_config({"evaluate_on": "train"})
