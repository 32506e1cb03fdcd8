"""The `clipguard` command. Each subcommand lives in its own module and only declares options.

Command modules import the core (torch, open_clip, ...) inside their function bodies, so building
this app and printing any `--help` stays fast; tests/test_cli_startup.py keeps it that way.
"""

from __future__ import annotations

from typing import Annotated

import typer

from clipguard.cli.attack import attack
from clipguard.cli.audit import audit
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
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    # Plain click help: rich panels squeeze option help into a 15-character column at 80
    # columns, and rich markup turns text such as `A:B:` into an emoji (`:b:`).
    rich_markup_mode=None,
    # Subcommand contexts inherit these, so `-h` works on every command too.
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)


def _print_version(value: bool) -> None:
    if value:
        from clipguard import __version__

        typer.echo(f"clipguard {__version__}")
        raise typer.Exit()


@app.callback(epilog="Example: clipguard score shards/ --out scores/ --model clipguard-reference")
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Find poisoned image-text pairs in WebDataset shards, and measure attacks and defences.

    Run `clipguard COMMAND -h` for a command's options and an example.
    """


app.command()(score)
app.command()(sample)
app.command()(calibrate)
app.command()(attack)
app.command()(evaluate)
app.command(name="filter")(filter_command)
app.command()(gate)
app.command()(report)
app.command()(audit)
app.command()(finetune)
app.command()(sterilize)
app.command()(synth)
app.command()(convert)
app.command()(demo)


def main() -> None:  # pragma: no cover - console-script entry
    app(prog_name="clipguard")


if __name__ == "__main__":  # pragma: no cover - python -m clipguard.cli.main
    main()
