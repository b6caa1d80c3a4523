"""Deep generative replay: what is generated, how it is labelled, the objective and the memory."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from test_learners import accuracy, identical, make, params, split_stream
from torch import nn

import task_streams
from learners import TrainingStopped
from learners.generative_replay import GenerativeReplay

SMALL = {
    "generator_epochs": 1,
    "latent_dim": 4,
    "generator_hidden": 16,
    "reconstruction": "gaussian",
}
"""a fast VAE for the synthetic Gaussian streams (inputs outside [0, 1]: gaussian likelihood)"""
DIGITS = {"generator_epochs": 20}
SOLVER = {"hidden": (64,), "epochs": 5, "batch_size": 32, "optimizer": "adam", "lr": 3e-3}


def _digits_stream():
    return task_streams.build_stream(
        {"name": "split", "source": "digits", "num_tasks": 2, "scenario": "class"}, 0
    )


def _independent_classifier(stream) -> nn.Module:
    """A classifier trained on the real training data of every task, apart from the learner."""
    x = torch.cat([task.x_train for task in stream]).flatten(1)
    y = torch.cat([task.y_train for task in stream])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        clf = nn.Sequential(nn.Linear(x.shape[1], 64), nn.ReLU(), nn.Linear(64, 4))
        opt = torch.optim.Adam(clf.parameters(), lr=1e-2)
        for _ in range(200):
            opt.zero_grad()
            F.cross_entropy(clf(x), y).backward()
            opt.step()
    x_test = torch.cat([task.x_test for task in stream]).flatten(1)
    y_test = torch.cat([task.y_test for task in stream])
    with torch.no_grad():
        assert (clf(x_test).argmax(1) == y_test).float().mean() > 0.95
    return clf.eval()


@pytest.fixture(scope="module")
def digits_run():
    """Generative replay and fine-tuning on 2 class-incremental digits tasks (classes 0,1 | 2,3)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: threads only contend on a busy machine
    try:
        stream = _digits_stream()
        clf = _independent_classifier(stream)
        result = {"stream": stream, "clf": clf}
        for name, hparams in (("finetune", {}), ("generative_replay", DIGITS)):
            learner = make(name, stream, hparams, **SOLVER)
            learner.learn(stream[0])
            before = accuracy(learner, stream[0])
            if name == "generative_replay":
                with torch.no_grad():
                    generated = clf(learner.generate(400).flatten(1)).argmax(1)
                result["classes_after_task_0"] = generated
            learner.learn(stream[1])
            result[name] = (
                learner,
                before,
                accuracy(learner, stream[0]),
                accuracy(learner, stream[1]),
            )
    finally:
        torch.set_num_threads(threads)
    return result


# ---------------------------------------------------------------------- the generator
def test_generated_samples_cover_every_learned_class(digits_run):
    clf, (learner, *_) = digits_run["clf"], digits_run["generative_replay"]
    after_0 = torch.bincount(digits_run["classes_after_task_0"], minlength=4) / 400
    assert after_0[:2].sum() > 0.9  # after task 0: digits of task 0, not noise
    assert after_0[:2].min() > 0.2  # both of its classes
    with torch.no_grad():
        after_1 = torch.bincount(clf(learner.generate(400).flatten(1)).argmax(1), minlength=4) / 400
    # after task 1 the generator (trained on task 1 plus its own replay of task 0) still
    # produces both classes of task 0, and those of task 1: no collapse onto one class
    assert after_1.min() > 0.05, after_1.tolist()
    assert after_1[:2].sum() > 0.2, after_1.tolist()


def test_generative_replay_retains_more_of_task_0_than_finetune_in_class_incremental(digits_run):
    _, fine_before, fine_after, fine_new = digits_run["finetune"]
    _, gr_before, gr_after, gr_new = digits_run["generative_replay"]
    assert fine_before > 0.95 and gr_before > 0.95
    assert fine_after < 0.2  # fine-tuning forgets task 0 entirely in class-IL
    assert gr_after > 0.8 and gr_after > fine_after + 0.6
    assert gr_new > 0.6  # and task 1 is still learned


def test_all_draws_use_the_learners_generator_not_the_global_rng():
    stream = split_stream("class", n=60, tasks=3)
    learner = make("generative_replay", stream, SMALL)
    learner.learn(stream[0])
    global_state = torch.get_rng_state()
    learner.before_task(stream[1])
    learner.augment_batch(stream[1].x_train[:10], stream[1].y_train[:10], torch.ones(10).long())
    learner.after_task(stream[1])  # VAE training: batch order, noise and its own replay
    assert torch.equal(torch.get_rng_state(), global_state)
    samples = []
    for seed in (3, 3, 4):
        learner.generator.manual_seed(seed)
        samples.append(learner.generate(50))
    assert torch.equal(samples[0], samples[1]) and not torch.equal(samples[0], samples[2])


# ---------------------------------------------------------------------- the solver
def _capture_batches(learner, task):
    """Learn ``task``, recording each augmented batch and the current model at that moment."""
    original = learner.augment_batch
    batches = []

    def spy(x, y, t):
        out = original(x, y, t)
        batches.append((x.shape[0], *out, copy.deepcopy(learner.model)))
        return out

    learner.augment_batch = spy
    learner.learn(task)
    del learner.augment_batch
    return batches


def test_replayed_labels_are_the_frozen_previous_solvers_argmax_over_learned_classes():
    stream = split_stream("class", n=60, tasks=3)
    hparams = {**SMALL, "generator_epochs": 10, "replay_batch_size": 7}
    learner = make("generative_replay", stream, hparams, batch_size=10, lr=0.2)
    learner.learn(stream[0])
    learner.learn(stream[1])
    frozen = copy.deepcopy(learner.model).eval()  # the solver at the end of task 1
    batches = _capture_batches(learner, stream[2])
    assert len(batches) == 6
    disagree, labels = 0, set()
    for n_real, xb, yb, tb, current in batches:
        assert xb.shape[0] == yb.shape[0] == tb.shape[0] == n_real + 7
        x, y = xb[n_real:], yb[n_real:]
        assert torch.cdist(x.flatten(1), stream[2].x_train.flatten(1)).min() > 0  # generated
        with torch.no_grad():
            expected = frozen(x)[:, :4].argmax(1)  # classes of tasks 0 and 1 only
            disagree += int((current(x)[:, :4].argmax(1) != y).sum())
        assert torch.equal(y, expected)
        labels |= set(y.tolist())
        assert torch.equal(tb[n_real:], y // 2)  # tagged with the task that owns the class
    assert len(labels) > 1 and labels <= {0, 1, 2, 3}
    assert disagree > 0  # the solver being trained would have labelled some differently
    assert learner.previous_model is None  # dropped when the task ends


def test_task_incremental_replay_draws_a_learned_task_and_labels_within_its_units():
    stream = split_stream("task", n=60, tasks=3)
    learner = make("generative_replay", stream, {**SMALL, "replay_batch_size": 50})
    learner.learn(stream[0])
    learner.learn(stream[1])
    frozen = copy.deepcopy(learner.model).eval()
    batches = _capture_batches(learner, stream[2])
    tasks = torch.cat([tb[n:] for n, _, _, tb, _ in batches])
    assert set(tasks.tolist()) == {0, 1}
    assert 0.35 < tasks.float().mean().item() < 0.65  # uniform over the learned tasks
    for n, xb, yb, tb, _ in batches:
        with torch.no_grad():
            out = frozen(xb[n:])
        t = tb[n:]
        within = out.reshape(-1, 3, 2)[torch.arange(t.shape[0]), t].argmax(1)
        assert torch.equal(yb[n:], 2 * t + within)


def test_the_loss_weights_current_and_replayed_parts_by_the_tasks_seen():
    stream = split_stream("class", n=60, tasks=3)
    for weighting in ("tasks", "equal"):
        learner = make("generative_replay", stream, {**SMALL, "replay_weighting": weighting})
        learner.learn(stream[0])
        learner.learn(stream[1])
        learner.before_task(stream[2])
        x, y = stream[2].x_train[:10], stream[2].y_train[:10]
        xb, yb, tb = learner.augment_batch(x, y, torch.full_like(y, 2))
        assert xb.shape[0] == 20  # replay_batch_size 0: as many as the training batch
        ce = F.cross_entropy(learner.model(xb), yb, reduction="none")
        expected = (
            ce[:10].mean() / 3 + (2 / 3) * ce[10:].mean() if weighting == "tasks" else ce.mean()
        )
        assert learner.loss(xb, yb, tb).item() == pytest.approx(expected.item(), rel=1e-6)


def test_before_any_task_nothing_is_replayed():
    stream = split_stream("class", n=60)
    runs = []
    for name, hparams in (("finetune", {}), ("generative_replay", SMALL)):
        learner = make(name, stream, hparams, seed=4)
        learner.learn(stream[0])
        runs.append(params(learner))
    assert identical(*runs)  # task 0: the same steps as fine-tuning


def test_resume_restores_the_generator_and_its_optimizer_exactly():
    stream = split_stream("task", n=60, tasks=3)
    hparams = {**SMALL, "generator_epochs": 2}
    learner = make("generative_replay", stream, hparams, momentum=0.9)
    learner.learn(stream[0])
    learner.learn(stream[1])  # the VAE's Adam state now holds two tasks of moments
    saved = io.BytesIO()
    torch.save(learner.state_dict(), saved)
    learner.learn(stream[2])
    saved.seek(0)
    resumed = make("generative_replay", stream, hparams, seed=7, momentum=0.9)
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    assert resumed.seen_tasks == [0, 1]
    resumed.learn(stream[2])
    assert identical(params(resumed), params(learner))
    vae = {n: p.detach() for n, p in learner.vae.named_parameters()}
    assert identical({n: p.detach() for n, p in resumed.vae.named_parameters()}, vae)
    assert torch.equal(resumed.generate(20), learner.generate(20))


# ---------------------------------------------------------------------- memory and stopping
def test_memory_is_the_generators_parameters_and_no_samples():
    stream = split_stream("class", n=60)
    hparams = {**SMALL, "latent_dim": 3, "generator_hidden": 7}
    learner = make("generative_replay", stream, hparams)
    d, h, z = 20, 7, 3
    vae_floats = (d * h + h) + 2 * (h * z + z) + (z * h + h) + (h * d + d)
    for task in [None, *stream]:
        if task is not None:
            learner.learn(task)
        assert learner.stored_memory() == {"stored_samples": 0, "stored_bytes": 4 * vae_floats}
    state = learner.method_state()
    assert set(state) == {"vae", "vae_optimizer", "seen_tasks"} and state["seen_tasks"] == [0, 1]
    assert learner.resources()["model_bytes"] != learner.stored_memory()["stored_bytes"]


def test_a_stop_request_reaches_the_generator_training():
    stream = split_stream("class", n=60)
    learner = make("generative_replay", stream, {**SMALL, "generator_epochs": 3})
    learner.learn(stream[0])
    calls = []

    def stop_after_the_solver() -> bool:  # 6 solver batches, then 2 generator batches
        calls.append(1)
        return len(calls) > 8

    with pytest.raises(TrainingStopped, match="training the generator"):
        learner.learn(stream[1], should_stop=stop_after_the_solver)
    assert learner.tasks_learned == 1 and learner.seen_tasks == [0]


def test_it_is_registered_with_its_hyperparameters():
    learner = make("generative_replay", split_stream("class"))
    assert isinstance(learner, GenerativeReplay)
    assert learner.hparams.latent_dim == 32 and learner.hparams.generator_hidden == 256
