"""The LSTM meta-learner: task families, no leak of ground truth, no weight change at
deployment, the meta-training phase (cache, resume, lock), and that it learns from feedback."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from learners import ConfigError, MetaTrainingConfig, build_learner, run_phase
from learners import meta as meta_module
from learners.base import TrainingStopped
from learners.lstm_meta import FeedbackLSTM, meta_step, prequential, sample_losses
from task_streams import StreamConfig, build_stream
from task_streams.families import (
    Episodes,
    bayes_linear_predictions,
    build_family,
    class_set_parity,
)

TINY = {"hidden": 16, "samples_per_task": 30}
DIGITS_META = MetaTrainingConfig(source="digits", ways=2, episodes=8, batch=4, episode_length=10)


def digits_stream(scenario: str = "class", tasks: int = 2):
    config = StreamConfig(name="split", source="digits", num_tasks=tasks, scenario=scenario,
                          train_per_task=60, test_per_task=30)  # fmt: skip
    return build_stream(config, seed=0)


# ---------------------------------------------------------------------- task families
def test_random_label_episodes_are_balanced_and_count_presentations():
    family = build_family("random_labels", source="digits", ways=5, num_outputs=10)
    episodes = family.sample(6, 20, 2, torch.Generator().manual_seed(0), "meta")
    assert episodes.x.shape == (6, 40, 1, 8, 8) and episodes.y.shape == (6, 40)
    for b in range(6):
        for seg in range(2):
            labels = episodes.y[b, seg * 20 : (seg + 1) * 20]
            counts = torch.bincount(labels, minlength=10)
            assert sorted(counts[counts > 0].tolist()) == [4] * 5  # 5 classes, 4 times each
            pres = episodes.presentation[b, seg * 20 : (seg + 1) * 20]
            for i in range(20):  # earlier samples of the same label in the same segment
                assert pres[i] == (labels[:i] == labels[i]).sum()
    assert episodes.segment[0].tolist() == [0] * 20 + [1] * 20


def test_heldout_episodes_share_no_image_and_no_mapping_with_meta_training():
    family = build_family("random_labels", source="digits", ways=5, num_outputs=5)
    g = torch.Generator().manual_seed(0)
    meta = family.sample(40, 10, 1, g, "meta")
    held = family.sample(40, 10, 1, g, "heldout")
    flat = lambda e: {tuple(v.tolist()) for v in e.x.reshape(-1, 64)}  # noqa: E731
    assert not flat(meta) & flat(held)
    assert family._pools["meta"][1].sum() > family._pools["heldout"][1].sum()
    # class combinations: meta-training draws one half of the sets, held-out the other; and
    # every class takes every label in both (nothing to memorise about a class's label)
    halves = []
    for split, want in (("meta", 0), ("heldout", 1)):
        classes, labels = family._mappings(400, 1, g, split, False)
        assert (class_set_parity(classes) == want).all()
        assert all(class_set_parity(row.tolist()) == want for row in classes[:20])
        pairs = set(zip(classes.flatten().tolist(), labels.flatten().tolist(), strict=True))
        assert pairs == {(c, label) for c in range(10) for label in range(5)}
        halves.append({tuple(sorted(row.tolist())) for row in classes})
    assert not halves[0] & halves[1] and len(halves[0]) + len(halves[1]) > 200  # of 252 sets


def test_query_episodes_are_class_incremental_streams_with_unseen_query_images():
    """queries: an episode's tasks share no class and no label; after task s come unseen
    images of the classes of tasks 0..s, labelled as the episode labelled their class."""
    family = build_family("random_labels", source="digits", ways=2, num_outputs=10)
    e = family.sample(8, 12, 4, torch.Generator().manual_seed(0), "heldout", queries=15)
    assert e.query_x.shape == (8, 4, 15, 1, 8, 8) and e.segment_ends == [12, 24, 36, 48]
    pool, counts = family._pools["heldout"]
    flat = pool.reshape(10, pool.shape[1], -1).float() / 255.0

    def class_of(image):  # the class whose pool holds this image
        hits = (flat == image.reshape(1, 1, -1)).all(-1).any(-1).nonzero().flatten().tolist()
        assert len(hits) == 1
        return hits[0]

    for b in range(8):
        label_of = {}  # class -> the label the episode gave it, task by task
        shown = {tuple(v.tolist()) for v in e.x[b].reshape(48, -1)}
        for s in range(4):
            task_labels = set(e.y[b, s * 12 : (s + 1) * 12].tolist())
            assert len(task_labels) == 2 and not task_labels & set(label_of.values())
            for i in range(s * 12, (s + 1) * 12):
                c = class_of(e.x[b, i])
                assert c not in label_of or label_of[c] == e.y[b, i]
                label_of[c] = int(e.y[b, i])
            assert len(label_of) == 2 * (s + 1)  # two new classes per task
            for image, label in zip(e.query_x[b, s], e.query_y[b, s], strict=True):
                assert tuple(image.flatten().tolist()) not in shown  # never fed back
                assert label_of[class_of(image)] == label  # of a class seen so far
    assert len({tuple(row.tolist()) for row in e.query_y[:, 3]}) > 1  # later tasks: old ones too
    assert (e.query_y[:, 3].unsqueeze(-1) == e.y[:, :12].unsqueeze(1)).any(-1).any()
    with pytest.raises(ValueError, match="segments × ways = 12 is more than the 10"):
        family.sample(2, 12, 6, torch.Generator(), "meta", queries=5)
    with pytest.raises(ValueError, match="queries is for classification families"):
        build_family("sine").sample(2, 12, 2, torch.Generator(), "meta", queries=5)


def test_the_linear_oracle_is_exact_once_it_has_seen_enough_points():
    family = build_family("linear", dim=3)
    episodes = family.sample(20, 12, 1, torch.Generator().manual_seed(0))
    error = (bayes_linear_predictions(family, episodes) - episodes.y).pow(2).mean(0)
    assert error[0] > 1.0  # the prior mean knows nothing of this function
    assert error[5:].max() < 1e-3  # 4 coefficients: exact from 4 points on


# ---------------------------------------------------------------------- the network
def _episodes(kind: str, batch=3, length=8) -> tuple[FeedbackLSTM, Episodes]:
    g = torch.Generator().manual_seed(0)
    if kind == "classification":
        family = build_family("random_labels", source="digits", ways=3, num_outputs=3)
    else:
        family = build_family("sine")
    episodes = family.sample(batch, length, 1, g)
    torch.manual_seed(0)
    model = FeedbackLSTM(math.prod(family.input_shape), family.num_outputs, 12, 2, kind)
    return model, episodes


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_a_prediction_never_sees_its_own_ground_truth(kind):
    model, episodes = _episodes(kind)
    out, _ = prequential(model, episodes, feedback_steps=2)
    i = 4
    changed = Episodes(episodes.x, episodes.y.clone(), episodes.segment, episodes.presentation,
                       episodes.kind)  # fmt: skip
    changed.y[:, i] = (episodes.y[:, i] + 1) % 3 if kind == "classification" else 7.0
    out2, _ = prequential(model, changed, feedback_steps=2)
    assert torch.equal(out[:, : i + 1], out2[:, : i + 1])  # up to and including query i
    assert not torch.allclose(out[:, i + 1], out2[:, i + 1])  # the next one has seen it
    withheld, _ = prequential(model, episodes, feedback_steps=2, mode="withheld")
    assert torch.equal(out[:, 0], withheld[:, 0])
    assert not torch.allclose(out[:, 1:], withheld[:, 1:])


def test_truncated_bptt_carries_the_state_and_steps_once_per_chunk():
    model, episodes = _episodes("classification", batch=4, length=12)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: compare losses, not steps
    steps = []
    opt.register_step_post_hook(lambda *_: steps.append(1))
    whole = meta_step(model, opt, episodes, 1, truncation=12, clip=1.0)
    assert len(steps) == 1
    chunked = meta_step(model, opt, episodes, 1, truncation=5, clip=1.0)
    assert len(steps) == 1 + 3  # chunks of 5, 5 and 2 samples
    # the state crosses the chunks: a fresh state per chunk would change the later losses
    assert chunked["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    out, _ = prequential(model, episodes, 1)
    losses = sample_losses(model, out, episodes.y)
    assert whole["first_loss"] == pytest.approx(losses[:, 0].mean().item(), rel=1e-5)


def test_queries_are_scored_and_their_gradient_crosses_task_ends():
    family = build_family("random_labels", source="digits", ways=2, num_outputs=6)
    episodes = family.sample(4, 6, 3, torch.Generator().manual_seed(0), "meta", queries=5)
    torch.manual_seed(0)
    model = FeedbackLSTM(64, 6, 12, 1, "classification")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    steps = []
    opt.register_step_post_hook(lambda *_: steps.append(1))
    stats = meta_step(model, opt, episodes, 1, truncation=18, clip=1.0)
    assert len(steps) == 1  # one chunk: the queries after tasks 0 and 1 do not cut it
    from learners.lstm_meta import query_logits

    state, losses = None, []
    for s, end in enumerate(episodes.segment_ends):
        part = Episodes(*(t[:, end - 6 : end] for t in (episodes.x, episodes.y,
                          episodes.segment, episodes.presentation)), "classification")  # fmt: skip
        _, state = prequential(model, part, 1, state=state)
        answers = query_logits(model, state, episodes.query_x[:, s])
        losses.append(sample_losses(model, answers, episodes.query_y[:, s]))
    assert stats["query_loss"] == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)
    assert "query_loss" not in meta_step(model, opt, _episodes("classification")[1], 1, 8, 1.0)


def test_queries_start_after_their_share_of_meta_training():
    """queries_from=0.5: the first half of meta-training learns tasks, the second also keeps
    them (queries scored); and the stream is fed episode_length samples a task by default."""
    from learners.lstm_meta import MetaTraining

    meta = MetaTrainingConfig(source="digits", ways=2, episodes=16, batch=4, episode_length=6,
                              segments=2, queries=3, queries_from=0.5)  # fmt: skip
    stream = digits_stream()
    learner = build_learner("lstm_meta", stream.info, TINY | {"samples_per_task": 0}, seed=0,
                            meta=meta)  # fmt: skip
    phase = MetaTraining(learner)
    asked = ["query_loss" in phase.step() for _ in range(phase.total_steps())]
    assert asked == [False, False, True, True]
    phase.apply(phase.result())
    assert learner.learn(stream.tasks[0])["train_samples"] == 6  # meta_training.episode_length


# ---------------------------------------------------------------------- as a learner
def _trained_learner(seed=0, meta=DIGITS_META, cache=None, **hparams):
    stream = digits_stream()
    learner = build_learner("lstm_meta", stream.info, {**TINY, **hparams}, seed=seed, meta=meta)
    events = list(run_phase(learner.phase(), cache))
    return learner, stream, events


def test_learn_changes_no_weight_and_predict_reads_a_snapshot_of_the_state():
    learner, stream, _ = _trained_learner()
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    x = stream[0].x_test[:10]
    blank = learner.logits(x)
    learner.learn(stream[0])
    after = learner.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical weights
    assert learner.state is not None
    state = [s.clone() for s in learner.state]
    alone = torch.stack([learner.logits(x[i : i + 1])[0] for i in range(10)])
    together = learner.logits(x)
    torch.testing.assert_close(alone, together)  # no query's state reaches another
    assert all(torch.equal(a, b) for a, b in zip(state, learner.state, strict=True))
    assert not torch.allclose(blank, together)  # what it was fed changed its answers


def test_a_phase_is_cached_by_its_key_and_a_second_seed_reuses_it(tmp_path):
    first, _, events = _trained_learner(seed=0, cache=tmp_path)
    assert events[-1]["event"] == "done" and events[-1]["cached"] is False
    assert [e["point"]["step"] for e in events[:-1]] == [1, 2]  # 8 episodes / 4 per step
    assert set(events[0]["point"]) == {"step", "loss", "first_loss", "last_loss"}
    second, _, again = _trained_learner(seed=1, cache=tmp_path)
    assert [e["event"] for e in again] == ["done"] and again[0]["cached"] is True
    assert again[0]["key"] == events[-1]["key"]
    assert again[0]["curve"] == events[-1]["curve"]
    for k, v in first.model.state_dict().items():
        assert torch.equal(v, second.model.state_dict()[k])
    # deployment-only settings share the phase; what the weights depend on does not
    _, _, third = _trained_learner(seed=2, cache=tmp_path, samples_per_task=5)
    assert third[0]["cached"] is True
    _, _, other = _trained_learner(seed=0, cache=tmp_path, hidden=17)
    assert other[-1]["cached"] is False and other[-1]["key"] != events[-1]["key"]


def test_a_killed_worker_resumes_meta_training_where_its_checkpoint_left_it(tmp_path, monkeypatch):
    meta = MetaTrainingConfig(source="digits", ways=2, episodes=24, batch=4, episode_length=10)
    reference, _, _ = _trained_learner(meta=meta)  # uninterrupted, no cache
    monkeypatch.setattr(meta_module, "CHECKPOINT_EVERY_S", 0.0)  # a checkpoint after each step
    stream = digits_stream()
    learner = build_learner("lstm_meta", stream.info, TINY, meta=meta)
    phase = learner.phase()
    calls = {"n": 0}
    real_step = phase.step

    def dies_at_step_4() -> float:
        calls["n"] += 1
        if calls["n"] == 4:
            raise SystemExit("worker killed")  # no chance to save anything more
        return real_step()

    phase.step = dies_at_step_4
    with pytest.raises(SystemExit):
        list(run_phase(phase, tmp_path))
    finals = [p for p in tmp_path.glob("*.pt") if not p.name.endswith(".partial.pt")]
    assert list(tmp_path.glob("*.partial.pt")) and not finals
    resumed = build_learner("lstm_meta", stream.info, TINY, seed=5, meta=meta)
    events = list(run_phase(resumed.phase(), tmp_path))
    assert events[0]["point"]["step"] == 4  # steps 1-3 were not trained again
    assert events[-1]["resumed_from"] == 3 and events[-1]["cached"] is False
    for k, v in reference.model.state_dict().items():  # bit-identical to the uninterrupted run
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert not list(tmp_path.glob("*.partial.pt"))


def test_a_stop_request_keeps_the_progress_and_a_waiting_worker_reuses_the_result(tmp_path):
    stream = digits_stream()
    meta = MetaTrainingConfig(source="digits", ways=2, episodes=40, batch=4, episode_length=10)
    learner = build_learner("lstm_meta", stream.info, TINY, meta=meta)
    seen = []
    with pytest.raises(TrainingStopped):
        for event in run_phase(learner.phase(), tmp_path, should_stop=lambda: len(seen) >= 2):
            seen.append(event)
    # two workers at once: one computes (resuming at step 2), the other waits for it
    results = {}

    def work(name: str, seed: int) -> None:
        other = build_learner("lstm_meta", stream.info, TINY, seed=seed, meta=meta)
        results[name] = list(run_phase(other.phase(), tmp_path))[-1]

    threads = [threading.Thread(target=work, args=(n, s)) for n, s in (("a", 0), ("b", 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    done = sorted(results.values(), key=lambda e: e["cached"])
    assert [e["cached"] for e in done] == [False, True]
    assert done[0]["resumed_from"] == 2


def test_lstm_meta_refuses_a_family_that_cannot_train_it_for_the_stream():
    from orchestrator.config import load_config

    stream = {"name": "split", "source": "digits", "num_tasks": 2, "scenario": "class"}
    base = {"methods": {"lstm_meta": {}}, "stream": stream}
    with pytest.raises(ConfigError, match=r"shape \(1, 28, 28\).*stream's are \(1, 8, 8\)"):
        load_config({**base, "meta_training": {"ways": 2}})  # default source mnist5k: 28x28
    with pytest.raises(ConfigError, match="regression family"):
        load_config({**base, "meta_training": {"family": "sine", "source": "digits"}})
    with pytest.raises(ConfigError, match="meta_training.ways=5 is more than the 4 labels"):
        load_config({**base, "meta_training": {"source": "digits"}})
    with pytest.raises(ConfigError, match="segments × ways = 6 is more than the 4 available"):
        load_config({**base, "meta_training": {"source": "digits", "ways": 2, "segments": 3,
                                               "queries": 4}})  # fmt: skip
    config = load_config({**base, "meta_training": {"source": "digits", "ways": 4}})
    assert config.meta_training.source == "digits"


def test_only_meta_trained_methods_carry_the_meta_training_section_in_their_run_keys():
    from orchestrator.config import expand_runs, load_config

    stream = {"name": "split", "source": "digits", "num_tasks": 2, "scenario": "class"}
    config = {"methods": {"lstm_meta": {}, "finetune": {}}, "stream": stream,
              "meta_training": {"source": "digits", "ways": 2}}  # fmt: skip
    runs = {r.method: r for r in expand_runs(load_config(config))}
    assert runs["lstm_meta"].resolved["meta_training"]["source"] == "digits"
    assert "meta_training" not in runs["finetune"].resolved
    other = {r.method: r for r in expand_runs(load_config(
        {**config, "meta_training": {"source": "digits", "ways": 2, "episodes": 5}}))}  # fmt: skip
    assert other["finetune"].run_key == runs["finetune"].run_key
    assert other["lstm_meta"].run_key != runs["lstm_meta"].run_key


# ---------------------------------------------------------------------- through lia run
@pytest.mark.usefixtures("ray_local")
def test_lia_run_meta_trains_once_for_two_seeds_and_logs_the_curve(tmp_path):
    from conftest import tiny_config, write_config
    from mlflow.tracking import MlflowClient

    from orchestrator.cli import main

    config = tiny_config(
        tmp_path, name="meta", methods={"lstm_meta": TINY}, seeds=[0, 1],
        stream={"name": "split", "source": "digits", "num_tasks": 2, "scenario": "class",
                "train_per_task": 60, "test_per_task": 30},
        meta_training={"source": "digits", "ways": 2, "episodes": 40, "batch": 4,
                       "episode_length": 10},
    )  # fmt: skip
    assert main(["run", str(write_config(tmp_path, config)), "--no-progress"]) == 0
    client = MlflowClient(tracking_uri=config["tracking"]["uri"])
    experiment = client.get_experiment_by_name("meta")
    runs = client.search_runs([experiment.experiment_id], "tags.`lia.kind` = 'run'")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert sorted(r.data.tags["meta_training.cached"] for r in runs) == ["false", "true"]
    assert len({r.data.tags["meta_training.key"] for r in runs}) == 1
    for run in runs:  # both show the curve (10 steps of 4 episodes) and its diagnostics
        for metric in ("loss", "first_loss", "last_loss"):
            history = client.get_metric_history(run.info.run_id, f"meta_training.{metric}")
            assert [m.step for m in history] == list(range(1, 11)), metric
    cached = list((tmp_path / "checkpoints" / "phases").glob("*.pt"))
    assert len(cached) == 1 and not cached[0].name.endswith(".partial.pt")


def test_runs_sharing_a_meta_training_do_not_take_several_actors_at_once():
    from orchestrator.config import expand_runs, load_config
    from orchestrator.session import phase_first

    meta = {"source": "digits", "ways": 2, "episodes": 8, "batch": 4}
    config = load_config({
        "methods": {"lstm_meta": {}, "big": {"method": "lstm_meta", "hidden": 32},
                    "finetune": {}},
        "seeds": [0, 1, 2],
        "stream": {"name": "split", "source": "digits", "num_tasks": 2, "scenario": "class"},
        "meta_training": meta,
    })  # fmt: skip
    order = [(s.label, s.seed) for s in phase_first(expand_runs(config))]
    assert order[:2] == [("lstm_meta", 0), ("big", 0)]  # one per meta-training first
    assert order[2:5] == [("finetune", 0), ("finetune", 1), ("finetune", 2)]
    assert sorted(order[5:]) == [("big", 1), ("big", 2), ("lstm_meta", 1), ("lstm_meta", 2)]
