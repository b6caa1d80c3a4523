"""iCaRL: herding, the exemplar budget, nearest-mean classification, its loss and retention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_learners import accuracy, conflict_stream, make, split_stream

from learners import ConfigError, TrainingStopped
from learners.icarl import feature_extractor, herding


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    """n L2-normalised, non-negative (ReLU-like) feature vectors around a common direction."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.relu(1.0 + torch.randn(n, d, generator=g)), dim=1)


def _gap(subset: torch.Tensor, features: torch.Tensor) -> float:
    return (subset.mean(0) - features.mean(0)).norm().item()


def _random_gap(features: torch.Tensor, m: int, draws: int, seed: int) -> float:
    """Mean over ``draws`` uniform m-subsets of the distance of their mean to the class mean."""
    g = torch.Generator().manual_seed(seed)
    n = features.shape[0]
    return (
        sum(_gap(features[torch.randperm(n, generator=g)[:m]], features) for _ in range(draws))
        / draws
    )


# ---------------------------------------------------------------------- herding
@pytest.mark.parametrize("seed", range(3))
def test_herded_means_approach_the_class_mean_faster_than_random_subsets(seed):
    features = _unit(200, 16, seed)
    order = herding(features, 40)
    assert order.unique().numel() == 40  # never the same sample twice
    herded, random = [], []
    for m in (1, 2, 5, 10, 20, 40):
        herded.append(_gap(features[order[:m]], features))
        random.append(_random_gap(features, m, draws=30, seed=seed))
        assert herded[-1] <= random[-1]
        if m >= 5:  # after a few picks, well ahead of chance
            assert herded[-1] < 0.5 * random[-1]
    assert sum(herded) / len(herded) < sum(random) / len(random)


def test_herding_is_the_greedy_choice_at_every_step():
    features = _unit(50, 8, 7)
    order = herding(features, 12).tolist()
    mu, chosen = features.mean(0), []
    for _ in range(12):
        best = min(
            (i for i in range(50) if i not in chosen),
            key=lambda i: (mu - features[[*chosen, i]].mean(0)).norm().item(),
        )
        chosen.append(best)
    assert order == chosen
    assert herding(features, 80).tolist() == herding(features, 50).tolist()  # capped at n


def test_the_learners_exemplars_are_herded_on_its_features():
    stream = split_stream("class", n=200)
    learner = make("icarl", stream, {"memory_size": 40}, hidden=(32,), epochs=2)
    learner.learn(stream[0])
    task = stream[0]
    for c in task.classes:
        features = learner.embed(task.x_train[task.y_train == c])
        exemplars = learner.embed(learner.exemplars[c])
        assert exemplars.shape[0] == 20
        for m in (1, 3, 10, 20):
            assert _gap(exemplars[:m], features) < _random_gap(features, m, draws=30, seed=c)


# ---------------------------------------------------------------------- the memory
def test_exemplar_sets_stay_within_the_budget_balanced_and_in_herding_order():
    stream = split_stream("class", n=60, tasks=4)
    budget = 30
    learner = make("icarl", stream, {"memory_size": budget}, hidden=(16,))
    previous: dict[int, torch.Tensor] = {}
    for k, task in enumerate(stream):
        learner.learn(task)
        seen = 2 * (k + 1)
        m = budget // seen
        assert sorted(learner.exemplars) == list(range(seen))
        sizes = [ex.shape[0] for ex in learner.exemplars.values()]
        assert sizes == [m] * seen and sum(sizes) <= budget
        assert learner.stored_memory()["stored_samples"] == sum(sizes)
        for c, ex in learner.exemplars.items():
            source = stream[c // 2]
            pool = source.x_train[source.y_train == c].flatten(1)
            assert all((pool == row).all(1).any() for row in ex.flatten(1))  # real samples
            if c in previous:  # shrinking keeps the first m, in herding order
                assert torch.equal(ex, previous[c][:m])
        previous = {c: ex.clone() for c, ex in learner.exemplars.items()}


def test_a_memory_smaller_than_the_number_of_classes_is_refused():
    with pytest.raises(ConfigError, match="memory_size=3 is too small"):
        make("icarl", split_stream("class"), {"memory_size": 3})
    make("icarl", split_stream("class"), {"memory_size": 4})


# ---------------------------------------------------------------------- classification
def _after_two_tasks(scenario: str = "class"):
    stream = split_stream(scenario, n=100)
    learner = make("icarl", stream, {"memory_size": 40}, hidden=(32,), epochs=2)
    for task in stream:
        learner.learn(task)
    return learner, stream


def test_nme_prediction_is_the_nearest_class_mean_of_normalised_features():
    learner, stream = _after_two_tasks()
    classes, means = learner.class_means()
    assert classes == [0, 1, 2, 3]
    for c, mean in zip(classes, means, strict=True):  # means recomputed with the final model
        expected = F.normalize(learner.embed(learner.exemplars[c]).mean(0), dim=0)
        torch.testing.assert_close(mean, expected)
    x = torch.cat([task.x_test for task in stream])
    features = F.normalize(feature_extractor(learner.model)(x).flatten(1), dim=1)
    nearest = torch.tensor(classes)[torch.cdist(features, means).argmin(1)]
    assert torch.equal(learner.predict(x), nearest)


def test_predictions_come_from_the_means_not_the_output_layer():
    learner, stream = _after_two_tasks()
    x = stream[0].x_test
    before = learner.predict(x)
    last = list(learner.model.modules())[-1]
    with torch.no_grad():
        last.weight.normal_()
        last.bias.normal_()
    assert torch.equal(learner.predict(x), before)


def test_task_incremental_nme_answers_among_the_tasks_classes():
    learner, stream = _after_two_tasks("task")
    for task in stream:
        predicted = learner.predict(task.x_test, task.id)
        assert set(predicted.tolist()) <= set(task.classes)
        assert accuracy(learner, task) > 0.7
    with pytest.raises(ValueError, match="needs task_id"):
        learner.predict(stream[0].x_test)


def test_before_any_task_it_answers_by_the_network():
    stream = split_stream("class", n=20)
    learner = make("icarl", stream, {"memory_size": 20})
    x = stream[0].x_test
    assert torch.equal(learner.predict(x), learner.model(x).argmax(1))


# ---------------------------------------------------------------------- the loss
def test_loss_is_bce_on_new_classes_plus_distillation_on_old_ones():
    stream = split_stream("class", n=100)
    learner = make("icarl", stream, {"memory_size": 40, "distill_weight": 2.0}, hidden=(16,))
    learner.learn(stream[0])
    learner.before_task(stream[1])
    x, y, t = learner.training_data(stream[1])
    assert x.shape[0] == 100 + 40 and set(y[100:].tolist()) == {0, 1}
    teacher_out = learner.model(x).detach()
    with torch.no_grad():
        for p in learner.model.parameters():
            p.add_(0.1)
    out = learner.model(x)
    onehot = F.one_hot(y, 4).float()
    new = F.binary_cross_entropy_with_logits(out[:, 2:], onehot[:, 2:], reduction="sum")
    old = F.binary_cross_entropy_with_logits(
        out[:, :2], torch.sigmoid(teacher_out[:, :2]), reduction="sum"
    )
    expected = (new + 2.0 * old) / x.shape[0]
    assert learner.loss(x, y, t).item() == pytest.approx(expected.item(), rel=1e-5)


def test_distillation_pulls_nothing_while_the_model_equals_its_teacher():
    stream = split_stream("class", n=100)
    learner = make("icarl", stream, {"memory_size": 40}, hidden=(16,))
    learner.learn(stream[0])
    learner.before_task(stream[1])
    x, y, t = learner.training_data(stream[1])
    learner.model.zero_grad(set_to_none=True)
    learner.loss(x, y, t).backward()
    head = list(learner.model.modules())[-1]
    assert head.weight.grad[:2].abs().max() < 1e-6  # old classes: targets = own outputs
    assert head.weight.grad[2:].abs().max() > 1e-3  # new classes: label targets
    assert head.weight.grad.shape[0] == 4 and learner.teacher is not learner.model


# ---------------------------------------------------------------------- behaviour
def test_icarl_retains_more_of_task_0_than_finetune_in_class_incremental():
    stream = split_stream("class", n=150)
    after = {}
    for name, hparams in (("finetune", {}), ("icarl", {"memory_size": 100})):
        learner = make(name, stream, hparams, hidden=(64,), epochs=3)
        learner.learn(stream[0])
        assert accuracy(learner, stream[0]) > 0.85
        learner.learn(stream[1])
        after[name] = accuracy(learner, stream[0])
        assert accuracy(learner, stream[1]) > 0.85
    assert after["icarl"] > 0.7
    assert after["icarl"] > after["finetune"] + 0.2


def test_a_stop_request_reaches_the_exemplar_pass_and_leaves_the_memory_as_it_was():
    stream = split_stream("class", n=60)
    learner = make("icarl", stream, {"memory_size": 20}, hidden=(16,), batch_size=10)
    learner.learn(stream[0])
    memory = {c: ex.clone() for c, ex in learner.exemplars.items()}
    steps = -(-(60 + 20) // 10)  # the training loop checks once per batch
    calls = []

    def stop_after_training() -> bool:
        calls.append(1)
        return len(calls) > steps

    with pytest.raises(TrainingStopped, match="exemplars of class 2"):
        learner.learn(stream[1], should_stop=stop_after_training)
    assert learner.tasks_learned == 1 and learner.seen == [0, 1]
    assert memory.keys() == learner.exemplars.keys()
    assert all(torch.equal(memory[c], learner.exemplars[c]) for c in memory)


def test_domain_incremental_is_refused_with_the_reason():
    from orchestrator.config import load_config

    with pytest.raises(ConfigError, match="domain-incremental") as err:
        make("icarl", conflict_stream(), {"memory_size": 20})
    assert "same classes recur" in str(err.value) and "supported: class, task" in str(err.value)
    stream = {"name": "permuted", "source": "digits", "num_tasks": 2}
    with pytest.raises(ConfigError, match="same classes recur"):
        load_config({"methods": {"icarl": {}}, "stream": stream})
