"""Run identity: configurations kept apart, code changes re-run only what they touch."""

from __future__ import annotations

import sys
import textwrap

import pytest
from conftest import tiny_config, write_config
from mlflow.tracking import MlflowClient

from learners import LEARNERS
from orchestrator import identity, load_experiment
from orchestrator.cli import main
from orchestrator.config import expand_runs, load_config
from orchestrator.report import write_report

EDITED = '''
"""Test plugin: a learner whose file the test edits."""
from learners.base import register
from learners.finetune import FineTune


@register("edited")
class Edited(FineTune):
    """Fine-tuning, in a file of its own."""

    def before_task(self, task):
        {body}
'''


def _write_plugin(folder, body: str) -> None:
    (folder / "lia_edited_plugin.py").write_text(textwrap.dedent(EDITED).format(body=body))


def test_keys_separate_configuration_seed_and_code(tmp_path):
    config = load_config(tiny_config(tmp_path))
    runs = expand_runs(config)
    by_label: dict[str, set[str]] = {}
    for run in runs:
        by_label.setdefault(run.label, set()).add(run.config_key)
    assert all(len(keys) == 1 for keys in by_label.values())  # seeds share a config key
    assert len({r.run_key for r in runs}) == len({r.instance_key for r in runs}) == len(runs)
    # a renamed label is the same run; another learning rate is another configuration
    renamed = expand_runs(
        load_config(tiny_config(tmp_path, methods={"ft": {"method": "finetune"}}))
    )
    assert {r.run_key for r in renamed} == {r.run_key for r in runs if r.label == "finetune"}
    other_lr = expand_runs(load_config(tiny_config(tmp_path), ["train.lr=0.05"]))
    assert not {r.config_key for r in other_lr} & {r.config_key for r in runs}
    # the code is part of the run key only
    resolved = runs[0].resolved
    assert identity.run_key(resolved, "a") != identity.run_key(resolved, "b")
    assert identity.instance_key(resolved) == runs[0].instance_key


def test_settings_added_later_leave_the_keys_of_earlier_runs_unchanged(tmp_path):
    """A run recorded before stream.evaluate_on / stream.domains existed (its resolved config
    lacks them) keeps its keys; a non-default value makes another configuration."""
    (run,) = expand_runs(load_config(tiny_config(tmp_path, methods={"finetune": {}}, seeds=[0])))
    assert run.resolved["stream"]["domains"] is None
    older = {**run.resolved, "stream": dict(run.resolved["stream"])}
    del older["stream"]["domains"], older["stream"]["evaluate_on"]
    assert identity.config_key(older) == run.config_key
    assert identity.instance_key(older) == run.instance_key
    other = {**run.resolved, "stream": {**run.resolved["stream"], "domains": ["digits"]}}
    assert identity.config_key(other) != run.config_key


def test_code_hash_follows_the_methods_files_not_their_comments(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    _write_plugin(tmp_path, "pass")
    import lia_edited_plugin  # noqa: F401

    files = [p.name for p in identity.code_files("edited")]
    assert files[:3] == ["lia_edited_plugin.py", "finetune.py", "base.py"]
    assert "builders.py" in files and "evaluation.py" in files
    before = identity.code_hash("edited")
    ewc, replay = identity.code_hash("ewc"), identity.code_hash("replay")
    _write_plugin(tmp_path, "pass  # a comment changes nothing")
    assert identity.code_hash("edited") == before
    _write_plugin(tmp_path, "self.touched = True")
    assert identity.code_hash("edited") != before
    assert (identity.code_hash("ewc"), identity.code_hash("replay")) == (ewc, replay)
    # forget this copy of the plugin: the end-to-end test imports its own
    del sys.modules["lia_edited_plugin"], LEARNERS["edited"]


def test_two_same_configurations_under_two_labels_are_refused(tmp_path):
    from learners import ConfigError

    with pytest.raises(ConfigError, match="same configuration"):
        expand_runs(
            load_config(
                tiny_config(tmp_path, methods={"finetune": {}, "copy": {"method": "finetune"}})
            )
        )


@pytest.mark.usefixtures("ray_local")
def test_a_changed_learner_file_reruns_only_its_runs(ray_local, tmp_path, capsys):
    plugin_dir = ray_local
    _write_plugin(plugin_dir, "pass")
    config = tiny_config(
        tmp_path,
        name="code",
        seeds=[0],
        plugins=["lia_edited_plugin"],
        methods={"finetune": {}, "edited": {}},
    )
    path = write_config(tmp_path, config)
    uri = config["tracking"]["uri"]
    assert main(["run", str(path), "--no-progress"]) == 0
    capsys.readouterr()
    first = load_experiment("code", tracking_uri=uri).set_index("label")

    _write_plugin(plugin_dir, "self.touched = True")  # a fix to the learner
    assert main(["run", str(path), "--no-progress"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "1 of 2 runs already finished" in err
    assert "1 runs re-run because their code changed since they finished (edited)" in err
    second = load_experiment("code", tracking_uri=uri).set_index("label")
    assert second.loc["finetune", "mlflow_run_id"] == first.loc["finetune", "mlflow_run_id"]
    assert second.loc["edited", "mlflow_run_id"] != first.loc["edited", "mlflow_run_id"]
    assert second.loc["edited", "code_hash"] != first.loc["edited", "code_hash"]

    # --reuse any keeps results whatever the code; renaming a label re-runs nothing
    _write_plugin(plugin_dir, "self.touched = 2")
    assert main(["run", str(path), "--no-progress", "--reuse", "any"]) == 0
    assert "2 of 2 runs already finished" in " ".join(capsys.readouterr().err.split())
    config["methods"] = {"ft": {"method": "finetune"}}
    assert main(["run", str(write_config(tmp_path, config)), "--no-progress"]) == 0
    assert "1 of 1 runs already finished" in " ".join(capsys.readouterr().err.split())
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(first.loc["finetune", "mlflow_run_id"])
    assert run.data.tags["label"] == "ft"  # the latest name is the one reports show
    # and --reuse none computes everything again
    path = write_config(tmp_path, config)
    assert main(["run", str(path), "--no-progress", "--reuse", "none"]) == 0
    assert "runs: 1 finished, 0 failed, 0 skipped" in " ".join(capsys.readouterr().err.split())


@pytest.mark.usefixtures("ray_local")
def test_a_report_over_two_learning_rates_keeps_them_apart(tmp_path):
    config = tiny_config(tmp_path, name="two-lr", methods={"finetune": {}}, seeds=[0, 1])
    path = write_config(tmp_path, config)
    assert main(["run", str(path), "--no-progress"]) == 0
    assert main(["run", str(path), "--no-progress", "train.lr=0.05"]) == 0
    uri = config["tracking"]["uri"]
    runs = load_experiment("two-lr", tracking_uri=uri)
    assert len(runs) == 4 and runs["config_key"].nunique() == 2
    written = write_report("two-lr", tmp_path / "report", ["md", "csv"], tracking_uri=uri)
    md = written["md"].read_text()
    assert "finetune (train.lr=0.1)" in md and "finetune (train.lr=0.05)" in md
    for lr in (0.1, 0.05):
        group = runs[runs["params"].map(lambda p, lr=lr: p["train.lr"] == str(lr))]
        assert len(group) == 2 and group["config_key"].nunique() == 1
    latest = load_experiment("two-lr", tracking_uri=uri, latest=True)
    assert set(latest["params"].map(lambda p: p["train.lr"])) == {"0.05"}
    one = load_experiment("two-lr", tracking_uri=uri, config_key=runs["config_key"].iloc[0][:6])
    assert len(one) == 2


def test_code_hash_covers_the_project_modules_a_method_imports():
    """A fix in a helper module a method imports (GEM's episodic memory, DER's buffer)
    changes that method's runs' keys, not only fixes in its class and base classes."""
    names = ("gem", "agem", "der", "er_ace", "si", "online_ewc", "ewc", "finetune")
    files = {name: {p.name for p in identity.code_files(name)} for name in names}
    assert "_episodic.py" in files["gem"] and "_episodic.py" in files["agem"]
    assert "replay.py" in files["der"] and "replay.py" in files["er_ace"]
    assert "_importance.py" in files["si"] and "ewc.py" in files["online_ewc"]
    assert "_episodic.py" not in files["ewc"] and "replay.py" not in files["finetune"]
