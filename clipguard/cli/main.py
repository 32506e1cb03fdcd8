"""The `clipguard` command. Each subcommand lives in its own module and only declares options."""

from __future__ import annotations

import typer

from clipguard.cli.score import score

app = typer.Typer(
    name="clipguard",
    help="Find poisoned image-text pairs in WebDataset shards, and measure attacks and defences.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Find poisoned image-text pairs in WebDataset shards, and measure attacks and defences."""


app.command()(score)


def main() -> None:  # pragma: no cover - console-script entry
    app()
