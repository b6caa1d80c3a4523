"""Config validation and run expansion — all before any Ray work starts."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import ray
from conftest import tiny_config, write_config

from learners import ConfigError
from orchestrator.cli import main
from orchestrator.config import expand_runs, load_config

RUN = ["run", "{config}", "--no-progress"]
REPORT = ["report", "tiny"]

# Every bad input: the command line ({config}, {tmp}, {file}, {too_many_cpus} filled in per
# test), a phrase of the one expected message, and environment variables to set.
BAD_INPUTS = [
    # methods and their hyperparameters (hp() dataclasses)
    (["methods={nope: {}}"], "unknown method 'nope'; accepted methods: ", {}),
    (["methods.ewc.ewc_lambda=-1"], "methods.ewc.ewc_lambda=-1", {}),
    (["methods.ewc.ewc_lambda=abc"], "methods.ewc.ewc_lambda", {}),
    (
        ["methods.ewc.ewc_lambda=inf"],
        "methods.ewc.ewc_lambda=inf is not accepted; expected a finite value >= 0",
        {},
    ),
    (["methods.replay.buffer_size=-5"], "methods.replay.buffer_size=-5", {}),
    (["methods.replay.buffr_size=5"], "unknown key methods.replay.buffr_size", {}),
    (["methods=3"], "methods must be a mapping, e.g. methods={finetune: {}}; got 3", {}),
    # stream
    (["stream.name=spiral"], "stream.name", {}),
    (["stream.num_tasks=0"], "stream.num_tasks", {}),
    (["stream.source=npz", "stream.path={tmp}/absent.npz"], "stream.path=", {}),
    (["stream.train_per_task=100000"], "stream.train_per_task=100000", {}),
    (["stream.max_angle=inf"], "stream.max_angle=inf is not a finite number", {}),
    (["stream.task_order=3"], "stream.task_order must be a list of integers or null", {}),
    # train and model
    (["train.lr=-0.1"], "train.lr=-0.1 is out of range; expected a value > 0", {}),
    (["train.lr=0"], "train.lr=0.0 is out of range; expected a value > 0", {}),
    (["train.lr=inf"], "train.lr=inf is not accepted; expected a finite value > 0", {}),
    (
        ["train.momentum=nan"],
        "train.momentum=nan is not accepted; expected a finite value in [0, 1]",
        {},
    ),
    (["train.optimizer=rmsprop"], "train.optimizer='rmsprop'", {}),
    (["train.epochs=many"], "train.epochs", {}),
    (["trian.lr=0.1"], "unknown key trian; accepted keys: name, plugins, methods, seeds", {}),
    (["train=5"], "train must be a mapping with keys epochs, batch_size", {}),
    (["model.dropout=-inf"], "model.dropout=-inf is not accepted", {}),
    (
        ["model.hidden=3"],
        "model.hidden must be a list of integers, e.g. model.hidden=[100,100]; got 3",
        {},
    ),
    (["model.hidden=[a]"], "model.hidden must be a list of integers", {}),
    (
        ["model.hidden=[0]"],
        "model.hidden=[0] is not accepted; expected a list of positive integers",
        {},
    ),
    # top level
    (["name="], "name must be a non-empty string; got nothing", {}),
    (["name=a/b"], "name='a/b' must be a non-empty string without '/'", {}),
    (["seeds=[]"], "seeds is empty", {}),
    (["seeds=0"], "seeds must be a list of integers, e.g. seeds=[0,1]; got 0", {}),
    (["seeds=[a]"], "seeds must be a list of integers, e.g. seeds=[0,1]; got [a]", {}),
    (["seeds=[0,1"], "override 'seeds=[0,1': the value is not valid YAML", {}),
    (
        ["task_orders=0"],
        "task_orders must be a list of lists of integers or null, e.g. task_orders=[[0,1,2],",
        {},
    ),
    (["task_orders=[0]"], "task_orders must be a list of lists of integers", {}),
    (["task_orders=[[0,0,1]]"], "stream.task_order=[0, 0, 1] is not a permutation", {}),
    (["plugins=x"], "plugins must be a list of strings, e.g. plugins=[my_methods]; got x", {}),
    (["plugins=[[x]]"], "plugins must be a list of module names", {}),
    (["plugins=[no_such_module_xyz]"], "plugins: cannot import 'no_such_module_xyz'", {}),
    # resources and Ray (no Ray is started to find out)
    (["resources.gpus_per_run=1.5"], "resources.gpus_per_run=1.5", {}),
    (["resources.cpus_per_run=inf"], "resources.cpus_per_run=inf is not accepted", {}),
    (
        ["resources.cpus_per_run={too_many_cpus}"],
        "resources.cpus_per_run={too_many_cpus} does not fit the local Ray instance",
        {},
    ),
    (
        ["resources.gpus_per_run=1", "ray.num_gpus=0"],
        "resources.gpus_per_run=1 does not fit the local Ray instance (0 GPUs, ray.num_gpus=0)",
        {},
    ),
    (["ray.num_cpus=0"], "ray.num_cpus=0 is not accepted; expected an integer >= 1", {}),
    (
        ["ray.num_cpus=1", "resources.cpus_per_run=2"],
        "ray.num_cpus=1 is less than resources.cpus_per_run=2",
        {},
    ),
    (["ray.num_gpus=-1"], "ray.num_gpus=-1 is not accepted; expected an integer >= 0", {}),
    (["ray.address=5"], "ray.address='5' is not accepted; expected host:port", {}),
    (["ray.address=127.0.0.1:1"], "ray.address=127.0.0.1:1 is unreachable", {}),
    (["ray.address=ray://127.0.0.1:1"], "ray.address=ray://127.0.0.1:1 is unreachable", {}),
    (
        ["--address", "127.0.0.1:1"],
        "ray.address=127.0.0.1:1 is unreachable (Connection refused); start the cluster",
        {},
    ),
    ([], "$RAY_ADDRESS=127.0.0.1:1 is unreachable", {"RAY_ADDRESS": "127.0.0.1:1"}),
    # checkpoints
    (["checkpoints.dir={file}"], "checkpoints.dir='{file}' is a file; expected a folder", {}),
    (
        ["checkpoints.dir={file}/sub"],
        "checkpoints.dir='{file}/sub' cannot be created: {file} is a file",
        {},
    ),
    # tracking
    (["tracking.uri=http://127.0.0.1:9"], "tracking.uri='http://127.0.0.1:9' is unreachable", {}),
    (
        ["tracking.uri=foo://bar"],
        "tracking.uri='foo://bar' has an unknown scheme 'foo://'; accepted: sqlite:///",
        {},
    ),
    (
        ["tracking.uri=null"],
        "$MLFLOW_TRACKING_URI='foo://bar' has an unknown scheme",
        {"MLFLOW_TRACKING_URI": "foo://bar"},
    ),
    (
        ["tracking.uri=sqlite:///{tmp}/nope/dir/mlflow.db"],
        "the folder {tmp}/nope/dir does not exist; create it or",
        {},
    ),
    (["tracking.uri=sqlite:///{tmp}"], "{tmp} is a folder; expected a database file", {}),
    (
        ["tracking.uri=postgresql://u:secret@127.0.0.1:1/db"],
        "tracking.uri='postgresql://u:***@127.0.0.1:1/db' is unreachable",
        {},
    ),
    (["tracking.uri=[1]"], "tracking.uri must be a string or null; got [1]", {}),
    (["tracking.artifact_location={file}"], "tracking.artifact_location='{file}' is a file", {}),
    (["tracking.flush_interval_s=nan"], "tracking.flush_interval_s=nan is not accepted", {}),
    (["retries.backoff_s=inf"], "retries.backoff_s=inf is not accepted; expected a finite", {}),
    # the config file itself
    ({"argv": ["run", "{tmp}/absent.yaml"]}, "config file '{tmp}/absent.yaml' does not exist", {}),
    (
        {"argv": ["run", "{tmp}/cwd"]},
        "config file '{tmp}/cwd' is a folder; expected a YAML file",
        {},
    ),
    # lia report
    (
        {"argv": [*REPORT, "--tracking-uri", "http://127.0.0.1:9"]},
        "tracking.uri='http://127.0.0.1:9' is unreachable",
        {},
    ),
    ({"argv": REPORT}, "no MLflow store at {tmp}/cwd/mlflow.db (the default tracking.uri=", {}),
    (
        {"argv": [*REPORT, "--tracking-uri", "sqlite:///{tmp}/absent.db"]},
        "no MLflow store at {tmp}/absent.db",
        {},
    ),
    ({"argv": [*REPORT, "--tracking-uri", "{tmp}/mlruns"]}, "no MLflow store at {tmp}/mlruns", {}),
    (
        {"argv": [*REPORT, "--tracking-uri", "foo://bar"]},
        "--tracking-uri='foo://bar' has an unknown scheme",
        {},
    ),
    (
        {"argv": [*REPORT, "--tracking-uri", "sqlite:///{file}", "--out", "{file}"]},
        "--out '{file}' is a file; give a folder",
        {},
    ),
    (
        {"argv": ["report", "", "--tracking-uri", "sqlite:///{file}"]},
        "the experiment name is empty",
        {},
    ),
]


def _listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _fill(text, values):
    for name, value in values.items():
        text = text.replace("{" + name + "}", value)
    return text


@pytest.mark.parametrize(
    ("args", "expected", "env"),
    [
        pytest.param(
            args,
            expected,
            env,
            id=" ".join(args if isinstance(args, list) else args["argv"]) or str(env),
        )
        for args, expected, env in BAD_INPUTS
    ],
)
def test_bad_input_is_refused_before_any_work(tmp_path, monkeypatch, capsys, args, expected, env):
    """One message naming what was wrong, exit code 2, no traceback, no Ray, nothing written."""
    config = write_config(tmp_path, tiny_config(tmp_path, methods={"ewc": {}, "replay": {}}))
    afile = tmp_path / "afile.txt"
    afile.write_text("not a folder")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("COLUMNS", "1000")  # so that the one message is printed on one line
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    fill = {
        "config": str(config),
        "tmp": str(tmp_path),
        "file": str(afile),
        "too_many_cpus": str((os.cpu_count() or 1) + 1),
    }
    argv = [_fill(a, fill) for a in (args["argv"] if isinstance(args, dict) else RUN + args)]
    before = _listing(tmp_path), _listing(cwd)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert _fill(expected, fill) in err, err
    assert "config error" in err or argv[0] == "report", err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not ray.is_initialized()
    assert (_listing(tmp_path), _listing(cwd)) == before


def test_runtime_errors_are_not_bad_input(tmp_path, monkeypatch, capsys):
    """A failure during a run is exit 1 with one line (the traceback only with -v)."""
    import orchestrator.preflight

    def fail(config):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(orchestrator.preflight, "check_run", fail)
    path = write_config(tmp_path, tiny_config(tmp_path))
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert "error: RuntimeError: boom" in err and "second line" not in err
    assert "Traceback" not in err
    assert main(["-v", "run", str(path)]) == 1
    assert "Traceback" in capsys.readouterr().err
    # lia report: an experiment that is not there is bad input (2), a crash is not (1)
    store = tmp_path / "store.db"
    store.touch()
    import orchestrator.report

    for error, code in ((ValueError("no MLflow experiment named 'x'"), 2), (KeyError("k"), 1)):

        def raise_it(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(orchestrator.report, "write_report", raise_it)
        argv = ["report", "x", "--tracking-uri", f"sqlite:///{store}", "--out", str(tmp_path)]
        assert main(argv) == code
        err = capsys.readouterr().err
        assert "error:" in err and "Traceback" not in err


def test_wrong_types_in_the_file_name_the_key(tmp_path):
    for changes, message in (
        (
            {"methods": ["finetune"]},
            'methods must be a mapping, e.g. methods={finetune: {}}; got ["finetune"]',
        ),
        (
            {"model": {"hidden": 3}},
            "model.hidden must be a list of integers, e.g. model.hidden=[100,100]; got 3",
        ),
        ({"seeds": 0}, "seeds must be a list of integers, e.g. seeds=[0,1]; got 0"),
        ({"name": None}, "name must be a non-empty string; got null"),
        ({"resources": 3}, "resources must be a mapping with keys cpus_per_run, "),
    ):
        with pytest.raises(ConfigError) as info:
            load_config(tiny_config(tmp_path, **changes))
        assert message in str(info.value)


def test_hp_exclusive_lower_bound_and_finite_floats():
    from dataclasses import dataclass

    from learners import hp
    from learners.hparams import check_ranges, describe_range

    @dataclass
    class HParams:
        rate: float = hp(0.1, help="a rate", gt=0.0)
        share: float = hp(0.5, help="a share", gt=0.0, high=1.0)
        free: float = hp(1.0, help="anything finite")

    fields = {f.name: f for f in dataclasses.fields(HParams)}
    assert describe_range(fields["rate"]) == "a value > 0"
    assert describe_range(fields["share"]) == "a value in (0, 1]"
    check_ranges(HParams())
    for values, message in (
        ({"rate": 0.0}, "rate=0.0 is out of range; expected a value > 0"),
        ({"share": 1.5}, "share=1.5 is out of range; expected a value in (0, 1]"),
        ({"free": float("inf")}, "free=inf is not accepted; expected a finite number"),
        ({"free": float("-inf")}, "free=-inf is not accepted"),
        ({"rate": float("nan")}, "rate=nan is not accepted; expected a finite value > 0"),
    ):
        with pytest.raises(ConfigError) as info:
            check_ranges(HParams(**values))
        assert message in str(info.value)


def test_error_lists_accepted_values(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tiny_config(tmp_path), ["methods={nope: {}}"])
    assert "ewc" in str(info.value) and "replay" in str(info.value)
    with pytest.raises(ConfigError, match="accepted keys: buffer_size, replay_batch_size"):
        load_config(tiny_config(tmp_path), ["methods={replay: {size: 3}}"])


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


def test_lia_clean_removes_checkpoints_and_with_results_the_local_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path, name="clean")
    path = write_config(tmp_path, config)
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / ".leases").mkdir(parents=True)
    (checkpoints / "abc" / "latest.pt").parent.mkdir()
    (checkpoints / "abc" / "latest.pt").write_bytes(b"x")
    (tmp_path / "mlflow.db").write_bytes(b"")
    assert main(["clean", str(path)]) == 0
    assert not checkpoints.exists() and (tmp_path / "mlflow.db").exists()
    assert main(["clean", str(path), "--results"]) == 0
    assert not (tmp_path / "mlflow.db").exists()
    assert main(["clean", str(path), "--results"]) == 0  # nothing left: still fine


def test_the_logged_config_holds_no_password():
    from orchestrator.config import to_yaml

    uri = "postgresql://lia:s3cret@127.0.0.1:5432/mlflow"
    config = load_config({"methods": {"finetune": {}}, "tracking": {"uri": uri}})
    text = to_yaml(config)
    assert "s3cret" not in text and "postgresql://lia:***@127.0.0.1:5432/mlflow" in text
    assert config.tracking.uri.endswith("lia:s3cret@127.0.0.1:5432/mlflow")  # used as given


SHIPPED = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    """What the README tells users to run is accepted as it is (a sweep config with its space)."""
    from omegaconf import OmegaConf

    from sweeps.config import load_sweep_config, sweep_spaces

    if "sweep" in OmegaConf.load(path):
        config = load_sweep_config(path)
        assert all(sweep_spaces(config).values())
    else:
        config = load_config(path)
    assert expand_runs(config)
