"""`clipguard filter`: flags -> threshold, model, FilterConfig -> filter_shards; progress and a summary.

The model and decoding options are the ones `clipguard score` takes, declared once here and
shared with `clipguard gate`, so that scores computed on the fly equal what `score` would write.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from clipguard.cli.choices import DEFAULT_MAX_CAPTION_BYTES, DEFAULT_MAX_PIXELS, DEFAULT_MODEL, DEFAULT_PRETRAINED, DEFAULT_SHARD_SIZE
from clipguard.cli.choices import ExecutorKind
from clipguard.cli.common import console, err_console, progress_reporter, user_errors
from clipguard.cli.score import ExecutorOpt, GpusPerWorkerOpt, Precision, RayAddressOpt
from clipguard.errors import ClipguardError

if TYPE_CHECKING:
    from clipguard.cli.progress import ProgressTask
    from clipguard.filtering.run import FilterProgress, FilterSummary
    from clipguard.model.loading import LoadedModel
    from clipguard.scoring.run import ScoreConfig

ShardsArg = Annotated[list[str], typer.Argument(help="Shard folders, globs, brace patterns ({00000..00099}.tar) or http(s) URLs.")]
GammaOpt = Annotated[Optional[float], typer.Option(help="Flag a pair when its cosine distance >= GAMMA (0..2).")]
CalibrationOpt = Annotated[
    Optional[Path],
    typer.Option(exists=True, dir_okay=False, help="calibration.json from `clipguard calibrate` (its gamma, checked against --model)."),
]
ScoresOpt = Annotated[
    Optional[Path],
    typer.Option(
        exists=True, file_okay=False,
        help="A `clipguard score` folder to reuse (read only); it must come from the same model. Shards it lacks are scored now.",
    ),
]
ModelOpt = Annotated[Optional[str], typer.Option(
    help=f"open_clip architecture or bundled model name (the scoring model). Default: the model that the "
    f"--scores folder or --calibration file records, else {DEFAULT_MODEL}.")]
PretrainedOpt = Annotated[Optional[str], typer.Option(
    help=f"Pretrained tag (online), local weights file, or 'none' for random weights (default with --model: {DEFAULT_PRETRAINED}).")]
ModelConfigOpt = Annotated[Optional[Path], typer.Option(help="open_clip model-config JSON for a custom architecture.")]
BatchSizeOpt = Annotated[int, typer.Option(min=1, help="Pairs per inference batch.")]
PrecisionOpt = Annotated[Optional[Precision], typer.Option(help="Inference precision (bf16 is fast on CPUs with AMX/AVX512-BF16). Default: the recorded model's, else fp32.")]
WorkersOpt = Annotated[int, typer.Option(min=0, help="DataLoader worker processes that decode while the model runs.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu or cuda.")]
MaxPixelsOpt = Annotated[int, typer.Option(help="Images whose header announces more pixels become error rows, undecoded.")]
MaxCaptionBytesOpt = Annotated[int, typer.Option(help="Captions are clipped to this many bytes.")]
JpegDraftOpt = Annotated[bool, typer.Option(help="Decode large JPEGs at reduced DCT scale (faster, nearly identical scores).")]
AllowPipeOpt = Annotated[bool, typer.Option(help="Allow pipe: shard URLs (they run shell commands).")]


@dataclass(frozen=True)
class ScoringOptions:
    model: str | None  # None: the model the scores or calibration record (else the default)
    pretrained: str | None
    model_config: Path | None
    batch_size: int
    precision: Precision | None
    workers: int
    device: str
    max_pixels: int
    max_caption_bytes: int
    jpeg_draft: bool
    executor: ExecutorKind = ExecutorKind.local
    ray_address: str | None = None
    gpus_per_worker: float = 0.0


def load_scoring(
    options: ScoringOptions, scores: Path | None = None, calibration: Path | None = None,
) -> tuple[LoadedModel, ScoreConfig]:
    """The model and score settings, exactly as `clipguard score` builds them. Without --model or
    --pretrained the model is the one the score folder (first) or calibration file records."""
    from clipguard.data.pairs import DecodeLimits
    from clipguard.model.loading import load_model
    from clipguard.scoring.recorded import ModelRequest, model_spec_for_run, recorded_model
    from clipguard.scoring.run import ExecutorSpec, ScoreConfig

    request = ModelRequest(
        name=options.model,
        pretrained=options.pretrained,
        model_config=options.model_config,
        device=options.device,
        precision=options.precision.value if options.precision is not None else None,
    )
    recorded = None if request.names_a_model else recorded_model(scores, calibration)
    loaded = load_model(model_spec_for_run(request, recorded))
    limits = DecodeLimits(
        max_pixels=options.max_pixels,
        max_caption_bytes=options.max_caption_bytes,
        draft_size=loaded.info.image_size if options.jpeg_draft else None,
    )
    executor = ExecutorSpec(
        kind=options.executor.value, address=options.ray_address, workers=max(options.workers, 1),
        gpus_per_worker=options.gpus_per_worker,
    )
    return loaded, ScoreConfig(batch_size=options.batch_size, workers=options.workers, limits=limits, executor=executor)


def filter_command(
    shards: ShardsArg,
    out: Annotated[str, typer.Option("--out", help="Folder (or s3:// URL) for clean shards, filter_manifest.json and per-shard records.")],
    quarantine: Annotated[str, typer.Option("--quarantine", help="Folder (or s3:// URL) for quarantine shards (flagged and errored pairs, each with a reason).")],
    gamma: GammaOpt = None,
    calibration: CalibrationOpt = None,
    scores: ScoresOpt = None,
    shard_size: Annotated[int, typer.Option(min=1, help="At most this many samples per output shard.")] = DEFAULT_SHARD_SIZE,
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
    executor: ExecutorOpt = ExecutorKind.local,
    ray_address: RayAddressOpt = None,
    gpus_per_worker: GpusPerWorkerOpt = 0.0,
    allow_pipe: AllowPipeOpt = False,
    keep_list: Annotated[Optional[Path], typer.Option("--keep-list", dir_okay=False, help="Also write a Parquet of the kept pairs' key, uid, url and shard.")] = None,
    subset_file: Annotated[Optional[Path], typer.Option("--subset-file", dir_okay=False, help="Also write DataComp's subset file: the kept uids as a sorted u8,u8 .npy for its resharder.")] = None,
    copy_shards: Annotated[bool, typer.Option(help="Copy pairs into clean and quarantine tars; --no-copy-shards writes only the lists and the manifest.")] = True,
    audit: Annotated[Optional[Path], typer.Option("--audit", file_okay=False, help="An audit folder (clipguard audit): also flag every pair of its findings.")] = None,
    signal_threshold: Annotated[Optional[list[str]], typer.Option("--signal-threshold", help="With --audit: also flag pairs whose cross-pair signal is above VALUE, as NAME=VALUE (e.g. image_fan_in=5); repeat for several.")] = None,
    findings: Annotated[bool, typer.Option(help="With --audit: flag the findings' pairs (--no-findings: only the --signal-threshold rules).")] = True,
) -> None:
    """Write clean shards and quarantine shards: a pair is flagged when cosine distance >= gamma (or, with --audit, by the audit).

    Every input pair ends in exactly one place, its members copied byte for byte. Flagged pairs and pairs that could not be scored go to quarantine with a <key>.clipguard.json member giving the reason. Outputs are per input shard (<shard>-clean-000000.tar, ...), and a rerun skips input shards that are already done.

    \b
    Example:
      clipguard filter shards/ --out clean/ --quarantine quarantine/ \\
        --calibration calibration/calibration.json --scores scores/
    """
    from clipguard.data.shardspec import resolve_shards
    from clipguard.filtering.auditflags import audit_flags_from_options
    from clipguard.filtering.run import FilterConfig, check_output_folders, filter_shards
    from clipguard.filtering.threshold import resolve_threshold

    with user_errors():
        threshold = resolve_threshold(gamma, calibration)
        shard_list = resolve_shards(shards, allow_pipe=allow_pipe)
        if not copy_shards and keep_list is None and subset_file is None:
            raise ClipguardError("--no-copy-shards writes no tars: ask for --keep-list and/or --subset-file")
        config = FilterConfig(
            clean_dir=out, quarantine_dir=quarantine, shard_size=shard_size, reuse_scores=scores,
            keep_list=keep_list, subset_file=subset_file, copy_shards=copy_shards,
            audit=audit_flags_from_options(audit, signal_threshold, findings),
        )
        check_output_folders(shard_list, config)
        options = ScoringOptions(
            model, pretrained, model_config, batch_size, precision, workers, device, max_pixels, max_caption_bytes,
            jpeg_draft, executor, ray_address, gpus_per_worker,
        )
        loaded, score_config = load_scoring(options, scores, calibration)
        config = dataclasses.replace(config, score=score_config)
        err_console.print(
            f"filtering {len(shard_list)} shard(s) at gamma {threshold.gamma:.4f} ({threshold.source}) "
            f"with {loaded.info.architecture} into {out} (quarantine: {quarantine})",
            markup=False,
        )
        with progress_reporter() as progress:
            tasks: dict[str, ProgressTask] = {}

            def on_progress(event: FilterProgress) -> None:
                if event.phase not in tasks:  # "score" (shards without reusable scores), then "filter"
                    tasks[event.phase] = progress.task(event.phase, total=event.shards_total, steps="shards")
                tasks[event.phase].update(completed=event.shards_done, done=event.pairs_done)

            summary = filter_shards(shard_list, loaded, threshold, config, progress=on_progress)
            for task in tasks.values():
                task.finish()
        print_summary(summary)
        if summary.unreadable:
            names = ", ".join(r.shard for r in summary.unreadable[:5])
            raise ClipguardError(
                f"{len(summary.unreadable)} shard(s) could not be read ({names}); nothing was written for "
                "them. Fix the source and rerun: finished shards are skipped"
            )


def print_summary(summary: FilterSummary) -> None:
    table = Table(title=f"clipguard filter -> {escape(str(summary.clean_dir))}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    skipped = sum(r.skipped_on_resume for r in summary.shards)
    reused = sum(r.scores == "reused" for r in summary.shards if not r.skipped_on_resume)
    table.add_row("input shards", f"{len(summary.shards)} ({skipped} already done, skipped; scores reused for {reused})")
    table.add_row("pairs read", f"{summary.read:,}")
    table.add_row("kept", f"{summary.kept:,}")
    by = {}
    for r in summary.shards:
        for name, count in r.flagged_by.items():
            by[name] = by.get(name, 0) + count
    if by:  # with an audit: what flagged them (a pair flagged by two rules counts under both)
        rules = ", ".join(f"{name}: {count:,}" for name, count in sorted(by.items()))
        table.add_row("flagged", f"{summary.flagged:,} (distance >= {summary.threshold.gamma:.4f} or the audit; {rules})")
    else:
        table.add_row("flagged", f"{summary.flagged:,} (cosine distance >= {summary.threshold.gamma:.4f})")
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(summary.errors_by_reason.items())) or "none"
    table.add_row("errored", f"{summary.errored:,} ({errors})")
    parts_clean = sum(len(r.clean) for r in summary.shards)
    parts_quarantine = sum(len(r.quarantine) for r in summary.shards)
    table.add_row("clean shards", f"{parts_clean} in {escape(str(summary.clean_dir))}")
    table.add_row("quarantine shards", f"{parts_quarantine} in {escape(str(summary.quarantine_dir))}")
    truncated = [r.shard for r in summary.shards if r.truncated]
    table.add_row("truncated inputs", escape(", ".join(truncated)) or "none")
    if any(r.scrape for r in summary.shards):
        table.add_row("lost by the scrape", f"{summary.scrape_lost:,} (img2dataset failed downloads, not in the shards)")
    if summary.keep_list is not None:
        table.add_row("keep list", escape(str(summary.keep_list)))
    if summary.subset_file is not None:
        table.add_row("subset file", f"{summary.subset_uids:,} uids in {escape(str(summary.subset_file))}")
    table.add_row("manifest", escape(str(summary.manifest_path)))
    table.add_row("wall time", f"{summary.wall_seconds:.1f} s")
    console.print(table)
