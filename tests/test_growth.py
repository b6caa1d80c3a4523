"""The growth contract (architecture record, rebuild, optimizer after growth), the expanding head
and ``<method>+<extension>`` composition."""

from __future__ import annotations

import io

import pytest
import torch
from test_learners import FEATURES, identical, make, params, split_stream

from learners import LEARNERS, ConfigError, learner_class
from learners.base import Learner
from learners.expanding_head import ExpandingHeadNet, _combinable


def _combinable_names() -> list[str]:
    return sorted(
        n
        for n, c in LEARNERS.items()
        if c.__module__.startswith("learners.") and _combinable(c) and n != "expanding_head"
    )


COMBINABLE = _combinable_names()
SMALL = {
    "ewc": {"fisher_samples": 40},
    "online_ewc": {"fisher_samples": 40},
    "mas": {"importance_samples": 40},
    "replay": {"buffer_size": 25},
    "der": {"buffer_size": 25},
    "er_ace": {"buffer_size": 25},
    "gem": {"memories_per_task": 10},
    "agem": {"memories_per_task": 10, "sample_size": 8},
}


def test_expansion_changes_no_old_logit_and_adds_units_for_new_classes_only():
    stream = split_stream("class", n=60, tasks=3)
    learner = make("expanding_head", stream, hidden=(16,))
    assert learner.resources()["model_parameters"] == FEATURES * 16 + 16  # the body, no units
    learner.learn(stream[0])
    x = torch.cat([task.x_test for task in stream])
    before = learner.logits(x)
    assert torch.isinf(before[:, 2:]).all() and torch.isfinite(before[:, :2]).all()
    assert set(learner.predict(x).tolist()) <= {0, 1}  # never a class it has not seen
    size = learner.resources()["model_parameters"]
    learner.before_task(stream[1])  # the expansion itself, before any training
    after = learner.logits(x)
    assert torch.equal(after[:, :2], before[:, :2])  # old logits bit-identical
    assert torch.isfinite(after[:, 2:4]).all() and torch.isinf(after[:, 4:]).all()
    assert learner.resources()["model_parameters"] == size + 2 * (16 + 1)
    assert learner.architecture() == {"head_groups": [[0, 1], [2, 3]]}
    # the optimizer was rebuilt over the new units (else they would never train)
    optimized = {id(p) for g in learner.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in optimized for p in learner.model.heads[1].parameters())


def test_a_domain_stream_adds_its_classes_once():
    from test_learners import conflict_stream

    stream = conflict_stream(n=40)
    learner = make("expanding_head", stream, hidden=(8,))
    for task in stream:
        learner.learn(task)
    assert learner.model.groups == [[0, 1, 2, 3]]


def test_zero_init_starts_new_classes_at_logit_zero():
    stream = split_stream("class", n=40)
    learner = make("expanding_head", stream, {"head_init": "zeros"}, hidden=(8,))
    learner.learn(stream[0])
    learner.before_task(stream[1])
    new_logits = learner.logits(stream[1].x_test)[:, 2:4]
    assert new_logits.numel() > 0 and torch.equal(new_logits, torch.zeros_like(new_logits))


def test_the_classifier_that_grows_is_the_backbones_last_layer_for_mlp_and_cnn():
    from learners.backbones import ModelConfig, build_backbone
    from task_streams.base import StreamInfo

    info = StreamInfo("s", "class", (1, 8, 8), 10, ("a",), ((0, 1),))
    for backbone in ("mlp", "cnn"):
        net = ExpandingHeadNet(build_backbone(ModelConfig(backbone=backbone), info), 10)
        assert not any(
            isinstance(m, torch.nn.Linear) and m.out_features == 10 for m in net.body.modules()
        )
        net.add_group([3, 7])
        out = net(torch.rand(5, 1, 8, 8))
        assert out.shape == (5, 10) and torch.isfinite(out[:, [3, 7]]).all()
        assert torch.isinf(out[:, [0, 1, 2, 4, 5, 6, 8, 9]]).all()
        with pytest.raises(ValueError, match="overlaps"):
            net.add_group([7, 8])


def test_composition_merges_hyperparameters_and_validates_them_in_one_place():
    cls = learner_class("ewc+expanding_head")
    assert cls is learner_class("ewc+expanding_head")  # composed once
    assert cls.name == "ewc+expanding_head" and issubclass(cls, LEARNERS["ewc"])
    learner = make(
        "ewc+expanding_head", split_stream("class"), {"ewc_lambda": 5, "head_init": "zeros"}
    )
    assert learner.hparams.ewc_lambda == 5 and learner.hparams.head_init == "zeros"
    with pytest.raises(ConfigError, match="ewc_lambda.*head_init|head_init.*ewc_lambda"):
        make("ewc+expanding_head", split_stream("class"), {"lambda": 5})
    with pytest.raises(ConfigError, match="not an extension.*ewc\\+expanding_head|expanding_head"):
        learner_class("ewc+wider")
    with pytest.raises(ConfigError, match="accepted methods"):
        learner_class("nope+expanding_head")


@pytest.mark.parametrize("name", ["lstm_meta", "icarl", "der", "gem", "agem"])
def test_methods_with_their_own_output_layer_refuse_the_expanding_head(name):
    with pytest.raises(
        ConfigError, match=f"{name}\\+expanding_head.*accepted: .*ewc\\+expanding_head"
    ):
        learner_class(f"{name}+expanding_head")


def test_a_composed_method_is_accepted_in_a_config_and_refused_when_it_cannot_be():
    from orchestrator.config import load_config

    stream = {"name": "split", "source": "digits", "num_tasks": 2, "scenario": "class"}
    load_config({"methods": {"ewc_head": {"method": "ewc+expanding_head", "ewc_lambda": 10}},
                 "stream": stream})  # fmt: skip
    with pytest.raises(ConfigError, match="methods.ewc_head.ewc_lambda=-1"):
        load_config({"methods": {"ewc_head": {"method": "ewc+expanding_head", "ewc_lambda": -1}},
                     "stream": stream})  # fmt: skip


@pytest.mark.parametrize("name", COMBINABLE)
def test_every_combinable_method_learns_with_a_growing_head_and_resumes_exactly(name):
    """Every registered method that trains the configured backbone, with the expanding head:
    it learns a class-incremental stream (no NaN, the new classes answered) and resumes
    bit-identically after a task that grew the head."""
    composed = f"{name}+expanding_head"
    if "class" not in learner_class(composed).SCENARIOS:
        pytest.skip(f"{name} does not support the class-incremental scenario")
    stream = split_stream("class", n=60)
    kwargs = {"hidden": (16,), "momentum": 0.9, "batch_size": 8}
    learner = make(composed, stream, SMALL.get(name), **kwargs)
    learner.learn(stream[0])
    saved = io.BytesIO()
    torch.save(learner.state_dict(), saved)
    learner.learn(stream[1])
    assert all(torch.isfinite(p).all() for p in learner.model.parameters()), name
    predicted = learner.predict(stream[1].x_test)
    assert (predicted == stream[1].y_test).float().mean() > 0.6, name  # learned the new classes
    saved.seek(0)
    resumed = make(composed, stream, SMALL.get(name), seed=5, **kwargs)
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    resumed.learn(stream[1])
    assert identical(params(resumed), params(learner)), name
    assert torch.equal(resumed.predict(stream[1].x_test), predicted)


def test_ewc_puts_no_penalty_on_units_added_after_its_anchor():
    stream = split_stream("class", n=60)
    learner = make("ewc+expanding_head", stream, {"ewc_lambda": 100.0, "fisher_samples": 40})
    learner.learn(stream[0])
    assert float(learner.penalty().detach()) == 0.0  # at the anchor
    learner.before_task(stream[1])
    new = list(learner.model.heads[1].parameters())
    with torch.no_grad():
        for p in new:
            p.add_(1.0)  # moving only the new units costs nothing
    assert float(learner.penalty().detach()) == 0.0
    with torch.no_grad():
        next(learner.model.heads[0].parameters()).add_(1.0)
    assert float(learner.penalty().detach()) > 0.0


def test_model_grew_keeps_the_optimizer_state_of_surviving_parameters():
    stream = split_stream("class", n=60)
    learner = make("expanding_head", stream, hidden=(8,), optimizer="adam", lr=1e-2)
    learner.learn(stream[0])
    old = {
        id(p): learner.optimizer.state[p]["exp_avg"].clone()
        for p in learner.model.body.parameters()
    }
    learner.before_task(stream[1])
    for p in learner.model.body.parameters():
        assert torch.equal(learner.optimizer.state[p]["exp_avg"], old[id(p)])
    assert all(p not in learner.optimizer.state for p in learner.model.heads[1].parameters())


def test_a_fixed_network_records_no_growth():
    learner = make("finetune", split_stream("class"))
    assert learner.architecture() == {}
    assert learner.state_dict()["architecture"]["growth"] == {}
    before = {n: tuple(p.shape) for n, p in learner.model.named_parameters()}
    Learner.rebuild(learner, {"head_groups": [[0, 1]]})  # the base ignores any record
    assert {n: tuple(p.shape) for n, p in learner.model.named_parameters()} == before


def test_lia_methods_lists_the_extension_and_what_it_combines_with(capfd):
    from orchestrator.cli import main

    assert main(["methods"]) == 0
    captured = capfd.readouterr()
    out = " ".join((captured.out + captured.err).split())  # the console may wrap long lines
    entry = out[out.index("<method>+expanding_head —") :]
    combines = entry.split("Combines with:")[1].split("(")[0].replace(",", " ").split()
    assert {"ewc", "si", "mas", "replay", "finetune"} <= set(combines)
    assert not {"der", "gem", "icarl", "lstm_meta"} & set(combines)
    assert "ewc+expanding_head" in entry
