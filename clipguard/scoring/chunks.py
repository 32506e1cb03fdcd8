"""Worker side of scoring: shards -> chunks of decoded, preprocessed, tokenized pairs
(the reading stages of `clipguard.data.stages`, batched per shard).

Runs inside DataLoader workers so that JPEG decoding overlaps with inference in the main
process. Each worker owns whole shards, and a shard is cut into chunks the same way every time,
so a shard's scores never depend on which worker read it or what was read before it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import IterableDataset, get_worker_info

from clipguard.data.handlers import record_and_continue
from clipguard.data.pairs import DecodeLimits, Pair
from clipguard.data.shardspec import Shard
from clipguard.data.sourcemeta import ScrapeReport, ScrapeSidecar, SourceMeta, read_sidecar
from clipguard.data.stages import Decoded, TokenizedBatch, batched, prepare_pairs, preprocess_images, read_shards, tokenize_batches
from clipguard.data.tarstream import ShardEnd, ShardReport
from clipguard.model.encoding import TokenizedCaptions, tokenize


@dataclass
class RowMeta:
    """One input sample, whatever became of it."""

    key: str
    error: str | None
    image_sha256: str | None
    caption: str | None
    caption_tokens: int = 0
    caption_truncated: bool = False
    caption_invalid_utf8: bool = False
    caption_clipped: bool = False
    source: SourceMeta = field(default_factory=SourceMeta)
    patches: tuple[int, ...] = ()  # the image's patch signatures (`clipguard.signals.patches`)


@dataclass
class Chunk:
    shard: Shard
    rows: list[RowMeta]
    pixels: torch.Tensor | None  # [n_ok, 3, H, W] for rows with error None, in row order
    tokens: torch.Tensor | None  # [n_ok, context]
    last: bool = False
    report: ShardReport | None = None  # set on the last chunk of a shard
    ok_index: list[int] = field(default_factory=list)  # row positions of the ok rows
    read_seconds: float = 0.0  # reading tar members for this chunk's rows
    decode_seconds: float = 0.0  # decoding, preprocessing and tokenizing them
    scrape: ScrapeReport | None = None  # img2dataset's account of the shard, on its last chunk

    def pin_memory(self) -> "Chunk":
        """Called by a DataLoader with pin_memory=True: page-locked tensors copy to a GPU
        asynchronously, overlapping the copy with the previous batch's inference."""
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        if self.tokens is not None:
            self.tokens = self.tokens.pin_memory()
        return self


class ShardChunks(IterableDataset):
    """Yields chunks of up to ``chunk_size`` rows; every shard ends with a chunk marked last."""

    def __init__(
        self,
        shards: list[Shard],
        preprocess: Callable,
        tokenizer: Callable,
        chunk_size: int,
        limits: DecodeLimits,
        patches: bool = False,
    ):
        super().__init__()
        self.shards = shards
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.chunk_size = chunk_size
        self.limits = limits
        # Patch signatures travel only in the embeddings' metadata (`score --save-embeddings`, for
        # the audit); without it they would be computed for nothing on every image.
        self.patches = patches

    def __iter__(self) -> Iterator[Chunk]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for index, shard in enumerate(self.shards):
            if index % workers == worker:
                yield from self.shard_chunks(shard)

    def shard_chunks(self, shard: Shard) -> Iterator[Chunk]:
        # A failed shard is recorded in its report, which rides on the shard's last chunk.
        clock = _StageClock()
        raw = clock.timed(read_shards([shard], self.limits, record_and_continue))
        items = prepare_pairs(raw, self.limits, self.preprocess, patches=self.patches)
        sidecar = read_sidecar(shard)
        resumed = time.perf_counter()
        for batch in tokenize_batches(batched(items, self.chunk_size), self.tokenize_captions):
            chunk = clock.stamp(chunk_of(shard, batch), time.perf_counter() - resumed)
            with_sidecar(chunk, sidecar)
            yield chunk
            resumed = time.perf_counter()  # the consumer's time between chunks is not ours

    def make_chunk(self, shard: Shard, pairs: list[Pair]) -> Chunk:
        """A chunk of pairs decoded elsewhere (canaries), through the same preprocess and tokenize."""
        items = list(preprocess_images([Decoded(pair) for pair in pairs], self.preprocess))
        return chunk_of(shard, next(tokenize_batches([items], self.tokenize_captions)))

    def tokenize_captions(self, captions: list[str]) -> TokenizedCaptions:
        return tokenize(self.tokenizer, captions)


def chunk_of(shard: Shard, batch: TokenizedBatch) -> Chunk:
    ready = batch.ready
    tokens = batch.tokens
    lengths = {id(item): (n, cut) for item, n, cut in zip(ready, tokens.n_tokens, tokens.truncated)} if ready else {}
    decoded = [item for item in batch.items if isinstance(item, Decoded)]
    end = batch.items[-1] if batch.items and isinstance(batch.items[-1], ShardEnd) else None
    return Chunk(
        shard=shard,
        rows=[_row(item, *lengths.get(id(item), (0, False))) for item in decoded],
        pixels=torch.stack([item.pixels for item in ready]) if ready else None,
        tokens=tokens.tokens if ready else None,
        last=end is not None,
        report=end.report if end is not None else None,
        ok_index=[position for position, item in enumerate(decoded) if item.ok],
    )


def with_sidecar(chunk: Chunk, sidecar: ScrapeSidecar) -> None:
    """Fill what a sample's .json lacked from img2dataset's parquet, by key."""
    if sidecar.by_key:
        for row in chunk.rows:
            row.source = row.source.filled_from(sidecar.meta(row.key))
    if chunk.last:
        chunk.scrape = sidecar.report


def _row(item: Decoded, n_tokens: int, truncated: bool) -> RowMeta:
    pair = item.pair
    return RowMeta(
        key=pair.key,
        error=pair.error,
        image_sha256=pair.image_sha256,
        caption=pair.caption,
        caption_tokens=n_tokens,
        caption_truncated=truncated,
        caption_invalid_utf8=pair.caption_invalid_utf8,
        caption_clipped=pair.caption_clipped,
        source=pair.source,
        patches=tuple(int(v) for v in item.patches) if item.patches is not None else (),
    )


class _StageClock:
    """Seconds spent reading tar members, and the rest of a chunk's making (decoding,
    preprocessing, tokenizing), for the shard's stats."""

    def __init__(self):
        self.read = 0.0

    def timed(self, items: Iterator) -> Iterator:
        iterator = iter(items)
        while True:
            started = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                self.read += time.perf_counter() - started
                return
            self.read += time.perf_counter() - started
            yield item

    def stamp(self, chunk: Chunk, seconds: float) -> Chunk:
        chunk.read_seconds, self.read = self.read, 0.0
        chunk.decode_seconds = max(seconds - chunk.read_seconds, 0.0)
        return chunk


def passthrough_collate(batch):
    """Chunks are already batches; the DataLoader must not try to stack them."""
    return batch
