"""Config validation and run expansion — all before any Ray work starts."""

from __future__ import annotations

import pytest
import ray
from conftest import tiny_config, write_config

from learners import ConfigError
from orchestrator.cli import main
from orchestrator.config import expand_runs, load_config


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("methods={nope: {}}", "unknown method 'nope'; accepted methods: "),
        ("methods.ewc.ewc_lambda=-1", "methods.ewc.ewc_lambda=-1"),
        ("methods.ewc.ewc_lambda=abc", "methods.ewc.ewc_lambda"),
        ("methods.replay.buffer_size=-5", "methods.replay.buffer_size=-5"),
        ("methods.replay.buffr_size=5", "unknown key methods.replay.buffr_size"),
        ("stream.name=spiral", "stream.name"),
        ("stream.num_tasks=0", "stream.num_tasks"),
        ("train.lr=-0.1", "train.lr=-0.1"),
        ("train.optimizer=rmsprop", "train.optimizer='rmsprop'"),
        ("train.epochs=many", "train.epochs"),
        ("trian.lr=0.1", "unknown key trian"),
        ("seeds=[]", "seeds is empty"),
        ("resources.gpus_per_run=1.5", "resources.gpus_per_run=1.5"),
        ("plugins=[no_such_module_xyz]", "plugins: cannot import 'no_such_module_xyz'"),
    ],
)
def test_bad_config_fails_with_one_message_before_ray(tmp_path, capsys, override, expected):
    path = write_config(tmp_path, tiny_config(tmp_path, methods={"ewc": {}, "replay": {}}))
    assert main(["run", str(path), "--no-progress", override]) == 2
    err = capsys.readouterr().err
    assert expected in " ".join(err.split()), err
    assert "config error" in err
    assert not ray.is_initialized()
    assert not (tmp_path / "mlflow.db").exists()


def test_error_lists_accepted_values(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tiny_config(tmp_path), ["methods={nope: {}}"])
    assert "ewc" in str(info.value) and "replay" in str(info.value)
    with pytest.raises(ConfigError, match="accepted keys: buffer_size, replay_batch_size"):
        load_config(tiny_config(tmp_path), ["methods={replay: {size: 3}}"])


def test_unreachable_tracking_server_fails_fast(tmp_path, capsys):
    path = write_config(tmp_path, tiny_config(tmp_path))
    assert main(["run", str(path), "tracking.uri=http://127.0.0.1:9"]) == 2
    assert "tracking.uri='http://127.0.0.1:9' is unreachable" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_missing_config_file(capsys):
    assert main(["run", "does/not/exist.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_run_keys_are_stable_and_change_with_the_config(tmp_path):
    config = load_config(tiny_config(tmp_path))
    first = [r.run_key for r in expand_runs(config)]
    assert first == [r.run_key for r in expand_runs(load_config(tiny_config(tmp_path)))]
    assert len(set(first)) == 4  # 2 methods x 2 seeds
    changed_config = load_config(tiny_config(tmp_path), ["train.lr=0.05"])
    changed = [r.run_key for r in expand_runs(changed_config)]
    assert not set(first) & set(changed)
    # the tracking location is not part of a run's identity
    moved = load_config(tiny_config(tmp_path), ["tracking.uri=sqlite:///elsewhere.db"])
    assert [r.run_key for r in expand_runs(moved)] == first


def test_task_orders_expand_and_are_validated(tmp_path):
    config = load_config(tiny_config(tmp_path, task_orders=[[0, 1, 2], [2, 0, 1]]))
    runs = expand_runs(config)
    assert len(runs) == 8
    assert {r.resolved["stream"]["task_order"][0] for r in runs} == {0, 2}
    with pytest.raises(ConfigError, match="task_order"):
        load_config(tiny_config(tmp_path, task_orders=[[0, 0, 1]]))


def test_labels_pick_methods(tmp_path):
    config = load_config(
        tiny_config(
            tmp_path,
            methods={
                "ewc_weak": {"method": "ewc", "ewc_lambda": 1.0},
                "ewc_strong": {"method": "ewc", "ewc_lambda": 1e4},
            },
        )
    )
    runs = expand_runs(config)
    assert {r.method for r in runs} == {"ewc"}
    assert {r.resolved["hparams"]["ewc_lambda"] for r in runs} == {1.0, 1e4}


def test_missing_or_short_user_data_fails_before_ray(tmp_path, capsys):
    path = write_config(tmp_path, tiny_config(tmp_path))
    missing = ["stream.source=npz", f"stream.path={tmp_path}/absent.npz"]
    assert main(["run", str(path), *missing]) == 2
    assert "stream.path=" in capsys.readouterr().err
    # more samples per task than the data holds (found by building the stream once)
    assert main(["run", str(path), "stream.train_per_task=100000"]) == 2
    assert "stream.train_per_task=100000" in " ".join(capsys.readouterr().err.split())
    assert not ray.is_initialized() and not (tmp_path / "mlflow.db").exists()
