"""``lia sweep``: added to the ``lia`` command through the ``lia.commands`` entry point."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from learners import ConfigError


def register(sub: argparse._SubParsersAction) -> tuple[str, Callable[..., int]]:
    """Add the ``sweep`` subcommand to ``lia``'s parser; return its name and handler."""
    parser = sub.add_parser("sweep", help="tune methods with Optuna (the config's sweep: section)")
    parser.add_argument("config", help="experiment YAML with a sweep: section")
    parser.add_argument("overrides", nargs="*", help="dot-list overrides, as for lia run")
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or local)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--export", metavar="PATH", help="write the best values as a config lia run accepts"
    )
    return "sweep", run


def run(args: argparse.Namespace, console: Console) -> int:
    """Run the sweep; print each study's outcome; exit 1 if a study has no complete trial."""
    from sweeps.config import load_sweep_config

    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"ray.address={args.address}")
    if args.export and Path(args.export).is_dir():
        raise ConfigError(f"--export {args.export!r} is a folder; give a file name, e.g. best.yaml")
    config = load_sweep_config(args.config, overrides)
    from sweeps.driver import export_best, sweep

    results = sweep(config, progress=not args.no_progress, console=console)
    for r in results:
        counts = ", ".join(f"{v} {k}" for k, v in r.counts.items())
        best = (
            f"best {', '.join(config.sweep.objective)} = "
            + ", ".join(f"{v:.4g}" for v in r.best_values or [])
            + f" with {r.best_params}"
            if r.best_params is not None
            else "no complete trial"
        )
        Console().print(f"study {r.study_name} ({r.label}): {counts} · {best}")
    for r in results:
        if r.evaluation is not None and not r.evaluation.empty:
            from orchestrator.progress import summary_table

            title = f"{r.label}: best values on the evaluation stream (heldout protocol)"
            Console().print(summary_table(r.evaluation, title))
    if args.export:
        export = Path(args.export)
        tuned = [r for r in results if r.best_params is not None]
        for r in tuned:  # one config per tuned label: its train.* values are its own
            path = export if len(tuned) == 1 else export.with_stem(f"{export.stem}-{r.label}")
            path.write_text(export_best(config, r))
            console.print(f"wrote {path}: run it with lia run {path}")
    return 0 if all(r.best_params is not None for r in results) else 1
