"""StreamRunner: the Ray actor that runs one run at a time and streams one event per task."""

from __future__ import annotations

import io
import logging
import os
import re
import threading
import time
import traceback
from typing import Any

import ray

from learners.metrics import RMatrix
from orchestrator import checkpoints

log = logging.getLogger(__name__)


def pick_device(gpu_ids: list[Any]) -> str:
    """The torch device for an actor: the first GPU Ray assigned it, else the CPU.

    Ray sets CUDA_VISIBLE_DEVICES to the assigned ids, so inside the actor they are
    renumbered from 0.
    """
    import torch

    if gpu_ids and torch.cuda.is_available():
        return "cuda:0"
    if gpu_ids:
        log.warning(
            "Ray assigned GPU %s but torch sees no CUDA device; running on the CPU", gpu_ids
        )
    return "cpu"


class StreamRunner:
    """Runs runs one after another; ``run`` is a generator yielding plain-Python events."""

    def __init__(self, torch_threads: int, gpu_memory_fraction: float | None = None):
        import torch

        torch.set_num_threads(max(1, int(torch_threads)))
        self.torch_threads = torch.get_num_threads()
        self.device = pick_device(ray.get_gpu_ids())
        if self.device.startswith("cuda") and gpu_memory_fraction:
            # Runs sharing a GPU get no isolation from Ray; cap each one's share.
            torch.cuda.set_per_process_memory_fraction(gpu_memory_fraction, 0)
        self._stop = threading.Event()

    def info(self) -> dict[str, Any]:
        """Where this actor runs: node, pid, device, torch threads."""
        return {
            "node": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "device": self.device,
            "torch_threads": self.torch_threads,
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        }

    def stop(self) -> None:
        """Ask the run in progress to stop at its next batch."""
        self._stop.set()

    def run(
        self,
        resolved: dict[str, Any],
        plugins: list[str] | None = None,
        run_key: str | None = None,
        checkpoint_dir: str | None = None,
    ):
        """Learn one run, yielding one event per task; resume from its checkpoint if any.

        Events: ``start`` (where it runs; ``resumed_from_task`` when resuming), ``phase``
        events of a meta-trained method's phase before the stream (``learners/meta.py``:
        cached by its own key in the checkpoint folder's ``phases/``), ``init`` (the
        random-init row), one ``task`` per finished task, then ``artifacts``. A resumed run
        first re-yields the events its checkpoint recorded (marked ``replayed``).
        """
        from learners import MetaTrainingConfig, ModelConfig, TrainConfig, build_learner, run_phase
        from learners.evaluation import iter_stream, r_matrix_from_events
        from learners.hparams import build_dataclass
        from learners.metrics import chance_accuracy
        from orchestrator.config import import_plugins
        from task_streams import StreamConfig, build_stream

        self._stop.clear()
        import_plugins(list(plugins or []))
        started = time.perf_counter()
        seed = int(resolved["seed"])
        stream = build_stream(build_dataclass(StreamConfig, resolved["stream"]), seed)
        stream = stream.to(self.device)
        learner = build_learner(
            resolved["method"],
            stream.info,
            resolved["hparams"],
            model=build_dataclass(ModelConfig, resolved["model"]),
            train=build_dataclass(TrainConfig, resolved["train"]),
            device=self.device,
            seed=seed,
            meta=build_dataclass(MetaTrainingConfig, resolved["meta_training"])
            if "meta_training" in resolved
            else None,
        )
        keep = checkpoint_dir is not None and run_key is not None
        saved = checkpoints.load(checkpoint_dir, run_key) if keep else None
        events: list[dict[str, Any]] = []
        if saved is not None:
            learner.load_state_dict(saved["learner"])
            events = list(saved["events"])
        yield {
            "kind": "start",
            "tasks": [t.name for t in stream],
            "scenario": stream.scenario,
            "chance": chance_accuracy(stream.info),
            "test_counts": [t.num_test for t in stream],
            "setup_time_s": time.perf_counter() - started,
            "resumed_from_task": learner.tasks_learned if saved is not None else None,
            **self.info(),
        }
        for event in events:
            yield {**event, "replayed": True}
        phase = learner.phase()  # None too when resumed: the checkpoint holds its result
        if phase is not None:
            from orchestrator.identity import code_hash

            yield from run_phase(
                phase,
                checkpoints.phase_dir(checkpoint_dir) if checkpoint_dir is not None else None,
                should_stop=self._stop.is_set,
                code=code_hash(resolved["method"]),
            )
        for event in iter_stream(
            learner, stream, should_stop=self._stop.is_set, start_task=learner.tasks_learned
        ):
            events.append(event)
            if keep and event["kind"] == "task":
                checkpoints.save(checkpoint_dir, run_key, learner.state_dict(), events)
            yield event
        r = r_matrix_from_events([t.name for t in stream], events)
        # rendering here keeps the driver (the single MLflow writer) free for other runs
        title = heatmap_title(resolved)
        yield {"kind": "artifacts", "files": {"r_matrix.png": heatmap_png(r, title)}}

    def forget(self, checkpoint_dir: str, run_key: str) -> None:
        """Delete a run's checkpoint once the driver has its results in MLflow."""
        checkpoints.remove(checkpoint_dir, run_key)


def heatmap_title(resolved: dict[str, Any]) -> str:
    """``ewc on split digits, class-IL: R, seed 0``: what the run's heatmap shows."""
    stream = resolved["stream"]
    what = resolved["label"]
    if resolved["method"] != what:
        what += f" ({resolved['method']})"
    where = f"{stream['name']} {stream.get('source', '')}".strip()
    if stream.get("scenario"):
        where += f", {stream['scenario']}-IL"
    return f"{what} on {where}: R, seed {resolved['seed']}"


def heatmap_png(r: RMatrix, title: str = "R matrix") -> bytes:
    """The annotated R-matrix heatmap as PNG bytes."""
    from orchestrator import plots

    buffer = io.BytesIO()
    plots.r_heatmap(r.R, r.tasks, r.random_init, buffer, title=title)
    return buffer.getvalue()


def make_runner_class(cpus_per_run: float, gpus_per_run: float):
    """The StreamRunner actor class with its resource request and threading set."""
    return ray.remote(StreamRunner).options(
        num_cpus=cpus_per_run,
        num_gpus=gpus_per_run,
        max_concurrency=2,  # one thread runs, the other can receive stop()
        max_restarts=0,
        max_task_retries=0,  # a retried generator would re-run from the start; the driver decides
    )


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def plain_text(text: str) -> str:
    """``text`` without terminal control sequences (Ray colours the errors it relays)."""
    return _ANSI.sub("", text)


def format_error(err: BaseException) -> str:
    """The error text stored with a failed run: the traceback, as plain text."""
    return plain_text("".join(traceback.format_exception(type(err), err, err.__traceback__)))
