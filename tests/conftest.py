"""Shared fixtures: a small Ray instance per module that needs one, tiny experiment configs."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

FAILING_PLUGIN = '''
"""Test plugin: a learner that fails on its second task."""
from learners.base import register
from learners.finetune import FineTune


@register("explode_on_task_1")
class ExplodeOnTask1(FineTune):
    """Fine-tuning that raises when it reaches task 1."""

    def before_task(self, task):
        if task.id == 1:
            raise RuntimeError("boom on task 1")


@register("die_on_task_1")
class DieOnTask1(FineTune):
    """Fine-tuning whose worker process dies (as in an OOM kill) when it reaches task 1."""

    def before_task(self, task):
        if task.id == 1:
            import os

            os._exit(1)


@register("die_once_on_task_2")
class DieOnceOnTask2(FineTune):
    """Fine-tuning whose worker dies at task 2 the first time only (a marker file remembers)."""

    def before_task(self, task):
        import os
        from pathlib import Path

        marker = Path(os.environ["LIA_TEST_MARKERS"]) / f"died-{self.seed}"
        if task.id == 2 and not marker.exists():
            marker.touch()
            os._exit(1)


@register("sigkill_once_on_task_2")
class SigkillOnceOnTask2(FineTune):
    """Fine-tuning whose worker is SIGKILLed at task 2 the first time only (a marker remembers)."""

    def before_task(self, task):
        import os
        import signal
        from pathlib import Path

        marker = Path(os.environ["LIA_TEST_MARKERS"]) / f"sigkilled-{self.seed}"
        if task.id == 2 and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)


class ScriptedRunner:
    """A stand-in for StreamRunner whose run() plays a script (actor-pool tests)."""

    def __init__(self):
        import threading

        self._stop = threading.Event()

    def stop(self):
        self._stop.set()

    def run(self, script, marker=None):
        import os
        import signal
        import time
        from pathlib import Path

        for step in script:
            action = step[0]
            if action == "event":
                yield step[1]
            elif action == "die_once":
                if not Path(marker).exists():
                    Path(marker).touch()
                    os.kill(os.getpid(), signal.SIGKILL)
            elif action == "die":
                os.kill(os.getpid(), signal.SIGKILL)
            elif action == "raise":
                raise RuntimeError(step[1])
            elif action == "wait_for_stop":
                deadline = time.monotonic() + step[1]
                while not self._stop.is_set() and time.monotonic() < deadline:
                    time.sleep(0.01)
                if self._stop.is_set():
                    return
'''


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """Ray started once for the module (2 CPUs, small object store); test plugins importable."""
    import ray

    plugin_dir = tmp_path_factory.mktemp("plugins")
    (plugin_dir / "lia_test_plugin.py").write_text(FAILING_PLUGIN)
    sys.path.insert(0, str(plugin_dir))
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(plugin_dir) + (os.pathsep + old if old else "")
    os.environ["LIA_TEST_MARKERS"] = str(tmp_path_factory.mktemp("markers"))
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=150 * 1024**2,
        logging_level="WARNING",
    )
    yield plugin_dir
    ray.shutdown()
    os.environ.pop("LIA_TEST_MARKERS", None)
    sys.path.remove(str(plugin_dir))
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


def tiny_config(tmp_path: Path, name: str = "tiny", **changes) -> dict:
    """A config that runs in seconds: 3 permuted-digits tasks, a 32-unit MLP."""
    config = {
        "name": name,
        "methods": {"finetune": {}, "replay": {"buffer_size": 50}},
        "seeds": [0, 1],
        "stream": {
            "name": "permuted",
            "source": "digits",
            "num_tasks": 3,
            "train_per_task": 200,
            "test_per_task": 100,
        },
        "model": {"hidden": [32]},
        "train": {"epochs": 1, "batch_size": 10, "lr": 0.1},
        "tracking": {
            "uri": f"sqlite:///{tmp_path}/mlflow.db",
            "artifact_location": str(tmp_path / "artifacts"),
        },
    }
    config["checkpoints"] = {"dir": str(tmp_path / "checkpoints")}
    config.update(changes)
    return config


def write_config(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / f"{config['name']}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def free_port() -> int:
    """A TCP port nobody listens on at 127.0.0.1 now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(root: Path) -> Iterator[str]:
    """``mlflow server`` on a free loopback port, with its own SQLite store and proxied
    artifacts under ``root``; yields its URI once it answers, stops it afterwards."""
    import subprocess
    import time

    import requests

    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
         "--port", str(port), "--backend-store-uri", f"sqlite:///{root}/server.db",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if requests.get(f"{uri}/health", timeout=1).ok:
                    break
            except requests.RequestException:
                if time.monotonic() > deadline or process.poll() is not None:
                    pytest.fail("the MLflow server did not start within 90 s")
                time.sleep(0.5)
        yield uri
    finally:
        process.terminate()
        process.wait(timeout=30)
