"""MLflow, written only by the driver: parent run per invocation, child run per run.

Everything goes through ``MlflowClient`` with explicit run ids and batched logging, so one
process writes the (default SQLite) store however many actors run.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from learners import ConfigError
from learners.metrics import Metrics, RMatrix
from orchestrator import plots
from orchestrator.config import RunSpec, flatten

log = logging.getLogger(__name__)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PARENT_TAG = "mlflow.parentRunId"
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000


def resolve_tracking_uri(uri: str | None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else the embedded SQLite default."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def check_reachable(uri: str) -> None:
    """Fail fast (ConfigError) when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
    except requests.RequestException as err:
        raise ConfigError(
            f"tracking.uri={uri!r} is unreachable ({type(err).__name__}); start "
            "the MLflow server or point tracking.uri / MLFLOW_TRACKING_URI at a "
            "reachable one"
        ) from None


def _now_ms() -> int:
    return int(time.time() * 1000)


class Tracker:
    """The driver's MLflow writer for one experiment."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        artifact_location: str | None = None,
        flush_interval_s: float = 2.0,
    ):
        check_reachable(uri)
        self.uri = uri
        # per-task rows are buffered per run and written at most every flush_interval_s
        # (and always when the run ends), so fast runs do not turn into a write per task
        self.flush_interval_s = flush_interval_s
        self._buffer: dict[str, list[Metric]] = {}
        self._last_flush: dict[str, float] = {}
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            self.experiment_id = self.client.create_experiment(
                experiment,
                artifact_location=artifact_location,
                # the MLflow 3 UI then opens on runs and charts, not on GenAI traces
                tags={"mlflow.experimentKind": "custom_model_development"},
            )
        else:
            self.experiment_id = found.experiment_id
        self.experiment = experiment

    # ------------------------------------------------------------------ reading
    def finished_runs(self) -> dict[str, Any]:
        """FINISHED child runs of this experiment by run key (latest wins)."""
        return finished_child_runs(self.client, [self.experiment_id])

    # ------------------------------------------------------------------ parent run
    def start_parent(self, run_name: str, config_yaml: str, tags: dict[str, str]) -> str:
        run = self.client.create_run(
            self.experiment_id, run_name=run_name, tags={"lia.kind": "invocation", **tags}
        )
        self.client.log_text(run.info.run_id, config_yaml, "config.yaml")
        return run.info.run_id

    def finish_parent(
        self, run_id: str, artifacts: dict[str, str | bytes], status: str = "FINISHED"
    ) -> None:
        for name, content in artifacts.items():
            self._log_file(run_id, name, content)
        self.client.set_terminated(run_id, status)

    # ------------------------------------------------------------------ child runs
    def start_child(self, spec: RunSpec, parent_id: str) -> str:
        stream = spec.resolved["stream"]
        tags = {
            PARENT_TAG: parent_id,
            "run_key": spec.run_key,
            "method": spec.method,
            "label": spec.label,
            "stream": stream["name"],
            "seed": str(spec.seed),
            "order": str(spec.order_index),
            "lia.kind": "run",
        }
        run = self.client.create_run(self.experiment_id, run_name=spec.run_name, tags=tags)
        run_id = run.info.run_id
        params = [Param(k, v[:6000]) for k, v in flatten(spec.resolved).items()]
        for start in range(0, len(params), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=params[start : start + MAX_PARAMS_PER_BATCH])
        return run_id

    def log_start(self, run_id: str, event: dict[str, Any]) -> None:
        """Tags from the actor's first event: where the run runs and the scenario."""
        self.client.log_batch(
            run_id,
            tags=[
                RunTag("scenario", str(event["scenario"])),
                RunTag("device", str(event["device"])),
                RunTag("node", str(event["node"])),
                RunTag("torch_threads", str(event["torch_threads"])),
                *(
                    [RunTag("resumed_from_task", str(event["resumed_from_task"]))]
                    if event.get("resumed_from_task") is not None
                    else []
                ),
            ],
        )

    def log_init_row(self, run_id: str, row: list[float]) -> None:
        """The random-init accuracies, at step 0 of metrics ``init_acc_task_{j}``."""
        ts = _now_ms()
        self._log_metrics(
            run_id, [Metric(f"init_acc_task_{j}", v, ts, 0) for j, v in enumerate(row)]
        )

    def log_task_row(self, run_id: str, r: RMatrix, event: dict[str, Any]) -> None:
        """One finished task: ``acc_task_{j}`` and ``avg_acc_seen`` at step i, plus costs."""
        i = event["task"]
        ts = _now_ms()
        metrics = [Metric(f"acc_task_{j}", v, ts, i) for j, v in enumerate(event["row"])]
        metrics.append(Metric("avg_acc_seen", r.avg_acc_seen(i), ts, i))
        for key in (
            "train_time_s",
            "eval_time_s",
            "peak_memory_bytes",
            "model_parameters",
            "stored_samples",
            "stored_bytes",
        ):
            if key in event:
                metrics.append(Metric(f"task_{key}", float(event[key]), ts, i))
        self._buffer.setdefault(run_id, []).extend(metrics)
        if time.monotonic() - self._last_flush.get(run_id, 0.0) >= self.flush_interval_s:
            self.flush(run_id)

    def flush_all(self) -> None:
        """Write every run's buffered metrics."""
        for run_id in list(self._buffer):
            self.flush(run_id)

    def flush(self, run_id: str) -> None:
        """Write the buffered per-task metrics of ``run_id``."""
        self._last_flush[run_id] = time.monotonic()
        pending = self._buffer.pop(run_id, [])
        if pending:
            self._log_metrics(run_id, pending)

    def finish_child(
        self,
        run_id: str,
        r: RMatrix,
        metrics: Metrics,
        totals: dict[str, float],
        files: dict[str, bytes] | None = None,
    ) -> None:
        """Final metrics, the R-matrix artifacts and FINISHED status."""
        self.flush(run_id)
        ts = _now_ms()
        step = r.num_tasks - 1
        final = [Metric(k, v, ts, step) for k, v in metrics.as_dict().items() if v is not None]
        final += [
            Metric(f"forgetting_task_{j}", v, ts, step)
            for j, v in enumerate(metrics.forgetting_per_task)
        ]
        final += [Metric(k, float(v), ts, step) for k, v in totals.items()]
        self._log_metrics(run_id, final)
        tags = [RunTag(f"undefined.{name}", reason) for name, reason in metrics.undefined.items()]
        if tags:
            self.client.log_batch(run_id, tags=tags)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "r_matrix.json").write_text(r.to_json())
            (Path(tmp) / "r_matrix.csv").write_text(r.to_csv())
            for name, content in (files or {}).items():
                (Path(tmp) / name).write_bytes(content)
            if not (Path(tmp) / "r_matrix.png").exists():
                plots.r_heatmap(
                    r.R, r.tasks, r.random_init, Path(tmp) / "r_matrix.png", title="R matrix"
                )
            self.client.log_artifacts(run_id, tmp)
        self.client.set_terminated(run_id, "FINISHED")

    def fail_child(self, run_id: str, error: str, status: str = "FAILED") -> None:
        """Mark a run FAILED (or KILLED) with its error text as ``error.txt``."""
        self.flush(run_id)
        self.client.log_text(run_id, error, "error.txt")
        self.client.set_tag(
            run_id, "error", error.strip().splitlines()[-1][:500] if error else "unknown"
        )
        self.client.set_terminated(run_id, status)

    # ------------------------------------------------------------------ helpers
    def _log_metrics(self, run_id: str, metrics: list[Metric]) -> None:
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=metrics[start : start + MAX_METRICS_PER_BATCH])

    def _log_file(self, run_id: str, name: str, content: str | bytes) -> None:
        if isinstance(content, bytes):
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / name
                path.write_bytes(content)
                self.client.log_artifact(run_id, str(path))
        else:
            self.client.log_text(run_id, content, name)


def finished_child_runs(client: MlflowClient, experiment_ids: list[str]) -> dict[str, Any]:
    """FINISHED runs carrying a ``run_key`` tag, by key; the latest run wins on duplicates."""
    runs: dict[str, Any] = {}
    token = None
    while True:
        page = client.search_runs(
            experiment_ids,
            filter_string="attributes.status = 'FINISHED'",
            max_results=1000,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        for run in page:
            key = run.data.tags.get("run_key")
            if key:
                runs[key] = run
        token = page.token
        if not token:
            return runs


def load_r_matrices(client: MlflowClient, run_ids: Iterable[str]) -> dict[str, RMatrix]:
    """Download ``r_matrix.json`` of each run (in parallel)."""
    run_ids = list(run_ids)

    def fetch(run_id: str) -> RMatrix:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run_id, "r_matrix.json", tmp)
            return RMatrix.from_dict(json.loads(Path(path).read_text()))

    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(run_ids, pool.map(fetch, run_ids), strict=True))


__all__ = [
    "Tracker",
    "check_reachable",
    "finished_child_runs",
    "load_r_matrices",
    "resolve_tracking_uri",
]
