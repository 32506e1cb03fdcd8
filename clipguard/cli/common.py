"""What every command shares: consoles, error handling at the edge, progress bars."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator
from enum import Enum

import typer
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

from clipguard.errors import ClipguardError


class TrainPrecision(str, Enum):
    """Autocast precision of a training forward pass (finetune, sterilize); weights stay fp32."""

    fp32 = "fp32"
    bf16 = "bf16"

# Diagnostics and progress go to stderr so that stdout stays clean for --format json.
err_console = Console(stderr=True, width=int(os.environ.get("CLIPGUARD_CONSOLE_WIDTH", "0")) or None)
console = Console(width=int(os.environ.get("CLIPGUARD_CONSOLE_WIDTH", "0")) or None)

ERROR_EXIT = 2


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn domain errors into a red message and exit code 2; anything else is a bug and raises."""
    try:
        yield
    except ClipguardError as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(code=ERROR_EXIT) from None


def progress_bar(unit: str = "pairs") -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[done]:,} " + unit),
        TextColumn("{task.fields[rate]:,.1f} " + unit + "/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    )


@contextlib.contextmanager
def score_progress(total_shards: int) -> Iterator:
    """A progress bar for score_shards; yields the callback that score_shards takes."""
    with progress_bar() as bar:
        task = bar.add_task("score", total=total_shards, done=0, rate=0.0)
        started = time.perf_counter()

        def on_progress(event) -> None:
            rate = event.pairs_done / max(time.perf_counter() - started, 1e-9)
            bar.update(task, completed=event.shards_done, done=event.pairs_done, rate=rate)

        yield on_progress
        bar.update(task, completed=total_shards)


def compact_table(title: str, number_columns: Iterable[str], first_column: str = "model") -> Table:
    """A table that stays readable at 80 columns (logs, CI, pipes): no vertical rules, no wrapped
    cells; a column of names, then right-aligned number columns."""
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column(first_column, style="bold", no_wrap=True)
    for header in number_columns:
        table.add_column(header, justify="right", no_wrap=True)
    return table
