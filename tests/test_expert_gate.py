"""Expert Gate: the gates send each task's samples to its own expert without a task id, a new
expert starts from the most related one, experts of finished tasks never change, and resuming
is exact."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_learners import identical, params

from learners import ModelConfig, TrainConfig, TrainingStopped, build_learner
from learners.backbones import MLP, SmallCNN
from learners.evaluation import evaluate
from learners.expert_gate import ExpertGate
from task_streams import TaskStream, build_stream
from task_streams.sources import load_source

DOMAINS = ["mnist5k", "fashion_mnist", "mnist5k:rot90"]
MODEL = ModelConfig(hidden=[100])
TRAIN = TrainConfig(optimizer="adam", lr=1e-3, epochs=3)
SMALL = {"train_per_task": 200, "test_per_task": 60}
DIGITS = {**SMALL, "source": "digits", "num_tasks": 2}


def expert_gate(stream: TaskStream, seed: int = 0, **hparams: Any) -> ExpertGate:
    learner = build_learner("expert_gate", stream.info, hparams, MODEL, TRAIN, seed=seed)
    assert isinstance(learner, ExpertGate)
    return learner


def part(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def predictions(learner: ExpertGate, stream: TaskStream) -> list[torch.Tensor]:
    return [learner.predict(task.x_test, task.id) for task in stream]


@pytest.fixture(scope="module")
def stream() -> TaskStream:
    """MNIST, Fashion-MNIST, MNIST rotated by 90°: 500 train / 200 test each, one label space."""
    try:
        load_source("fashion_mnist")
    except (OSError, ValueError) as err:
        pytest.skip(f"fashion_mnist is not available: {err}")
    config = {"name": "domains", "domains": DOMAINS, "train_per_task": 500, "test_per_task": 200}
    return build_stream(config, seed=0)


@pytest.fixture(scope="module")
def run(stream: TaskStream) -> dict[str, Any]:
    """Expert Gate learns the stream; what it was after each task is kept."""
    learner = expert_gate(stream)
    after: list[dict[str, Any]] = []
    for task in stream:
        learner.learn(task)
        k = task.id
        saved = io.BytesIO()
        torch.save(learner.state_dict(), saved)
        after.append(
            {
                "expert": part(learner.model.experts[k]),
                "gate": part(learner.model.gates[k]),
                "predictions": predictions(learner, stream),
                "state": saved.getvalue(),
                "architecture": learner.architecture(),
                "parameters": learner.resources()["model_parameters"],
                "optimized": {id(p) for g in learner.optimizer.param_groups for p in g["params"]},
                "newest": {id(p) for p in learner.model.experts[k].parameters()},
            }
        )
    return {"learner": learner, "after": after}


def test_the_gates_route_each_task_to_its_expert(stream, run):
    """No task id: each sample goes to the expert of its best-reconstructing gate. Measured
    (seed 0): 97.0% / 98.0% / 93.0% of the test samples of MNIST / Fashion / rotated MNIST
    (seeds 1, 2: 98.5 / 97.5 / 93.5, 93.5 / 97.5 / 95.0)."""
    learner = run["learner"]
    assert learner.expert_tasks == [0, 1, 2]
    for task in stream:
        routed = learner.route(task.x_test)
        assert (routed == task.id).float().mean().item() >= 0.9, task.name
        errors = learner.model.reconstruction_errors(task.x_test)
        assert torch.equal(routed, errors.argmin(dim=1))


def test_rotated_mnist_starts_from_the_mnist_expert(stream, run):
    """Rel(a) = 1 − (Er_a − Er_k)/Er_k: the rotated digits are reconstructed better by the
    MNIST gate than by the Fashion one, so the new expert is a copy of expert 0."""
    learner = run["learner"]
    assert learner.relatedness[0] == [] and len(learner.relatedness[1]) == 1
    mnist, fashion = learner.relatedness[2]
    assert mnist > fashion
    assert learner.initialised_from == [None, 0, 0]

    resumed = expert_gate(stream, seed=5)  # as it was after task 1, then task 2's gate
    resumed.load_state_dict(torch.load(io.BytesIO(run["after"][1]["state"]), weights_only=True))
    resumed.before_task(stream[2])
    assert identical(part(resumed.model.experts[2]), part(resumed.model.experts[0]))
    *old, new = resumed.mean_errors(stream[2].x_train)
    assert resumed.relatedness[2] == pytest.approx([1 - (e - new) / new for e in old])
    assert resumed.relatedness[2] == learner.relatedness[2]


def test_experts_and_gates_of_finished_tasks_never_change(stream, run):
    """Expert k and gate k are bit for bit as they were after task k; so a sample routed to
    expert k at the end is answered exactly as right after task k (a gate added later that
    does not win changes nothing), and the task's accuracy on those samples is kept."""
    learner, after = run["learner"], run["after"]
    final = predictions(learner, stream)
    for task in stream:
        k = task.id
        assert identical(part(learner.model.experts[k]), after[k]["expert"])
        assert identical(part(learner.model.gates[k]), after[k]["gate"])
        own = learner.route(task.x_test) == k
        assert own.any()
        assert torch.equal(final[k][own], after[k]["predictions"][k][own])
    for k in range(2):  # only the newest expert is trainable; every gate is frozen
        assert not any(p.requires_grad for p in learner.model.experts[k].parameters())
    assert all(p.requires_grad for p in learner.model.experts[2].parameters())
    assert not any(p.requires_grad for p in learner.model.gates.parameters())


def test_the_network_grows_by_one_expert_and_gate_per_task(run):
    after = run["after"]
    assert [a["architecture"] for a in after] == [{"experts": k} for k in (1, 2, 3)]
    one = sum(p.numel() for p in after[0]["expert"].values())
    one += sum(p.numel() for p in after[0]["gate"].values())
    assert [a["parameters"] for a in after] == [one, 2 * one, 3 * one]
    for a in after:  # the optimizer holds the newest expert and nothing else
        assert a["optimized"] == a["newest"]
    assert run["learner"].stored_memory() == {"stored_samples": 0, "stored_bytes": 0}


def test_resume_after_task_1_is_exact(stream, run):
    learner, after = run["learner"], run["after"]
    resumed = expert_gate(stream, seed=99)
    resumed.load_state_dict(torch.load(io.BytesIO(after[1]["state"]), weights_only=True))
    assert resumed.architecture() == {"experts": 2} and resumed.tasks_learned == 2
    resumed.learn(stream[2])
    assert identical(params(resumed), params(learner))
    assert resumed.relatedness == learner.relatedness
    assert resumed.initialised_from == learner.initialised_from
    for ours, theirs in zip(predictions(resumed, stream), after[2]["predictions"], strict=True):
        assert torch.equal(ours, theirs)


def test_it_forgets_far_less_than_finetuning(stream, run):
    """Measured (seed 0): ACC 0.755 (0.84 / 0.645 / 0.78) against finetune's 0.580
    (0.475 / 0.505 / 0.76); seeds 1, 2: 0.738 and 0.758 against 0.612 and 0.613."""
    finetune = build_learner("finetune", stream.info, {}, MODEL, TRAIN, seed=0)
    for task in stream:
        finetune.learn(task)
    ours, theirs = evaluate(run["learner"], stream), evaluate(finetune, stream)
    assert sum(ours) / len(ours) > sum(theirs) / len(theirs) + 0.1
    assert ours[0] > theirs[0] + 0.2  # MNIST, after Fashion and rotated MNIST


# ------------------------------------------------------------------ small streams (no Fashion)
def test_scratch_initialisation_copies_nothing():
    stream = build_stream({**SMALL, "name": "domains", "domains": ["digits", "digits:rot90"]}, 0)
    learner = expert_gate(stream, init_from="scratch")
    learner.learn(stream[0])
    learner.before_task(stream[1])
    assert learner.initialised_from == [None, None] and len(learner.relatedness[1]) == 1
    first, second = part(learner.model.experts[0]), part(learner.model.experts[1])
    assert all(not torch.equal(first[n], second[n]) for n in first)


@pytest.mark.parametrize("scenario", ["class", "task"])
def test_answers_come_from_the_routed_experts_task_classes_without_the_task_id(scenario):
    """Class and task scenarios: the answer is one of the routed expert's task's classes, and
    the task id passed to predict() changes nothing; training masks the newest expert too."""
    stream = build_stream({**DIGITS, "name": "split", "scenario": scenario}, 0)
    learner = expert_gate(stream)
    for task in stream:
        learner.learn(task)
    for task in stream:
        answers = learner.predict(task.x_test, task.id)
        routed = torch.tensor(learner.expert_tasks)[learner.route(task.x_test)]
        for label, expert_task in zip(answers.tolist(), routed.tolist(), strict=True):
            assert label in stream[expert_task].classes
        other = 1 - task.id
        assert torch.equal(answers, learner.predict(task.x_test, other))
    x, y = stream[1].x_train[:20], stream[1].y_train[:20]
    mask = learner.task_masks[1]
    expected = F.cross_entropy(learner.model.experts[1](x).masked_fill(~mask, -torch.inf), y)
    assert torch.equal(learner.loss(x, y, torch.ones_like(y)), expected)


def test_experts_are_built_like_the_configured_backbone():
    stream = build_stream({**SMALL, "name": "domains", "domains": ["digits", "digits:perm"]}, 0)
    cnn = ModelConfig(backbone="cnn", cnn_channels=[4], cnn_fc=8)
    learner = build_learner("expert_gate", stream.info, {}, cnn, TrainConfig(epochs=1), seed=0)
    for task in stream:
        learner.learn(task)
    assert all(isinstance(e, SmallCNN) for e in learner.model.experts)
    assert isinstance(expert_gate(stream).model.experts[0], MLP)
    assert learner.code_units() == 32  # 64 input values: the code is at most half


def test_a_stopped_task_learned_again_leaves_one_expert():
    """A stop during the gate's training changes nothing; one during the expert's training
    leaves the new expert, which the task's next attempt replaces rather than adds to."""
    stream = build_stream({**SMALL, "name": "domains", "domains": ["digits", "digits:rot90"]}, 0)
    learner = expert_gate(stream)
    learner.learn(stream[0])
    with pytest.raises(TrainingStopped, match="gate"):
        learner.learn(stream[1], should_stop=lambda: True)
    assert learner.architecture() == {"experts": 1} and learner.tasks_learned == 1
    gate_batches = -(-stream[1].num_train // TRAIN.batch_size) * learner.hparams.gate_epochs
    calls = []

    def stop_in_the_expert_training() -> bool:
        calls.append(1)
        return len(calls) > gate_batches + 2

    with pytest.raises(TrainingStopped, match="during task"):
        learner.learn(stream[1], should_stop=stop_in_the_expert_training)
    assert learner.architecture() == {"experts": 2} and learner.tasks_learned == 1
    learner.learn(stream[1])
    assert learner.architecture() == {"experts": 2} and learner.tasks_learned == 2
    assert learner.expert_tasks == [0, 1] and len(learner.relatedness) == 2
