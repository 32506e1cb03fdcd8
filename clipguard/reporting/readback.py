"""Read pairs back from the scored shards: bounded thumbnails of chosen pairs, class labels of all.

The shards are streamed through the same safe reader as scoring (nothing extracted, member sizes
and pixels bounded). One pass per shard serves both needs; a chosen pair is turned into a small
JPEG as soon as it is read, so memory holds thumbnails, never a shard's raw images. A shard that
cannot be read, or a pair that is no longer in its shard, gives a thumbnail without a picture
and with the reason, so the report shows a placeholder instead of failing.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from clipguard.data.pairs import DecodeLimits, decode_pair, read_caption
from clipguard.data.shardspec import Shard
from clipguard.data.tarstream import ShardReport, iter_samples
from clipguard.labels import Label, Labeler

PairId = tuple[str, str]  # (shard name, key)
THUMBNAIL_PIXELS = 160
THUMBNAIL_QUALITY = 80
# Decode large JPEGs at a reduced scale: a thumbnail never needs full resolution.
THUMBNAIL_LIMITS = DecodeLimits(draft_size=2 * THUMBNAIL_PIXELS)
SHARD_UNREADABLE = "shard_unreadable"


@dataclass(frozen=True)
class Thumbnail:
    """A pair as the report shows it: a data: URI, or None with the reason there is no picture."""

    shard: str
    key: str
    data_uri: str | None
    caption: str | None
    problem: str | None = None


@dataclass
class ReadBack:
    thumbnails: dict[PairId, Thumbnail] = field(default_factory=dict)
    labels: dict[PairId, Label] = field(default_factory=dict)  # only when a labeler was given
    unreadable_shards: dict[str, str] = field(default_factory=dict)  # shard -> reason


def read_back(
    shard_urls: dict[str, str],
    wanted: Iterable[PairId],
    labeler: Labeler | None = None,
    allow_pipe: bool = False,
) -> ReadBack:
    """Thumbnails of ``wanted``; with a labeler, also a label for every pair of every shard."""
    wanted_by_shard: dict[str, set[str]] = {}
    for shard, key in wanted:
        wanted_by_shard.setdefault(shard, set()).add(key)
    names = list(shard_urls) if labeler is not None else list(wanted_by_shard)
    names += [s for s in wanted_by_shard if s not in names]
    result = ReadBack()
    for name in names:
        keys = wanted_by_shard.get(name, set())
        reason = _unreadable_reason(shard_urls.get(name), allow_pipe)
        if reason is None:
            reason = _read_shard(Shard(url=shard_urls[name], name=name), keys, labeler, result)
        if reason is not None:
            result.unreadable_shards[name] = reason
        for key in keys:
            if (name, key) not in result.thumbnails:
                problem = reason or "key not found in the shard (did the shard change since scoring?)"
                result.thumbnails[(name, key)] = Thumbnail(name, key, None, None, problem)
    return result


def _unreadable_reason(url: str | None, allow_pipe: bool) -> str | None:
    if url is None:
        return "the score manifest does not say where this shard is"
    if url.startswith("pipe:") and not allow_pipe:
        return "pipe: shard URL not re-run without --allow-pipe"
    if "://" not in url and not url.startswith("pipe:") and not Path(url).is_file():
        return f"shard file {url} no longer exists"
    return None


def _read_shard(shard: Shard, keys: set[str], labeler: Labeler | None, result: ReadBack) -> str | None:
    report = ShardReport(shard=shard.name, url=shard.url)
    remaining = set(keys)
    for sample in iter_samples(shard, report):
        pair_id = (shard.name, sample.key)
        if labeler is not None and pair_id not in result.labels:
            caption, _, _ = read_caption(sample, THUMBNAIL_LIMITS)
            result.labels[pair_id] = labeler.label(sample.fields, caption)
        if sample.key in remaining:
            result.thumbnails[pair_id] = make_thumbnail(shard.name, sample)
            remaining.discard(sample.key)
            if not remaining and labeler is None:
                break
    return report.read_error


def make_thumbnail(shard: str, sample) -> Thumbnail:
    pair = decode_pair(sample, THUMBNAIL_LIMITS)
    if pair.image is None:
        return Thumbnail(shard, sample.key, None, pair.caption, pair.error or "no image")
    image = pair.image
    image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY)
    uri = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return Thumbnail(shard, sample.key, uri, pair.caption, pair.error)
