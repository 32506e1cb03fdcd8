"""`clipguard sample`: flags -> SampleRequest (+ a scoring job for shards) -> sample_for_labelling."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from clipguard.cli.common import console, err_console, score_progress, user_errors
from clipguard.cli.filter import (
    AllowPipeOpt,
    BatchSizeOpt,
    DeviceOpt,
    JpegDraftOpt,
    MaxCaptionBytesOpt,
    MaxPixelsOpt,
    ModelConfigOpt,
    ModelOpt,
    PrecisionOpt,
    PretrainedOpt,
    ScoringOptions,
    WorkersOpt,
    load_scoring,
)
from clipguard.cli.choices import DEFAULT_MAX_CAPTION_BYTES, DEFAULT_MAX_PIXELS
from clipguard.errors import ClipguardError

if TYPE_CHECKING:
    from clipguard.calibration.labelsample import SampleOutput


def sample(
    inputs: Annotated[list[str], typer.Argument(
        metavar="SHARDS|SCORES",
        help="A `clipguard score` folder, or shards (folders, globs, brace patterns, URLs) to score first.")],
    n: Annotated[int, typer.Option("-n", "--n", min=1, help="How many pairs to draw for labelling.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for sample.csv, sample_design.json and index.html.")],
    seed: Annotated[int, typer.Option(help="Random seed of the draw (same seed, same sample).")] = 0,
    stratify: Annotated[bool, typer.Option(help="Over-sample the high-distance tail (top 1% / next 4% / rest get 40/30/30% of the labels).")] = False,
    show_scores: Annotated[bool, typer.Option("--show-scores", help="Show distance, stratum and weight on the page (default: blind, so they cannot bias the labeller).")] = False,
    scores: Annotated[Optional[Path], typer.Option(help="With SHARDS: where to write (or resume) their scores; default OUT/scores.")] = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    model_config: ModelConfigOpt = None,
    batch_size: BatchSizeOpt = 64,
    precision: PrecisionOpt = None,
    workers: WorkersOpt = 1,
    device: DeviceOpt = "cpu",
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    max_caption_bytes: MaxCaptionBytesOpt = DEFAULT_MAX_CAPTION_BYTES,
    jpeg_draft: JpegDraftOpt = True,
    allow_pipe: AllowPipeOpt = False,
) -> None:
    """Draw a random sample of pairs for a person to label: sample.csv, sample_design.json and a self-contained index.html.

    Label each pair on the page (keys j/k move, p/c poison/clean, u clears, z zooms; saved in the browser as you go), press Download labels.csv and run `clipguard calibrate SCORES --labels labels.csv`; or fill the label column of sample.csv (poison/clean, 1/0, yes/no).

    \b
    Example:
      clipguard sample scores/ --out labelling/ --n 500
    """
    from clipguard.calibration.labelsample import SampleRequest, ScoringJob, sample_for_labelling
    from clipguard.data.shardspec import resolve_shards

    with user_errors():
        request = SampleRequest(n=n, seed=seed, stratify=stratify, allow_pipe=allow_pipe, show_scores=show_scores)
        score_folder = _score_folder(inputs)
        if score_folder is not None:
            if scores is not None:
                raise ClipguardError("--scores is for SHARDS; a score folder was given, so nothing is scored")
            result = sample_for_labelling(score_folder, out, request)
        else:
            options = ScoringOptions(model, pretrained, model_config, batch_size, precision, workers, device,
                                     max_pixels, max_caption_bytes, jpeg_draft)
            scores = scores or out / "scores"
            # Resuming a score folder: its own model scores the rest.
            loaded, config = load_scoring(options, scores)
            job = ScoringJob(resolve_shards(inputs, allow_pipe=allow_pipe), loaded, config)
            err_console.print(f"scoring {len(job.shards)} shard(s) with {loaded.info.architecture} into {scores}",
                              markup=False)
            with score_progress(len(job.shards)) as on_progress:
                result = sample_for_labelling(scores, out, request, job, on_progress)
        print_summary(result)


def _score_folder(inputs: list[str]) -> Path | None:
    from clipguard.scoring.run import MANIFEST_NAME

    if len(inputs) == 1 and (Path(inputs[0]) / MANIFEST_NAME).is_file():
        return Path(inputs[0])
    return None


def print_summary(result: SampleOutput) -> None:
    design = result.design
    table = Table(title=f"clipguard sample -> {escape(str(result.out_dir))}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("scores", escape(str(result.scores_dir)))
    table.add_row("population", f"{result.population_size:,} scored pairs ({result.n_error_pairs:,} error rows left out)")
    kind = "stratified" if design.stratified else "uniform"
    table.add_row("sample", f"{design.n} pairs, {kind}, seed {design.seed}")
    for stratum in design.strata if design.stratified else ():
        upper = "inf" if stratum.upper == float("inf") else f"{stratum.upper:.4f}"
        lower = "-inf" if stratum.lower == float("-inf") else f"{stratum.lower:.4f}"
        table.add_row(
            f"  stratum {stratum.index}",
            f"{lower} <= d < {upper}: {stratum.sample_size} of {stratum.population_size:,} pairs "
            f"(inclusion probability {stratum.inclusion_probability:.3g})",
        )
    missing = len(result.unavailable)
    table.add_row("images shown", f"{design.n - missing} of {design.n}" + (f" ({missing} unavailable, see the page)" if missing else ""))
    table.add_row("to label", escape(str(result.csv_path)) + "  (label column)")
    shown = "distances and strata shown" if result.show_scores else "blind: scores hidden, order shuffled"
    table.add_row("page", escape(str(result.page_path)) + f"  ({shown}; its labels.csv carries the design)")
    table.add_row("design", escape(str(result.design_path)) + "  (keep it next to sample.csv)")
    console.print(table)
    for note in result.notes:
        console.print(note, markup=False)
