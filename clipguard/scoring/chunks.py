"""Worker-side stage: shards -> chunks of decoded, preprocessed, tokenized pairs.

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

from clipguard.data.pairs import DecodeLimits, Pair, decode_pair
from clipguard.data.shardspec import Shard
from clipguard.data.tarstream import ShardReport, iter_samples
from clipguard.model.encoding import tokenize


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
    ):
        super().__init__()
        self.shards = shards
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.chunk_size = chunk_size
        self.limits = limits

    def __iter__(self) -> Iterator[Chunk]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for index, shard in enumerate(self.shards):
            if index % workers == worker:
                yield from self.shard_chunks(shard)

    def shard_chunks(self, shard: Shard) -> Iterator[Chunk]:
        report = ShardReport(shard=shard.name, url=shard.url)
        pending: list[Pair] = []
        clock = _StageClock()
        samples = iter_samples(shard, report, self.limits.max_member_bytes)
        while (sample := clock.timed_next("read", samples)) is not None:
            pending.append(clock.timed("decode", decode_pair, sample, self.limits))
            if len(pending) == self.chunk_size:
                yield clock.stamp(clock.timed("decode", self.make_chunk, shard, pending))
                pending = []
        chunk = clock.stamp(clock.timed("decode", self.make_chunk, shard, pending))
        chunk.last, chunk.report = True, report
        yield chunk

    def make_chunk(self, shard: Shard, pairs: list[Pair]) -> Chunk:
        pixels, ok_pairs = [], []
        for pair in pairs:
            if pair.ok:
                try:
                    pixels.append(self.preprocess(pair.image))
                    ok_pairs.append(pair)
                except Exception as exc:  # a transform failing on odd modes must not end the run
                    pair.error = f"preprocess_failed: {type(exc).__name__}: {str(exc)[:120]}"
            pair.image = None  # PIL images are large and need not cross the process boundary
        tokenized = tokenize(self.tokenizer, [p.caption for p in ok_pairs]) if ok_pairs else None
        lengths = dict(zip((id(p) for p in ok_pairs), zip(tokenized.n_tokens, tokenized.truncated))) if ok_pairs else {}
        rows, ok_index = [], []
        for position, pair in enumerate(pairs):
            n_tokens, truncated = lengths.get(id(pair), (0, False))
            if pair.ok:
                ok_index.append(position)
            rows.append(
                RowMeta(
                    key=pair.key,
                    error=pair.error,
                    image_sha256=pair.image_sha256,
                    caption=pair.caption,
                    caption_tokens=n_tokens,
                    caption_truncated=truncated,
                    caption_invalid_utf8=pair.caption_invalid_utf8,
                    caption_clipped=pair.caption_clipped,
                )
            )
        return Chunk(
            shard=shard,
            rows=rows,
            pixels=torch.stack(pixels) if pixels else None,
            tokens=tokenized.tokens if tokenized else None,
            ok_index=ok_index,
        )


class _StageClock:
    """Seconds spent reading and decoding since the last chunk, for the shard's stats."""

    def __init__(self):
        self.seconds = {"read": 0.0, "decode": 0.0}

    def timed(self, stage: str, fn, *args):
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds[stage] += time.perf_counter() - start

    def timed_next(self, stage: str, iterator):
        return self.timed(stage, next, iterator, None)

    def stamp(self, chunk: Chunk) -> Chunk:
        chunk.read_seconds, chunk.decode_seconds = self.seconds["read"], self.seconds["decode"]
        self.seconds = {"read": 0.0, "decode": 0.0}
        return chunk


def passthrough_collate(batch):
    """Chunks are already batches; the DataLoader must not try to stack them."""
    return batch
