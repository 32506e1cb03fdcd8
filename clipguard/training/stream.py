"""Training data: shards -> shuffled, decoded, preprocessed pairs -> full batches.

Worker side (``TrainPairs``): each DataLoader worker owns whole shards, reads them through the
shared reading stages (`clipguard.data.stages`), shuffles raw samples in a bounded buffer (raw
bytes are small; preprocessed pixels are not), then decodes, preprocesses and tokenizes,
yielding chunks of prepared pairs together with the samples that could not be used and why.
Main side (``batches``): chunks -> batches of exactly ``batch_size``, counting every skipped
sample in a ``BadSampleTally``.

Order is a pure function of (seed, epoch, worker count): the shard order is permuted per epoch,
each worker's buffer has its own seeded generator, and the DataLoader returns worker outputs in a
fixed round-robin order. Resuming therefore only needs the epoch and the number of batches done.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipguard.data.handlers import record_and_continue
from clipguard.data.pairs import DecodeLimits
from clipguard.data.shardspec import Shard
from clipguard.data.stages import (
    TokenizedBatch,
    batched,
    prepare_pairs,
    read_shards,
    tokenize_batches,
    without_shard_ends,
)
from clipguard.data.tarstream import RawSample, ShardEnd
from clipguard.training.config import BadSampleTally

CHUNK_SIZE = 32  # prepared pairs per worker message: fewer, larger inter-process transfers
_SHARD_ORDER_STREAM, _BUFFER_STREAM = 0, 1


@dataclass
class Skipped:
    shard: str
    key: str
    error: str


@dataclass
class PreparedChunk:
    pixels: torch.Tensor | None  # [n, 3, H, W]
    tokens: torch.Tensor | None  # [n, context]
    skipped: list[Skipped] = field(default_factory=list)
    shard_problems: list[tuple[str, str]] = field(default_factory=list)  # (shard, error)


@dataclass
class Batch:
    pixels: torch.Tensor
    tokens: torch.Tensor

    def __len__(self) -> int:
        return int(self.pixels.shape[0])


def shard_order(shards: list[Shard], seed: int, epoch: int, shuffle: bool) -> list[Shard]:
    if not shuffle:
        return list(shards)
    permutation = np.random.default_rng([seed, epoch, _SHARD_ORDER_STREAM]).permutation(len(shards))
    return [shards[i] for i in permutation]


def buffer_shuffle(items: Iterable[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """WebDataset-style shuffle: a sample leaves the buffer at a random slot when a new one enters.
    Shard marks pass straight through; they have no place in the sample order."""
    buffer: list[RawSample] = []
    for item in items:
        if not isinstance(item, RawSample):
            yield item
            continue
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = int(rng.integers(size))
        yield buffer[slot]
        buffer[slot] = item
    for slot in rng.permutation(len(buffer)):
        yield buffer[int(slot)]


class TrainPairs(IterableDataset):
    """One pass over the shards for a given epoch, as ``PreparedChunk``s."""

    def __init__(
        self,
        shards: list[Shard],
        preprocess: Callable,
        tokenizer: Callable,
        seed: int,
        shuffle_buffer: int,
        limits: DecodeLimits | None = None,
    ):
        super().__init__()
        self.shards = shards
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.limits = limits or DecodeLimits()
        self.epoch = 0

    def __iter__(self) -> Iterator[PreparedChunk]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        shuffle = self.shuffle_buffer > 1
        mine = shard_order(self.shards, self.seed, self.epoch, shuffle)[worker::workers]
        # Raw samples are shuffled (their bytes are small), then decoded: the reading stages with
        # shuffling in between. Only the ends of shards that failed go on, to be counted.
        items: Iterable[Any] = without_shard_ends(read_shards(mine, self.limits, record_and_continue), keep_failed=True)
        if shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, _BUFFER_STREAM, worker])
            items = buffer_shuffle(items, self.shuffle_buffer, rng)
        prepared = prepare_pairs(items, self.limits, self.preprocess)
        for batch in tokenize_batches(batched(prepared, CHUNK_SIZE), self.tokenizer):
            yield prepared_chunk(batch)


def prepared_chunk(batch: TokenizedBatch) -> PreparedChunk:
    chunk = PreparedChunk(pixels=None, tokens=None)
    for item in batch.items:
        if isinstance(item, ShardEnd):
            chunk.shard_problems.append((item.report.shard, item.report.read_error or "unknown"))
        elif not item.ok:
            chunk.skipped.append(Skipped(item.sample.shard, item.pair.key, item.pair.error))
    ready = batch.ready
    if ready:
        chunk.pixels = torch.stack([item.pixels for item in ready])
        chunk.tokens = batch.tokens
    return chunk


def _passthrough(item):
    return item


def chunk_loader(dataset: TrainPairs, workers: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        collate_fn=_passthrough,
        # A fresh loader per epoch; forked workers start in milliseconds.
        persistent_workers=False,
    )


def batches(
    chunks: Iterable[PreparedChunk], batch_size: int, tally: BadSampleTally | None, replay: int = 0
) -> Iterator[Batch]:
    """Full batches only: a contrastive batch's size sets the task's difficulty and the loss scale.

    The first ``replay`` batches are formed but not yielded, and nothing read while forming them
    is counted: a resumed run passes over the part of the epoch it has already trained on, whose
    bad samples the checkpoint has already counted. ``tally`` None counts nothing at all.
    """
    pixels: list[torch.Tensor] = []
    tokens: list[torch.Tensor] = []
    held = formed = 0
    for chunk in chunks:
        if tally is not None and formed >= replay:
            for skipped in chunk.skipped:
                tally.add(skipped.shard, skipped.key, skipped.error)
            for shard, error in chunk.shard_problems:
                tally.add_shard_problem(shard, error)
        if chunk.pixels is None:
            continue
        offset, n = 0, int(chunk.pixels.shape[0])
        while offset < n:
            take = min(batch_size - held, n - offset)
            pixels.append(chunk.pixels[offset : offset + take])
            tokens.append(chunk.tokens[offset : offset + take])
            held += take
            offset += take
            if held == batch_size:
                formed += 1
                if formed > replay:
                    yield Batch(torch.cat(pixels), torch.cat(tokens))
                pixels, tokens, held = [], [], 0
    if tally is not None and formed >= replay:
        tally.partial_batch_dropped += held


def count_raw_samples(shards: list[Shard]) -> int:
    """Samples in the shards, undecoded: sizes the learning-rate schedule when epochs set its
    length. Unusable samples are included, so the estimate can only be too long, never too short."""
    return sum(1 for _ in without_shard_ends(read_shards(shards, handler=record_and_continue)))
