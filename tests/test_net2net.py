"""Net2Net: widening and deepening preserve the function, the triggers fire when they should,
growth resumes exactly, and only the MLP backbone is accepted."""

from __future__ import annotations

import io
import math

import pytest
import torch
from test_learners import identical, make, params, split_stream
from torch import nn

from learners import ConfigError, ModelConfig, build_learner
from learners.backbones import MLP

FEATURES, CLASSES = 20, 4  # split_stream's inputs and its two tasks' classes


def _learner(hidden=(8, 6, 5), dropout=0.0, **hparams):
    stream = split_stream("class", n=60)
    learner = make("net2net", stream, {"noise": 0.0, **hparams}, hidden=hidden, dropout=dropout)
    learner.learn(stream[0])  # trained weights and biases, not the initial ones
    return learner, stream


def _outputs(learner, x):
    learner.model.eval()
    with torch.no_grad():
        return learner.model(x)


def _inputs(n=64, seed=3):
    return torch.randn(n, 1, 4, 5, generator=torch.Generator().manual_seed(seed))


def _same_structure_as_a_fresh_mlp(learner) -> bool:
    fresh = MLP(FEATURES, learner.widths(), CLASSES, learner.model_config.dropout)
    return [type(m) for m in learner.model.net] == [type(m) for m in fresh.net] and {
        k: v.shape for k, v in learner.model.state_dict().items()
    } == {k: v.shape for k, v in fresh.state_dict().items()}


# ---------------------------------------------------------------------- function preserved
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("hidden", [(8,), (8, 6, 5)])
@pytest.mark.parametrize("factor", [1.5, 3.0])
def test_widening_computes_the_same_function(hidden, dropout, factor):
    learner, _ = _learner(hidden, dropout, widen_factor=factor)
    x = _inputs()
    before = _outputs(learner, x)

    def units(layer: nn.Linear) -> torch.Tensor:  # one row per unit: incoming weights, bias
        return torch.cat([layer.weight, layer.bias[:, None]], 1).detach().clone()

    old = units(learner._linears()[0])
    assert learner.grow("wider")
    assert learner.widths() == [math.ceil(n * factor) for n in hidden]
    assert (_outputs(learner, x) - before).abs().max() <= 1e-5
    assert _same_structure_as_a_fresh_mlp(learner)
    # units kept as they were; every new unit a copy of an old one
    new = units(learner._linears()[0])
    assert torch.equal(new[: hidden[0]], old)
    assert all((old == row).all(1).any() for row in new[hidden[0] :])


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("hidden", [(8,), (8, 6, 5)])
def test_deepening_computes_the_same_function(hidden, dropout):
    learner, _ = _learner(hidden, dropout, max_layers=5)
    x = _inputs()
    before = _outputs(learner, x)
    kept = [layer.weight for layer in learner._linears()]
    assert learner.grow("deeper")
    assert not any(m.training for m in learner.model.modules())  # new modules in eval mode too
    assert learner.widths() == [*hidden, hidden[-1]]
    assert (_outputs(learner, x) - before).abs().max() <= 1e-5
    assert _same_structure_as_a_fresh_mlp(learner)  # Dropout where the MLP puts it
    linears = learner._linears()
    assert torch.equal(linears[-2].weight, torch.eye(hidden[-1]))
    assert all(a is b.weight for a, b in zip(kept[:-1], linears[:-2], strict=True))  # kept
    assert linears[-1].weight is kept[-1]


def test_both_widens_then_adds_a_layer_and_keeps_the_function():
    learner, _ = _learner((8, 6), dropout=0.2)
    x = _inputs()
    before = _outputs(learner, x)
    assert learner.grow("both")
    assert learner.widths() == [12, 9, 9]
    assert (_outputs(learner, x) - before).abs().max() <= 1e-5


def test_training_continues_from_the_same_loss():
    learner, stream = _learner((8, 6), dropout=0.0, grow="both")
    x, y = stream[1].x_train[:30], stream[1].y_train[:30]
    t = torch.ones_like(y)
    learner.model.train()
    before = learner.loss(x, y, t).item()
    old_params = list(learner.model.parameters())
    learner.before_task(stream[1])  # trigger=every: grows before the second task
    assert learner.widths() == [12, 9, 9]
    assert learner.loss(x, y, t).item() == pytest.approx(before, abs=1e-5)
    # the optimizer was rebuilt over the grown network's parameters
    optimised = [p for group in learner.optimizer.param_groups for p in group["params"]]
    assert len(optimised) == len(list(learner.model.parameters()))
    assert all(a is b for a, b in zip(optimised, learner.model.parameters(), strict=True))
    assert not any(p is q for p in optimised for q in old_params)  # all replaced by widening


def test_deepening_keeps_the_optimizer_state_of_the_layers_it_keeps():
    stream = split_stream("class", n=60)
    learner = make("net2net", stream, {"grow": "deeper"}, hidden=(8,), optimizer="adam")
    learner.learn(stream[0])
    output = learner._linears()[-1].weight
    moments = learner.optimizer.state[output]["exp_avg"].clone()
    learner.before_task(stream[1])
    assert learner.widths() == [8, 8] and learner._linears()[-1].weight is output
    assert torch.equal(learner.optimizer.state[output]["exp_avg"], moments)
    assert learner._linears()[-2].weight not in learner.optimizer.state  # new: fresh state


# ---------------------------------------------------------------------- noise
def test_noise_changes_the_outputs_slightly_and_breaks_the_symmetry():
    x = _inputs()
    exact, _ = _learner((8,), widen_factor=3.0)
    noisy, _ = _learner((8,), widen_factor=3.0, noise=0.01)
    assert identical(params(exact), params(noisy))
    reference = _outputs(exact, x)
    exact.grow("wider")
    noisy.grow("wider")
    assert (_outputs(exact, x) - reference).abs().max() <= 1e-5
    change = (_outputs(noisy, x) - reference).abs().max()
    assert 0 < change < 0.05 * reference.abs().max()

    def distinct_rows(learner):
        return torch.unique(learner._linears()[0].weight, dim=0).shape[0]

    assert distinct_rows(exact) == 8  # 24 units, 8 distinct incoming weight vectors
    assert distinct_rows(noisy) == 24  # every copy differs from its original
    # the originals are kept exactly; only the copies' incoming weights move
    kept = noisy._linears()[0].weight[:8]
    assert torch.equal(kept, exact._linears()[0].weight[:8])

    deeper, _ = _learner((8,), noise=0.01)
    deeper.grow("deeper")
    added = deeper._linears()[-2].weight
    assert not torch.equal(added, torch.eye(8))
    assert (added - torch.eye(8)).abs().max() < 0.05


# ---------------------------------------------------------------------- triggers
def _mlp_parameters(inputs: int, widths: list[int], classes: int) -> int:
    sizes = [inputs, *widths, classes]
    return sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def test_every_trigger_grows_before_the_expected_tasks():
    stream = split_stream("class", n=30, tasks=5)
    learner = make("net2net", stream, {"every_tasks": 2, "grow": "both"}, hidden=(8,))
    widths = []
    for task in stream:
        learner.learn(task)
        widths.append(learner.widths())
    assert widths == [[8], [8], [12, 12], [12, 12], [18, 18, 18]]
    assert [(e["task"], e["step"], e["kind"]) for e in learner.growth_log] == [
        (2, 0, "both"),
        (4, 0, "both"),
    ]
    assert learner.growth_log[1]["before"] == [12, 12]
    assert learner.growth_log[1]["after"] == [18, 18, 18]
    # by hand: (20+1)*18 + (18+1)*18 + (18+1)*18 + (18+1)*10 = 378 + 342 + 342 + 190
    assert learner.resources()["model_parameters"] == 1252
    assert _mlp_parameters(FEATURES, [18, 18, 18], 10) == 1252


def test_growth_stops_at_the_limits():
    stream = split_stream("class", n=30, tasks=5)
    hparams = {"grow": "both", "max_width": 20, "max_layers": 2}
    learner = make("net2net", stream, hparams, hidden=(8,))
    widths = []
    for task in stream:
        optimizer = learner.optimizer
        learner.learn(task)
        widths.append(learner.widths())
    assert widths == [[8], [12, 12], [18, 18], [20, 20], [20, 20]]
    # the log names what changed; the last task's growth was a no-op, not logged
    assert [e["kind"] for e in learner.growth_log] == ["both", "wider", "wider"]
    assert learner.optimizer is optimizer  # and rebuilt nothing
    assert learner.resources()["model_parameters"] == _mlp_parameters(FEATURES, [20, 20], 10)


def test_a_task_learned_again_after_a_stop_does_not_grow_twice():
    from learners import TrainingStopped

    stream = split_stream("class", n=60)
    learner = make("net2net", stream, hidden=(8,))
    learner.learn(stream[0])
    with pytest.raises(TrainingStopped):
        learner.learn(stream[1], should_stop=lambda: True)
    learner.learn(stream[1])
    assert learner.widths() == [12] and len(learner.growth_log) == 1


def _plateau(lr: float, **hparams):
    """A full-batch learner (every step sees the same 60 samples) on a plateau trigger."""
    stream = split_stream("class", n=60)
    settings = {"trigger": "plateau", "patience": 3, "noise": 0.0, "loss_threshold": 0.0}
    learner = make(
        "net2net", stream, {**settings, **hparams}, hidden=(8,), batch_size=60, epochs=12, lr=lr
    )
    losses = []
    original = learner.loss

    def recording(x, y, t):
        value = original(x, y, t)
        losses.append(value.item())
        return value

    learner.loss = recording
    learner.learn(stream[0])
    return learner, losses


def test_plateau_trigger_fires_when_the_loss_cannot_improve():
    learner, losses = _plateau(lr=0.0, max_growths_per_task=2)
    assert [(e["task"], e["step"]) for e in learner.growth_log] == [(0, 6), (0, 12)]
    assert learner.widths() == [18]
    # the loss is flat across both growths: the function was preserved mid-task
    assert max(losses) - min(losses) <= 1e-5

    once, _ = _plateau(lr=0.0)  # max_growths_per_task=1 by default
    assert [e["step"] for e in once.growth_log] == [6] and once.widths() == [12]


def test_plateau_trigger_waits_while_the_loss_falls_or_is_low():
    learner, losses = _plateau(lr=0.5, min_improvement=0.001)
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False))  # it kept falling
    assert learner.growth_log == [] and learner.widths() == [8]

    flat_but_low, losses = _plateau(lr=0.0, loss_threshold=10.0)
    assert max(losses) < 10.0 and flat_but_low.growth_log == []


# ---------------------------------------------------------------------- resume
@pytest.mark.parametrize(
    "hparams",
    [
        {"grow": "both", "noise": 0.05},
        {"trigger": "plateau", "patience": 3, "min_improvement": 0.5},
    ],
)
def test_resume_after_a_growth_is_exact(hparams):
    stream = split_stream("class", n=60, tasks=3)
    kwargs = {"hidden": (8,), "dropout": 0.2, "optimizer": "adam", "lr": 0.01, "batch_size": 8}
    learner = make("net2net", stream, hparams, **kwargs)
    learner.learn(stream[0])
    learner.learn(stream[1])
    saved_log, saved_window = [dict(e) for e in learner.growth_log], list(learner._window)
    assert saved_log  # the saved state comes after a growth
    if hparams.get("trigger") == "plateau":
        assert saved_window  # and, here, with a part-filled plateau window
    saved = io.BytesIO()
    torch.save(learner.state_dict(), saved)
    learner.learn(stream[2])
    expected, log = params(learner), learner.growth_log
    assert len(log) > len(saved_log)  # and it grows again after the resume point

    saved.seek(0)
    resumed = make("net2net", stream, hparams, seed=99, **kwargs)
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    assert resumed.growth_log == saved_log and resumed._window == saved_window
    resumed.learn(stream[2])
    assert identical(params(resumed), expected)
    assert resumed.growth_log == log and resumed.widths() == learner.widths()


# ---------------------------------------------------------------------- backbone
def test_the_cnn_backbone_and_an_mlp_without_hidden_layers_are_refused():
    from orchestrator.config import load_config

    stream = {"name": "split", "source": "digits", "num_tasks": 2, "scenario": "class"}
    with pytest.raises(ConfigError) as err:
        load_config({"methods": {"net2net": {}}, "stream": stream, "model": {"backbone": "cnn"}})
    message = str(err.value)
    assert "methods.net2net" in message and "model.backbone='cnn'" in message
    assert "'mlp'" in message
    load_config({"methods": {"net2net": {}}, "stream": stream, "model": {"backbone": "mlp"}})

    info = split_stream().info
    with pytest.raises(ConfigError, match=r"model\.backbone='cnn'.*accepted: 'mlp'"):
        build_learner("net2net", info, model=ModelConfig(backbone="cnn"))
    with pytest.raises(ConfigError, match=r"model\.hidden=\[\]"):
        build_learner("net2net", info, model=ModelConfig(hidden=[]))


def test_rebuild_gives_a_fresh_learner_the_grown_shape():
    learner, stream = _learner((8, 6), grow="both")
    learner.grow()
    fresh = make("net2net", stream, hidden=(8, 6))
    fresh.rebuild(learner.architecture())
    assert learner.architecture() == {"hidden": [12, 9, 9]}
    fresh.model.load_state_dict(learner.model.state_dict())
    x = _inputs()
    assert torch.equal(_outputs(fresh, x), _outputs(learner, x))
