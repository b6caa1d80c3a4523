"""Task-conditioned hypernetwork: the target net is the configured MLP with generated weights,
the output regulariser keeps old embeddings' weights in place, old embeddings stay frozen,
task 0 is kept better than by fine-tuning, resume is exact, the task is inferred by entropy."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from test_learners import identical, make, params, split_stream

from learners import LEARNERS, ConfigError, ModelConfig, TrainConfig, build_learner
from learners.backbones import MLP
from learners.evaluation import evaluate
from learners.meta import MetaTrainingConfig
from task_streams import build_stream

PERMUTED = {
    "name": "permuted",
    "source": "digits",
    "num_tasks": 3,
    "scenario": "task",
    "train_per_task": 300,
    "test_per_task": 200,
}


def digits_learner(name: str, stream, hparams: dict | None = None, seed: int = 0):
    train = TrainConfig(optimizer="adam", lr=1e-3, epochs=5, batch_size=16)
    return build_learner(
        name, stream.info, hparams or {}, model=ModelConfig(hidden=[64]), train=train, seed=seed
    )


def old_weights(learner) -> torch.Tensor:
    """h(e_0): the hypernetwork's output for task 0's embedding."""
    with torch.no_grad():
        return learner.model.generate([0])[0].clone()


# ---------------------------------------------------------------------- the target network
@pytest.mark.parametrize("chunk_size", [0, 7, 100])
def test_the_target_is_the_configured_mlp_with_generated_scaled_weights(chunk_size):
    stream = split_stream("task", n=40)
    learner = make("hypernetwork", stream, {"chunk_size": chunk_size}, hidden=(8, 6))
    # 20 inputs, hidden [8, 6], 4 classes: 20·8+8 + 8·6+6 + 6·4+4 = 250 generated weights
    weights = old_weights(learner)
    assert weights.shape == (250,)
    reference = MLP(20, [8, 6], 4, 0.0)
    offset = 0
    with torch.no_grad():
        for layer in (m for m in reference.net if isinstance(m, torch.nn.Linear)):
            for p in (layer.weight, layer.bias):  # both scaled by 1/√fan_in
                chunk = weights[offset : offset + p.numel()].reshape(p.shape)
                p.copy_(chunk / math.sqrt(layer.in_features))
                offset += p.numel()
        x = stream[0].x_test
        torch.testing.assert_close(learner.model(x, 0), reference(x))
    # chunked: ⌈250/chunk⌉ chunk embeddings, one hypernetwork pass each
    chunks = learner.model.hnet.chunk_embeddings
    assert (chunks is None) == (chunk_size == 0)
    if chunk_size:
        assert chunks.shape[0] == math.ceil(250 / chunk_size)


# ---------------------------------------------------------------------- the regulariser
def test_loss_is_ce_plus_beta_times_the_mean_squared_output_drift_of_old_tasks():
    stream = split_stream("task", n=60, tasks=3)
    learner = make("hypernetwork", stream, {"beta": 0.5}, hidden=(8,))
    learner.learn(stream[0])
    learner.learn(stream[1])
    learner.before_task(stream[2])
    assert learner.old_tasks == [0, 1]
    stored = learner.targets.clone()
    assert torch.equal(stored, learner.model.generate([0, 1]).detach())
    assert learner.stored_memory() == {"stored_samples": 0, "stored_bytes": stored.numel() * 4}
    with torch.no_grad():
        for p in learner.model.hnet.parameters():
            p.add_(0.01)
    x, y = stream[2].x_train[:10], stream[2].y_train[:10]
    t = torch.full_like(y, 2)
    ce = F.cross_entropy(learner.logits(x, t), y)
    drift = (learner.model.generate([0, 1]) - stored).pow(2).sum(dim=1).mean()
    assert drift.item() > 0
    assert learner.loss(x, y, t).item() == pytest.approx((ce + 0.5 * drift).item(), rel=1e-5)
    # old embeddings get no gradient (frozen), the current one and φ do
    learner.model.zero_grad(set_to_none=True)
    learner.loss(x, y, t).backward()
    embeddings = learner.model.task_embeddings
    assert embeddings[0].grad is None and embeddings[1].grad is None
    assert embeddings[2].grad is not None and embeddings[2].grad.abs().sum() > 0
    assert all(p.grad is not None for p in learner.model.hnet.parameters())


def test_lookahead_evaluates_the_regulariser_after_a_gradient_step_of_the_task_loss():
    stream = split_stream("task", n=60)
    learner = make("hypernetwork", stream, {"beta": 0.5, "lookahead": True}, hidden=(8,))
    learner.learn(stream[0])
    learner.before_task(stream[1])
    with torch.no_grad():
        for p in learner.model.hnet.parameters():
            p.add_(0.01)
    x, y = stream[1].x_train[:10], stream[1].y_train[:10]
    t = torch.ones_like(y)
    ce = F.cross_entropy(learner.logits(x, t), y)
    named = dict(learner.model.hnet.named_parameters())
    grads = torch.autograd.grad(ce, list(named.values()))
    shifted = {n: (p - 0.05 * g).detach() for (n, p), g in zip(named.items(), grads, strict=True)}
    original = {n: p.detach().clone() for n, p in named.items()}
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(shifted[n])
        ahead = learner.regulariser().item()
        for n, p in named.items():
            p.copy_(original[n])
    assert ahead != pytest.approx(learner.regulariser().item(), rel=1e-3)
    assert learner.loss(x, y, t).item() == pytest.approx(ce.item() + 0.5 * ahead, rel=1e-5)


def test_old_task_weights_move_little_with_beta_and_much_without():
    stream = build_stream(PERMUTED, 0)
    drift = {}
    for beta in (0.01, 0.0):
        learner = digits_learner("hypernetwork", stream, {"beta": beta})
        learner.learn(stream[0])
        before = old_weights(learner)
        embedding = learner.model.task_embeddings[0].detach().clone()
        learner.learn(stream[1])
        learner.learn(stream[2])
        assert torch.equal(learner.model.task_embeddings[0], embedding)  # frozen
        drift[beta] = ((old_weights(learner) - before).norm() / before.norm()).item()
    assert drift[0.01] < 0.05
    assert drift[0.0] > 5 * drift[0.01]


def test_task_0_is_kept_better_than_by_finetune():
    stream = build_stream(PERMUTED, 0)
    drop, final = {}, {}
    for name in ("hypernetwork", "finetune"):
        learner = digits_learner(name, stream)
        learner.learn(stream[0])
        first = evaluate(learner, stream)[0]
        assert first > 0.75, name
        for task in list(stream)[1:]:
            learner.learn(task)
        final[name] = evaluate(learner, stream)
        drop[name] = first - final[name][0]
    assert drop["hypernetwork"] < 0.05
    assert drop["finetune"] > drop["hypernetwork"] + 0.1
    assert min(final["hypernetwork"]) > 0.8  # and it learned every task


# ---------------------------------------------------------------------- task inference
def test_task_inference_picks_the_embedding_of_the_sample_s_task_in_permuted_digits():
    stream = build_stream({**PERMUTED, "num_tasks": 2, "scenario": "domain"}, 0)
    # the smaller hypernetwork of the paper's size: on these 8x8 digits its target nets are
    # more confident on their own task (task 0: 81% picked right, 76% with the default [100, 250])
    learner = digits_learner("hypernetwork", stream, {"hnet_hidden": [100, 100]})
    for task in stream:
        learner.learn(task)
    for task in stream:
        inferred, answers = learner.infer_tasks(task.x_test)
        assert (inferred == task.id).float().mean() > 0.8, task.id
        assert torch.equal(answers, learner.predict(task.x_test, None))
        assert torch.equal(answers, learner.predict(task.x_test, 1 - task.id))  # id not used
    assert min(evaluate(learner, stream)) > 0.75


# ---------------------------------------------------------------------- state and setup
def test_resume_after_task_1_is_bit_identical_with_lookahead():
    stream = build_stream({**PERMUTED, "train_per_task": 100, "test_per_task": 50}, 0)
    hparams = {"lookahead": True, "chunk_size": 500}
    learner = digits_learner("hypernetwork", stream, hparams)
    learner.learn(stream[0])
    learner.learn(stream[1])
    buffer = io.BytesIO()
    torch.save(learner.state_dict(), buffer)
    learner.learn(stream[2])
    buffer.seek(0)
    resumed = digits_learner("hypernetwork", stream, hparams, seed=7)
    assert not identical(params(resumed), params(learner))
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.learned == [0, 1]
    resumed.learn(stream[2])
    assert identical(params(resumed), params(learner))
    assert torch.equal(resumed.targets, learner.targets)
    for task in stream:
        assert torch.equal(
            resumed.predict(task.x_test, task.id), learner.predict(task.x_test, task.id)
        )


def test_the_cnn_backbone_is_refused_naming_the_key():
    from orchestrator.config import load_config

    stream = {"name": "split", "source": "digits", "num_tasks": 2, "scenario": "task"}
    info = build_stream(stream, 0).info
    cnn = ModelConfig(backbone="cnn")
    with pytest.raises(ConfigError, match=r"model.backbone='cnn' is not accepted.*accepted: mlp"):
        build_learner("hypernetwork", info, model=cnn)
    with pytest.raises(ConfigError, match=r"where: model.backbone='cnn'"):
        LEARNERS["hypernetwork"].check_setup(info, MetaTrainingConfig(), "where", cnn)
    with pytest.raises(ConfigError, match="model.backbone='cnn'"):
        load_config(
            {"methods": {"hypernetwork": {}}, "stream": stream, "model": {"backbone": "cnn"}}
        )
    with pytest.raises(ConfigError, match="hnet_hidden"):
        build_learner("hypernetwork", info, {"hnet_hidden": [10, 0]})
