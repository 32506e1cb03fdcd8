"""`clipguard report`: flags -> ReportRequest -> write_report; one line on where the page went."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from clipguard.cli.choices import DEFAULT_MAX_ERROR_RATE, DEFAULT_WORST
from clipguard.cli.common import console, user_errors
from clipguard.cli.filter import AllowPipeOpt


def report(
    scores: Annotated[Path, typer.Argument(help="The `clipguard score` folder to report on.")],
    out: Annotated[Path, typer.Option(help="The HTML file to write (self-contained: open it offline, attach it).")] = Path("report.html"),
    calibration: Annotated[Optional[Path], typer.Option(help="calibration.json from `clipguard calibrate`: gamma, its estimates and intervals.")] = None,
    gamma: Annotated[Optional[float], typer.Option(help="Flag at this cosine-distance threshold instead of a calibration's.")] = None,
    audit: Annotated[Optional[Path], typer.Option(help="Audit findings: a findings.json, or a folder holding one (format in the README).")] = None,
    filter_dir: Annotated[Optional[Path], typer.Option("--filter", help="A `clipguard filter` output folder (with filter_manifest.json), or the manifest itself.")] = None,
    keywords: Annotated[Optional[Path], typer.Option(help="Keyword file (class -> [keywords]) for a table by class; reads every shard's captions.")] = None,
    shards: Annotated[Optional[list[str]], typer.Option(help="Where the scored shards are now, for thumbnails (default: the URLs in the score manifest). Repeat for several.")] = None,
    worst: Annotated[int, typer.Option(min=0, max=500, help="How many of the highest-distance pairs to show as thumbnails.")] = DEFAULT_WORST,
    max_flagged_rate: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Policy for a pass / fail verdict, as in `gate` (without it: a count to review).")] = None,
    max_error_rate: Annotated[float, typer.Option(min=0.0, max=1.0, help="With --max-flagged-rate: the largest share of pairs that may fail to score.")] = DEFAULT_MAX_ERROR_RATE,
    allow_pipe: AllowPipeOpt = False,
) -> None:
    """Write one HTML page: verdict, model, distances with gamma, flagged rate by shard, the worst pairs as pictures.

    \b
    Example:
      clipguard report scores/ --calibration calibration.json --out report.html
    """
    # Imported here so that `--help` does not wait for torch.
    from clipguard.data.shardspec import resolve_shards
    from clipguard.reporting import ReportRequest, write_report

    with user_errors():
        shard_urls = {s.name: s.url for s in resolve_shards(shards, allow_pipe=allow_pipe)} if shards else None
        written = write_report(ReportRequest(
            scores=scores, out=out, calibration=calibration, gamma=gamma, audit=audit, filter_dir=filter_dir,
            keywords=keywords, shard_urls=shard_urls, worst=worst, max_flagged_rate=max_flagged_rate,
            max_error_rate=max_error_rate, allow_pipe=allow_pipe,
        ))
    console.print(f"{written.data.verdict.headline}", markup=False, highlight=False)
    console.print(f"report: {written.path} ({written.bytes / 1024:,.0f} KiB)", markup=False, highlight=False)
