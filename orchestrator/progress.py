"""What the terminal shows: live progress of an invocation, and the summary table."""

from __future__ import annotations

import pandas as pd
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from orchestrator.results import table_rows


class ProgressView:
    """Tasks done of the total; runs done / running / failed / skipped / waiting; an ETA."""

    def __init__(self, console: Console, total_tasks: int, enabled: bool):
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("tasks · {task.fields[counts]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
        )
        self.total = total_tasks
        self.task = self.progress.add_task("runs", total=max(total_tasks, 1), counts="")

    def shrink(self, tasks: int) -> None:
        """Take ``tasks`` that will not run (a failed or skipped run's) out of the total."""
        self.grow(-tasks)

    def grow(self, tasks: int) -> None:
        """Add ``tasks`` to the total (runs submitted while the session runs)."""
        self.total += tasks
        self.progress.update(self.task, total=max(1, self.total))

    def update(self, counts: dict[str, int], advance: int = 0) -> None:
        text = " · ".join(f"{k} {v}" for k, v in counts.items() if v or k != "waiting")
        self.progress.update(self.task, advance=advance, counts=text)


def summary_table(summary: pd.DataFrame, title: str) -> Table:
    """The summary as a rich table (accuracy in %, mean ± std over seeds), compact enough for
    an 80-column terminal or pipe: numbers never wrap; a long method name folds instead."""
    header, rows = table_rows(summary, compact=True)
    table = Table(
        title=title,
        box=box.SIMPLE_HEAD,
        show_edge=False,
        padding=(0, 1),
        collapse_padding=True,
        pad_edge=False,
        min_width=min(len(title), 80),  # the title on one line
    )
    for i, h in enumerate(header):
        if i == 0:
            table.add_column(h, justify="left", overflow="fold")
        else:
            table.add_column(h, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table
