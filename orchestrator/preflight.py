"""Checks of the environment a command will use, before it does any work.

``check_run`` and ``check_report`` look at what a static config check cannot: the
filesystem (folders that must exist or be creatable, files in the way), the network (tracking
servers, databases, Ray clusters: one short TCP or HTTP probe each) and this machine's cores
and GPUs (what a Ray instance started here will offer). Each raises one
:class:`learners.ConfigError` naming the key and what is accepted, within seconds, and writes
nothing: no folder is created, no store is opened.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import urllib.parse
from pathlib import Path

from learners import ConfigError
from orchestrator.config import ExperimentConfig, parse_ray_address
from orchestrator.net import DB_PORTS, database_address, probe_tcp, redact
from orchestrator.tracking import check_reachable, resolve_tracking_uri, sqlite_path

__all__ = ["TRACKING_SCHEMES", "check_report", "check_run"]

TRACKING_SCHEMES = (
    "sqlite",
    "postgresql",
    "mysql",
    "mssql",
    "http",
    "https",
    "file",
    "databricks",
    "databricks-uc",
    "uc",
)
"""the URI schemes MLflow 3's tracking store registry accepts (and a plain path: file store)"""

_ACCEPTED_URIS = (
    "sqlite:///path/to/mlflow.db, postgresql://, mysql://, mssql://, http(s)://host:port, "
    "file:///path (or a plain folder path), databricks, databricks-uc, uc"
)
TCP_TIMEOUT_S = 3.0


def check_run(config: ExperimentConfig) -> None:
    """Refuse (ConfigError) a validated config the environment cannot run, before any work.

    Checks, cheapest first: the tracking URI (scheme, SQLite folder, file store), the artifact
    location and checkpoint folder (existing folders, or creatable ones), what a Ray instance
    started here would offer against ``resources``, then the network: an HTTP tracking server's
    /health, a database's port and ``ray.address``'s port, each with a short timeout.
    """
    uri = resolve_tracking_uri(config.tracking.uri)
    key = _uri_key(config.tracking.uri, "tracking.uri")
    scheme = _check_tracking_uri(uri, key, report=False)
    artifacts = config.tracking.artifact_location
    if artifacts:
        local = _local_path(artifacts)
        if local is not None:
            _check_folder(local, f"tracking.artifact_location={artifacts!r}")
    if config.checkpoints.dir is not None:
        _check_checkpoints(config.checkpoints.dir, f"checkpoints.dir={config.checkpoints.dir!r}")
    ray_target = _check_ray(config)
    _check_tracking_network(uri, key, scheme)
    if ray_target is not None:
        from cluster import check_address

        address, key = ray_target
        check_address(address, timeout_s=TCP_TIMEOUT_S, key=key)


def check_report(experiment: str, tracking_uri: str | None, out_dir: str | None) -> None:
    """Refuse (ConfigError) a ``lia report`` that cannot work, before reading or writing.

    The tracking store must exist (a SQLite file or file store that is not there is refused,
    not created) and answer; ``out_dir`` (default ``reports/EXPERIMENT``) must be a folder or
    creatable.
    """
    if not experiment or not experiment.strip():
        raise ConfigError("the experiment name is empty; give the MLflow experiment's name")
    out = out_dir if out_dir is not None else f"reports/{experiment}"
    _check_folder(out, f"--out {out!r}", flag=True)
    uri = resolve_tracking_uri(tracking_uri)
    key = _uri_key(tracking_uri, "--tracking-uri")
    scheme = _check_tracking_uri(uri, key, report=True)
    _check_tracking_network(uri, key, scheme)


# ---------------------------------------------------------------------------- tracking
def _uri_key(given: str | None, key: str) -> str:
    """Where the tracking URI came from, for messages: the key, the variable or the default."""
    if given:
        return key
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return "$MLFLOW_TRACKING_URI"
    return "the default tracking.uri"


def _scheme(uri: str) -> str:
    """The store scheme as MLflow picks it: ``postgresql+psycopg2`` is postgresql, a bare or
    Windows path is '' (file store), ``databricks``/``uc`` name themselves."""
    if uri in ("databricks", "databricks-uc", "uc"):
        return uri
    scheme = urllib.parse.urlparse(uri).scheme.lower()
    engine = scheme.split("+", 1)[0]
    if engine in ("sqlite", "postgresql", "mysql", "mssql"):
        return engine
    if len(scheme) == 1 and scheme.isalpha():
        return ""
    return scheme


def _check_tracking_uri(uri: str, key: str, *, report: bool) -> str:
    """Scheme known; a local store's file or folder usable. Returns the scheme."""
    scheme = _scheme(uri)
    if scheme not in (*TRACKING_SCHEMES, ""):
        raise ConfigError(
            f"{key}={uri!r} has an unknown scheme {scheme + '://'!r}; accepted: {_ACCEPTED_URIS}"
        )
    if scheme == "sqlite":
        path = sqlite_path(uri)
        if path is not None:
            _check_store(path, uri, key, report=report, is_file=True)
    elif scheme in ("", "file"):
        path = _local_path(uri)
        if path is not None:
            _check_store(Path(path), uri, key, report=report, is_file=False)
    return scheme


def _local_path(uri: str) -> str | None:
    """The local path of a plain path or ``file:`` URI; None for a remote location."""
    scheme = _scheme(uri)
    if scheme == "":
        return uri
    if scheme == "file":
        parsed = urllib.parse.urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            return None
        return urllib.parse.unquote(parsed.path)
    return None


def _check_store(path: Path, uri: str, key: str, *, report: bool, is_file: bool) -> None:
    """A SQLite file (``is_file``) or file-store folder: for a report it must exist; for a run
    it may be created, but only inside an existing, writable folder."""
    what = "database file" if is_file else "store folder"
    if not report:
        fix = f"point tracking.uri / $MLFLOW_TRACKING_URI at a {what} in an existing folder"
        check_creatable(path, f"{key}={uri!r}", what, fix, is_file=is_file)
        return
    shown = os.path.abspath(path)
    if not path.exists():
        raise ConfigError(
            f"no MLflow store at {shown} ({key}={uri!r}); run `lia run` first, or point "
            "--tracking-uri / $MLFLOW_TRACKING_URI at an existing store"
        )
    if path.is_dir() != (not is_file):
        found = "a folder" if path.is_dir() else "a file"
        raise ConfigError(f"{key}={uri!r}: {shown} is {found}; expected a {what}")


def check_creatable(path: Path, label: str, what: str, fix: str, *, is_file: bool = True) -> None:
    """``path`` is an existing writable ``what`` (a file, or a folder when not ``is_file``),
    or one that can be created in an existing writable folder; else one ConfigError that
    starts with ``label`` and ends, for a missing folder, with ``fix``."""
    shown = Path(os.path.abspath(path))
    if shown.exists():
        if is_file and shown.is_dir():
            raise ConfigError(f"{label}: {shown} is a folder; expected a {what}")
        if not is_file and not shown.is_dir():
            raise ConfigError(f"{label}: {shown} is a file; expected a {what}")
        if not os.access(shown, os.W_OK):
            raise ConfigError(f"{label}: {shown} is not writable")
        return
    folder = shown.parent
    if not folder.is_dir():
        raise ConfigError(f"{label}: the folder {folder} does not exist; create it or {fix}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{label}: the folder {folder} is not writable")


def _check_tracking_network(uri: str, key: str, scheme: str) -> None:
    """An HTTP server must answer /health; a database server must accept a TCP connection."""
    if scheme in ("http", "https"):
        check_reachable(uri)
    elif scheme in DB_PORTS:
        try:
            address = database_address(uri)
        except ValueError:  # a port that is not a number
            raise ConfigError(f"{key}={redact(uri)!r} has an invalid port") from None
        reason = probe_tcp(*address, TCP_TIMEOUT_S) if address else None
        if reason is not None:  # (no host: a local socket, left to the driver)
            raise ConfigError(
                f"{key}={redact(uri)!r} is unreachable ({reason}); start the database or point "
                "the URI at a reachable one"
            )


# ---------------------------------------------------------------------------- folders
def _check_folder(path: str, label: str, *, flag: bool = False) -> None:
    """``path`` is an existing writable folder, or can be created (its nearest existing
    ancestor is a writable folder). Checked without creating anything."""
    target = Path(os.path.abspath(os.path.expanduser(path)))
    if target.exists():
        if not target.is_dir():
            fix = "give a folder" if flag else "expected a folder (existing, or one to create)"
            raise ConfigError(f"{label} is a file; {fix}")
        if not os.access(target, os.W_OK | os.X_OK):
            raise ConfigError(f"{label}: the folder {target} is not writable")
        return
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{label} cannot be created: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{label} cannot be created: the folder {ancestor} is not writable")


STORAGE_TIMEOUT_S = 20.0


def _check_checkpoints(root: str, label: str) -> None:
    """A local folder (as :func:`_check_folder`), or a URI fsspec reaches: a small object is
    written, read back and deleted there within STORAGE_TIMEOUT_S seconds."""
    from learners import storage

    if not storage.is_remote(root):
        _check_folder(storage.resolve(root), label)
        return
    accepted = (
        "accepted: a local folder, or an fsspec URI every node reaches (s3://bucket/prefix, "
        "with FSSPEC_S3_ENDPOINT_URL for an S3-compatible server and AWS credentials in the "
        "environment; gs://, abfs://, ...)"
    )
    outcome: dict[str, BaseException | None] = {}

    def attempt() -> None:
        try:
            storage.probe(root)
            outcome["error"] = None
        except BaseException as err:  # reported below, in the driver's thread
            outcome["error"] = err

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(STORAGE_TIMEOUT_S)
    if "error" not in outcome:
        raise ConfigError(f"{label} did not answer within {STORAGE_TIMEOUT_S:g} s; {accepted}")
    err = outcome["error"]
    if isinstance(err, ImportError):
        raise ConfigError(
            f"{label} needs a package this install lacks ({err}); install the filesystem's "
            "fsspec implementation (s3fs for s3://, gcsfs for gs://)"
        )
    if err is not None:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{label} cannot be written: {text}; {accepted}")


# ---------------------------------------------------------------------------- Ray
def _check_ray(config: ExperimentConfig) -> tuple[str, str] | None:
    """Resources against a Ray instance started here; the (address, key) of a cluster to
    probe (None when there is nothing to probe)."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return None  # the driver uses the Ray this process already runs
    key = "ray.address" if config.ray.address else "$RAY_ADDRESS"
    address = config.ray.address or os.environ.get("RAY_ADDRESS") or None
    if address and address.strip() != "local":
        parse_ray_address(address, key)  # the form of $RAY_ADDRESS, too
        # probed after the tracking store; a cluster's resources are checked once connected
        return address, key
    _check_local_resources(config)
    return None


def _check_local_resources(config: ExperimentConfig) -> None:
    """``resources`` must fit the Ray instance ``ensure_ray`` will start on this machine."""
    r, num_cpus = config.resources, config.ray.num_cpus
    have_cpus = num_cpus if num_cpus is not None else (os.cpu_count() or 1)
    if num_cpus is not None and num_cpus < r.cpus_per_run:
        raise ConfigError(
            f"ray.num_cpus={num_cpus} is less than resources.cpus_per_run={r.cpus_per_run:g}; "
            f"accepted: ray.num_cpus >= {math.ceil(r.cpus_per_run)}, or null for all cores"
        )
    if r.cpus_per_run > have_cpus:
        raise ConfigError(
            f"resources.cpus_per_run={r.cpus_per_run:g} does not fit the local Ray instance "
            f"({have_cpus} CPUs on this machine); accepted: at most {have_cpus}, or set "
            "ray.address to a cluster with larger nodes"
        )
    gpus = r.gpus_per_run
    if not gpus:  # null (1 if there are GPUs, else 0) or 0 always fits
        return
    if config.ray.num_gpus is not None:
        have_gpus, source = config.ray.num_gpus, f"ray.num_gpus={config.ray.num_gpus}"
    else:
        have_gpus, source = _detected_gpus(), "detected on this machine"
    if gpus > have_gpus:
        raise ConfigError(
            f"resources.gpus_per_run={gpus:g} does not fit the local Ray instance "
            f"({have_gpus} GPUs, {source}); accepted: 0 (CPU) or null (a GPU if there is one)"
        )


def _detected_gpus() -> int:
    """GPUs a local Ray instance would find (as torch sees them, $CUDA_VISIBLE_DEVICES too)."""
    import torch  # only when a run asks for a GPU: importing torch takes a second or two

    return torch.cuda.device_count()
