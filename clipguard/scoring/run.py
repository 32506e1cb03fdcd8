"""`score`: stream shards through a reference CLIP and write each pair's cosine distance.

shards -> (workers: read, decode, preprocess, tokenize) -> chunks -> (main: embed with caches)
-> one Parquet per shard + ``<shard>_stats.json`` (see `clipguard.scoring.stats`). Finished shards
are skipped on rerun; ``manifest.json`` is the folder's summary, derived from the stats files.

The unit of work is one shard: `score_shard` scores one, building its model from a `ModelSpec`
(cached per process) where it is not handed one, so a worker anywhere can run it. Executors
decide where shards run: ``local`` (the default: DataLoader workers decode while this process
embeds) or ``ray`` (`clipguard.executors.ray`: one actor per worker, a shard per task). Both
write the same bytes for the same shard.

A shard whose source failed (cannot be opened, or the connection broke for good after retries,
or nothing in it could be read) gets no score file: it is listed in the manifest's
``failed_shards`` with the reason and the samples it had yielded, the run is not complete, and a
rerun reads it again. A score file records where its shard came from (``source``: the real path
or URL, and a local file's size and mtime), so a folder never hands one shard's scores to
another shard of the same name, and a shard rewritten in place is scored again.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader

import clipguard
from clipguard.data.pairs import DecodeLimits
from clipguard.data.folderlock import exclusive_folder
from clipguard.data.shardspec import Shard
from clipguard.data.storage import OutputFolder
from clipguard.errors import ClipguardError
from clipguard.executors.spec import EXECUTORS, ExecutorSpec  # noqa: F401  (re-exported: callers import it from here)
from clipguard.model.loading import LoadedModel, ModelSpec, load_model
from clipguard.scoring import stats as shard_stats
from clipguard.scoring.chunks import Chunk, ShardChunks, passthrough_collate
from clipguard.scoring.embedder import EmbeddingCache, ShardEmbedder
from clipguard.scoring.scorefiles import (
    embedding_paths,
    left_out_path,
    read_metadata,
    read_scores,
    score_path,
    write_embeddings,
    write_parquet,
    write_score_table,
)
from clipguard.threadcount import thread_count

MANIFEST_NAME = "manifest.json"
# Rebuilding the summary reads every stats file of the folder: not after each of 10^4 shards.
MANIFEST_REFRESH_SECONDS = 10.0


@dataclass(frozen=True)
class ScoreConfig:
    batch_size: int = 64
    workers: int = 0
    save_embeddings: bool = False
    trim_text: bool = True
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    executor: ExecutorSpec = field(default_factory=ExecutorSpec)
    # Threads for inference (None: torch's default here, one per Ray actor). Float sums depend on
    # how a reduction is split: two runs give the same bytes only at the same thread count.
    threads: int | None = None


@dataclass
class ShardResult:
    shard: str
    url: str
    score_file: str
    samples: int
    ok: int
    errors: int
    errors_by_reason: dict[str, int]
    caption_truncated: int
    caption_invalid_utf8: int
    truncated: bool
    read_error: str | None
    skipped_members: list[dict[str, str]]
    skipped_on_resume: bool = False
    # The source failed: no score file was written, and the samples it had yielded are lost to
    # this run (counted here, read again by a rerun).
    failed: bool = False
    source: dict | None = None
    # img2dataset's report beside the shard (ScrapeReport.to_dict): downloads the scrape lost,
    # which never reached the tar and so are not among this shard's samples.
    scrape: dict | None = None


@dataclass
class ScoreSummary:
    out_dir: Path
    shards: list[ShardResult]
    pairs: int
    ok: int
    errors_by_reason: dict[str, int]
    distance_quantiles: dict[str, float]
    wall_seconds: float
    pairs_scored_this_run: int

    @property
    def pairs_per_second(self) -> float:
        return self.pairs_scored_this_run / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def failed(self) -> list[ShardResult]:
        return [r for r in self.shards if r.failed]


@dataclass
class ScoreProgress:
    """Passed to the progress callback after every chunk (the CLI draws a bar from it)."""

    shards_done: int
    shards_total: int
    pairs_done: int
    shard: str


ProgressCallback = Callable[[ScoreProgress], None]


def score_shards(
    shards: list[Shard],
    loaded: LoadedModel,
    out_dir: Path | str,
    config: ScoreConfig = ScoreConfig(),
    progress: ProgressCallback | None = None,
) -> ScoreSummary:
    """Score every shard not yet finished in ``out_dir`` (a local folder or an object-store URL)."""
    folder = OutputFolder.at(out_dir)
    if not folder.is_local:
        # An object store has no lock; one run per prefix is the user's to keep.
        return _score_shards(shards, loaded, folder, config, progress)
    with exclusive_folder(folder.staging):
        return _score_shards(shards, loaded, folder, config, progress)


def _score_shards(
    shards: list[Shard], loaded: LoadedModel, out_dir: OutputFolder, config: ScoreConfig, progress: ProgressCallback | None
) -> ScoreSummary:
    _check_embeddings_destination(out_dir, config)
    start = time.perf_counter()
    run_meta = _run_metadata(loaded, config)
    finished, pending = _split_finished(shards, out_dir, run_meta, config)
    for shard in pending:  # claimed: a run killed from here on leaves the folder incomplete
        shard_stats.write_stats(out_dir, shard.name, {"status": shard_stats.PENDING, "run": run_meta, "result": {"shard": shard.name, "url": shard.url}})
    _write_manifest(out_dir)
    results: dict[str, ShardResult] = {r.shard: r for r in finished}
    pairs_done = 0

    def on_rows(shard_name: str, rows: int) -> None:
        nonlocal pairs_done
        pairs_done += rows
        if progress:
            progress(ScoreProgress(sum(1 for s in shards if s.name in results), len(shards), pairs_done, shard_name))

    refreshed = time.perf_counter()
    for result in _executor(config.executor).run(pending, loaded, out_dir, config, on_rows):
        results[result.shard] = result
        on_rows(result.shard, 0)
        if time.perf_counter() - refreshed > MANIFEST_REFRESH_SECONDS:
            _write_manifest(out_dir)  # for people watching; readers derive it from the stats files
            refreshed = time.perf_counter()
    _write_manifest(out_dir)
    ordered = [results[s.name] for s in shards]
    return _summarize(out_dir, ordered, time.perf_counter() - start, pairs_done)


def _executor(spec: ExecutorSpec):
    if spec.kind == "ray":
        from clipguard.executors.ray import RayExecutor  # ray is an optional extra

        return RayExecutor(spec)
    return LocalExecutor()


class LocalExecutor:
    """Shards through DataLoader workers that decode while this process embeds."""

    def run(
        self, pending: list[Shard], loaded: LoadedModel, out_dir: OutputFolder, config: ScoreConfig,
        on_rows: Callable[[str, int], None],
    ) -> Iterator[ShardResult]:
        run_meta = _run_metadata(loaded, config)
        embedder = ShardEmbedder(loaded, config.batch_size, config.trim_text)
        buffers: dict[str, _ShardBuffer] = {}
        with inference_threads(config.threads):
            for chunk in _chunk_stream(pending, loaded, config):
                # Chunks of one shard arrive in order; other workers' shards may interleave with them.
                buffer = buffers.setdefault(chunk.shard.name, _ShardBuffer())
                buffer.add(chunk, embedder)
                on_rows(chunk.shard.name, len(chunk.rows))
                if chunk.last:
                    yield _finish_shard(chunk, buffers.pop(chunk.shard.name), out_dir, run_meta, config)


def inference_threads(threads: int | None) -> contextlib.AbstractContextManager[None]:
    return thread_count(torch.get_num_threads, torch.set_num_threads, threads)


def score_shard(
    shard: Shard, model: ModelSpec | LoadedModel, config: ScoreConfig, out_dir: Path | str | OutputFolder
) -> ShardResult:
    """Score one shard into ``out_dir`` (a folder or an object-store URL): its Parquet file and
    stats file, each appearing whole. A `ModelSpec` is loaded once per process and kept."""
    _check_embeddings_destination(shard_stats.as_folder(out_dir), config)
    loaded = model if isinstance(model, LoadedModel) else cached_model(model)
    embedder = ShardEmbedder(loaded, config.batch_size, config.trim_text)
    buffer = _ShardBuffer()
    chunks = ShardChunks([shard], loaded.preprocess, loaded.tokenizer, config.batch_size, config.limits,
                         patches=config.save_embeddings)
    for chunk in chunks.shard_chunks(shard):
        buffer.add(chunk, embedder)
    return _finish_shard(chunk, buffer, shard_stats.as_folder(out_dir), _run_metadata(loaded, config), config)


@functools.lru_cache(maxsize=2)
def cached_model(spec: ModelSpec) -> LoadedModel:
    """One model per worker process, built from what the driver asked for."""
    return load_model(spec)


def _chunk_stream(pending: list[Shard], loaded: LoadedModel, config: ScoreConfig):
    if not pending:
        return iter(())
    dataset = ShardChunks(pending, loaded.preprocess, loaded.tokenizer, config.batch_size, config.limits,
                          patches=config.save_embeddings)
    workers = min(config.workers, len(pending))
    if workers == 0:
        return iter(dataset)
    loader = DataLoader(
        dataset, batch_size=None, num_workers=workers, collate_fn=passthrough_collate, prefetch_factor=4,
        pin_memory=loaded.info.device.startswith("cuda"),
    )
    return iter(loader)


class _ShardBuffer:
    """Rows and embeddings of one shard, kept until its last chunk arrives."""

    def __init__(self):
        self.chunks: list[Chunk] = []
        self.similarities: list[np.ndarray] = []
        self.image_embeddings: list[np.ndarray | None] = []
        self.text_embeddings: list[np.ndarray | None] = []
        # One cache per shard: a shard's scores must not depend on which shards came before it.
        self.cache = EmbeddingCache()
        self.seconds = {"read_seconds": 0.0, "decode_seconds": 0.0, "infer_seconds": 0.0}

    def add(self, chunk: Chunk, embedder: ShardEmbedder) -> None:
        self.seconds["read_seconds"] += chunk.read_seconds
        self.seconds["decode_seconds"] += chunk.decode_seconds
        started = time.perf_counter()
        embeddings = embedder.embed(chunk, self.cache)
        self.seconds["infer_seconds"] += time.perf_counter() - started
        similarity = np.full(len(chunk.rows), np.nan, dtype=np.float32)
        if embeddings is not None:
            sims = (embeddings.image * embeddings.text).sum(dim=-1).numpy()
            similarity[chunk.ok_index] = sims
            dim = embeddings.image.shape[1]
            image = np.full((len(chunk.rows), dim), np.nan, dtype=np.float32)
            text = np.full((len(chunk.rows), dim), np.nan, dtype=np.float32)
            image[chunk.ok_index] = embeddings.image.numpy()
            text[chunk.ok_index] = embeddings.text.numpy()
            self.image_embeddings.append(image)
            self.text_embeddings.append(text)
        else:
            self.image_embeddings.append(None)
            self.text_embeddings.append(None)
        chunk.pixels = chunk.tokens = None
        self.chunks.append(chunk)
        self.similarities.append(similarity)


def _finish_shard(last: Chunk, buffer: _ShardBuffer, out_dir: OutputFolder, run_meta: dict, config: ScoreConfig) -> ShardResult:
    """Score file (and embeddings) first, each made visible whole; then the stats that mark the
    shard finished, so a reader never sees stats whose score file is still to come."""
    started = time.perf_counter()
    result = _write_shard(last, buffer, out_dir.staging, run_meta, config)
    if not result.failed:
        out_dir.publish(score_path(out_dir.staging, result.shard).name)  # embeddings: local only, in place
    status = shard_stats.FAILED if result.failed else shard_stats.COMPLETE
    seconds = {**buffer.seconds, "write_seconds": time.perf_counter() - started}
    shard_stats.write_stats(
        out_dir, result.shard,
        {"status": status, "result": asdict(result), "run": run_meta, "seconds": {k: round(v, 6) for k, v in seconds.items()}},
    )
    return result


def _write_shard(last: Chunk, buffer: _ShardBuffer, out_dir: Path, run_meta: dict, config: ScoreConfig) -> ShardResult:
    rows = [row for chunk in buffer.chunks for row in chunk.rows]
    similarity = np.concatenate(buffer.similarities) if buffer.similarities else np.zeros(0, np.float32)
    report = last.report
    errors = Counter(_reason_class(row.error) for row in rows if row.error)
    result = ShardResult(
        shard=last.shard.name,
        url=last.shard.url,
        score_file=score_path(out_dir, last.shard.name).name,
        samples=len(rows),
        ok=len(rows) - sum(errors.values()),
        errors=sum(errors.values()),
        errors_by_reason=dict(errors),
        caption_truncated=sum(r.caption_truncated for r in rows),
        caption_invalid_utf8=sum(r.caption_invalid_utf8 for r in rows),
        truncated=report.truncated,
        read_error=report.read_error,
        skipped_members=report.skipped_members,
        failed=report.failed,
        source={"location": last.shard.location, **(last.shard.local_stat() or {})},
        scrape=last.scrape.to_dict() if last.scrape is not None else None,
    )
    if result.failed:
        score_path(out_dir, last.shard.name).unlink(missing_ok=True)
        return result  # no score file: the shard is not finished, and a rerun reads it again
    if config.save_embeddings:
        _save_shard_embeddings(out_dir, last.shard.name, buffer, len(rows))
    # Error rows have NaN similarity in memory and null in the file.
    cosine = [None if np.isnan(v) else float(v) for v in similarity]
    columns = {
        "key": [r.key for r in rows],
        "shard": [last.shard.name] * len(rows),
        "cosine_similarity": cosine,
        "cosine_distance": [None if v is None else 1.0 - v for v in cosine],
        "status": ["error" if r.error else "ok" for r in rows],
        "error": [r.error for r in rows],
        "caption_tokens": [r.caption_tokens for r in rows],
        "caption_truncated": [r.caption_truncated for r in rows],
        "caption_invalid_utf8": [r.caption_invalid_utf8 for r in rows],
        "caption_clipped": [r.caption_clipped for r in rows],
        "image_sha256": [r.image_sha256 for r in rows],
        "uid": [r.source.uid for r in rows],
        "url": [r.source.url for r in rows],
        "source_status": [r.source.source_status for r in rows],
        "source_error": [r.source.source_error for r in rows],
    }
    write_score_table(score_path(out_dir, last.shard.name), columns, {**run_meta, "shard": asdict(result)})
    return result


def _check_embeddings_destination(out_dir: OutputFolder, config: ScoreConfig) -> None:
    if config.save_embeddings and not out_dir.is_local:
        raise ClipguardError(
            f"--save-embeddings writes clip-retrieval's folders (img_emb/, text_emb/, metadata/) into a local "
            f"--out, not {out_dir}; score into a local folder and copy it up"
        )


def _save_shard_embeddings(out_dir: Path, name: str, buffer: _ShardBuffer, n_rows: int) -> None:
    """clip-retrieval's layout for this shard: only the ok rows, so that an index built from
    img_emb/ holds one vector per scored pair; the error rows are listed beside it."""
    image_path, text_path, metadata_path = embedding_paths(out_dir, name)
    dims = [e.shape[1] for e in buffer.image_embeddings if e is not None]
    dim = dims[0] if dims else 0
    rows = [row for chunk in buffer.chunks for row in chunk.rows]
    ok = np.array([row.error is None for row in rows], dtype=bool)
    for path, parts in ((image_path, buffer.image_embeddings), (text_path, buffer.text_embeddings)):
        blocks = [p if p is not None else np.full((len(c.rows), dim), np.nan, np.float32) for p, c in zip(parts, buffer.chunks)]
        array = np.concatenate(blocks) if blocks else np.zeros((0, dim), np.float32)
        assert len(array) == n_rows
        write_embeddings(path, array[ok])
    kept = [row for row in rows if row.error is None]
    write_parquet(metadata_path, pa.table({
        "key": pa.array([r.key for r in kept], pa.string()),
        "shard": pa.array([name] * len(kept), pa.string()),
        "caption": pa.array([r.caption for r in kept], pa.string()),
        "image_sha256": pa.array([r.image_sha256 for r in kept], pa.string()),
        # For the audit's stamped-images test (`clipguard.signals.patches`).
        "image_patches": pa.array([list(r.patches) for r in kept], pa.list_(pa.uint64())),
    }))
    left_out = [row for row in rows if row.error is not None]
    write_parquet(left_out_path(out_dir, name), pa.table({
        "key": pa.array([r.key for r in left_out], pa.string()),
        "shard": pa.array([name] * len(left_out), pa.string()),
        "error": pa.array([r.error for r in left_out], pa.string()),
    }))


def _reason_class(error: str) -> str:
    """'corrupt_image: OSError: ...' -> 'corrupt_image' for counting."""
    return error.split(":", 1)[0]


def _run_metadata(loaded: LoadedModel, config: ScoreConfig) -> dict:
    return {
        "clipguard_version": clipguard.__version__,
        "model": loaded.info.to_dict(),
        "fingerprint": loaded.info.fingerprint(),
        "batch_size": config.batch_size,
        "trim_text": config.trim_text,
        "limits": asdict(config.limits),
    }


def _split_finished(shards: list[Shard], out_dir: OutputFolder, run_meta: dict, config: ScoreConfig):
    finished, pending = [], []
    for shard in shards:
        recorded = _finished_record(out_dir, shard.name)
        if recorded is None:
            pending.append(shard)
            continue
        if recorded.get("fingerprint") != run_meta["fingerprint"]:
            raise ClipguardError(
                f"{out_dir} already holds scores for shard {shard.name} from a different model or "
                "precision; score into a new --out folder"
            )
        source = (recorded.get("shard") or {}).get("source") or {}
        if source.get("location") not in (None, shard.location):
            raise ClipguardError(
                f"{out_dir} already holds scores for a different shard named {shard.name} (from "
                f"{source.get('location')}, not {shard.location}); score into a new --out folder"
            )
        stat = shard.local_stat()
        if stat is not None and any(source.get(k) != v for k, v in stat.items()):
            pending.append(shard)  # rewritten since it was scored: its old scores are stale
            continue
        if config.save_embeddings and not all(p.is_file() for p in embedding_paths(Path(out_dir.location), shard.name)):
            pending.append(shard)
            continue
        finished.append(ShardResult(**{**recorded["shard"], "skipped_on_resume": True}))
    return finished, pending


def _finished_record(out_dir: OutputFolder, shard_name: str) -> dict | None:
    """What a finished shard's files record (its fingerprint and result); None where it must be
    scored (again). Read from the stats file, so an object store is asked for one small file."""
    stats = shard_stats.read_stats(out_dir, shard_name)
    score_file = score_path(Path("."), shard_name).name
    if stats is None:  # a folder from before stats files: the score file's own metadata
        return read_metadata(out_dir.fetch(score_file)) if out_dir.exists(score_file) else None
    if stats["status"] != shard_stats.COMPLETE or not out_dir.exists(score_file):
        return None
    return {"fingerprint": (stats.get("run") or {}).get("fingerprint"), "shard": stats.get("result") or {}}


def _write_manifest(out_dir: OutputFolder) -> None:
    """``manifest.json``: the folder summary, for people; readers derive it from the stats files."""
    try:
        summary = shard_stats.folder_summary(out_dir)
        out_dir.write_bytes(MANIFEST_NAME, (json.dumps(summary, indent=2) + "\n").encode())
    except shard_stats.NotAScoreFolderError:
        pass  # nothing claimed or scored yet (an empty shard list)


def _summarize(folder: OutputFolder, results: list[ShardResult], wall: float, pairs_this_run: int) -> ScoreSummary:
    reasons: Counter = Counter()
    for r in results:
        if not r.failed:
            reasons.update(r.errors_by_reason)
    quantiles: dict[str, float] = {}
    out_dir = Path(folder.location) if folder.is_local else folder.location
    if folder.is_local and any(r.samples and not r.failed for r in results):  # remote: not fetched back
        distances = read_scores(out_dir).cosine_distance
        distances = distances[~np.isnan(distances)]
        if len(distances):
            for q in (0.01, 0.1, 0.5, 0.9, 0.99):
                quantiles[f"p{int(q * 100)}"] = float(np.quantile(distances, q))
            quantiles["max"] = float(distances.max())
    written = [r for r in results if not r.failed]
    return ScoreSummary(
        out_dir=out_dir,
        shards=results,
        pairs=sum(r.samples for r in written),
        ok=sum(r.ok for r in written),
        errors_by_reason=dict(reasons),
        distance_quantiles=quantiles,
        wall_seconds=wall,
        pairs_scored_this_run=pairs_this_run,
    )


def load_manifest(out_dir: Path) -> dict:
    """The score folder's summary, derived from its per-shard files (one model, checked)."""
    if not Path(out_dir).is_dir():
        raise ClipguardError(f"{out_dir} is not a folder; it is not a clipguard score folder")
    return shard_stats.folder_summary(out_dir)
