"""The ``lia`` command: ``lia run``, ``lia report``, ``lia methods``."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from learners import EXTENSIONS, LEARNERS, ConfigError
from learners.hparams import describe_range
from orchestrator.config import REUSE_MODES

EXTRA_COMMANDS: dict[str, Callable[[argparse.Namespace, Console], int]] = {}
"""subcommands other packages registered (name -> handler)"""
OVERRIDE_COMMANDS = ("run", "clean", "sweep")
"""subcommands that take key=value overrides anywhere on the line"""


def _run(args: argparse.Namespace, console: Console) -> int:
    from orchestrator.config import load_config

    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"ray.address={args.address}")
    config = load_config(args.config, overrides)
    # imported after the config is read: a bad one is refused without loading Ray and MLflow
    from orchestrator.driver import execute, summary_table

    result = execute(
        config,
        progress=not args.no_progress,
        console=console,
        reuse=args.reuse,
        overrides=list(args.overrides),
    )
    if not result.summary.empty:
        from orchestrator.results import significance_legend

        out = Console(soft_wrap=True)
        out.print(
            summary_table(
                result.summary, f"{result.experiment}: mean ± std over seeds, accuracy in %"
            )
        )
        legend = significance_legend(result.summary)
        if legend:
            out.print(legend, highlight=False)
    c = result.counts
    console.print(
        f"runs: {c['done']} finished, {c['failed']} failed, {c['skipped']} skipped · "
        f"MLflow experiment {result.experiment!r} at {result.tracking_uri} "
        + (
            f"(parent run {result.parent_run_id})"
            if result.parent_run_id
            else "(nothing computed: no parent run)"
        )
    )
    if result.tracking_uri.startswith("sqlite:"):
        console.print(f"browse: mlflow ui --backend-store-uri {result.tracking_uri}")
    return 1 if c["failed"] else 0


def _clean(args: argparse.Namespace, console: Console) -> int:
    from orchestrator.config import load_config
    from orchestrator.tracking import resolve_tracking_uri, sqlite_path

    config = load_config(args.config, list(args.overrides)) if args.config else None
    from learners import storage

    root = config.checkpoints.dir if config and config.checkpoints.dir else "checkpoints"
    targets: list[str | Path] = [root if storage.is_remote(root) else Path(root)]
    if args.results:
        db = sqlite_path(resolve_tracking_uri(config.tracking.uri if config else None))
        targets += [Path("mlruns"), Path("mlartifacts"), Path("reports")]
        if db is not None:
            targets += [db, db.parent / f".{db.name}.lock"]
    removed = []
    for target in targets:
        if not storage.exists(target):
            continue
        storage.remove(target)
        removed.append(str(target))
    console.print(f"removed {', '.join(removed)}" if removed else "nothing to remove")
    return 0


def _report(args: argparse.Namespace, console: Console) -> int:
    from orchestrator import preflight
    from orchestrator.report import write_report

    out = args.out or f"reports/{args.experiment}"
    preflight.check_report(args.experiment, args.tracking_uri, out)
    written = write_report(
        args.experiment,
        out,
        args.format or ["md"],
        args.tracking_uri,
        config_key=args.config_key,
        latest=args.latest,
        figure_format=args.figure_format,
    )
    if "md" in written:
        Console().print(written["md"].read_text())
    console.print(
        f"wrote {len(written)} files to {out}: " + ", ".join(p.name for p in written.values())
    )
    return 0


def _methods(args: argparse.Namespace, console: Console) -> int:
    for name in sorted(LEARNERS):
        cls = LEARNERS[name]
        console.print(f"[bold]{name}[/] — {(cls.__doc__ or '').strip().splitlines()[0]}")
        for f in dataclasses.fields(cls.HParams):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            console.print(
                f"    {f.name} = {default!r}  ({describe_range(f)}): {f.metadata.get('help', '')}"
            )
    for name in sorted(EXTENSIONS):
        mixin = EXTENSIONS[name]
        check = getattr(mixin, "check_base", None)
        bases = [m for m in sorted(LEARNERS) if m != name and _accepts(check, m)]
        console.print(
            f"[bold]<method>+{name}[/] — {(mixin.__doc__ or '').strip().splitlines()[0]} "
            f"Combines with: {', '.join(bases)} (e.g. methods.mine.method="
            f"{'ewc' if 'ewc' in bases else bases[0]}+{name})"
            if bases
            else f"[bold]<method>+{name}[/] — combines with no registered method"
        )
    return 0


def _accepts(check, method: str) -> bool:
    """Whether an extension's check_base accepts ``method``."""
    if check is None:
        return True
    try:
        check(LEARNERS[method], f"{method}+?")
    except ConfigError:
        return False
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lia",
        description="LearnsItAll: continual-learning experiments on Ray, tracked in MLflow",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an experiment config")
    run.add_argument("config", help="experiment YAML (see configs/)")
    run.add_argument(
        "overrides",
        nargs="*",
        help="dot-list overrides, e.g. seeds=[0,1] train.lr=0.05 methods.ewc.ewc_lambda=1000",
    )
    run.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or local)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--reuse",
        choices=REUSE_MODES,
        default="same-code",
        help="which finished runs stand for runs of this config: those with the same "
        "config, seed and code (default), the same config and seed whatever the code, or none",
    )
    report = sub.add_parser("report", help="tables and plots of an MLflow experiment")
    report.add_argument("experiment", help="MLflow experiment name")
    report.add_argument(
        "--format",
        action="append",
        choices=["md", "csv", "latex"],
        help="table format(s); repeatable (default md)",
    )
    report.add_argument(
        "--figure-format",
        choices=["png", "pdf", "svg"],
        default="png",
        help="format of the figures (default png; pdf and svg are vector, for papers)",
    )
    report.add_argument("--out", help="output folder (default reports/EXPERIMENT)")
    report.add_argument(
        "--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
    )
    report.add_argument(
        "--latest",
        action="store_true",
        help="per label, only the configuration run most recently",
    )
    report.add_argument(
        "--config-key", help="only this configuration (a config key, or a unique prefix of one)"
    )
    sub.add_parser("methods", help="list methods and their hyperparameters")
    # other packages add subcommands (lia sweep) through the lia.commands entry point, so
    # the orchestrator never imports them
    for entry in entry_points(group="lia.commands"):
        name, handler = entry.load()(sub)
        EXTRA_COMMANDS[name] = handler
    clean = sub.add_parser(
        "clean", help="remove checkpoints (and with --results the local MLflow store, reports)"
    )
    clean.add_argument("config", nargs="?", help="experiment YAML whose folders to clean")
    clean.add_argument("overrides", nargs="*", help="dot-list overrides, as for lia run")
    clean.add_argument(
        "--results",
        action="store_true",
        help="also remove mlflow.db (the config's SQLite store), mlruns/, mlartifacts/, reports/",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # overrides may come before or after options: collect the key=value leftovers
    args, extra = parser.parse_known_args(argv)
    stray = [
        e
        for e in extra
        if args.command not in OVERRIDE_COMMANDS or e.startswith("-") or "=" not in e
    ]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if args.command in OVERRIDE_COMMANDS:
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    console = Console(stderr=True, soft_wrap=True)  # messages never broken mid-path
    handlers = {
        "run": _run,
        "report": _report,
        "methods": _methods,
        "clean": _clean,
        **EXTRA_COMMANDS,
    }
    try:
        return handlers[args.command](args, console)
    except ConfigError as err:  # bad input (config, overrides, environment): nothing was done
        console.print(f"[red]config error:[/] {escape(str(err))}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130
    except Exception as err:
        # `lia report`'s inputs: an experiment that is not there (or has no finished runs)
        bad_input = args.command == "report" and isinstance(err, (ValueError, FileNotFoundError))
        if args.verbose and not bad_input:
            console.print_exception()
        text = str(err).strip() or type(err).__name__
        if not bad_input:
            text = f"{type(err).__name__}: {text.splitlines()[0]}"
            if not args.verbose:
                text += " (rerun as `lia -v ...` for the traceback)"
        console.print(f"[red]error:[/] {escape(text)}", highlight=False)
        return 2 if bad_input else 1


if __name__ == "__main__":
    sys.exit(main())
