"""Learners: registry and hyperparameter validation, and each method's defining property."""

from __future__ import annotations

import dataclasses
import io
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare

import learners.ewc as ewc_module
from learners import (
    LEARNERS,
    ConfigError,
    Learner,
    ModelConfig,
    TrainConfig,
    TrainingStopped,
    build_learner,
)
from learners.replay import ReservoirBuffer
from task_streams.base import Task, TaskStream

SHAPE = (1, 4, 5)  # 20 features, (C, H, W) as the Task contract says
FEATURES = 20
METHODS = ("finetune", "joint", "ewc", "replay")
REGISTERED = sorted(n for n, cls in LEARNERS.items() if cls.__module__.startswith("learners."))
"""every method the learners package registers (not the plugins other tests register): the
generic tests below iterate the registry, so a new method gets them without being listed"""


# ---------------------------------------------------------------------- synthetic streams
def gaussian_task(
    task_id: int,
    protos: torch.Tensor,
    labels: torch.Tensor,
    n: int,
    g: torch.Generator,
    classes: tuple[int, ...],
    context: torch.Tensor | None = None,
    noise: float = 1.0,
) -> Task:
    """n train and n test samples around ``protos`` (one per label), optional constant context."""
    src = torch.randint(0, protos.shape[0], (2 * n,), generator=g)
    x = protos[src] + noise * torch.randn(2 * n, protos.shape[1], generator=g)
    if context is not None:
        x = torch.cat([x, context.expand(2 * n, -1)], dim=1)
    x, y = x.reshape(2 * n, *SHAPE), labels[src]
    return Task(task_id, f"task{task_id}", x[:n], y[:n], x[n:], y[n:], classes)


def conflict_stream(n: int = 300, seed: int = 0) -> TaskStream:
    """Domain-incremental: task 1 relabels task 0's clusters c -> c+1 (mod 4), with a context."""
    g = torch.Generator().manual_seed(seed)
    protos = 2 * torch.randn(4, FEATURES - 4, generator=g)
    context = torch.ones(1, 4)
    labels = torch.arange(4)
    a = gaussian_task(0, protos, labels, n, g, (0, 1, 2, 3), context)
    b = gaussian_task(1, protos, (labels + 1) % 4, n, g, (0, 1, 2, 3), -context)
    return TaskStream("conflict", "domain", [a, b], SHAPE, 4)


def split_stream(
    scenario: str = "class", n: int = 300, seed: int = 0, tasks: int = 2, separation: float = 0.7
) -> TaskStream:
    """Classes {2k, 2k+1} in task k, overlapping Gaussian clusters."""
    g = torch.Generator().manual_seed(seed)
    protos = separation * torch.randn(2 * tasks, FEATURES, generator=g)
    stream = [
        gaussian_task(
            k, protos[2 * k : 2 * k + 2], torch.tensor([2 * k, 2 * k + 1]), n, g, (2 * k, 2 * k + 1)
        )
        for k in range(tasks)
    ]
    return TaskStream(f"split-{scenario}", scenario, stream, SHAPE, 2 * tasks)


def make(
    name: str,
    stream: TaskStream,
    hparams: dict | None = None,
    seed: int = 0,
    hidden: tuple[int, ...] = (32,),
    dropout: float = 0.0,
    **train: object,
) -> Learner:
    """A small learner for ``stream``."""
    train_config = TrainConfig(**{"epochs": 1, "lr": 0.05, **train})
    return build_learner(
        name,
        stream.info,
        hparams or {},
        model=ModelConfig(hidden=list(hidden), dropout=dropout),
        train=train_config,
        seed=seed,
    )


def accuracy(learner: Learner, task: Task) -> float:
    """Test accuracy on one task."""
    return (learner.predict(task.x_test, task.id) == task.y_test).float().mean().item()


def params(learner: Learner) -> dict[str, torch.Tensor]:
    """A detached copy of the model's parameters."""
    return {n: p.detach().clone() for n, p in learner.model.named_parameters()}


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bit-identical tensors under the same names."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------- registry and hparams
def test_the_four_methods_are_registered():
    assert set(METHODS) <= set(LEARNERS)
    info = split_stream().info
    for name in METHODS:
        learner = build_learner(name, info)
        assert learner.name == name and type(learner) is LEARNERS[name]


def test_unknown_method_lists_the_valid_names():
    with pytest.raises(ConfigError) as err:
        build_learner("nope", split_stream().info)
    assert "'nope'" in str(err.value)
    assert all(name in str(err.value) for name in METHODS)


@pytest.mark.parametrize(
    ("name", "hparams", "key", "accepted"),
    [
        ("ewc", {"nope": 1}, "methods.ewc.nope", "ewc_lambda, fisher_samples, fisher_type"),
        ("ewc", {"ewc_lambda": "abc"}, "methods.ewc.ewc_lambda", ">= 0"),
        ("ewc", {"ewc_lambda": -1}, "methods.ewc.ewc_lambda", ">= 0"),
        ("ewc", {"fisher_samples": -5}, "methods.ewc.fisher_samples", ">= 0"),
        ("ewc", {"fisher_type": "fake"}, "methods.ewc.fisher_type", "'empirical', 'true'"),
        ("replay", {"buffer_size": -1}, "methods.replay.buffer_size", ">= 0"),
        ("replay", {"buffer_size": "big"}, "methods.replay.buffer_size", ">= 0"),
        ("replay", {"replay_batch_size": -1}, "methods.replay.replay_batch_size", ">= 0"),
        ("joint", {"lr": 0.1}, "methods.joint.lr", "no settings"),
        ("finetune", {"ewc_lambda": 1.0}, "methods.finetune.ewc_lambda", "no settings"),
    ],
)
def test_bad_hparams_name_the_key_and_what_is_accepted(name, hparams, key, accepted):
    with pytest.raises(ConfigError) as err:
        build_learner(name, split_stream().info, hparams)
    assert key in str(err.value) and accepted in str(err.value)


@pytest.mark.parametrize("name", REGISTERED)
def test_every_hparam_is_documented_and_its_default_accepted(name):
    cls = LEARNERS[name]
    for field in dataclasses.fields(cls.HParams):
        assert field.metadata["help"], f"{name}.{field.name} has no help"
    defaults = {f.name: getattr(cls.HParams(), f.name) for f in dataclasses.fields(cls.HParams)}
    info = split_stream(_scenario(name, "class")).info
    assert dataclasses.asdict(build_learner(name, info, defaults).hparams) == defaults


# ---------------------------------------------------------------------- EWC
def _ewc_after_one_task(scenario: str = "domain", **hparams: object) -> tuple[Learner, TaskStream]:
    stream = split_stream(scenario, n=200)
    learner = make("ewc", stream, {"ewc_lambda": 10.0, **hparams})
    learner.learn(stream[0])
    return learner, stream


def _move(
    learner: Learner,
    direction: dict[str, torch.Tensor],
    anchor: dict[str, torch.Tensor],
    scale: float,
) -> None:
    with torch.no_grad():
        for n, p in learner.model.named_parameters():
            p.copy_(anchor[n] + scale * direction[n])


def test_ewc_penalty_is_zero_at_the_anchor_and_grows_away_from_it():
    learner, _ = _ewc_after_one_task()
    assert learner.penalty().item() == 0.0
    anchor = params(learner)
    g = torch.Generator().manual_seed(1)
    direction = {n: torch.randn(p.shape, generator=g) for n, p in anchor.items()}
    values = []
    for scale in (0.1, 0.2, 0.4, 0.8):
        _move(learner, direction, anchor, scale)
        values.append(learner.penalty().item())
    assert values[0] > 0
    assert all(b > a for a, b in pairwise(values))
    for a, b in pairwise(values):  # quadratic: doubling the distance quadruples it
        assert b / a == pytest.approx(4.0, rel=1e-3)


def test_ewc_penalty_is_linear_in_lambda_and_its_gradient_added_in_closed_form():
    stream = split_stream("domain", n=100, tasks=3)
    learner = make("ewc", stream, {"ewc_lambda": 10.0})
    learner.learn(stream[0])
    learner.learn(stream[1])  # two anchors: the linear term of the re-expansion matters
    with torch.no_grad():
        for p in learner.model.parameters():
            p.add_(0.05)
    base = learner.penalty().item()
    learner.hparams.ewc_lambda = 30.0
    assert learner.penalty().item() == pytest.approx(3 * base, rel=1e-6)
    x, y = stream[2].x_train[:10], stream[2].y_train[:10]
    t = torch.full_like(y, 2)
    ce = F.cross_entropy(learner.logits(x, t), y)
    assert learner.loss(x, y, t).item() == pytest.approx(ce.item(), rel=1e-6)  # CE alone
    # the step's gradient: CE's by autograd plus the penalty's, added in after_backward
    learner.model.zero_grad()
    (ce + learner.penalty()).backward()
    expected = {n: p.grad.clone() for n, p in learner.model.named_parameters()}
    learner.model.zero_grad()
    learner.loss(x, y, t).backward()
    learner.after_backward(x, y, t)
    for n, p in learner.model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-4, atol=1e-6)
    learner.hparams.ewc_lambda = 0.0
    learner.model.zero_grad()
    learner.loss(x, y, t).backward()
    ce_only = {n: p.grad.clone() for n, p in learner.model.named_parameters()}
    learner.after_backward(x, y, t)
    assert identical(ce_only, {n: p.grad for n, p in learner.model.named_parameters()})


def test_ewc_penalty_sums_one_quadratic_per_learned_task():
    stream = split_stream("domain", n=100, tasks=3)
    learner = make("ewc", stream, {"ewc_lambda": 7.0})
    for task in stream:
        learner.learn(task)
    assert len(learner.fishers) == len(learner.anchors) == 3
    with torch.no_grad():
        for p in learner.model.parameters():
            p.mul_(0.9)
    current = dict(learner.model.named_parameters())
    direct = sum(
        (f[n] * (current[n] - a[n]).pow(2)).sum()
        for f, a in zip(learner.fishers, learner.anchors, strict=True)
        for n in f
    )
    assert learner.penalty().item() == pytest.approx(0.5 * 7.0 * direct.item(), rel=1e-4)
    assert all(v.min() >= 0 for f in learner.fishers for v in f.values())


@pytest.mark.parametrize("path", ["linear", "vmap"])
@pytest.mark.parametrize("scenario", ["domain", "task"])
def test_ewc_vectorized_fisher_equals_a_per_sample_loop(scenario, path, monkeypatch):
    monkeypatch.setattr(ewc_module, "FISHER_CHUNK", 16)  # several chunks, a ragged last one
    monkeypatch.setattr(ewc_module, "LINEAR_FISHER_CHUNK", 16)
    stream = split_stream(scenario, n=40)
    learner = make("ewc", stream, hidden=(8, 6))
    if path == "vmap":  # what a backbone with other layers (the CNN) uses
        monkeypatch.setattr(learner, "_linear_layers", lambda: None)
    else:
        assert learner._linear_layers() is not None
    learner.learn(stream[0])
    x, y = stream[1].x_train, stream[1].y_train
    t = torch.ones_like(y)
    fisher = learner.fisher(x, y, t)

    reference = {n: torch.zeros_like(p) for n, p in learner.model.named_parameters()}
    for i in range(y.shape[0]):
        learner.model.zero_grad()
        F.cross_entropy(learner.logits(x[i : i + 1], t[i : i + 1]), y[i : i + 1]).backward()
        for n, p in learner.model.named_parameters():
            reference[n] += p.grad.pow(2)
    assert fisher.keys() == reference.keys()
    for n in fisher:
        torch.testing.assert_close(fisher[n], reference[n] / y.shape[0], rtol=1e-4, atol=1e-7)
    if scenario == "task":  # task 1's masked-out output units get no gradient
        out_weight = list(fisher)[-2]
        assert fisher[out_weight][:2].abs().max() == 0 and fisher[out_weight][2:].max() > 0


def test_ewc_true_fisher_is_deterministic_and_uses_the_generator():
    stream = split_stream("domain", n=100)
    x, y = stream[0].x_train, stream[0].y_train
    t = torch.zeros_like(y)
    learner = make("ewc", stream, {"fisher_type": "true"})  # untrained: labels vary
    learner.generator.manual_seed(5)
    first = learner.fisher(x, y, t)
    learner.generator.manual_seed(5)
    assert identical(first, learner.fisher(x, y, t))
    learner.generator.manual_seed(6)
    assert not identical(first, learner.fisher(x, y, t))

    runs = []
    for _ in range(2):
        learner = make("ewc", stream, {"fisher_type": "true", "fisher_samples": 50})
        learner.learn(stream[0])
        runs.append(learner.fishers[0])
    assert identical(*runs)


def test_ewc_fisher_samples_beyond_the_task_size_means_all_samples():
    fishers = []
    for k in (0, 10_000):
        learner, _ = _ewc_after_one_task(fisher_samples=k)
        fishers.append(learner.fishers[0])
    assert identical(*fishers)
    subset, _ = _ewc_after_one_task(fisher_samples=32)
    assert not identical(fishers[0], subset.fishers[0])


# ---------------------------------------------------------------------- replay buffer
def _ids(n: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.arange(start, start + n)
    return ids.float().unsqueeze(1), ids, torch.zeros_like(ids)


def test_buffer_never_exceeds_capacity():
    buffer, g = ReservoirBuffer(25), torch.Generator().manual_seed(0)
    added = 0
    for size in [1, 3, 40, 7, 100, 2, 0, 64] * 5:
        buffer.add(*_ids(size, added), g)
        added += size
        assert len(buffer) == min(added, 25) and buffer.seen == added
        assert buffer.x.shape[0] == buffer.y.shape[0] == 25
        kept = buffer.y[: len(buffer)]
        assert kept.unique().numel() == len(buffer) and kept.max() < added
        assert torch.equal(buffer.x[: len(buffer), 0], kept.float())  # rows stay together


def _algorithm_r(capacity: int, batches: list[int], seed: int, items: int) -> list[int]:
    """Reference: Vitter's Algorithm R item by item on the first ``items``, same random draws."""
    g, slots, i = torch.Generator().manual_seed(seed), [], 0
    for size in batches:
        draws = torch.rand(size, generator=g, dtype=torch.float64)
        for u in draws.tolist():
            if i == items:
                return slots
            if i < capacity:
                slots.append(i)
            else:
                r = int(u * (i + 1))
                if r < capacity:
                    slots[r] = i
            i += 1
    return slots


@pytest.mark.parametrize("seed", range(20))
def test_batched_add_equals_item_by_item_algorithm_r(seed):
    sizes = torch.Generator().manual_seed(100 + seed)
    batches = torch.randint(1, 40, (12,), generator=sizes).tolist()
    buffer, g, added = ReservoirBuffer(8), torch.Generator().manual_seed(seed), 0
    for size in batches:
        buffer.add(*_ids(size, added), g)
        added += size
        assert buffer.y[: len(buffer)].tolist() == _algorithm_r(8, batches, seed, added)


@pytest.mark.parametrize(("batch", "trials"), [(7, 2000), (32, 1000)])
def test_reservoir_keeps_every_item_with_equal_probability(batch, trials):
    n, capacity = 100, 10
    counts = torch.zeros(n)
    g = torch.Generator().manual_seed(0)
    for _ in range(trials):
        buffer = ReservoirBuffer(capacity)
        for start in range(0, n, batch):
            buffer.add(*_ids(min(batch, n - start), start), g)
        counts[buffer.y] += 1
    assert counts.sum() == trials * capacity
    assert chisquare(counts.numpy()).pvalue > 0.001
    first, last = counts[:10].sum().item(), counts[-10:].sum().item()
    expected = trials * capacity * 10 / n
    assert first == pytest.approx(expected, rel=0.15) and last == pytest.approx(expected, rel=0.15)


def test_buffer_sample_is_distinct_and_from_the_filled_part():
    buffer, g = ReservoirBuffer(50), torch.Generator().manual_seed(0)
    with pytest.raises(ValueError):
        buffer.sample(5, g)
    buffer.add(*_ids(20, 1000), g)
    buffer.y[20:] = -1  # the unfilled part must never be drawn
    for _ in range(50):
        x, y, t = buffer.sample(15, g)
        assert y.numel() == 15 and y.unique().numel() == 15
        assert ((y >= 1000) & (y < 1020)).all() and torch.equal(x[:, 0], y.float())
    _, y, _ = buffer.sample(100, g)
    assert sorted(y.tolist()) == list(range(1000, 1020))


def test_buffer_state_round_trip_and_zero_capacity():
    buffer, g = ReservoirBuffer(10), torch.Generator().manual_seed(0)
    buffer.add(*_ids(37), g)
    stream = io.BytesIO()
    torch.save(buffer.state_dict(), stream)
    stream.seek(0)
    copy = ReservoirBuffer(10)
    copy.load_state_dict(torch.load(stream, weights_only=True))
    g_copy = torch.Generator()
    g_copy.set_state(g.get_state())
    buffer.add(*_ids(30, 37), g)
    copy.add(*_ids(30, 37), g_copy)
    assert copy.seen == buffer.seen == 67 and torch.equal(copy.y, buffer.y)

    empty = ReservoirBuffer(0)
    empty.add(*_ids(5), g)
    assert len(empty) == 0 and empty.seen == 5 and empty.nbytes() == 0


def test_replay_adds_memory_samples_to_batches_and_counts_its_memory():
    stream = split_stream("class", n=100)
    learner = make("replay", stream, {"buffer_size": 30, "replay_batch_size": 4})
    x, y = stream[0].x_train[:10], stream[0].y_train[:10]
    t = torch.zeros_like(y)
    assert all(a is b for a, b in zip(learner.augment_batch(x, y, t), (x, y, t), strict=True))
    learner.learn(stream[0])
    assert learner.buffer.seen == 100
    memory = learner.stored_memory()
    assert memory["stored_samples"] == 30
    assert memory["stored_bytes"] == 30 * (FEATURES * 4 + 8 + 8)
    xb, yb, tb = learner.augment_batch(x, y, t)
    assert xb.shape[0] == yb.shape[0] == tb.shape[0] == 14 and torch.equal(xb[:10], x)
    stored = {tuple(row.tolist()) for row in learner.buffer.x.flatten(1)}
    assert all(tuple(row.tolist()) in stored for row in xb[10:].flatten(1))


def test_replay_with_an_empty_buffer_is_finetune():
    stream = split_stream("class", n=100)
    runs = []
    for name, hparams in (("finetune", {}), ("replay", {"buffer_size": 0})):
        learner = make(name, stream, hparams, seed=4)
        for task in stream:
            learner.learn(task)
        runs.append(params(learner))
    assert identical(*runs)


# ---------------------------------------------------------------------- joint
def test_joint_trains_on_every_sample_of_the_tasks_seen_so_far():
    stream = split_stream("task", n=30, tasks=3)
    learner = make("joint", stream)
    for k, task in enumerate(stream):
        x, y, t = learner.training_data(task)
        assert torch.equal(x, torch.cat([s.x_train for s in stream.tasks[: k + 1]]))
        assert torch.equal(y, torch.cat([s.y_train for s in stream.tasks[: k + 1]]))
        assert t.tolist() == [i for i in range(k + 1) for _ in range(30)]
        assert learner.learn(task)["train_samples"] == 30 * (k + 1)  # no duplicates on retry
        assert learner.stored_memory()["stored_samples"] == 30 * (k + 1)
    assert learner.stored_memory()["stored_bytes"] == 90 * (FEATURES * 4 + 8 + 8)


# ---------------------------------------------------------------------- behaviour
def test_finetune_forgets_and_joint_does_not():
    stream = conflict_stream()
    results = {}
    for name in ("finetune", "joint"):
        learner = make(name, stream, hidden=(64,), epochs=2)
        learner.learn(stream[0])
        before = accuracy(learner, stream[0])
        learner.learn(stream[1])
        results[name] = (before, accuracy(learner, stream[0]), accuracy(learner, stream[1]))
    fine_before, fine_after, fine_new = results["finetune"]
    assert fine_before > 0.9 and fine_new > 0.9
    assert fine_before - fine_after > 0.3
    assert min(results["joint"]) > 0.85


def test_replay_retains_more_of_task_0_than_finetune_in_class_incremental():
    stream = split_stream("class", n=300)
    after = {}
    for name, hparams in (("finetune", {}), ("replay", {"buffer_size": 100})):
        learner = make(name, stream, hparams, hidden=(64,), epochs=3)
        learner.learn(stream[0])
        assert accuracy(learner, stream[0]) > 0.85
        learner.learn(stream[1])
        after[name] = accuracy(learner, stream[0])
        assert accuracy(learner, stream[1]) > 0.85
    assert after["replay"] > 0.7
    assert after["replay"] > after["finetune"] + 0.2


# ---------------------------------------------------------------------- state and seeds
# Small settings so that every method's generic tests run in a second or two; a method not
# listed runs with its defaults.
METHOD_HPARAMS = {
    "ewc": {"fisher_type": "true", "fisher_samples": 40},
    "online_ewc": {"fisher_type": "true", "fisher_samples": 40, "gamma": 0.9},
    "mas": {"importance_samples": 40},
    "si": {"si_c": 0.5},
    "replay": {"buffer_size": 25},
    "icarl": {"memory_size": 20},
    "der": {"buffer_size": 25},
    "er_ace": {"buffer_size": 25},
    "gem": {"memories_per_task": 10},
    "agem": {"memories_per_task": 10, "sample_size": 8},
    "generative_replay": {
        "generator_epochs": 1,
        "latent_dim": 4,
        "generator_hidden": 16,
        "reconstruction": "gaussian",
    },
    "lstm_meta": {"hidden": 16, "samples_per_task": 40},
}
METHOD_SECTIONS = {  # config sections besides methods a method needs on the digits streams
    "lstm_meta": {"meta_training": {"source": "digits", "ways": 2, "episodes": 8, "batch": 4}},
}


def _scenario(name: str, preferred: str) -> str:
    """``preferred`` if the method supports it, else the first scenario it supports."""
    supported = LEARNERS[name].SCENARIOS
    return preferred if preferred in supported else supported[0]


def _predictions(learner: Learner, stream: TaskStream) -> list[torch.Tensor]:
    return [learner.predict(task.x_test, task.id) for task in stream]


@pytest.mark.parametrize("name", REGISTERED)
def test_resume_from_a_saved_state_is_exact(name):
    """Saved after any task (a growing network after each growth), loaded into a fresh learner
    of another seed, it continues bit-identically: same parameters, memory and answers."""
    stream = split_stream(_scenario(name, "task"), n=60, tasks=3)
    kwargs = {"hidden": (16,), "dropout": 0.2, "momentum": 0.9, "batch_size": 8}
    learner = make(name, stream, METHOD_HPARAMS.get(name), **kwargs)
    saved = []
    for task in stream:
        learner.learn(task)
        buffer = io.BytesIO()
        torch.save(learner.state_dict(), buffer)
        saved.append(buffer)
    expected = params(learner)

    for after in range(len(stream) - 1):
        saved[after].seek(0)
        resumed = make(name, stream, METHOD_HPARAMS.get(name), seed=99, **kwargs)
        resumed.load_state_dict(torch.load(saved[after], weights_only=True))
        assert resumed.tasks_learned == after + 1
        for task in list(stream)[after + 1 :]:
            resumed.learn(task)
        assert identical(params(resumed), expected), f"resumed after task {after}"
        assert resumed.stored_memory() == learner.stored_memory()
        for ours, theirs in zip(
            _predictions(resumed, stream), _predictions(learner, stream), strict=True
        ):
            assert torch.equal(ours, theirs)  # what it answers, too (iCaRL: class means)


@pytest.mark.parametrize("name", REGISTERED)
def test_same_seed_same_parameters_different_seed_different(name):
    stream = split_stream(_scenario(name, "class"), n=60)

    def run(seed: int) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        learner = make(name, stream, METHOD_HPARAMS.get(name), seed=seed, hidden=(16,), dropout=0.2)
        for task in stream:
            learner.learn(task)
        return params(learner), _predictions(learner, stream)

    first, answers = run(1)
    again, answers_again = run(1)
    assert identical(first, again)
    # what it answers, too (iCaRL: class means; lstm_meta: its hidden state, not its weights)
    assert all(torch.equal(a, b) for a, b in zip(answers, answers_again, strict=True))
    assert not identical(first, run(2)[0])


@pytest.mark.parametrize("name", REGISTERED)
def test_a_stop_request_reaches_the_method(name):
    """learn() raises TrainingStopped when asked to stop, wherever the method is training."""
    stream = split_stream(_scenario(name, "class"), n=60)
    learner = make(name, stream, METHOD_HPARAMS.get(name), hidden=(16,))
    learner.learn(stream[0])
    calls = []

    def stop_after_a_few() -> bool:
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(TrainingStopped):
        learner.learn(stream[1], should_stop=stop_after_a_few)
    assert learner.tasks_learned == 1


@pytest.mark.parametrize("name", REGISTERED)
def test_unsupported_scenarios_are_refused_before_work(name, tmp_path):
    from orchestrator.config import load_config

    cls = LEARNERS[name]
    streams = {
        "class": {"name": "split", "source": "digits", "num_tasks": 2, "scenario": "class"},
        "task": {"name": "split", "source": "digits", "num_tasks": 2, "scenario": "task"},
        "domain": {"name": "permuted", "source": "digits", "num_tasks": 2},
    }
    for scenario, stream in streams.items():
        config = {"methods": {name: METHOD_HPARAMS.get(name, {})}, "stream": stream,
                  **METHOD_SECTIONS.get(name, {})}  # fmt: skip
        if scenario in cls.SCENARIOS:
            load_config(config)
            continue
        with pytest.raises(ConfigError, match=f"does not support the {scenario}-incremental"):
            load_config(config)
        with pytest.raises(ConfigError, match=scenario):
            make(name, split_stream(scenario) if scenario != "domain" else conflict_stream())


def test_a_method_limited_to_some_scenarios_is_refused_elsewhere_saying_why():
    from learners.finetune import FineTune
    from orchestrator.config import load_config

    class TaskOnly(FineTune):
        SCENARIOS = ("task",)
        SCENARIO_NOTE = "it needs the task identity at test time"

    LEARNERS["task_only_probe"] = TaskOnly
    TaskOnly.name = "task_only_probe"
    try:
        stream = {"name": "permuted", "source": "digits", "num_tasks": 2}
        with pytest.raises(ConfigError) as err:
            load_config({"methods": {"mine": {"method": "task_only_probe"}}, "stream": stream})
        message = str(err.value)
        assert "methods.mine" in message and "domain-incremental" in message
        assert "needs the task identity" in message and "supported: task" in message
        with pytest.raises(ConfigError, match="class-incremental"):
            make("task_only_probe", split_stream("class"))
        make("task_only_probe", split_stream("task"))
    finally:
        del LEARNERS["task_only_probe"]


@pytest.fixture(scope="module")
def digits_streams() -> dict[str, TaskStream]:
    """Two-task digits streams, one per scenario (split task / class, permuted domain)."""
    from task_streams import build_stream

    small = {"source": "digits", "num_tasks": 2, "train_per_task": 200, "test_per_task": 60}
    return {
        "task": build_stream({**small, "name": "split", "scenario": "task"}, 0),
        "class": build_stream({**small, "name": "split", "scenario": "class"}, 0),
        "domain": build_stream({**small, "name": "permuted"}, 0),
    }


@pytest.mark.parametrize("name", REGISTERED)
def test_every_method_learns_every_scenario_it_supports(name, digits_streams):
    from learners.evaluation import evaluate

    if LEARNERS[name].META_TRAINED:
        # lstm_meta learns from feedback only after thousands of meta-training steps: the
        # class-incremental curriculum of configs/lstm_meta.yaml takes 10,000 (about 8 minutes
        # on one thread here; then ACC 80% on split digits). Too long for this suite;
        # tests/test_lstm_meta.py covers its properties, `lia run configs/lstm_meta.yaml` and
        # benchmarks/meta_learning.py measure its learning.
        pytest.xfail("meta-training to a learning LSTM takes minutes (see the comment)")
    for scenario in LEARNERS[name].SCENARIOS:
        stream = digits_streams[scenario]
        learner = make(name, stream, METHOD_HPARAMS.get(name), optimizer="adam", lr=1e-2, epochs=3)
        for task in stream:
            learner.learn(task)
        final = evaluate(learner, stream)
        chance = 1 / (2 if scenario == "task" else stream.num_classes)
        assert final[-1] > chance + 0.2, (scenario, final)  # it learned the last task
        assert learner.resources()["stored_bytes"] >= 0
