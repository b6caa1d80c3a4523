"""lia sweep end to end: trial states, pruning honesty, export, and a driver killed mid-sweep."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from conftest import tiny_config
from mlflow.tracking import MlflowClient

from orchestrator.cli import main

LRS = [0.1, 0.2, 0.05, 0.3, 1e-5, 2e-5, 1e30, 3e-5, 0.15]


def _sweep_config(tmp_path, name: str, **sweep) -> dict:
    config = tiny_config(tmp_path, name=name, methods={"finetune": {}}, seeds=[0])
    config["resources"] = {"max_concurrent_runs": 1}  # trials one after another: reproducible
    config["sweep"] = {
        "n_trials": len(LRS),
        "space": {"train.lr": {"type": "categorical", "choices": LRS}},
        "sampler": "grid",
        "pruner": "median",
        "storage": f"sqlite:///{tmp_path}/optuna.db",
        **sweep,
    }
    return config


def _study(tmp_path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/optuna.db")


@pytest.mark.usefixtures("ray_local")
def test_a_sweep_records_complete_pruned_and_failed_trials_honestly(tmp_path, capsys):
    config = _sweep_config(tmp_path, "states")
    path = tmp_path / "states.yaml"
    path.write_text(yaml.safe_dump(config))
    export = tmp_path / "best.yaml"
    assert main(["sweep", str(path), "--no-progress", "--export", str(export)]) == 0
    study = _study(tmp_path, "states-finetune")
    states = optuna.trial.TrialState
    by_lr = {t.params["train.lr"]: t for t in study.trials}
    assert len(study.trials) == len(LRS) and set(by_lr) == set(LRS)
    assert by_lr[1e30].state == states.FAIL  # diverged
    assert "TrainingDiverged" in by_lr[1e30].user_attrs["lia.fail_reason"]
    pruned = [t for t in study.trials if t.state == states.PRUNED]
    complete = [t for t in study.trials if t.state == states.COMPLETE]
    assert pruned and complete
    # a pruned trial stopped early: fewer reported steps than tasks; Optuna keeps its last
    # intermediate value, but the state says it is not a final result
    for t in pruned:
        assert t.params["train.lr"] < 1e-3 and len(t.intermediate_values) < 3
        assert t.value == t.intermediate_values[max(t.intermediate_values)]
    for t in complete:  # complete trials ran every task; their value is the final ACC
        assert sorted(t.intermediate_values) == [0, 1, 2]
        assert 0 < t.value <= 1
    # MLflow: one child per trial run, tagged with its trial and state; pruned ones KILLED
    client = MlflowClient(tracking_uri=config["tracking"]["uri"])
    exp = client.get_experiment_by_name("states-sweep")
    runs = client.search_runs([exp.experiment_id], "tags.`lia.kind` = 'run'", max_results=100)
    assert len(runs) == len(LRS)
    state_of = {int(r.data.tags["optuna.trial_number"]): r for r in runs}
    for t in study.trials:
        run = state_of[t.number]
        expected = {states.COMPLETE: "complete", states.PRUNED: "pruned", states.FAIL: "failed"}
        assert run.data.tags["trial_state"] == expected[t.state]
        if t.state == states.PRUNED:
            assert run.info.status == "KILLED"
        if t.state == states.COMPLETE:
            assert run.data.metrics["ACC"] == pytest.approx(t.value)
    (parent,) = client.search_runs([exp.experiment_id], "tags.`lia.kind` = 'invocation'")
    assert parent.data.tags["sweep.protocol"] == "full"
    assert parent.data.tags["best.train.lr"] == str(study.best_params["train.lr"])
    files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "optimization_history.png"} <= files
    # the export is a config lia run accepts, holding the best value
    exported = yaml.safe_load(export.read_text())
    assert exported["train"]["lr"] == study.best_params["train.lr"] and "sweep" not in exported
    assert main(["run", str(export), "--no-progress"]) == 0
    # lia report on the sweep's experiment: the study, its protocol and trial states first
    capsys.readouterr()
    out_dir = tmp_path / "report"
    assert (
        main(
            ["report", "states-sweep", "--tracking-uri", config["tracking"]["uri"]]
            + ["--out", str(out_dir)]
        )
        == 0
    )
    summary = (out_dir / "summary.md").read_text()
    assert "### Study `states-finetune` (finetune)" in summary
    assert "**protocol: full**" in summary
    counts = {
        s: sum(t.state == getattr(states, s.upper()) for t in study.trials)
        for s in ("complete", "pruned")
    }
    assert f"{counts['complete']} complete, {counts['pruned']} pruned, 1 failed" in summary
    assert f"train.lr={study.best_params['train.lr']}" in summary
    assert summary.index("## Studies") < summary.index("Mean ± standard deviation")


def test_bad_sweep_input_is_refused_before_work(tmp_path, capsys):
    cases = [
        ({"space": {"ewc_lambda": [1, 10]}}, "sweep.space.ewc_lambda"),
        ({"objective": ["ACC", "stored_bytes"], "pruner": "median"}, "multi-objective"),
        ({"n_trials": 0}, "sweep.n_trials"),
        ({"sampler": "bayes"}, "sweep.sampler"),
        ({"space": {"train.lr": {"type": "log", "low": 0.0, "high": 1.0}}}, "sweep.space"),
        ({"objective": ["forgetting"]}, "pruning fits objective ACC only"),
        ({"objective": ["FWT"], "pruner": "none", "_class_il": True}, "FWT is undefined"),
        ({"n_trials": 10}, "more than the grid's 9 points"),
        ({"protocol": "heldout", "_train": 1200}, "exceeds the 1151 samples available"),
    ]
    for changes, expected in cases:
        changes = dict(changes)
        class_il = changes.pop("_class_il", False)
        train = changes.pop("_train", None)
        config = _sweep_config(tmp_path, "bad", **changes)
        if train:  # the evaluation stream has 1,437 digits to train on, validation 1,151
            config["stream"]["train_per_task"] = train
        if class_il:
            config["stream"] = {"name": "split", "source": "digits", "scenario": "class"}
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(config))
        assert main(["sweep", str(path), "--no-progress"]) == 2, changes
        err = " ".join(capsys.readouterr().err.split())
        assert expected in err and "Traceback" not in err, (changes, err)
        assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_sweep_resumes_after_its_driver_is_killed(tmp_path):
    config = _sweep_config(tmp_path, "resume", n_trials=4, pruner="none")
    lrs = [0.05, 0.1, 0.2, 0.3]
    config["sweep"]["space"] = {"train.lr": {"type": "categorical", "choices": lrs}}
    config["train"]["epochs"] = 30
    config["stream"]["num_tasks"] = 4
    config["tracking"]["flush_interval_s"] = 0
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "orchestrator.cli", "sweep", str(path), "--no-progress"]
    driver = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    uri = config["tracking"]["uri"]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert driver.poll() is None, driver.stdout.read()
        try:
            study = _study(tmp_path, "resume-finetune")
            if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
                break
        except Exception:
            pass
        time.sleep(0.3)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    assert main(["sweep", str(path), "--no-progress"]) == 0
    study = _study(tmp_path, "resume-finetune")
    states = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    orphaned = [t for t in trials if "lia.orphaned" in t.user_attrs]
    decided = [t for t in trials if t.state.is_finished() and t not in orphaned]
    assert orphaned and all(t.state == states.FAIL for t in orphaned)
    assert len(decided) == 4 and not [t for t in trials if t.state == states.RUNNING]
    assert sorted(t.params["train.lr"] for t in decided) == lrs
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("resume-sweep")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    children = [r for r in runs if r.data.tags.get("lia.kind") == "run"]
    finished = [r.data.tags["run_key"] for r in children if r.info.status == "FINISHED"]
    assert len(finished) == len(set(finished)) == 4  # each trial run computed once


@pytest.mark.usefixtures("ray_local")
def test_protocols_heldout_and_first_tasks_tune_on_what_they_say(tmp_path, capsys):
    lrs = [0.05, 0.2]
    space = {"train.lr": {"type": "categorical", "choices": lrs}}
    config = _sweep_config(
        tmp_path, "heldout", n_trials=2, pruner="none", protocol="heldout", space=space
    )
    path = tmp_path / "heldout.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["sweep", str(path), "--no-progress"]) == 0
    client = MlflowClient(tracking_uri=config["tracking"]["uri"])
    tuning = client.get_experiment_by_name("heldout-sweep")
    runs = client.search_runs([tuning.experiment_id], "tags.`lia.kind` = 'run'")
    assert {r.data.tags["seed"] for r in runs} == {"10000"}  # tuned on other seeds
    # ... and on a validation split of the training pool, never on the test images
    assert {r.data.params["stream.evaluate_on"] for r in runs} == {"validation"}
    evaluation = client.get_experiment_by_name("heldout")  # then a lia run experiment
    (best,) = client.search_runs([evaluation.experiment_id], "tags.`lia.kind` = 'run'")
    study = _study(tmp_path, "heldout-finetune")
    assert best.data.tags["seed"] == "0"
    assert best.data.params["stream.evaluate_on"] == "test"
    assert float(best.data.params["train.lr"]) == study.best_params["train.lr"]
    assert "best values on the evaluation stream" in capsys.readouterr().out
    out_dir = tmp_path / "report"
    uri = ["--tracking-uri", config["tracking"]["uri"], "--out", str(out_dir)]
    assert main(["report", "heldout", *uri]) == 0  # the evaluation says how it was tuned
    summary = (out_dir / "summary.md").read_text()
    assert "study `heldout-finetune`" in summary and "**protocol: heldout**" in summary

    config = _sweep_config(
        tmp_path, "first", n_trials=2, pruner="none", protocol="first_tasks", space=space
    )
    config["sweep"]["first_tasks"] = 2
    path = tmp_path / "first.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["sweep", str(path), "--no-progress"]) == 0
    for trial in _study(tmp_path, "first-finetune").trials:
        assert sorted(trial.intermediate_values) == [0, 1]  # 2 of the stream's 3 tasks


@pytest.mark.usefixtures("ray_local")
def test_two_objectives_report_their_pareto_front(tmp_path):
    config = tiny_config(tmp_path, name="pareto", methods={"replay": {}}, seeds=[0])
    config["stream"]["num_tasks"] = 2
    config["resources"] = {"max_concurrent_runs": 1}
    config["sweep"] = {
        "n_trials": 2,
        "space": {"buffer_size": {"type": "categorical", "choices": [20, 80]}},
        "objective": ["ACC", "stored_bytes"],
        "sampler": "grid",
        "pruner": "none",
        "storage": f"sqlite:///{tmp_path}/optuna.db",
    }
    path = tmp_path / "pareto.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["sweep", str(path), "--no-progress"]) == 0
    study = _study(tmp_path, "pareto-replay")
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    by_size = {t.params["buffer_size"]: t.values for t in study.trials}
    assert by_size[20][1] < by_size[80][1]  # stored bytes grow with the buffer
    out_dir = tmp_path / "report"
    uri = ["--tracking-uri", config["tracking"]["uri"], "--out", str(out_dir)]
    assert main(["report", "pareto-sweep", *uri]) == 0
    summary = (out_dir / "summary.md").read_text()
    front = summary.split("Pareto front:")[1].split("Best complete trials")[0]
    assert {t.number for t in study.best_trials} == {
        int(line.split("|")[1])
        for line in front.splitlines()
        if line.startswith("|") and line.split("|")[1].strip().isdigit()
    }
