"""SI, MAS and online EWC: each one's defining property, on tiny synthetic streams."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from test_learners import identical, make, params, split_stream

from learners import Learner
from learners.ewc import EWC
from task_streams.base import TaskStream

STRENGTH = {"si": "si_c", "mas": "mas_lambda", "online_ewc": "ewc_lambda"}
"""each method's penalty strength"""
PER_UNIT = {"si": 1.0, "mas": 1.0, "online_ewc": 0.5}
"""penalty = PER_UNIT · strength · Σ Ω (θ − θ*)²"""
ALL_SAMPLES = {"si": {}, "mas": {"importance_samples": 0}, "online_ewc": {"fisher_samples": 0}}
"""importances from every training sample: no random draws (the generator is left untouched)"""
METHODS = tuple(STRENGTH)


def importance(learner: Learner) -> dict[str, torch.Tensor]:
    """Ω (online EWC, EWC after one task: the Fisher F)."""
    return learner.fishers[0] if isinstance(learner, EWC) else learner.importance


def anchor(learner: Learner) -> dict[str, torch.Tensor]:
    """θ* (online EWC, EWC after one task: the only anchor)."""
    return learner.anchors[0] if isinstance(learner, EWC) else learner.anchor


def build(name: str, stream: TaskStream, strength: float = 1.0, **kwargs: object) -> Learner:
    hparams = {STRENGTH[name]: strength, **ALL_SAMPLES[name], **kwargs.pop("hparams", {})}
    return make(name, stream, hparams, hidden=(16,), **kwargs)


def blank_pixel_stream(scenario: str, tasks: int = 2) -> TaskStream:
    """split_stream with input feature 0 always 0 (train and test)."""
    stream = split_stream(scenario, n=100, tasks=tasks)
    for task in stream:
        task.x_train[:, 0, 0, 0] = 0.0
        task.x_test[:, 0, 0, 0] = 0.0
    return stream


def moved_away(learner: Learner, scale: float, seed: int = 1) -> None:
    """Put the parameters at θ* + scale · (a fixed random direction)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in learner.model.named_parameters():
            p.copy_(anchor(learner)[n] + scale * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------------- all three
@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("scenario", ["class", "task"])
def test_importances_are_nonnegative_and_zero_where_nothing_depends_on_the_weight(name, scenario):
    stream = blank_pixel_stream(scenario, tasks=3)
    learner = build(name, stream, 1.0, momentum=0.9)  # momentum: SI's ω can go negative
    for task in stream.tasks[:2]:
        learner.learn(task)
    omega = importance(learner)
    assert omega.keys() == {n for n, _ in learner.model.named_parameters()}
    assert all(v.min() >= 0 for v in omega.values())
    assert all(v.max() > 0 for v in omega.values())
    first, out_weight, out_bias = "net.1.weight", *list(omega)[-2:]
    assert omega[first][:, 0].abs().max() == 0  # weights from the always-zero pixel
    assert omega[first][:, 1:].max() > 0
    if scenario == "task":  # output units of task 2, not learned yet, never mattered
        assert omega[out_weight][4:].abs().max() == 0 and omega[out_bias][4:].abs().max() == 0
        assert omega[out_weight][:4].max() > 0


@pytest.mark.parametrize("name", METHODS)
def test_the_penalty_is_zero_at_the_anchor_and_a_step_on_it_pulls_towards_the_anchor(name):
    stream = split_stream("domain", n=100)
    learner = build(name, stream, 3.0)
    learner.learn(stream[0])
    assert identical(params(learner), anchor(learner))
    assert learner.penalty().item() == 0.0
    moved_away(learner, 0.1)
    assert learner.penalty().item() > 0
    before = {n: p.detach() - anchor(learner)[n] for n, p in learner.model.named_parameters()}
    # a step small enough not to overshoot: δ ← (1 − lr·2kΩ)·δ with lr·2kΩ ≤ 1/2
    k = PER_UNIT[name] * 3.0
    lr = 0.25 / (k * max(v.max().item() for v in importance(learner).values()))
    penalty_params = list(learner.model.parameters())
    grads = torch.autograd.grad(learner.penalty(), penalty_params)
    with torch.no_grad():
        for p, g in zip(penalty_params, grads, strict=True):
            p.sub_(lr * g)
    after = {n: p.detach() - anchor(learner)[n] for n, p in learner.model.named_parameters()}
    for n in before:
        assert (after[n].abs() <= before[n].abs()).all()
        omega = importance(learner)[n]
        shrunk = omega > 1e-3 * omega.max()
        assert (after[n].abs()[shrunk] < before[n].abs()[shrunk]).all()
    assert sum(v.pow(2).sum() for v in after.values()) < sum(
        v.pow(2).sum() for v in before.values()
    )


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("scenario", ["task", "class"])
def test_the_step_follows_the_gradient_of_cross_entropy_plus_penalty(name, scenario):
    """Wherever the method adds its penalty's gradient (closed form or autograd), the optimizer
    sees ∇(CE + penalty)."""
    stream = split_stream(scenario, n=100)
    learner = build(name, stream, 2.0)
    learner.learn(stream[0])
    moved_away(learner, 0.05)
    x, y = stream[1].x_train[:10], stream[1].y_train[:10]
    t = torch.ones_like(y)
    learner.before_task(stream[1])
    learner.optimizer.zero_grad(set_to_none=True)
    learner.loss(x, y, t).backward()
    learner.after_backward(x, y, t)
    seen = [p.grad.clone() for p in learner.model.parameters()]
    learner.optimizer.zero_grad(set_to_none=True)
    objective = F.cross_entropy(learner.logits(x, t), y) + learner.penalty()
    expected = torch.autograd.grad(objective, list(learner.model.parameters()))
    penalty_only = torch.autograd.grad(learner.penalty(), list(learner.model.parameters()))
    assert max(g.abs().max() for g in penalty_only) > 1e-3  # the penalty does matter here
    for a, b in zip(seen, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("scenario", ["task", "class"])
def test_strength_zero_is_finetune_bit_for_bit(name, scenario):
    stream = split_stream(scenario, n=60, tasks=3)
    runs = []
    for method in ("finetune", name):
        hparams = {STRENGTH[name]: 0.0, **ALL_SAMPLES[name]} if method == name else {}
        learner = make(method, stream, hparams, seed=3, hidden=(16,), dropout=0.2, momentum=0.9)
        for task in stream:
            learner.learn(task)
        runs.append(params(learner))
    assert identical(*runs)


@pytest.mark.parametrize("name", METHODS)
def test_stored_memory_is_one_importance_and_one_anchor(name):
    stream = split_stream("class", n=60, tasks=3)
    learner = build(name, stream)
    assert learner.stored_memory() == {"stored_samples": 0, "stored_bytes": 0}
    model_bytes = sum(p.numel() * p.element_size() for p in learner.model.parameters())
    for task in stream:
        learner.learn(task)
        assert learner.stored_memory() == {"stored_samples": 0, "stored_bytes": 2 * model_bytes}


# ---------------------------------------------------------------------- SI
def _snapshot(learner: Learner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.model.named_parameters()}


def test_si_path_integral_uses_the_task_loss_gradient_not_the_penalty():
    """ω = −Σ_steps g_CE·Δθ along the actual trajectory, although each step also followed the
    (here large) penalty's gradient; then Ω += ω/(Δ² + ξ)."""
    stream = split_stream("class", n=100)
    learner = build("si", stream, 5.0, momentum=0.9, hparams={"si_xi": 0.1})
    learner.learn(stream[0])
    omega_before = {n: v.clone() for n, v in learner.importance.items()}
    moved_away(learner, 0.1)  # so that the penalty's gradient is large from the first step
    task = stream[1]
    learner.before_task(task)
    start = _snapshot(learner)
    names = [n for n, _ in learner.model.named_parameters()]
    reference = {n: torch.zeros_like(v) for n, v in start.items()}
    with_penalty = {n: torch.zeros_like(v) for n, v in start.items()}
    penalty_share = []
    for first in range(0, 60, 10):  # six steps of the Learner loop, by hand
        x, y = task.x_train[first : first + 10], task.y_train[first : first + 10]
        t = torch.ones_like(y)
        ce = F.cross_entropy(learner.logits(x, t), y)
        ce_grad = dict(
            zip(names, torch.autograd.grad(ce, list(learner.model.parameters())), strict=True)
        )
        learner.optimizer.zero_grad(set_to_none=True)
        learner.loss(x, y, t).backward()
        learner.after_backward(x, y, t)
        full_grad = {n: p.grad.clone() for n, p in learner.model.named_parameters()}
        before = _snapshot(learner)
        learner.optimizer.step()
        learner.after_step(x, y, t)
        for n, p in learner.model.named_parameters():
            moved = p.detach() - before[n]
            reference[n] -= ce_grad[n] * moved
            with_penalty[n] -= full_grad[n] * moved
        penalty_share.append(
            sum((full_grad[n] - ce_grad[n]).norm() for n in names)
            / sum(ce_grad[n].norm() for n in names)
        )
    for n in names:
        torch.testing.assert_close(learner.omega[n], reference[n], rtol=1e-5, atol=1e-9)
    # the same sum with the full gradient (task loss + penalty) is far off, so the check above
    # tells the two apart
    off = sum((with_penalty[n] - reference[n]).pow(2).sum() for n in names).sqrt()
    assert min(penalty_share) > 0.25  # the penalty's gradient was far from negligible
    assert off > 0.2 * sum(reference[n].pow(2).sum() for n in names).sqrt()

    omega = {n: v.clone() for n, v in learner.omega.items()}
    end = _snapshot(learner)
    learner.after_task(task)
    for n in names:
        expected = (omega_before[n] + omega[n] / ((end[n] - start[n]).pow(2) + 0.1)).clamp(min=0)
        torch.testing.assert_close(learner.importance[n], expected, rtol=1e-6, atol=0)
    assert identical(learner.anchor, end)


def test_si_path_integral_with_plain_sgd_is_the_learning_rate_times_the_squared_gradients():
    """Without penalty and momentum Δθ = −lr·g, so ω = lr·Σ g² on the first task."""
    stream = split_stream("domain", n=100)
    learner = build("si", stream)
    task = stream[0]
    learner.before_task(task)
    squares = {n: torch.zeros_like(p) for n, p in learner.model.named_parameters()}
    t = torch.zeros(10, dtype=torch.long)
    for first in range(0, 50, 10):
        x, y = task.x_train[first : first + 10], task.y_train[first : first + 10]
        learner.optimizer.zero_grad(set_to_none=True)
        learner.loss(x, y, t).backward()
        learner.after_backward(x, y, t)
        for n, p in learner.model.named_parameters():
            squares[n] += p.grad.pow(2)
        learner.optimizer.step()
        learner.after_step(x, y, t)
    for n, v in squares.items():
        torch.testing.assert_close(learner.omega[n], 0.05 * v, rtol=1e-4, atol=1e-8)


# ---------------------------------------------------------------------- MAS
@pytest.mark.parametrize("path", ["linear", "vmap"])
@pytest.mark.parametrize("scenario", ["task", "domain"])
def test_mas_importance_is_the_mean_absolute_gradient_of_the_squared_output_norm(
    scenario, path, monkeypatch
):
    import learners.mas as mas_module

    monkeypatch.setattr(mas_module, "CHUNK", 16)  # several chunks, a ragged last one
    monkeypatch.setattr(mas_module, "LINEAR_CHUNK", 16)
    if path == "vmap":  # what a backbone with other layers (the CNN) uses
        monkeypatch.setattr(mas_module, "all_linear_layers", lambda model: None)
    stream = split_stream(scenario, n=40)
    learner = make("mas", stream, {"importance_samples": 0}, hidden=(8, 6))
    learner.learn(stream[0])
    x = stream[1].x_train
    t = torch.ones(x.shape[0], dtype=torch.long)
    omega = learner.output_sensitivity(x, t)
    reference = {n: torch.zeros_like(p) for n, p in learner.model.named_parameters()}
    for i in range(x.shape[0]):
        learner.model.zero_grad()
        out = learner.model(x[i : i + 1])
        if scenario == "task":
            out = out[:, 2:4]  # task 1's own output units
        out.pow(2).sum().backward()
        for n, p in learner.model.named_parameters():
            reference[n] += p.grad.abs()
    for n in omega:
        torch.testing.assert_close(omega[n], reference[n] / x.shape[0], rtol=1e-4, atol=1e-7)


def test_mas_importance_is_label_free():
    stream = split_stream("class", n=100)
    learner = build("mas", stream, hparams={"importance_samples": 50})
    learner.learn(stream[0])
    task = stream[1]
    relabelled = dataclasses.replace(
        task, y_train=task.y_train[torch.randperm(task.num_train, generator=torch.Generator())]
    )
    assert not torch.equal(relabelled.y_train, task.y_train)
    state = learner.generator.get_state()
    first = learner.task_importance(task)
    learner.generator.set_state(state)
    assert identical(first, learner.task_importance(relabelled))
    learner.generator.set_state(state)
    wrong = dataclasses.replace(task, x_train=task.x_train.flip(0))
    assert not identical(first, learner.task_importance(wrong))  # it does depend on the inputs


def test_mas_importances_add_up_over_tasks():
    stream = split_stream("domain", n=60)
    learner = build("mas", stream)
    learner.learn(stream[0])
    first = {n: v.clone() for n, v in learner.importance.items()}
    learner.learn(stream[1])
    second = learner.task_importance(stream[1])  # at the weights after task 1, all samples
    for n, v in learner.importance.items():
        torch.testing.assert_close(v, first[n] + second[n], rtol=1e-6, atol=0)


# ---------------------------------------------------------------------- online EWC
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_online_ewc_keeps_one_fisher_decayed_by_gamma(gamma):
    stream = split_stream("class", n=60, tasks=2)
    learner = build("online_ewc", stream, hparams={"gamma": gamma})
    learner.learn(stream[0])
    f0 = {n: v.clone() for n, v in learner.fishers[0].items()}
    learner.learn(stream[1])
    x, y = stream[1].x_train, stream[1].y_train
    f1 = learner.fisher(x, y, torch.ones_like(y))  # separately, at the weights after task 1
    assert len(learner.fishers) == len(learner.anchors) == 1
    for n, v in learner.fishers[0].items():
        torch.testing.assert_close(v, gamma * f0[n] + f1[n], rtol=1e-6, atol=0)
    assert identical(learner.anchors[0], params(learner))


@pytest.mark.parametrize("scenario", ["task", "domain"])
def test_online_ewc_after_one_task_with_gamma_one_is_ewc(scenario):
    stream = split_stream(scenario, n=100)
    hparams = {"ewc_lambda": 7.0, "fisher_samples": 40, "fisher_type": "true"}
    online = make("online_ewc", stream, {**hparams, "gamma": 1.0}, hidden=(16,))
    ewc = make("ewc", stream, hparams, hidden=(16,))
    for learner in (online, ewc):
        learner.learn(stream[0])
    assert identical(online.fishers[0], ewc.fishers[0])
    for learner in (online, ewc):
        moved_away(learner, 0.1)
    assert online.penalty().item() > 0
    assert online.penalty().item() == pytest.approx(ewc.penalty().item(), rel=1e-6)
