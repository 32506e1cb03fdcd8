"""`clipguard score`: flags -> ScoreConfig -> score_shards, with a progress bar and a summary."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from clipguard.cli.choices import (
    DEFAULT_MAX_CAPTION_BYTES, DEFAULT_MAX_PIXELS, DEFAULT_MODEL, DEFAULT_PRETRAINED, EmbeddingLayout, ExecutorKind,
)
from clipguard.cli.common import console, err_console, score_progress, user_errors
from clipguard.errors import ClipguardError

if TYPE_CHECKING:
    from clipguard.scoring.run import ScoreSummary



ExecutorOpt = Annotated[ExecutorKind, typer.Option(help="Where shards are scored: local (decode workers beside this process) or ray (one actor per --workers).")]
RayAddressOpt = Annotated[Optional[str], typer.Option(help="Ray cluster to join ('auto', 'ray://host:10001'); default: start a local one.")]
GpusPerWorkerOpt = Annotated[float, typer.Option(min=0.0, help="GPUs each Ray actor reserves (with --device cuda).")]


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


def score(
    out: Annotated[str, typer.Option("--out", help="Folder (or s3:// / gs:// URL) for score files, stats and manifest.json.")],
    shards: Annotated[Optional[list[str]], typer.Argument(help="Shard folders, globs, brace patterns ({00000..00099}.tar) or http(s) URLs (none with --from-embeddings).")] = None,
    model: Annotated[str, typer.Option(help="open_clip architecture or bundled model name.")] = DEFAULT_MODEL,
    pretrained: Annotated[Optional[str], typer.Option(help="Pretrained tag (online), local weights file, or 'none' for random weights.")] = DEFAULT_PRETRAINED,
    model_config: Annotated[Optional[Path], typer.Option(help="open_clip model-config JSON for a custom architecture.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Pairs per inference batch.")] = 64,
    precision: Annotated[Precision, typer.Option(help="Inference precision (bf16 is fast on CPUs with AMX/AVX512-BF16).")] = Precision.fp32,
    workers: Annotated[int, typer.Option(min=0, help="Local executor: DataLoader processes that decode while the model runs. Ray: the number of actors.")] = 1,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    save_embeddings: Annotated[bool, typer.Option(help="Also write fp16 embeddings in clip-retrieval's layout (img_emb/, text_emb/, metadata/; error rows listed in embeddings_left_out/).")] = False,
    max_pixels: Annotated[int, typer.Option(help="Images whose header announces more pixels become error rows, undecoded.")] = DEFAULT_MAX_PIXELS,
    max_caption_bytes: Annotated[int, typer.Option(help="Captions are clipped to this many bytes.")] = DEFAULT_MAX_CAPTION_BYTES,
    jpeg_draft: Annotated[bool, typer.Option(help="Decode large JPEGs at reduced DCT scale (faster, nearly identical scores).")] = True,
    executor: ExecutorOpt = ExecutorKind.local,
    ray_address: RayAddressOpt = None,
    gpus_per_worker: GpusPerWorkerOpt = 0.0,
    threads: Annotated[Optional[int], typer.Option(min=1, help="Inference threads (default: torch's here, 1 per Ray actor). Runs give the same bytes at the same count.")] = None,
    allow_pipe: Annotated[bool, typer.Option(help="Allow pipe: shard URLs (they run shell commands).")] = False,
    from_embeddings: Annotated[Optional[Path], typer.Option(help="Score precomputed embeddings in this folder instead of shards (no model, no images).")] = None,
    layout: Annotated[EmbeddingLayout, typer.Option(help="--from-embeddings: clip-retrieval (img_emb/, text_emb/, metadata/) or datacomp (NNNNNNNN.npz + .parquet).")] = EmbeddingLayout.clip_retrieval,
    embedding_model: Annotated[Optional[str], typer.Option(help="--from-embeddings: datacomp b32 (default) or l14; clip-retrieval: a label of the model that made them, recorded as the folder's model.")] = None,
) -> None:
    """Stream shards through a reference CLIP and write every pair's cosine distance.

    \b
    Example:
      clipguard score shards/ --out scores/ --model clipguard-reference
      clipguard score s3://bucket/shards/ --out scores/ --executor ray --workers 8
      clipguard score --from-embeddings pool/ --layout datacomp --out scores/
    """
    if from_embeddings is not None:
        if shards:
            with user_errors():
                raise ClipguardError("give SHARDS or --from-embeddings, not both: embeddings are scored without their shards")
        _score_embeddings(from_embeddings, layout, embedding_model, out)
        return
    if not shards:
        with user_errors():
            raise ClipguardError("give SHARDS to score (or --from-embeddings DIR)")
    # Imported here so that `--help` does not wait for torch and open_clip.
    from clipguard.data.pairs import DecodeLimits
    from clipguard.data.shardspec import resolve_shards
    from clipguard.model.loading import ModelSpec, load_model
    from clipguard.scoring.run import ExecutorSpec, ScoreConfig, score_shards

    with user_errors():
        shard_list = resolve_shards(shards, allow_pipe=allow_pipe)
        spec = ModelSpec(name=model, pretrained=pretrained, model_config=model_config, device=device, precision=precision.value)
        loaded = load_model(spec)
        limits = DecodeLimits(
            max_pixels=max_pixels,
            max_caption_bytes=max_caption_bytes,
            draft_size=loaded.info.image_size if jpeg_draft else None,
        )
        on = ExecutorSpec(kind=executor.value, address=ray_address, workers=max(workers, 1), gpus_per_worker=gpus_per_worker)
        config = ScoreConfig(
            batch_size=batch_size, workers=workers, save_embeddings=save_embeddings, limits=limits, executor=on, threads=threads,
        )
        err_console.print(
            f"scoring {len(shard_list)} shard(s) with {loaded.info.architecture} "
            f"({loaded.info.weights_source} weights, {precision.value}) into {out}"
        )
        with score_progress(len(shard_list)) as on_progress:
            summary = score_shards(shard_list, loaded, out, config, progress=on_progress)
        print_summary(summary)
        if summary.failed:
            details = "; ".join(f"{r.shard}: {r.read_error}" for r in summary.failed[:5])
            raise ClipguardError(
                f"{len(summary.failed)} shard(s) could not be read and have no scores ({details}). "
                "Fix the source and rerun into the same --out: only those shards are read again"
            )


def _score_embeddings(folder: Path, layout: EmbeddingLayout, embedding_model: str | None, out: str) -> None:
    from clipguard.scoring.from_embeddings import EmbeddingSource, find_parts, score_from_embeddings

    with user_errors():
        source = EmbeddingSource(folder=folder, layout=layout.value, embedding_model=embedding_model)
        files = len(find_parts(source))
        err_console.print(f"scoring {files} file(s) of {layout.value} embeddings ({source.model_label}) in {folder} into {out}")
        with score_progress(files) as on_progress:
            summary = score_from_embeddings(source, out, progress=on_progress)
        table = Table(title=f"clipguard score --from-embeddings -> {summary.out_dir}", show_header=False)
        table.add_column("what", style="bold")
        table.add_column("value")
        skipped = sum(r.skipped_on_resume for r in summary.parts)
        table.add_row("files", f"{len(summary.parts)} ({skipped} already complete, skipped)")
        table.add_row("pairs", f"{summary.pairs:,} ({summary.ok:,} ok)")
        table.add_row("errors by reason", ", ".join(f"{k}: {v}" for k, v in sorted(summary.errors_by_reason.items())) or "none")
        table.add_row("throughput", f"{summary.pairs_per_second:,.0f} pairs/s (pairs scored in this run)")
        console.print(table)


def print_summary(summary: ScoreSummary) -> None:
    table = Table(title=f"clipguard score -> {summary.out_dir}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    skipped = sum(r.skipped_on_resume for r in summary.shards)
    table.add_row("shards", f"{len(summary.shards)} ({skipped} already complete, skipped)")
    table.add_row("pairs", f"{summary.pairs:,} ({summary.ok:,} ok)")
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(summary.errors_by_reason.items())) or "none"
    table.add_row("errors by reason", errors)
    scrape = [r.scrape for r in summary.shards if r.scrape]
    if scrape:  # img2dataset's failed downloads: lost before clipguard, never in the tars
        lost = sum(s["failed"] for s in scrape)
        table.add_row("lost by the scrape", f"{lost:,} of {sum(s['attempted'] for s in scrape):,} attempted (img2dataset)")
    truncated = [r.shard for r in summary.shards if r.truncated]
    table.add_row("truncated shards", ", ".join(truncated) or "none")
    failed = [r.shard for r in summary.failed]
    table.add_row("failed shards", ", ".join(failed) + " (no scores; rerun to retry)" if failed else "none")
    if summary.distance_quantiles:
        q = summary.distance_quantiles
        table.add_row("cosine distance", "  ".join(f"{k} {v:.3f}" for k, v in q.items()))
    table.add_row("wall time", f"{summary.wall_seconds:.1f} s")
    table.add_row("throughput", f"{summary.pairs_per_second:,.1f} pairs/s (pairs scored in this run)")
    console.print(table)
