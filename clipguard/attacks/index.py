"""One streaming pass over the clean shards: what each sample is, without holding its image.

The index records, per sample, its shard, key, caption, class label, image field and image
hash. The attack picks its sources from it; a second pass (``fetch_fields``) reads only the
chosen samples' bytes, and the writer makes a third pass copying every clean sample.

Attacks copy shards exactly, so a shard the reader could not read whole (truncated, unsafe or
oversized members) is refused with its reason rather than half-copied.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from clipguard.attacks.goals import AttackError
from clipguard.data.pairs import DecodeLimits, image_field, read_caption
from clipguard.data.shardspec import Shard
from clipguard.data.tarstream import RawSample, ShardReport, iter_samples
from clipguard.labels import LabelCounts, Labeler


@dataclass(frozen=True)
class IndexedSample:
    shard: int  # position in CleanIndex.shards
    offset: int  # position within its shard
    key: str
    caption: str | None
    label: str | None
    image_field: str | None
    image_sha256: str | None

    @property
    def has_caption(self) -> bool:
        return bool(self.caption)

    @property
    def has_image(self) -> bool:
        return self.image_field is not None


@dataclass
class CleanIndex:
    shards: list[Shard]
    samples: list[IndexedSample]
    shard_sizes: list[int]
    label_counts: LabelCounts = field(default_factory=LabelCounts)

    @property
    def size(self) -> int:
        return len(self.samples)

    def find_key(self, key: str) -> IndexedSample:
        matches = [s for s in self.samples if s.key == key]
        if not matches:
            raise AttackError(f"key {key!r} is not in the clean shards")
        if len(matches) > 1:
            names = ", ".join(self.shards[s.shard].name for s in matches)
            raise AttackError(f"key {key!r} occurs in several shards ({names}); keys must be unique")
        return matches[0]

    def texts_of(self, class_name: str) -> list[IndexedSample]:
        """Samples labelled ``class_name`` with a caption, one per distinct caption text."""
        seen: set[str] = set()
        chosen = []
        for sample in self.samples:
            if sample.label == class_name and sample.has_caption and sample.caption not in seen:
                seen.add(sample.caption)
                chosen.append(sample)
        return chosen

    def images_of(self, class_name: str | None, exclude: str | None = None) -> list[IndexedSample]:
        """One sample per distinct image (by sha256) labelled ``class_name`` (None = any label,
        ``exclude`` left out)."""
        seen: set[str] = set()
        chosen = []
        for sample in self.samples:
            if not sample.has_image or sample.image_sha256 in seen:
                continue
            if class_name is not None and sample.label != class_name:
                continue
            if exclude is not None and sample.label == exclude:
                continue
            seen.add(sample.image_sha256)
            chosen.append(sample)
        return chosen


def _refuse_unreadable(shard: Shard, report: ShardReport, sample: RawSample | None) -> None:
    if sample is not None and sample.problems:
        raise AttackError(
            f"shard {shard.url}: sample {sample.key!r} could not be read whole ({sample.problems[0]}); "
            "clipguard attack copies shards byte for byte and will not half-copy this one. "
            "Repair or filter the shard first."
        )
    if report.read_error:
        raise AttackError(f"shard {shard.url}: {report.read_error}; clipguard attack needs readable shards")


def build_index(
    shards: list[Shard],
    labeler: Labeler,
    limits: DecodeLimits = DecodeLimits(),
    progress: Callable[[int, int], None] | None = None,
) -> CleanIndex:
    samples: list[IndexedSample] = []
    sizes: list[int] = []
    counts = LabelCounts()
    seen_keys: dict[str, str] = {}
    for shard_number, shard in enumerate(shards):
        report = ShardReport(shard=shard.name, url=shard.url)
        offset = 0
        for raw in iter_samples(shard, report):
            _refuse_unreadable(shard, report, raw)
            if raw.key in seen_keys:
                raise AttackError(
                    f"key {raw.key!r} occurs twice (in {seen_keys[raw.key]} and {shard.name}); "
                    "poison keys could not be told from clean ones"
                )
            seen_keys[raw.key] = shard.name
            samples.append(_index_sample(raw, shard_number, offset, labeler, limits, counts))
            offset += 1
        _refuse_unreadable(shard, report, None)
        sizes.append(offset)
        if progress is not None:
            progress(shard_number + 1, len(samples))
    return CleanIndex(shards=shards, samples=samples, shard_sizes=sizes, label_counts=counts)


def _index_sample(
    raw: RawSample, shard: int, offset: int, labeler: Labeler, limits: DecodeLimits, counts: LabelCounts
) -> IndexedSample:
    caption, _, _ = read_caption(raw, limits)
    label = labeler.label(raw.fields, caption)
    counts.add(label)
    ext = image_field(raw)
    return IndexedSample(
        shard=shard,
        offset=offset,
        key=raw.key,
        caption=caption,
        label=label.name,
        image_field=ext,
        image_sha256=hashlib.sha256(raw.fields[ext]).hexdigest() if ext else None,
    )


def fetch_fields(index: CleanIndex, wanted: Iterable[IndexedSample]) -> dict[str, dict[str, bytes]]:
    """Every field of the wanted samples, by key; reads only the shards that hold them."""
    by_shard: dict[int, set[str]] = {}
    for sample in wanted:
        by_shard.setdefault(sample.shard, set()).add(sample.key)
    found: dict[str, dict[str, bytes]] = {}
    for shard_number, keys in sorted(by_shard.items()):
        shard = index.shards[shard_number]
        report = ShardReport(shard=shard.name, url=shard.url)
        for raw in iter_samples(shard, report):
            if raw.key in keys:
                found[raw.key] = dict(raw.fields)
        missing = keys - set(found)
        if missing:
            raise AttackError(f"shard {shard.url} changed while the attack ran: {sorted(missing)[:3]} gone")
    return found
