"""The `clipguard` command. Each subcommand lives in its own module and only declares options."""

from __future__ import annotations

import typer

from clipguard.cli.attack import attack
from clipguard.cli.evaluate import evaluate
from clipguard.cli.filter import filter_command
from clipguard.cli.finetune import finetune
from clipguard.cli.report import report
from clipguard.cli.gate import gate
from clipguard.cli.calibrate import calibrate
from clipguard.cli.convert import convert
from clipguard.cli.demo import demo
from clipguard.cli.sample import sample
from clipguard.cli.score import score
from clipguard.cli.sterilize import sterilize
from clipguard.cli.synth import synth

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
app.command()(sample)
app.command()(calibrate)
app.command()(attack)
app.command()(evaluate)
app.command(name="filter")(filter_command)
app.command()(gate)
app.command()(report)
app.command()(finetune)
app.command()(sterilize)
app.command()(synth)
app.command()(convert)
app.command()(demo)


def main() -> None:  # pragma: no cover - console-script entry
    app()
