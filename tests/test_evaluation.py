"""Running learners over real (bundled) streams: R matrices, determinism, stop and divergence."""

from __future__ import annotations

import pytest
import torch

from learners import (
    ModelConfig,
    TrainConfig,
    TrainingDiverged,
    TrainingStopped,
    build_learner,
)
from learners.evaluation import evaluate, iter_stream, run_stream
from learners.metrics import compute_metrics
from task_streams import StreamConfig, build_stream

MODEL = ModelConfig(hidden=[64])


def digits_split(scenario: str = "class"):
    """Digits 0-4 then 5-9: two tasks with every image of their classes."""
    return build_stream(
        StreamConfig(
            name="split", source="digits", num_tasks=2, classes_per_task=5, scenario=scenario
        ),
        seed=0,
    )


def test_finetune_forgets_and_joint_does_not_on_split_digits():
    stream = digits_split("class")
    train = TrainConfig(epochs=5, batch_size=16, optimizer="adam", lr=1e-3)
    results = {}
    for method in ("finetune", "joint"):
        learner = build_learner(method, stream.info, model=MODEL, train=train, seed=0)
        results[method] = run_stream(learner, stream)
    finetune, joint = results["finetune"].R, results["joint"].R
    # both learn task 0 first; fine-tuning then loses it, joint training keeps it
    assert finetune[0][0] > 0.9 and joint[0][0] > 0.9
    assert finetune[1][0] < 0.2
    assert joint[1][0] > 0.85 and joint[1][1] > 0.85
    m_ft = compute_metrics(results["finetune"], "class")
    m_joint = compute_metrics(results["joint"], "class")
    assert m_ft.forgetting > 0.7 and m_joint.forgetting < 0.1
    assert m_ft.fwt is None and "class-incremental" in m_ft.undefined["FWT"]


@pytest.mark.parametrize("method", ["finetune", "ewc", "replay", "joint"])
def test_same_seed_gives_a_bit_identical_r_matrix(method):
    stream = build_stream(
        StreamConfig(
            name="permuted", source="digits", num_tasks=3, train_per_task=300, test_per_task=200
        ),
        seed=3,
    )
    rows = []
    for _ in range(2):
        learner = build_learner(method, stream.info, model=MODEL, seed=3)
        r = run_stream(learner, stream)
        rows.append((r.random_init, r.R))
    assert rows[0] == rows[1]
    other = run_stream(build_learner(method, stream.info, model=MODEL, seed=4), stream)
    assert (other.random_init, other.R) != rows[0]


def test_iter_stream_events_and_resources():
    stream = build_stream(
        StreamConfig(
            name="permuted", source="digits", num_tasks=2, train_per_task=100, test_per_task=50
        ),
        seed=0,
    )
    learner = build_learner("replay", stream.info, {"buffer_size": 40}, model=MODEL)
    events = list(iter_stream(learner, stream))
    assert [e["kind"] for e in events] == ["init", "task", "task"]
    assert [e["task"] for e in events[1:]] == [0, 1]
    last = events[-1]
    assert last["steps"] == 10 and last["stored_samples"] == 40
    assert last["model_parameters"] == 64 * 64 + 64 + 64 * 10 + 10
    assert last["stored_bytes"] > 40 * 64 * 4 and last["peak_memory_bytes"] > 0
    assert last["row"] == evaluate(learner, stream)


def test_learn_stops_between_batches():
    stream = build_stream(
        StreamConfig(
            name="permuted", source="digits", num_tasks=1, train_per_task=100, test_per_task=50
        ),
        seed=0,
    )
    learner = build_learner("finetune", stream.info, model=MODEL)
    calls = []

    def stop_after_three() -> bool:
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(TrainingStopped, match="after 3 steps"):
        learner.learn(stream[0], should_stop=stop_after_three)
    assert learner.tasks_learned == 0


def test_diverging_training_fails_loudly():
    # an EWC penalty far too stiff for SGD's step size: lr * lambda * F >> 2
    stream = build_stream(
        StreamConfig(
            name="permuted", source="digits", num_tasks=2, train_per_task=200, test_per_task=50
        ),
        seed=0,
    )
    learner = build_learner("ewc", stream.info, {"ewc_lambda": 1e6}, model=MODEL, seed=0)
    learner.learn(stream[0])
    with pytest.raises(TrainingDiverged, match="lower train.lr"):
        learner.learn(stream[1])


def test_task_incremental_predict_needs_the_task_id_and_masks_other_classes():
    stream = digits_split("task")
    learner = build_learner("finetune", stream.info, model=MODEL)
    with pytest.raises(ValueError, match="task_id"):
        learner.predict(stream[0].x_test)
    predicted = learner.predict(stream[1].x_test, task_id=1)
    assert set(predicted.unique().tolist()) <= set(stream[1].classes)
    assert torch.equal(predicted, learner.predict(stream[1].x_test, task_id=1))


def test_cnn_backbone_learns_a_task():
    stream = build_stream(StreamConfig(name="permuted", source="digits", num_tasks=1), seed=0)
    model = ModelConfig(backbone="cnn", cnn_channels=[8, 16], cnn_fc=32)
    learner = build_learner(
        "finetune",
        stream.info,
        model=model,
        train=TrainConfig(epochs=3, batch_size=32, optimizer="adam", lr=3e-3),
    )
    assert learner.model(stream[0].x_test[:4]).shape == (4, 10)
    before = evaluate(learner, stream)[0]
    learner.learn(stream[0])
    assert evaluate(learner, stream)[0] > max(0.8, before + 0.5)


def test_cnn_that_pools_below_one_pixel_is_refused():
    stream = build_stream(StreamConfig(name="permuted", source="digits", num_tasks=1), seed=0)
    with pytest.raises(ValueError, match="cnn_channels"):
        build_learner(
            "finetune", stream.info, model=ModelConfig(backbone="cnn", cnn_channels=[4, 4, 4, 4])
        )


def test_a_registered_backbone_is_accepted_by_model_backbone_and_built():
    from torch import nn

    from learners import backbones
    from learners.hparams import ConfigError, build_dataclass

    with pytest.raises(ConfigError, match="model.backbone='linear'.*one of 'mlp', 'cnn'"):
        build_dataclass(ModelConfig, {"backbone": "linear"}, prefix="model.")
    try:
        backbones.register_backbone("linear")(
            lambda config, info: nn.Sequential(nn.Flatten(), nn.Linear(64, info.num_classes))
        )
        model = build_dataclass(ModelConfig, {"backbone": "linear"}, prefix="model.")
        stream = digits_split("class")
        learner = build_learner("finetune", stream.info, model=model)
        assert [type(m) for m in learner.model] == [nn.Flatten, nn.Linear]
        assert learner.model(stream[0].x_test[:3]).shape == (3, 10)
    finally:
        backbones.BACKBONES.pop("linear", None)


def test_gpu_utilization_is_the_mean_of_what_the_sampler_read_while_the_block_ran():
    import itertools
    import time

    from learners.evaluation import GpuUtilization

    readings = itertools.cycle([20.0, 60.0])
    with GpuUtilization(lambda: next(readings), every_s=0.01) as sampler:
        time.sleep(0.2)
    assert len(sampler.samples) >= 2 and sampler.mean == pytest.approx(
        sum(sampler.samples) / len(sampler.samples)
    )
    assert set(sampler.samples) <= {20.0, 60.0}
    count = len(sampler.samples)
    time.sleep(0.05)
    assert len(sampler.samples) == count  # stopped with the block
    assert GpuUtilization.of(torch.device("cpu")) is None  # a CPU run reports none


def test_a_gpu_run_logs_its_utilisation_per_task(monkeypatch):
    """On a GPU (faked: a sampler that reads 42 %), each task event carries the mean."""
    from learners import evaluation

    monkeypatch.setattr(
        evaluation.GpuUtilization, "of", classmethod(lambda cls, device: cls(lambda: 42.0, 0.01))
    )
    stream = build_stream(StreamConfig(name="split", source="digits", num_tasks=2,
                                       train_per_task=40, test_per_task=20), seed=0)  # fmt: skip
    learner = build_learner("finetune", stream.info, {}, seed=0)
    events = list(evaluation.iter_stream(learner, stream))
    assert [e["gpu_utilization_pct"] for e in events[1:]] == [42.0, 42.0]


def test_continual_evaluation_measures_during_training_and_changes_no_result():
    """train.eval_every_steps: rows every N steps inside each task, the same R as without
    (evaluation draws no random number and leaves the model as it found it), recency bias on
    a class-incremental stream, and the time it takes counted as evaluation, not training."""
    stream = digits_split("class")
    base = dict(epochs=3, batch_size=32, optimizer="adam", lr=1e-3)
    plain = build_learner("finetune", stream.info, model=MODEL, train=TrainConfig(**base), seed=0)
    measured = build_learner("finetune", stream.info, model=MODEL, seed=0,
                             train=TrainConfig(**base, eval_every_steps=5))  # fmt: skip
    without = list(iter_stream(plain, stream))
    within = list(iter_stream(measured, stream))
    assert [e["row"] for e in within] == [e["row"] for e in without]  # bit-identical R
    for event in within[1:]:
        steps = [p["step"] for p in event["curve"]]
        assert steps == list(range(5, event["steps"] + 1, 5))
        assert all(len(p["row"]) == 2 for p in event["curve"])
        assert event["during_eval_time_s"] > 0
    assert "curve" not in without[1]
    # the curve ends where R's row begins: task 1's accuracy climbs during its training
    assert within[2]["curve"][0]["row"][1] < within[2]["row"][1]
    # fine-tuning on class-IL sends old samples to the newest classes: recency bias near 1
    assert within[2]["recency_bias"] > 0.9 and "recency_bias" not in within[1]
