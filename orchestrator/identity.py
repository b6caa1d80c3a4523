"""Run identity: which configuration a run belongs to, and which code produced it.

Three keys, each 16 hex digits of a SHA-256:

- ``config_key``: the configuration minus its repetition axes (seed and task order) and minus
  the label. Runs sharing it are repetitions of one setting: reports aggregate over it.
- ``instance_key``: the configuration with its seed and task order, still without the label and
  without the code. ``--reuse any`` matches finished runs on it.
- ``run_key``: the instance key plus the hash of the code that computes the run (the method's
  file and its base classes' files, the project modules they import, the shared training
  loop, evaluation and backbones, and
  the stream builders). A fixed learner therefore re-runs, and nothing else does. Checkpoints
  are keyed by it, so a run never resumes from state written by other code.

The label is a name, not a setting: renaming it re-runs nothing.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import inspect
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

KEY_VERSION = 2

_LEARNERS_DIR = Path(__file__).resolve().parent.parent / "learners"
_STREAMS_DIR = Path(__file__).resolve().parent.parent / "task_streams"
# what every run executes whatever its method: the loop, evaluation, backbones, data
SHARED_CODE = (
    _LEARNERS_DIR / "base.py",
    _LEARNERS_DIR / "evaluation.py",
    _LEARNERS_DIR / "backbones.py",
    *sorted(_STREAMS_DIR.glob("*.py")),
)


def _digest(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


ADDED_SETTINGS: dict[tuple[str, str], Any] = {
    ("stream", "evaluate_on"): "test",
    ("stream", "domains"): None,
}
"""(section, key) -> default of settings added after KEY_VERSION 2: hashed only when they
differ from that default, so adding a setting does not change the keys of existing runs."""


def _setting(resolved: dict[str, Any]) -> dict[str, Any]:
    """The resolved config without its label (a name, not a setting), and without settings
    added later that hold their default."""
    setting = {k: v for k, v in resolved.items() if k != "label"}
    for (section, key), default in ADDED_SETTINGS.items():
        part = setting.get(section)
        if isinstance(part, dict) and key in part and part[key] == default:
            setting[section] = {k: v for k, v in part.items() if k != key}
    return setting


def config_key(resolved: dict[str, Any]) -> str:
    """Hash of the configuration without label, seed and task order."""
    setting = copy.deepcopy(_setting(resolved))
    setting.pop("seed", None)
    setting.get("stream", {}).pop("task_order", None)
    return _digest({"v": KEY_VERSION, "config": setting})


def instance_key(resolved: dict[str, Any]) -> str:
    """Hash of the configuration with its seed and task order, without label or code."""
    return _digest({"v": KEY_VERSION, "instance": _setting(resolved)})


def run_key(resolved: dict[str, Any], code: str) -> str:
    """Hash of the configuration with seed and task order, plus the code hash."""
    return _digest({"v": KEY_VERSION, "instance": _setting(resolved), "code": code})


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return tree


@lru_cache(maxsize=256)
def _file_hash(path: str, mtime_ns: int) -> str:
    """Hash of a Python file's syntax tree: comments, formatting and docstrings do not count."""
    source = Path(path).read_text()
    try:
        canonical = ast.dump(_strip_docstrings(ast.parse(source)))
    except SyntaxError:
        canonical = source
    return hashlib.sha256(canonical.encode()).hexdigest()


def file_hash(path: str | Path) -> str:
    """Hash of one source file as code (see :func:`_file_hash`)."""
    path = Path(path).resolve()
    return _file_hash(str(path), path.stat().st_mtime_ns)


def method_files(method: str) -> list[Path]:
    """The files defining a registered learner: its class and every base class's file."""
    from learners import learner_class

    files: list[Path] = []
    for cls in learner_class(method).__mro__:
        if cls is object:
            continue
        try:
            path = Path(inspect.getfile(cls)).resolve()
        except (TypeError, OSError):
            continue
        if path.suffix == ".py" and path not in files:
            files.append(path)
    return files


PROJECT_PACKAGES = ("learners", "task_streams")
"""packages whose modules a method file imports count as the method's code"""


def _module_file(name: str) -> Path | None:
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    origin = getattr(spec, "origin", None) if spec is not None else None
    return Path(origin).resolve() if origin and origin.endswith(".py") else None


def _imports(path: Path) -> tuple[Path, ...]:
    """The project modules ``path`` imports (``from learners._episodic import ...``)."""
    return _imports_of(str(path), path.stat().st_mtime_ns)


@lru_cache(maxsize=512)
def _imports_of(name: str, mtime_ns: int) -> tuple[Path, ...]:
    path = Path(name)
    found: list[Path] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from learners import replay` names a module; `from x.y import f` names x.y
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] in PROJECT_PACKAGES:
                module = _module_file(name)
                if module is not None and module.name != "__init__.py" and module not in found:
                    found.append(module)
    return tuple(found)


def code_files(method: str) -> list[Path]:
    """Every file whose code decides a run of ``method``'s results: the method's class and
    base classes, the project modules they import (transitively), and the shared code."""
    files = method_files(method)
    pending = list(files)
    while pending:
        for module in _imports(pending.pop()):
            if module not in files:
                files.append(module)
                pending.append(module)
    return files + [p.resolve() for p in SHARED_CODE if p.resolve() not in files]


def code_hash(method: str) -> str:
    """16-hex hash of the code that computes a run of ``method``."""
    root = _LEARNERS_DIR.parent
    parts = {}
    for path in code_files(method):
        try:
            name = str(path.relative_to(root))
        except ValueError:  # a plugin outside the package
            name = path.name
        parts[name] = file_hash(path)
    return _digest(parts)
