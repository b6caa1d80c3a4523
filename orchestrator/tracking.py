"""MLflow, written only by the driver: parent run per invocation, child run per run.

Everything goes through ``MlflowClient`` with explicit run ids and batched logging, so one
process writes the (default SQLite) store however many actors run.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import tempfile
import time
import urllib.parse
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from learners import ConfigError
from learners.metrics import Metrics, RMatrix
from orchestrator import plots
from orchestrator.config import RunSpec, flatten
from orchestrator.liveness import owner_alive, owner_record

log = logging.getLogger(__name__)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PARENT_TAG = "mlflow.parentRunId"
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000


def resolve_tracking_uri(uri: str | None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else the embedded SQLite default."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def check_reachable(uri: str, timeout_s: float = 3.0) -> None:
    """Fail fast (ConfigError) when an HTTP tracking server does not answer its /health.

    One request, no retries, in a daemon thread waited on for at most ``2 * timeout_s + 1``
    seconds: connect and read timeouts do not cover a slow name lookup, this does.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import threading

    import requests

    outcome: dict[str, str] = {}

    def probe() -> None:
        try:
            url = uri.rstrip("/") + "/health"
            requests.get(url, timeout=(timeout_s, timeout_s)).raise_for_status()
            outcome["ok"] = "yes"
        except Exception as err:  # any failure means: not a tracking server we can use
            outcome["error"] = type(err).__name__

    wait_s = 2 * timeout_s + 1
    thread = threading.Thread(target=probe, name="lia-check-reachable", daemon=True)
    thread.start()
    thread.join(wait_s)
    if "ok" not in outcome:
        reason = outcome.get("error", f"no answer in {wait_s:g} s")
        raise ConfigError(
            f"tracking.uri={uri!r} is unreachable ({reason}); start "
            "the MLflow server or point tracking.uri / MLFLOW_TRACKING_URI at a "
            "reachable one"
        )


def _now_ms() -> int:
    return int(time.time() * 1000)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a SQLite URI (None for other stores or an in-memory database)."""
    if not uri.startswith("sqlite:"):
        return None
    rest = uri.split(":", 1)[1]
    if not rest.startswith("///"):
        return None  # sqlite:// (in memory)
    path = rest[3:].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(urllib.parse.unquote(path))


def store_exists(uri: str) -> bool:
    """False for a SQLite store whose file does not exist yet (reading it would create it)."""
    path = sqlite_path(uri)
    return path is None or path.is_file()


@contextmanager
def _store_lock(uri: str):
    """Serialise the first touch of a SQLite store between processes (schema creation).

    Two invocations starting on a fresh ``mlflow.db`` would both create the schema and one
    fails ("duplicate column name"). The lock is a hidden file beside the database.
    """
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    lock = path.parent / f".{path.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def open_client(uri: str) -> MlflowClient:
    """An MlflowClient whose store is initialised (schema created once, under a lock)."""
    with _store_lock(uri):
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
    return client


class Tracker:
    """The driver's MLflow writer for one experiment.

    Opening it writes nothing: a missing SQLite file or experiment is only created by
    :meth:`ensure_experiment`, once the invocation has work to log.
    """

    def __init__(
        self,
        uri: str,
        experiment: str,
        artifact_location: str | None = None,
        flush_interval_s: float = 2.0,
    ):
        self.uri = uri
        self.experiment = experiment
        self.artifact_location = artifact_location
        # per-task rows are buffered per run and written at most every flush_interval_s
        # (and always when the run ends), so fast runs do not turn into a write per task
        self.flush_interval_s = flush_interval_s
        self._buffer: dict[str, list[Metric]] = {}
        self._last_flush: dict[str, float] = {}
        self.client: MlflowClient | None = None
        self.experiment_id: str | None = None
        if store_exists(uri):
            self.client = open_client(uri)
            found = self.client.get_experiment_by_name(experiment)
            if found is not None:
                self.experiment_id = found.experiment_id

    def ensure_experiment(self) -> str:
        """The experiment's id, creating the store and the experiment if needed (race-safe)."""
        if self.client is None:
            self.client = open_client(self.uri)
        if self.experiment_id is None:
            try:
                self.experiment_id = self.client.create_experiment(
                    self.experiment,
                    artifact_location=self.artifact_location,
                    # MLflow's UI before 3.10 reads this tag and opens the experiment on its
                    # runs, not on GenAI traces. From 3.10 on it ignores the tag: the sidebar's
                    # GenAI / Model training switch, a setting of the browser, chooses instead
                    # (no server or experiment setting does); see "Browsing results" in README
                    tags={"mlflow.experimentKind": "custom_model_development"},
                )
            except MlflowException:  # another invocation created it a moment ago
                found = self.client.get_experiment_by_name(self.experiment)
                if found is None:
                    raise
                self.experiment_id = found.experiment_id
        return self.experiment_id

    # ------------------------------------------------------------------ reading
    def finished_runs(self, key: str = "run_key") -> dict[str, Any]:
        """FINISHED child runs of this experiment by ``key`` tag (latest wins)."""
        if self.client is None or self.experiment_id is None:
            return {}
        return finished_child_runs(self.client, [self.experiment_id], key)

    def finished_run(self, run_key: str) -> Any | None:
        """The latest FINISHED child run with ``run_key``, if any."""
        if self.client is None or self.experiment_id is None:
            return None
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"attributes.status = 'FINISHED' and tags.run_key = '{run_key}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0] if runs else None

    def reconcile(self, own_parent: str | None = None, run_key: str | None = None) -> list[str]:
        """End (KILLED, with a reason) the RUNNING runs whose invocation is dead.

        ``run_key`` limits it to that run's children. Returns the names of the runs ended.
        """
        if self.client is None or self.experiment_id is None:
            return []
        query = "attributes.status = 'RUNNING'"
        if run_key is not None:
            query += f" and tags.run_key = '{run_key}'"
        running = self.client.search_runs([self.experiment_id], query, max_results=5000)
        parents: dict[str, Any] = {}
        ended = []
        for run in running:
            tags = run.data.tags
            parent_id = tags.get(PARENT_TAG) if tags.get("lia.kind") == "run" else None
            invocation_id = parent_id or run.info.run_id
            if invocation_id == own_parent:
                continue
            if invocation_id not in parents:
                parents[invocation_id] = (
                    run if parent_id is None else _get_run(self.client, parent_id)
                )
            alive, why = invocation_alive(parents[invocation_id])
            if alive:
                continue
            reason = f"ended by a later invocation: {why}"
            self.client.set_tag(run.info.run_id, "lia.end_reason", reason)
            self.client.set_terminated(run.info.run_id, "KILLED")
            ended.append(run.info.run_name or run.info.run_id)
        return ended

    # ------------------------------------------------------------------ parent run
    def start_parent(self, run_name: str, config_yaml: str, tags: dict[str, str]) -> str:
        """The invocation's parent run, tagged with what tells later invocations it is alive."""
        run = self.client.create_run(
            self.ensure_experiment(),
            run_name=run_name,
            tags={"lia.kind": "invocation", **liveness_tags(), **tags},
        )
        self.client.log_text(run.info.run_id, config_yaml, "config.yaml")
        return run.info.run_id

    def heartbeat(self, run_id: str) -> None:
        """Refresh the parent's heartbeat (how other hosts tell this invocation is alive)."""
        self.client.set_tag(run_id, "lia.heartbeat", f"{time.time():.0f}")

    def finish_parent(
        self,
        run_id: str,
        artifacts: dict[str, str | bytes],
        status: str = "FINISHED",
        metrics: dict[str, float] | None = None,
    ) -> None:
        """End the invocation's run with its artifacts and summary ``metrics`` (such as
        ``ACC/ewc``: the runs table then compares configurations at a glance)."""
        for name, content in artifacts.items():
            self._log_file(run_id, name, content)
        if metrics:
            ts = _now_ms()
            self._log_metrics(run_id, [Metric(k, v, ts, 0) for k, v in metrics.items()])
        self.client.set_terminated(run_id, status)

    # ------------------------------------------------------------------ child runs
    def start_child(
        self, spec: RunSpec, parent_id: str, extra_tags: dict[str, str] | None = None
    ) -> str:
        stream = spec.resolved["stream"]
        tags = {
            PARENT_TAG: parent_id,
            "run_key": spec.run_key,
            "method": spec.method,
            "label": spec.label,
            "stream": stream["name"],
            "seed": str(spec.seed),
            "order": str(spec.order_index),
            "config_key": spec.config_key,
            "instance_key": spec.instance_key,
            "code_hash": spec.code_hash,
            "attempts": "1",
            "lia.kind": "run",
            **(extra_tags or {}),
        }
        tags["mlflow.note.content"] = describe_run(spec)  # the run page's description
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

    def log_attempt(self, run_id: str, attempt: int, previous_error: str) -> None:
        """A retried run: how many attempts so far and why the previous one ended."""
        self.client.log_batch(
            run_id,
            tags=[
                RunTag("attempts", str(attempt)),
                RunTag(f"attempt_{attempt - 1}_error", previous_error[:500] or "unknown"),
            ],
        )

    def log_phase_curve(self, run_id: str, phase: str, points: list[dict[str, float]]) -> None:
        """Points of a phase's curve: metric ``<phase>.<name>`` (loss, diagnostics) per step."""
        ts = _now_ms()
        metrics = [
            Metric(f"{phase}.{name}", float(value), ts, int(point["step"]))
            for point in points
            for name, value in point.items()
            if name != "step"
        ]
        self._log_metrics(run_id, metrics)

    def log_phase_done(self, run_id: str, event: dict[str, Any]) -> None:
        """A finished phase: its key, whether it came from the cache, its cost."""
        phase = event["phase"]
        self.client.log_batch(
            run_id,
            metrics=[
                Metric(f"{phase}.seconds", float(event["seconds"]), _now_ms(), 0),
                Metric(f"{phase}.compute_seconds", float(event["compute_seconds"]), _now_ms(), 0),
                Metric(f"{phase}.steps", float(event["steps"]), _now_ms(), 0),
            ],
            tags=[
                RunTag(f"{phase}.key", str(event["key"])),
                RunTag(f"{phase}.cached", str(bool(event["cached"])).lower()),
                *(
                    [RunTag(f"{phase}.resumed_from", str(event["resumed_from"]))]
                    if event.get("resumed_from")
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
            "gpu_utilization_pct",
            "recency_bias",
            "model_parameters",
            "stored_samples",
            "stored_bytes",
        ):
            if key in event:
                metrics.append(Metric(f"task_{key}", float(event[key]), ts, i))
        self._buffer.setdefault(run_id, []).extend(metrics)
        if time.monotonic() - self._last_flush.get(run_id, 0.0) >= self.flush_interval_s:
            self.flush(run_id)

    def log_task_curve(self, run_id: str, event: dict[str, Any], offset: int) -> None:
        """Accuracy measured during a task's training (``train.eval_every_steps``) as
        ``during_acc_task_{j}`` at the run's global gradient step, then the row at the task's
        end: in the UI, each task's chart shows its accuracy *during* training."""
        ts = _now_ms()
        points = [*event["curve"], {"step": int(event.get("steps", 0)), "row": event["row"]}]
        metrics = [
            Metric(f"during_acc_task_{j}", float(v), ts, offset + int(point["step"]))
            for point in points
            for j, v in enumerate(point["row"])
        ]
        self._buffer.setdefault(run_id, []).extend(metrics)

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
        tags: dict[str, str] | None = None,
    ) -> None:
        """Final metrics, the R-matrix artifacts, ``tags`` and FINISHED status."""
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
        run_tags = [RunTag(k, v) for k, v in (tags or {}).items()]
        run_tags += [
            RunTag(f"undefined.{name}", reason) for name, reason in metrics.undefined.items()
        ]
        if run_tags:
            self.client.log_batch(run_id, tags=run_tags)
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
        from orchestrator.runner import plain_text

        error = plain_text(error)
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


_METRIC_NAME = re.compile(r"[^\w\-. /:]")


def metric_name(text: str) -> str:
    """``text`` as an MLflow metric name (letters, digits, ``_-. /:``; others become ``_``)."""
    return _METRIC_NAME.sub("_", text)


def describe_run(spec: RunSpec) -> str:
    """The run's description (markdown, shown on its MLflow page): method, stream, seed and
    the hyperparameters it was given."""
    stream = spec.resolved["stream"]
    scenario = stream.get("scenario")
    what = f"{stream['name']} {stream.get('source', '')}".strip()
    if scenario:
        what += f", {scenario}-incremental"
    what += f", {stream.get('num_tasks')} tasks"
    hparams = spec.resolved.get("hparams") or {}
    settings = ", ".join(f"{k}={v}" for k, v in sorted(hparams.items())) or "none"
    return (
        f"**{spec.label}** (method `{spec.method}`) on {what}; seed {spec.seed}"
        + (f", task order {spec.order_index}" if spec.order_index else "")
        + f".\n\nHyperparameters: {settings}.\n\nRun key `{spec.run_key}`."
    )


def finished_child_runs(
    client: MlflowClient, experiment_ids: list[str], key: str = "run_key"
) -> dict[str, Any]:
    """FINISHED runs carrying a ``key`` tag (run_key), by its value; the latest run wins."""
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
            value = run.data.tags.get(key)
            if value:
                runs[value] = run
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


def _get_run(client: MlflowClient, run_id: str) -> Any | None:
    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def liveness_tags() -> dict[str, str]:
    """Who this invocation is, as parent-run tags: ``lia.host``, ``lia.pid``, ... (liveness)."""
    return {f"lia.{k}": v for k, v in owner_record().items()}


def invocation_alive(parent: Any | None) -> tuple[bool, str]:
    """Whether the invocation owning ``parent`` (its parent run) still runs, and why not."""
    if parent is None:
        return False, "its parent run is gone"
    if parent.info.status != "RUNNING":
        return False, f"its invocation ended ({parent.info.status})"
    tags = parent.data.tags
    record = {k[len("lia.") :]: v for k, v in tags.items() if k.startswith("lia.")}
    if "pid" not in record:
        return False, "its invocation predates liveness records"
    return owner_alive(record)


__all__ = [
    "Tracker",
    "check_reachable",
    "finished_child_runs",
    "invocation_alive",
    "load_r_matrices",
    "resolve_tracking_uri",
]
