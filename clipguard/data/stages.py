"""The shard reading pipeline, once, as small generator stages (Iterator -> Iterator).

    shards -> open_shards -> tar_members -> group_by_key      read_shards (stages in data/tarstream.py)
           -> decode_pairs [-> with_patch_signatures]
           -> preprocess_images                               prepare_pairs   (read_pairs: all of these)
           -> batched -> tokenize_batches

Scoring, training, evaluation and the bundled-model recipe all read through these; each picks an
error policy (`clipguard.data.handlers`) and the stages after reading it needs. Every shard ends
with a `ShardEnd` carrying its `ShardReport`, failed shards too, so per-shard accounting happens
wherever the stream is consumed; `without_shard_ends` drops those marks for a consumer that only
wants samples. Preprocessing is per sample, tokenizing per batch (tokenizers are batched).

Nothing here imports torch: ``preprocess`` and ``tokenize`` are the model's own callables.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from clipguard.data.handlers import Handler, reraise
from clipguard.data.pairs import DecodeLimits, Pair, decode_pair
from clipguard.data.shardspec import Shard
from clipguard.data.tarstream import RawSample, ShardEnd, ShardReport, group_by_key, open_shards, tar_members
from clipguard.signals.patches import patch_signature


@dataclass
class Decoded:
    """A sample on its way to the model: what decoding made of it and, once preprocessed, the
    model's input pixels (set exactly when ``ok``)."""

    pair: Pair
    sample: RawSample | None = None  # the raw sample, for consumers that read more of its fields
    pixels: Any = None
    patches: Any = None  # `signals.patches.patch_signature` of the image, where `with_patch_signatures` ran

    @property
    def ok(self) -> bool:
        return self.pair.ok


@dataclass
class TokenizedBatch:
    items: list[Decoded | ShardEnd]
    tokens: Any  # tokenize(captions of ``ready``), None when no item is ok

    @property
    def ready(self) -> list[Decoded]:
        return _ready(self.items)


def read_shards(
    shards: Iterable[Shard],
    limits: DecodeLimits = DecodeLimits(),
    handler: Handler = reraise,
    keep_oversized: bool = False,
    report_for: Callable[[Shard], ShardReport] | None = None,
) -> Iterator[RawSample | ShardEnd]:
    """open -> members -> group by key."""
    opened = open_shards(shards, handler, report_for)
    return group_by_key(tar_members(opened, limits.max_member_bytes, keep_oversized, handler))


def prepare_pairs(
    items: Iterable[RawSample | ShardEnd], limits: DecodeLimits, preprocess: Callable | None = None,
    patches: bool = False,
) -> Iterator[Decoded | ShardEnd]:
    """decode -> patch signatures (when asked) -> preprocess (when given)."""
    decoded = decode_pairs(items, limits)
    if patches:
        decoded = with_patch_signatures(decoded)
    return preprocess_images(decoded, preprocess) if preprocess is not None else decoded


def read_pairs(
    shards: Iterable[Shard], limits: DecodeLimits, handler: Handler = reraise, preprocess: Callable | None = None
) -> Iterator[Decoded | ShardEnd]:
    """The whole reading pipeline up to batching: shards in, decoded (and preprocessed) pairs out."""
    return prepare_pairs(read_shards(shards, limits, handler), limits, preprocess)


def with_patch_signatures(items: Iterable[Decoded | ShardEnd]) -> Iterator[Decoded | ShardEnd]:
    """The decoded image's patch signatures (for the audit's stamped-images test), taken before
    preprocessing drops the image."""
    for item in items:
        if isinstance(item, Decoded) and item.ok:
            item.patches = patch_signature(item.pair.image)
        yield item


def decode_pairs(items: Iterable[RawSample | ShardEnd], limits: DecodeLimits) -> Iterator[Decoded | ShardEnd]:
    for item in items:
        yield Decoded(decode_pair(item, limits), item) if isinstance(item, RawSample) else item


def preprocess_images(items: Iterable[Decoded | ShardEnd], preprocess: Callable) -> Iterator[Decoded | ShardEnd]:
    for item in items:
        if isinstance(item, Decoded):
            _preprocess(item, preprocess)
        yield item


def _preprocess(item: Decoded, preprocess: Callable) -> None:
    pair = item.pair
    if pair.ok:
        try:
            item.pixels = preprocess(pair.image)
        except Exception as exc:  # a transform failing on an odd image must not end the run
            pair.error = f"preprocess_failed: {type(exc).__name__}: {str(exc)[:120]}"
    pair.image = None  # PIL images are large and need not go further (nor cross a process boundary)


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Lists of ``size`` items (shard marks count as items), the last one possibly shorter."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_batches(batches: Iterable[list[Decoded | ShardEnd]], tokenize: Callable) -> Iterator[TokenizedBatch]:
    for batch in batches:
        ready = _ready(batch)
        yield TokenizedBatch(batch, tokenize([item.pair.caption for item in ready]) if ready else None)


def without_shard_ends(items: Iterable[Any], keep_failed: bool = False) -> Iterator[Any]:
    """Drop the shard marks (all, or all but those of shards that could not be read in full)."""
    for item in items:
        if not isinstance(item, ShardEnd) or (keep_failed and item.report.read_error):
            yield item


def _ready(items: list[Decoded | ShardEnd]) -> list[Decoded]:
    return [item for item in items if isinstance(item, Decoded) and item.ok]
