"""DER++ and ER-ACE: the reservoir buffer's extras and each method's defining property."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from test_learners import make, split_stream

from learners.replay import ReservoirBuffer


def params(learner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.model.named_parameters()}


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def accuracy(learner, task) -> float:
    return (learner.predict(task.x_test, task.id) == task.y_test).float().mean().item()


def run(name: str, stream, hparams: dict, **kwargs: object):
    learner = make(name, stream, hparams, **kwargs)
    for task in stream:
        learner.learn(task)
    return learner


# ---------------------------------------------------------------------- buffer extras
def _items(n: int, start: int = 0):
    ids = torch.arange(start, start + n)
    logits = torch.stack([ids.double(), -ids.double(), 0.5 * ids.double()], dim=1)
    return ids.float().unsqueeze(1), ids, torch.zeros_like(ids), logits


def test_buffer_extras_stay_with_their_items_and_round_trip():
    buffer, g = ReservoirBuffer(10), torch.Generator().manual_seed(0)
    x, y, t, z = _items(37)
    buffer.add(x, y, t, g, logits=z)
    kept = buffer.y[: len(buffer)]
    assert torch.equal(buffer.extras["logits"][: len(buffer), 0], kept.double())
    assert buffer.extras["logits"].dtype == torch.float64
    assert buffer.nbytes() == 10 * (4 + 8 + 8 + 3 * 8)

    # sample_items draws exactly what sample draws, and returns the extras of those rows
    g2 = torch.Generator()
    g2.set_state(g.get_state())
    sx, sy, st, extras = buffer.sample_items(6, g)
    assert all(torch.equal(a, b) for a, b in zip(buffer.sample(6, g2), (sx, sy, st), strict=True))
    assert torch.equal(extras["logits"], torch.stack([sy, -sy, 0.5 * sy], 1).double())

    saved = io.BytesIO()
    torch.save(buffer.state_dict(), saved)
    saved.seek(0)
    copy = ReservoirBuffer(10)
    copy.load_state_dict(torch.load(saved, weights_only=True))
    assert copy.nbytes() == buffer.nbytes()
    assert torch.equal(copy.extras["logits"], buffer.extras["logits"])
    g_copy = torch.Generator()
    g_copy.set_state(g.get_state())
    x, y, t, z = _items(30, 37)
    buffer.add(x, y, t, g, logits=z)
    copy.add(x, y, t, g_copy, logits=z)
    assert copy.seen == buffer.seen == 67 and torch.equal(copy.y, buffer.y)
    assert torch.equal(copy.extras["logits"], buffer.extras["logits"])

    with pytest.raises(ValueError, match="extras"):
        buffer.add(x, y, t, g)  # the logits are missing
    with pytest.raises(ValueError, match="rows"):
        buffer.add(x, y, t, g, logits=z[:3])


def test_buffer_without_extras_saves_as_before():
    buffer, g = ReservoirBuffer(10), torch.Generator().manual_seed(0)
    x, y, t, _ = _items(20)
    buffer.add(x, y, t, g)
    state = buffer.state_dict()
    assert set(state) == {"capacity", "seen", "x", "y", "t"}
    copy = ReservoirBuffer(10)
    copy.load_state_dict(state)
    assert copy.extras == {} and torch.equal(copy.y, buffer.y)


# ---------------------------------------------------------------------- DER++
@pytest.mark.parametrize("scenario", ["class", "task"])
def test_der_without_alpha_and_beta_is_finetune_bit_for_bit(scenario):
    stream = split_stream(scenario, n=100)
    kwargs = {"seed": 3, "momentum": 0.9, "dropout": 0.2}
    der = run("der", stream, {"alpha": 0.0, "beta": 0.0, "buffer_size": 50}, **kwargs)
    finetune = run("finetune", stream, {}, **kwargs)
    assert identical(params(der), params(finetune))
    assert der.stored_memory() == {"stored_samples": 0, "stored_bytes": 0}


def _der_after_task_0(scenario: str, **hparams: object):
    stream = split_stream(scenario, n=100)
    learner = make("der", stream, {"buffer_size": 40, "replay_batch_size": 8, **hparams})
    learner.learn(stream[0])
    x, y = stream[1].x_train[:10], stream[1].y_train[:10]
    return learner, x, y, torch.ones_like(y)


def _explicit(learner, x, y, t, draws):
    """Replays ``learner``'s generator: the memory samples loss() is about to draw."""
    g = torch.Generator()
    g.set_state(learner.generator.get_state())
    samples = [learner.buffer.sample_items(8, g) for _ in range(draws)]
    return F.cross_entropy(learner.logits(x, t), y), samples


@pytest.mark.parametrize("scenario", ["class", "task"])
def test_der_beta_term_is_the_er_loss_on_a_memory_sample(scenario):
    learner, x, y, t = _der_after_task_0(scenario, alpha=0.0, beta=0.7)
    ce, [(mx, my, mt, _)] = _explicit(learner, x, y, t, draws=1)
    replay_ce = F.cross_entropy(learner.logits(mx, mt), my)
    expected = ce + 0.7 * replay_ce
    torch.testing.assert_close(learner.loss(x, y, t), expected, rtol=1e-6, atol=1e-7)
    assert replay_ce.item() > 0.01  # the term matters


@pytest.mark.parametrize("scenario", ["class", "task"])
def test_der_alpha_term_is_the_mse_to_the_stored_logits(scenario):
    learner, x, y, t = _der_after_task_0(scenario, alpha=0.5, beta=0.0)
    stored = learner.buffer.extras["logits"]
    assert torch.isfinite(stored).all()  # raw outputs are stored, never -inf
    ce, [(mx, _, mt, extras)] = _explicit(learner, x, y, t, draws=1)
    squared = (learner.model(mx) - extras["logits"]).pow(2)
    if scenario == "task":  # only the stored sample's own task units
        squared = squared[:, :2]
        assert (mt == 0).all()
    mse = squared.mean()
    torch.testing.assert_close(learner.loss(x, y, t), ce + 0.5 * mse, rtol=1e-6, atol=1e-7)
    assert mse.item() > 1e-6


def test_der_plus_plus_draws_the_distillation_sample_then_the_replay_sample():
    learner, x, y, t = _der_after_task_0("class", alpha=0.3, beta=0.6)
    ce, [(dx, _, _, extras), (rx, ry, _, _)] = _explicit(learner, x, y, t, draws=2)
    mse = F.mse_loss(learner.model(dx), extras["logits"])
    expected = ce + 0.3 * mse + 0.6 * F.cross_entropy(learner.model(rx), ry)
    torch.testing.assert_close(learner.loss(x, y, t), expected, rtol=1e-6, atol=1e-7)


def test_der_with_alpha_zero_follows_replay_at_twice_the_learning_rate():
    """With a non-empty memory, CE(x) + 1·CE(memory) is twice replay's loss on the
    concatenated batch (equal sizes) and the memory draws are the same, so from one state
    DER(α=0, β=1) at lr η tracks replay at lr 2η under plain SGD."""
    stream = split_stream("class", n=100)
    replay = make("replay", stream, {"buffer_size": 30}, lr=0.05)
    replay.learn(stream[0])
    der = make("der", stream, {"alpha": 0.0, "beta": 1.0, "buffer_size": 30}, lr=0.025)
    der.model.load_state_dict(replay.model.state_dict())
    der.generator.set_state(replay.generator.get_state())
    der.buffer.load_state_dict(replay.buffer.state_dict())
    der.buffer.extras = {"logits": torch.zeros(30, 4)}  # not read with α = 0
    start = params(der)
    der.learn(stream[1])
    replay.learn(stream[1])
    assert torch.equal(der.buffer.y, replay.buffer.y) and der.buffer.seen == replay.buffer.seen
    ours, theirs = params(der), params(replay)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6)
    assert max((ours[n] - start[n]).abs().max().item() for n in ours) > 0.1


def test_der_stores_the_logits_of_insertion_time():
    """Each stored row holds the outputs of the step that inserted it (the weights before its
    update), and keeps them while the model moves on."""
    stream = split_stream("class", n=100)
    learner = make("der", stream, {"buffer_size": 200}, batch_size=10)
    recorded = []
    original = learner.after_backward

    def record(x, y, t):  # between backward() and step(): the weights the loss was taken at
        with torch.no_grad():
            recorded.append(learner.model(x[:10]))
        original(x, y, t)

    learner.after_backward = record
    learner.learn(stream[0])
    assert learner.buffer.seen == 100  # capacity 200: slot i holds item i, nothing replaced
    at_insertion = torch.cat(recorded)
    stored = learner.buffer.extras["logits"][:100].clone()
    torch.testing.assert_close(stored, at_insertion, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        after_task_0 = learner.model(learner.buffer.x[:100])
    assert (stored - after_task_0).abs().max() > 1e-2  # not the current model's

    learner.learn(stream[1])
    assert torch.equal(learner.buffer.extras["logits"][:100], stored)
    with torch.no_grad():
        now = learner.model(learner.buffer.x[:100])
    assert (stored - now).abs().max() > 0.1
    assert learner.stored_memory()["stored_bytes"] == 200 * (20 * 4 + 8 + 8 + 4 * 4)


# ---------------------------------------------------------------------- ER-ACE
def test_er_ace_incoming_term_ignores_classes_absent_from_the_batch():
    stream = split_stream("class", n=100, tasks=3)
    learner = make("er_ace", stream, {"buffer_size": 40})
    learner.learn(stream[0])  # classes 0, 1 seen and stored
    x, y = stream[1].x_train[:10], stream[1].y_train[:10]
    t = torch.ones_like(y)
    assert set(y.tolist()) == {2, 3}
    bias = list(learner.model.parameters())[-1]
    state = learner.generator.get_state()

    terms = learner.loss_terms(x, y, t)
    assert set(terms) == {"incoming", "replay"}
    incoming = torch.autograd.grad(terms["incoming"], bias, retain_graph=True)[0]
    replay = torch.autograd.grad(terms["replay"], bias)[0]
    assert incoming[[0, 1, 4, 5]].abs().max() == 0  # absent from the batch: no gradient
    assert incoming[[2, 3]].abs().min() > 0
    assert replay[[0, 1]].abs().min() > 0  # replayed samples use the old classes ...
    assert replay[[2, 3]].abs().max() > 0  # ... and the new ones, seen in this batch
    assert replay[[4, 5]].abs().max() == 0  # never seen: outside the replay softmax
    assert learner.seen_classes.tolist() == [True] * 4 + [False] * 2

    with torch.no_grad():  # absent classes' logits do not change the incoming term
        bias[[0, 1, 4, 5]] += torch.tensor([5.0, -3.0, 7.0, 2.0])
    learner.generator.set_state(state)
    moved = learner.loss_terms(x, y, t)
    assert torch.equal(moved["incoming"], terms["incoming"])
    assert not torch.equal(moved["replay"], terms["replay"])


def test_er_ace_with_an_empty_memory_trains_on_the_batch_classes_only():
    stream = split_stream("class", n=60)
    learner = make("er_ace", stream, {"buffer_size": 0})
    x, y = stream[1].x_train[:10], stream[1].y_train[:10]
    t = torch.ones_like(y)
    terms = learner.loss_terms(x, y, t)
    assert set(terms) == {"incoming"}
    out = learner.model(x)[:, 2:4]
    torch.testing.assert_close(terms["incoming"], F.cross_entropy(out, y - 2))


def test_er_ace_retains_more_of_task_0_than_finetune_in_class_incremental():
    stream = split_stream("class", n=150)
    after = {}
    for name, hparams in (("finetune", {}), ("er_ace", {"buffer_size": 100})):
        learner = make(name, stream, hparams, hidden=(64,), epochs=2)
        learner.learn(stream[0])
        assert accuracy(learner, stream[0]) > 0.85
        learner.learn(stream[1])
        after[name] = accuracy(learner, stream[1]), accuracy(learner, stream[0])
    assert after["er_ace"][0] > 0.8
    assert after["er_ace"][1] > 0.7
    assert after["er_ace"][1] > after["finetune"][1] + 0.2
