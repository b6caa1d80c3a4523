"""Where checkpoints and meta-training results are kept: a local folder or any fsspec URI.

A root is a local path (``checkpoints``, ``/shared/ckpt``) or a URI fsspec understands
(``s3://bucket/ckpt``, ``gs://...``, ``file:///...``, ``memory://...``): a shared filesystem or
an object store that every node reaches. The same four operations serve both:

- :func:`save` writes ``torch.save(obj)`` atomically. A local file is written to a temporary
  name in its folder and renamed; an object is uploaded whole with one PUT, which an object
  store applies all or nothing, so a crash mid-write leaves the previous checkpoint (or
  none), never a truncated one.
- :func:`load` reads it with ``torch.load(weights_only=True)``: no arbitrary unpickling,
  wherever the bytes come from.
- :func:`exists` and :func:`remove`.

Remote settings come from fsspec's own configuration, so they reach every Ray worker with its
environment: ``FSSPEC_S3_ENDPOINT_URL=http://minio:9000`` (an S3-compatible server), the
usual ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, or a ``~/.config/fsspec`` file.

Locks (run leases, a phase computed once) are ``flock``s, which need a local or shared POSIX
filesystem: for a remote root they are taken in :func:`local_lock_dir`, a folder on this
machine named after the root, so they serialise the processes of one machine (every driver a
``ray job submit`` starts runs on the head node).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

LOCAL_SCHEMES = ("", "file", "local")


def scheme(root: str | os.PathLike) -> str:
    """The URI scheme of ``root`` ("" for a plain path)."""
    text = str(root)
    return text.split("://", 1)[0].lower() if "://" in text else ""


def is_remote(root: str | os.PathLike) -> bool:
    """Whether ``root`` is a URI of a non-local filesystem (s3://, gs://, memory://, ...)."""
    return scheme(root) not in LOCAL_SCHEMES


def resolve(root: str | os.PathLike) -> str:
    """``root`` made absolute (a local path: user and working directory expanded), so every
    process means the same place whatever its working directory; URIs are kept as given."""
    text = str(root)
    if is_remote(text):
        return text.rstrip("/")
    if scheme(text):
        text = text.split("://", 1)[1]
    return str(Path(text).expanduser().resolve())


def join(root: str | os.PathLike, *parts: str) -> str:
    """``root`` / parts, with ``/`` for URIs."""
    if is_remote(root):
        return "/".join([str(root).rstrip("/"), *parts])
    return str(Path(resolve(root), *parts))


def _fs(path: str) -> tuple[Any, str]:
    import fsspec
    import fsspec.config

    # fsspec reads FSSPEC_* variables once, at import; read them again, so that variables set
    # later in this process (a notebook, a test's server) count too
    fsspec.config.set_conf_env(fsspec.config.conf)
    return fsspec.core.url_to_fs(path)


def save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically (see the module doc)."""
    path = str(path)
    if is_remote(path):
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        fs, where = _fs(path)
        fs.pipe_file(where, buffer.getvalue())
        return
    local = Path(resolve(path))
    local.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=local.parent, prefix=f".{local.name}.")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, local)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def load(path: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True)`` of ``path`` on the CPU; FileNotFoundError if absent."""
    path = str(path)
    if is_remote(path):
        fs, where = _fs(path)
        data = io.BytesIO(fs.cat_file(where))
        return torch.load(data, weights_only=True, map_location="cpu")
    return torch.load(resolve(path), weights_only=True, map_location="cpu")


def exists(path: str | os.PathLike) -> bool:
    path = str(path)
    if is_remote(path):
        fs, where = _fs(path)
        return bool(fs.exists(where))
    return Path(resolve(path)).exists()


def remove(path: str | os.PathLike) -> None:
    """Delete a file or a folder (with what it holds); nothing if it is not there."""
    path = str(path)
    if is_remote(path):
        fs, where = _fs(path)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(where, recursive=True)
        return
    local = Path(resolve(path))
    if local.is_dir():
        import shutil

        shutil.rmtree(local, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            local.unlink()


def size(path: str | os.PathLike) -> int:
    """Bytes of the file or object at ``path``."""
    path = str(path)
    if is_remote(path):
        fs, where = _fs(path)
        return int(fs.size(where))
    return Path(resolve(path)).stat().st_size


def local_lock_dir(root: str | os.PathLike) -> Path:
    """A folder for ``flock`` files that guard ``root``: the root itself when local, else a
    folder on this machine named after the root's URI."""
    if not is_remote(root):
        return Path(resolve(root))
    digest = hashlib.sha256(str(root).rstrip("/").encode()).hexdigest()[:16]
    return Path.home() / ".cache" / "learnsitall" / "locks" / digest


def probe(root: str | os.PathLike) -> None:
    """Write, read back and delete a small object under ``root``: OSError (or the filesystem's
    own error) if that cannot be done."""
    marker = join(root, f".lia-probe-{os.getpid()}")
    save({"probe": 1}, marker)
    try:
        if load(marker) != {"probe": 1}:
            raise OSError(f"{root} did not return what was written")
    finally:
        remove(marker)
