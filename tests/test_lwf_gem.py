"""LwF, GEM and A-GEM: each method's defining property, and GEM's batched machinery against
plain per-task backward passes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_learners import (
    FEATURES,
    SHAPE,
    conflict_stream,
    gaussian_task,
    identical,
    make,
    params,
    split_stream,
)

from learners import Learner, ModelConfig, TrainConfig, build_learner
from learners._episodic import (
    InputLayerTracker,
    MemoryPass,
    TaskMemories,
    task_gradients,
    vmap_task_gradients,
)
from learners.agem import agem_project
from learners.gem import gem_multipliers, gem_project
from task_streams.base import TaskStream


# ---------------------------------------------------------------------- helpers
def loop_gradients(learner, memories):
    """Reference: one backward() per memory set (eval mode), flattened, shape (t, p); the
    model's .grad are left as they were."""
    model = learner.model
    was_training = model.training
    saved = [p.grad for p in model.parameters()]
    model.eval()
    rows = []
    for x, y, t in memories:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(learner.logits(x, t), y).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    for p, g in zip(model.parameters(), saved, strict=True):
        p.grad = g
    model.train(was_training)
    return torch.stack(rows)


def flat(tensors):
    return torch.cat([v.reshape(v.shape[0], -1) if v.dim() > 1 else v[:, None] for v in tensors], 1)


def flat_grad(learner):
    return torch.cat([p.grad.reshape(-1) for p in learner.model.parameters()])


def conflicting(t, p, seed):
    """A gradient g and t memory gradients, most of them at an obtuse angle to g."""
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(p, generator=g, dtype=torch.float64)
    memories = torch.randn(t, p, generator=g, dtype=torch.float64) - 0.6 * grad
    return grad, memories


# ---------------------------------------------------------------------- LwF
@pytest.mark.parametrize("scenario", ["task", "class", "domain"])
def test_lwf_with_weight_zero_is_finetune_bit_for_bit(scenario):
    stream = split_stream(scenario, n=80, tasks=3) if scenario != "domain" else conflict_stream(80)
    runs = []
    for name, hparams in (("finetune", {}), ("lwf", {"lwf_weight": 0.0})):
        learner = make(name, stream, hparams, seed=3, hidden=(16,), dropout=0.2, momentum=0.9)
        for task in stream:
            learner.learn(task)
        runs.append(params(learner))
    assert identical(*runs)


def _old_task_outputs(learner, x, units):
    with torch.no_grad():
        learner.model.eval()
        return F.log_softmax(learner.model(x)[:, units], dim=1)


def shared_input_stream(n: int = 200, seed: int = 0) -> TaskStream:
    """Task-incremental, two heads on the SAME inputs: task 0 labels the four clusters
    {0, 0, 1, 1}, task 1 labels them {2, 3, 2, 3}, so learning task 1 moves the features task
    0's head reads on task 0's inputs (the case distillation on current inputs protects)."""
    g = torch.Generator().manual_seed(seed)
    protos = 1.5 * torch.randn(4, FEATURES, generator=g)
    first = gaussian_task(0, protos, torch.tensor([0, 0, 1, 1]), n, g, (0, 1))
    second = gaussian_task(1, protos, torch.tensor([2, 3, 2, 3]), n, g, (2, 3))
    return TaskStream("shared-inputs", "task", [first, second], SHAPE, 4)


@pytest.mark.parametrize("scenario", ["task", "class", "domain"])
def test_lwf_keeps_the_old_tasks_outputs_closer_to_the_old_model_than_finetune(scenario):
    streams = {
        "task": lambda: shared_input_stream(n=200),
        "class": lambda: split_stream("class", n=200),
        "domain": lambda: conflict_stream(n=200),
    }
    stream = streams[scenario]()
    units = list(stream[0].classes)
    x_old = stream[0].x_test
    drift = {}
    for name, hparams in (("finetune", {}), ("lwf", {"lwf_weight": 3.0})):
        learner = make(name, stream, hparams, seed=0, hidden=(32,), epochs=2)
        learner.learn(stream[0])
        before = _old_task_outputs(learner, x_old, units)
        learner.learn(stream[1])
        after = _old_task_outputs(learner, x_old, units)
        # KL(old ‖ new) on task 0's test inputs, over task 0's output units
        drift[name] = F.kl_div(after, before, reduction="batchmean", log_target=True).item()
    assert drift["finetune"] > 1e-3
    assert drift["lwf"] < 0.5 * drift["finetune"]


def test_lwf_distils_the_units_each_scenario_documents():
    expected = {"task": [[0, 1], [2, 3]], "class": [[0, 1, 2, 3]], "domain": [list(range(6))]}
    for scenario, units in expected.items():
        stream = split_stream(scenario, n=20, tasks=3)
        learner = make("lwf", stream)
        learner.learn(stream[0])
        learner.learn(stream[1])
        assert [u.tolist() for u in learner.distilled_units()] == units


def test_lwf_task_incremental_distils_old_heads_only():
    stream = split_stream("task", n=60, tasks=2)
    learner = make("lwf", stream, {"lwf_weight": 1.0}, hidden=(16,))
    learner.learn(stream[0])
    learner.before_task(stream[1])
    with torch.no_grad():  # move away from the old model so that the distillation is not 0
        for p in learner.model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    x, y = stream[1].x_train[:16], stream[1].y_train[:16]
    t = torch.ones_like(y)
    kd = learner.loss(x, y, t) - F.cross_entropy(learner.logits(x, t), y)
    assert kd.item() > 0
    out_weight = list(learner.model.parameters())[-2]
    (grad,) = torch.autograd.grad(kd, out_weight)
    assert grad[:2].abs().max() > 0  # task 0's units are pulled towards the old model
    assert grad[2:].abs().max() == 0  # task 1's units are left to the cross-entropy


def test_lwf_frozen_copy_is_the_model_after_the_previous_task():
    stream = split_stream("class", n=60, tasks=3)
    learner = make("lwf", stream, hidden=(16,))
    learner.learn(stream[0])
    after_first = params(learner)
    learner.learn(stream[1])
    state = learner.state_dict()
    assert state["method"]["learned_tasks"] == [0, 1]
    old = state["method"]["old_model"]
    assert all(torch.equal(old[n], v) for n, v in params(learner).items())
    assert not all(torch.equal(old[n], v) for n, v in after_first.items())
    assert learner.stored_memory()["stored_bytes"] == sum(v.numel() * 4 for v in old.values())


# ---------------------------------------------------------------------- GEM: the projection
@pytest.mark.parametrize("seed", range(10))
def test_gem_projection_satisfies_every_constraint(seed):
    g, memories = conflicting(t=8, p=40, seed=seed)
    assert (memories @ g < 0).sum() >= 3  # many conflicts
    for margin in (0.0, 0.5):
        projected = gem_project(g, memories, margin=margin, eps=1e-12)
        assert (memories @ projected >= -1e-6).all()
        # with ε > 0, constraint k is relaxed by exactly ε·v_k (the QP's optimality conditions)
        eps = 1e-3
        v = gem_multipliers(memories @ memories.T, memories @ g, margin, eps)
        projected = gem_project(g, memories, margin=margin, eps=eps)
        assert (memories @ projected >= -eps * v - 1e-9).all()
        assert (v >= margin - 1e-9).all()


def test_gem_projection_is_the_closest_feasible_gradient():
    g, memories = conflicting(t=4, p=30, seed=0)
    projected = gem_project(g, memories, margin=0.0, eps=1e-12)
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):  # no other feasible point nearby is closer to g
        other = projected + 0.05 * torch.randn(30, generator=gen, dtype=torch.float64)
        if (memories @ other >= 0).all():
            assert (other - g).norm() >= (projected - g).norm() - 1e-9


def test_gem_projection_leaves_a_non_conflicting_gradient_unchanged():
    g, memories = conflicting(t=6, p=20, seed=0)
    aligned = memories.abs() * g.sign()  # every ⟨g, g_k⟩ > 0
    assert (aligned @ g > 0).all()
    assert gem_project(g, aligned) is g
    assert gem_project(g, torch.zeros(3, 20, dtype=torch.float64)) is g  # ⟨g, 0⟩ = 0: no conflict


def test_gem_fixes_a_deliberately_conflicting_pair():
    g = torch.tensor([1.0, 0.0], dtype=torch.float64)
    memory = torch.tensor([[-1.0, 1.0]], dtype=torch.float64)
    assert (memory @ g).item() == -1.0
    plain = gem_project(g, memory, margin=0.0, eps=1e-12)  # v* = 0.5: onto the boundary
    torch.testing.assert_close(plain, torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert (memory @ plain).item() == pytest.approx(0.0, abs=1e-9)
    biased = gem_project(g, memory, margin=0.8, eps=1e-12)  # v ≥ γ = 0.8 > v*: past it
    torch.testing.assert_close(biased, g + 0.8 * memory[0])
    assert (memory @ biased).item() == pytest.approx(0.6)  # the old loss now decreases


# ---------------------------------------------------------------------- GEM: batched gradients
def _after_two_tasks(name, scenario, **kwargs):
    stream = split_stream(scenario, n=60, tasks=3)
    learner = make(name, stream, {"memories_per_task": 12}, **kwargs)
    learner.learn(stream[0])
    learner.learn(stream[1])
    return learner, stream


@pytest.mark.parametrize("scenario", ["task", "class", "domain"])
def test_gem_batched_memory_gradients_equal_a_per_task_loop(scenario):
    learner, stream = _after_two_tasks("gem", scenario, hidden=(16, 12), dropout=0.2)
    learner.before_task(stream[2])
    batched = flat(learner.memory_gradients())
    reference = loop_gradients(learner, [learner.memories.stored(k) for k in (0, 1)])
    torch.testing.assert_close(batched, reference, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        flat(vmap_task_gradients(learner, *learner._past)), reference, rtol=1e-4, atol=1e-6
    )
    if scenario == "task":  # each task's memory loss uses only its own output units
        out_weight = learner.memory_gradients()[-2]
        assert out_weight[0, 2:].abs().max() == 0 and out_weight[1, :2].abs().max() == 0
        assert out_weight[1, 2:4].abs().max() > 0


def test_gem_batched_gradients_with_unequal_memories_and_a_cnn():
    stream = split_stream("task", n=40, tasks=3)
    model = ModelConfig(backbone="cnn", cnn_channels=[4], cnn_fc=8)
    learner = build_learner(
        "gem", stream.info, {"memories_per_task": 16}, model=model, train=TrainConfig(lr=0.05)
    )
    for k, n in ((0, 16), (1, 7)):  # task 1 holds fewer samples: padded, weight 0
        task = stream[k]
        learner.memories.add(k, task.x_train[:n], task.y_train[:n], torch.full((n,), k))
    stacked = learner.memories.stacked([0, 1])
    assert stacked[0].shape[:2] == (2, 16) and stacked[3][1, 7:].abs().max() == 0
    batched = flat(task_gradients(learner, *stacked))  # the vmap path: not an MLP
    reference = loop_gradients(learner, [learner.memories.stored(k) for k in (0, 1)])
    torch.testing.assert_close(batched, reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_gem_cheap_conflict_test_equals_the_dot_products_of_full_gradients(weight_decay):
    learner, stream = _after_two_tasks(
        "gem", "domain", hidden=(24, 12), dropout=0.2, weight_decay=weight_decay
    )
    learner.before_task(stream[2])
    x, y = stream[2].x_train[:5], stream[2].y_train[:5]
    t = torch.full_like(y, 2)
    learner.optimizer.zero_grad()
    learner.loss(x, y, t).backward()
    grads = learner.fold_weight_decay()
    batch = learner.take_batch_factors()
    assert batch is not None
    mx, my, mt, mw = learner._past
    rows = (mx.flatten(0, 1), my.flatten(), mt.flatten(), mw.flatten(), 2)
    dots, xg = MemoryPass(learner, learner._layers, *rows).dots(batch, weight_decay)
    exact = flat(learner.memory_gradients()) @ torch.cat([g.reshape(-1) for g in grads])
    torch.testing.assert_close(dots, exact, rtol=1e-4, atol=1e-7)
    # the first layer's X gᵀ, which keeps X W1ᵀ current between steps
    w1 = learner._layers[0].weight
    torch.testing.assert_close(xg, mx.flatten(0, 1).flatten(1) @ w1.grad.T, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------- GEM: inside training
TOL = 1e-5
"""in-training checks: ⟨g_k, g/‖g‖⟩ ≥ −TOL. The fresh g_k (autograd) and the ones the method
used (its own batched pass) differ by float32 rounding, ~1e-6 in norm for a memory whose loss
is ~0; a violated constraint is orders of magnitude larger (the raw conflicts here are ~1e-2)."""


def _record_steps(learner, fresh_references):
    """Wrap after_backward: per step, ⟨g_k, g/‖g⟩ for the raw and for the final gradient g and
    freshly computed reference gradients g_k, and whether the gradient was changed.

    Dividing by ‖g‖ only (not by ‖g_k‖) keeps float32 rounding in a nearly-zero g_k (a memory
    whose loss is ~0: softmax − onehot cancels) from looking like a violated constraint."""
    steps = []
    original = learner.after_backward
    wd = learner.train_config.weight_decay

    def along(references, g):
        return (references @ g) / g.norm().clamp_min(1e-30)

    def checked(x, y, t):
        raw = [p.grad.clone().add_(p.detach(), alpha=wd) for p in learner.model.parameters()]
        original(x, y, t)
        final = flat_grad(learner).double()
        references = fresh_references().double()
        raw_flat = torch.cat([r.reshape(-1) for r in raw]).double()
        changed = not torch.equal(final, raw_flat)
        steps.append((along(references, raw_flat), along(references, final), changed))

    learner.after_backward = checked
    return steps


@pytest.mark.parametrize("scenario", ["task", "class", "domain"])
def test_gem_steps_satisfy_the_constraints_against_fresh_memory_gradients(scenario):
    stream = split_stream(scenario, n=100, tasks=3)
    learner = make(
        "gem",
        stream,
        {"memories_per_task": 20, "margin": 0.0, "eps": 1e-12},
        hidden=(16,),
        dropout=0.2,
        momentum=0.9,
        weight_decay=1e-3,
        batch_size=5,
        lr=0.1,
    )
    learner.learn(stream[0])
    learner.learn(stream[1])
    memories = [learner.memories.stored(k) for k in (0, 1)]
    steps = _record_steps(learner, lambda: loop_gradients(learner, memories))
    learner.learn(stream[2])
    assert learner.projected_steps > 0
    conflicts = 0
    for raw, final, changed in steps:
        # every constraint holds for the gradient that is used, up to float32 rounding
        assert (final >= -TOL).all()
        if bool((raw < -TOL).any()):
            conflicts += 1
            assert changed
        if bool((raw > TOL).all()):
            assert not changed  # no conflict: the gradient is used as it is
    assert conflicts > 0


@pytest.mark.parametrize("scenario", ["task", "class", "domain"])
def test_gem_loss_recording_the_batch_is_the_plain_cross_entropy(scenario):
    learner, stream = _after_two_tasks("gem", scenario, hidden=(16, 12), dropout=0.2)
    learner.before_task(stream[2])  # memories in use: the loss records the batch's factors
    x, y = stream[2].x_train[:8], stream[2].y_train[:8]
    t = torch.full_like(y, 2)
    results = []
    for loss in (learner.loss, lambda *a: Learner.loss(learner, *a)):
        torch.manual_seed(5)  # the same dropout masks
        value = loss(x, y, t)
        results.append((value, torch.autograd.grad(value, list(learner.model.parameters()))))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1], strict=True))
    assert learner._batch is not None


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_input_layer_tracker_follows_sgd_steps_at_rank_b_cost(momentum):
    gen = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(20, 8)
    x = torch.randn(30, 20, generator=gen)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=momentum)
    wd = 0.01
    tracker = None
    for step in range(30):
        if step == 5:  # started while the optimizer already holds a momentum buffer
            tracker = InputLayerTracker(x, layer, refresh=1000)
        a_b = torch.randn(4, 20, generator=gen)
        d_b = torch.randn(4, 8, generator=gen)
        layer.weight.grad = d_b.T @ a_b + wd * layer.weight.detach()
        layer.bias.grad = d_b.sum(0)
        if tracker is None:
            optimizer.step()
            continue
        xg = (x @ a_b.T) @ d_b + wd * tracker.current()  # X gᵀ from the batch's factors
        tracker.before_step(xg, optimizer)
        optimizer.step()
        tracker.after_step(optimizer)
        assert tracker.p is not None and tracker.age == step - 4
        fresh = x @ layer.weight.detach().T
        torch.testing.assert_close(tracker.p, fresh, rtol=1e-4, atol=1e-5)
    tracker.before_step(None, optimizer)  # an update it cannot follow: recomputed next time
    optimizer.step()
    tracker.after_step(optimizer)
    assert tracker.p is None
    torch.testing.assert_close(tracker.current(), x @ layer.weight.detach().T)


def test_gem_keeps_the_first_layer_product_current_between_steps():
    stream = split_stream("class", n=100, tasks=3)
    learner = make(
        "gem",
        stream,
        {"memories_per_task": 20, "margin": 0.0},
        hidden=(16,),
        dropout=0.2,
        momentum=0.9,
        weight_decay=1e-3,
        batch_size=5,  # 5·(20 + 16) < 20·16: the first layer takes the rank-B route
        lr=0.1,
    )
    learner.learn(stream[0])
    learner.learn(stream[1])
    checked = []
    original = learner.after_step

    def compare(x, y, t):
        original(x, y, t)
        tracker = learner._tracker
        if tracker.p is not None:
            fresh = tracker.x @ learner._layers[0].weight.detach().T
            torch.testing.assert_close(tracker.p, fresh, rtol=1e-4, atol=1e-5)
            checked.append(tracker.age)

    learner.after_step = compare
    learner.learn(stream[2])
    assert max(checked) >= 2  # carried across steps, not only recomputed


def test_gem_without_memories_is_the_optimizer_s_own_update_with_weight_decay():
    stream = split_stream("class", n=60, tasks=1)
    runs = []
    for name in ("finetune", "gem"):
        learner = make(name, stream, seed=2, hidden=(16,), momentum=0.9, weight_decay=0.05)
        learner.learn(stream[0])
        runs.append(params(learner))
        if name == "gem":
            assert all(g["weight_decay"] == 0 for g in learner.optimizer.param_groups)
    for n in runs[0]:
        torch.testing.assert_close(runs[0][n], runs[1][n], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------- episodic memory
def _ids(n, start=0):
    ids = torch.arange(start, start + n)
    return ids.float().unsqueeze(1), ids, torch.zeros_like(ids)


def test_task_memories_keep_the_last_samples_seen_of_each_task():
    memory = TaskMemories(10)
    seen = 0
    for size in (3, 4, 8, 1, 25, 6):
        memory.add(0, *_ids(size, seen))
        seen += size
        x, y, _ = memory.stored(0)
        assert sorted(y.tolist()) == list(range(max(0, seen - 10), seen))
        assert torch.equal(x[:, 0], y.float())
    memory.add(1, *_ids(4, 100))
    assert memory.count(0) == 10 and memory.count(1) == 4 and len(memory) == 14
    state = memory.state_dict()
    copy = TaskMemories(10)
    copy.load_state_dict(state)
    for k in (0, 1):
        assert all(torch.equal(a, b) for a, b in zip(copy.stored(k), memory.stored(k), strict=True))
    copy.add(0, *_ids(3, 1000))
    memory.add(0, *_ids(3, 1000))
    assert torch.equal(copy.stored(0)[1], memory.stored(0)[1])
    memory.reset(0)
    assert memory.task_ids() == [1]


@pytest.mark.parametrize("name", ["gem", "agem"])
def test_memories_are_counted_and_only_past_tasks_constrain(name):
    learner, stream = _after_two_tasks(name, "class")
    memory = learner.stored_memory()
    assert memory["stored_samples"] == 24
    assert memory["stored_bytes"] == 24 * (FEATURES * 4 + 8 + 8)
    learner.before_task(stream[2])
    assert learner.memories.task_ids() == [0, 1]
    learner.before_task(stream[1])  # learning task 1 again: only task 0 constrains it
    assert learner.memories.task_ids() == [0]


# ---------------------------------------------------------------------- A-GEM
@pytest.mark.parametrize("seed", range(10))
def test_agem_projection_satisfies_its_constraint_and_is_the_closest(seed):
    g, memories = conflicting(t=1, p=50, seed=seed)
    ref = memories[0]
    assert (g @ ref) < 0
    projected = agem_project(g, ref)
    assert (projected @ ref) >= -1e-6 and (projected @ ref).abs() < 1e-9
    # the closest point of the half-space: the correction is along g_ref only
    correction = g - projected
    torch.testing.assert_close(correction, (correction @ ref) / (ref @ ref) * ref)
    assert agem_project(g, -ref) is g  # no conflict: unchanged


def test_agem_reference_sample_is_drawn_from_past_memories_with_the_generator():
    learner, stream = _after_two_tasks("agem", "class")
    learner.hparams.sample_size = 10
    learner.before_task(stream[2])
    state = learner.generator.get_state()
    x, y, t = learner.reference_sample()
    assert y.shape[0] == 10 and set(t.tolist()) <= {0, 1}
    pool = {tuple(row.tolist()) for row in learner._pool[0].flatten(1)}
    rows = [tuple(row.tolist()) for row in x.flatten(1)]
    assert len(set(rows)) == 10 and all(row in pool for row in rows)
    learner.generator.set_state(state)
    assert torch.equal(learner.reference_sample()[0], x)  # the learner's generator decides
    learner.hparams.sample_size = 1000  # more than the pool: the whole pool
    assert learner.reference_sample()[0].shape[0] == 24


def test_agem_reference_gradient_equals_a_plain_backward():
    learner, stream = _after_two_tasks("agem", "task", hidden=(16,), dropout=0.2)
    learner.before_task(stream[2])
    x, y, t = learner.reference_sample()
    ref = torch.cat([r.reshape(-1) for r in learner.reference_gradient(x, y, t)])
    torch.testing.assert_close(ref, loop_gradients(learner, [(x, y, t)])[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scenario", ["task", "class", "domain"])
def test_agem_steps_satisfy_the_constraint_against_a_fresh_reference_gradient(scenario):
    stream = split_stream(scenario, n=100, tasks=3)
    learner = make(
        "agem",
        stream,
        {"memories_per_task": 20, "sample_size": 15},
        hidden=(16,),
        dropout=0.2,
        momentum=0.9,
        weight_decay=1e-3,
        batch_size=5,
    )
    learner.learn(stream[0])
    learner.learn(stream[1])
    samples = []
    sample = learner.reference_sample

    def recording_sample():
        samples.append(sample())
        return samples[-1]

    learner.reference_sample = recording_sample
    steps = _record_steps(learner, lambda: loop_gradients(learner, samples[-1:]))
    learner.learn(stream[2])
    assert learner.projected_steps > 0
    conflicts = 0
    for raw, final, changed in steps:
        assert final.item() >= -TOL
        if raw.item() < -TOL:
            conflicts += 1
            assert changed
        if raw.item() > TOL:
            assert not changed
    assert conflicts > 0
