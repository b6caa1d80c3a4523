"""Actor placement with logical GPUs, cooperative stop, and connecting to an existing cluster."""

from __future__ import annotations

import time

import pytest
import ray

from learners import TrainingStopped
from orchestrator.config import ResourcesConfig
from orchestrator.driver import plan_actors
from orchestrator.runner import make_runner_class


@pytest.fixture(scope="module")
def logical_gpus():
    """Ray with 2 CPUs and 2 logical GPUs (scheduling only: there is no CUDA here)."""
    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=2,
        include_dashboard=False,
        object_store_memory=150 * 1024**2,
        logging_level="WARNING",
    )
    yield
    ray.shutdown()


def test_plan_actors_fits_what_the_cluster_offers(logical_gpus):
    # whole GPUs: one run per GPU, limited by the 2 GPUs
    assert plan_actors(ResourcesConfig(cpus_per_run=0.5, gpus_per_run=1), 10) == (2, 0.5, 1)
    # quarter GPUs: 8 GPU slots, but the 2 CPUs at 0.25 each allow 8 as well
    assert plan_actors(ResourcesConfig(cpus_per_run=0.25, gpus_per_run=0.25), 20) == (8, 0.25, 0.25)
    # never more actors than runs, nor than max_concurrent_runs
    assert plan_actors(ResourcesConfig(gpus_per_run=0.5), 1)[0] == 1
    assert (
        plan_actors(
            ResourcesConfig(cpus_per_run=0.1, gpus_per_run=0.25, max_concurrent_runs=3), 20
        )[0]
        == 3
    )
    # default: GPUs present -> one GPU per run
    assert plan_actors(ResourcesConfig(), 5) == (2, 1.0, 1.0)
    assert plan_actors(ResourcesConfig(gpus_per_run=0), 5)[2] == 0


def test_concurrent_actors_get_distinct_or_shared_gpu_ids(logical_gpus):
    whole = make_runner_class(0.5, 1)
    actors = [whole.remote(torch_threads=1) for _ in range(2)]
    infos = ray.get([a.info.remote() for a in actors])
    assert sorted(i["gpu_ids"][0] for i in infos) == ["0", "1"]
    assert all(i["device"] == "cpu" for i in infos)  # logical GPUs, no CUDA: CPU fallback
    for a in actors:
        ray.kill(a)
    half = make_runner_class(0.25, 0.5)
    actors = [half.remote(torch_threads=1) for _ in range(4)]
    ids = [i["gpu_ids"][0] for i in ray.get([a.info.remote() for a in actors], timeout=60)]
    # four half-GPU runs start at once (none waits) and pack two per GPU
    assert sorted(ids) == ["0", "0", "1", "1"]
    for a in actors:
        ray.kill(a)


def test_stop_ends_a_running_run_between_batches(logical_gpus, tmp_path):
    runner = make_runner_class(1, 0).remote(torch_threads=1)
    resolved = {
        "label": "finetune",
        "method": "finetune",
        "hparams": {},
        "seed": 0,
        "stream": {"name": "permuted", "source": "digits", "num_tasks": 2},
        "model": {"hidden": [32]},
        "train": {"epochs": 100000, "batch_size": 1, "lr": 0.01},
    }
    generator = runner.run.remote(resolved)
    assert ray.get(next(generator))["kind"] == "start"
    assert ray.get(next(generator))["kind"] == "init"
    time.sleep(0.5)  # well into the (endless) first task
    runner.stop.remote()
    # the task is endless: only the stop signal can end it
    with pytest.raises(ray.exceptions.RayTaskError) as info:
        ray.get(next(generator))
    assert isinstance(info.value.as_instanceof_cause(), TrainingStopped)
    # the actor survives and runs the next run
    resolved["train"]["epochs"] = 1
    events = [ray.get(ref) for ref in runner.run.remote(resolved)]
    assert [e["kind"] for e in events] == ["start", "init", "task", "task", "artifacts"]
    ray.kill(runner)


def test_requests_the_cluster_cannot_meet_are_config_errors(logical_gpus):
    from learners import ConfigError

    with pytest.raises(ConfigError, match="resources.cpus_per_run=4 does not fit"):
        plan_actors(ResourcesConfig(cpus_per_run=4), 3)
