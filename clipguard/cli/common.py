"""What every command shares: consoles, error handling at the edge, progress."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from enum import Enum

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from clipguard.cli.progress import ProgressReporter
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


def progress_reporter() -> ProgressReporter:
    """Progress on stderr: bars on a terminal, a plain line every few seconds elsewhere."""
    return ProgressReporter(err_console)


@contextlib.contextmanager
def score_progress(total_shards: int) -> Iterator:
    """Progress of score_shards (score, gate, sample); yields the callback that score_shards takes."""
    with progress_reporter() as progress:
        task = progress.task("score", total=total_shards, steps="shards", unit="pairs")

        def on_progress(event) -> None:
            task.update(completed=event.shards_done, done=event.pairs_done)

        yield on_progress
        task.finish()


def compact_table(title: str, number_columns: Iterable[str], first_column: str = "model") -> Table:
    """A table that stays readable at 80 columns (logs, CI, pipes): no vertical rules, no wrapped
    cells; a column of names, then right-aligned number columns."""
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column(first_column, style="bold", no_wrap=True)
    for header in number_columns:
        table.add_column(header, justify="right", no_wrap=True)
    return table
