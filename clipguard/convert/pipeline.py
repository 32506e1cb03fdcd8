"""Dataset on disk -> WebDataset shards + convert_manifest.json + a name in the dataset registry.

Every annotated pair ends in exactly one place: a shard, or a failure row of the manifest with
its reason (``written + failed == read``). Pairs outside a requested split are counted apart.
Class labels come from keyword search in the written caption (clipguard.labels, the paper's VG
labelling) and go into the sample's json as ``"class"``, which ``evaluate`` and ``attack`` read.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from clipguard.convert.coco import CocoInputs, read_coco
from clipguard.convert.flickr30k import FlickrInputs, read_flickr30k
from clipguard.convert.folder import FolderInputs, read_folder
from clipguard.convert.images import DEFAULT_MAX_IMAGE_BYTES, ImageFile, local_image_limits, read_image_file
from clipguard.convert.sources import CaptionChoice, ConvertError, ReaderCounts, SourcePair
from clipguard.convert.vg import DEFAULT_MAX_CAPTION_CHARS, VgInputs, read_vg
from clipguard.convert.writer import ConvertedShardWriter
from clipguard.data.pairs import DecodeLimits
from clipguard.data.writer import WrittenShard
from clipguard.datasets import register_dataset
from clipguard.labels import KeywordLabeler, LabelCounts

MANIFEST_NAME = "convert_manifest.json"
DEFAULT_SHARD_SIZE = 5000


class DatasetKind(str, Enum):
    coco = "coco"
    flickr30k = "flickr30k"
    vg = "vg"
    folder = "folder"


@dataclass(frozen=True)
class ConvertConfig:
    kind: DatasetKind
    root: Path
    out: Path
    name: str | None = None  # registry name and shard prefix; default: the kind
    shard_size: int = DEFAULT_SHARD_SIZE
    captions_file: Path | None = None  # COCO/Flickr caption file, VG region_descriptions.json
    images: Path | None = None
    image_data_file: Path | None = None  # VG only
    split: str | None = None  # COCO: train2017/val2017...; Flickr30k (Karpathy JSON): train/val/test
    captions: CaptionChoice = CaptionChoice.first
    vg_max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS
    keywords: dict[str, list[str]] | None = None  # None: the paper's 20 PASCAL classes
    register: bool = True
    registry: Path | None = None  # None: clipguard.datasets.default_config_path()
    overwrite: bool = False
    limits: DecodeLimits = field(default_factory=local_image_limits)
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES

    @property
    def dataset_name(self) -> str:
        return self.name or self.kind.value


@dataclass(frozen=True)
class Failure:
    key: str
    reason: str
    source: dict[str, Any]

    @property
    def code(self) -> str:
        return self.reason.split(":", 1)[0]


@dataclass(frozen=True)
class Registration:
    name: str
    registry: Path
    specs: list[str]


@dataclass
class ConvertResult:
    name: str
    kind: str
    out: Path
    shards: list[WrittenShard]
    read: int
    failures: list[Failure]
    outside_split: int
    labels: LabelCounts
    notes: Counter
    registration: Registration | None
    wall_seconds: float

    @property
    def written(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def by_reason(self) -> Counter:
        return Counter(f.code for f in self.failures)

    @property
    def manifest_path(self) -> Path:
        return self.out / MANIFEST_NAME

    def to_dict(self) -> dict[str, Any]:
        return {
            "made_by": "clipguard convert",
            "name": self.name,
            "kind": self.kind,
            "counts": {"read": self.read, "written": self.written, "failed": len(self.failures),
                       "outside_split": self.outside_split},
            "by_status": {"ok": self.written, "failed": len(self.failures)},
            "by_reason": dict(sorted(self.by_reason.items())),
            "labels": self.labels.to_dict(),
            "notes": dict(sorted(self.notes.items())),
            "shards": [s.to_dict() for s in self.shards],
            "registered": None if self.registration is None else {
                "name": self.registration.name, "registry": str(self.registration.registry),
                "specs": self.registration.specs},
            "wall_seconds": round(self.wall_seconds, 3),
            "failures": [{"key": f.key, "reason": f.reason, "source": f.source} for f in self.failures],
        }


ProgressCallback = Callable[[int, int], None]  # (pairs read, pairs written)


def _source_pairs(config: ConvertConfig, counts: ReaderCounts) -> Iterator[SourcePair]:
    """Resolve the inputs (errors now, before anything is written) and return the pair stream."""
    kind, root = config.kind, Path(config.root).expanduser()
    if kind not in (DatasetKind.coco, DatasetKind.flickr30k) and config.captions is CaptionChoice.all:
        raise ConvertError("one pair per caption (captions=all) applies to coco and flickr30k only")
    if config.split is not None and kind in (DatasetKind.vg, DatasetKind.folder):
        raise ConvertError(f"{kind.value} has no splits to choose from")
    if config.image_data_file is not None and kind is not DatasetKind.vg:
        raise ConvertError("an image_data.json file applies to vg only")
    if kind is DatasetKind.coco:
        return read_coco(CocoInputs.under(root, config.split, config.captions_file, config.images), config.captions)
    if kind is DatasetKind.flickr30k:
        inputs = FlickrInputs.under(root, config.captions_file, config.images)
        return read_flickr30k(inputs, config.captions, config.split, counts)
    if kind is DatasetKind.vg:
        inputs = VgInputs.under(root, config.captions_file, config.image_data_file, config.images)
        return read_vg(inputs, config.vg_max_caption_chars)
    if config.captions_file is not None or config.images is not None:
        raise ConvertError("a folder holds its own captions and images: pass only the folder")
    return read_folder(FolderInputs.under(root))


def _default_keywords() -> dict[str, list[str]]:
    # The synthetic world's vocabulary is the paper's keyword table (sheep = sheep, lamb, goat, ...).
    from clipguard.synth.vocabulary import keyword_table

    return keyword_table()


def _check_out_folder(out: Path, prefix: str, overwrite: bool) -> list[Path]:
    old = sorted(out.glob(f"{prefix}-*.tar")) if out.is_dir() else []
    if old and not overwrite:
        raise ConvertError(f"{out} already holds {len(old)} '{prefix}' shards; choose another --out folder "
                           "or pass --overwrite to replace them")
    return old


def _registry_specs(out: Path, prefix: str, shards: list[WrittenShard]) -> list[str]:
    folder = out.resolve()
    if len(shards) == 1:
        return [str(folder / shards[0].path.name)]
    return [f"{folder}/{prefix}-{{000000..{len(shards) - 1:06d}}}.tar"]


class _Converter:
    """The per-pair stage: image, caption bound, label, write or record a failure."""

    def __init__(self, config: ConvertConfig, writer: ConvertedShardWriter):
        self.config = config
        self.writer = writer
        self.labeler = KeywordLabeler(config.keywords if config.keywords is not None else _default_keywords())
        self.labels = LabelCounts()
        self.failures: list[Failure] = []
        self.notes: Counter = Counter()
        self.keys: set[str] = set()
        self._last: tuple[Path | None, ImageFile] | None = None  # one image, several captions

    def _image(self, path: Path | None) -> ImageFile:
        if self._last is None or self._last[0] != path:
            self._last = (path, read_image_file(path, self.config.limits, self.config.max_image_bytes))
        return self._last[1]

    def add(self, pair: SourcePair) -> None:
        reason = self._reason_to_fail(pair)
        if reason is not None:
            self.failures.append(Failure(pair.key, reason, pair.source))
            return
        image = self._image(pair.image_path)
        if image.error is not None:
            self.failures.append(Failure(pair.key, image.error, pair.source))
            return
        if image.reencoded:
            self.notes["reencoded_png"] += 1
        label = self.labeler.label(pair.caption)
        self.labels.add(label)
        meta = {"key": pair.key, **pair.source}
        if label.name is not None:
            meta["class"] = label.name
        if label.matched:
            meta["keyword_classes"] = list(label.matched)
        self.keys.add(pair.key)
        self.writer.write(pair.key, {
            image.field: image.data,
            "txt": pair.caption.encode("utf-8"),
            "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"),
        })

    def _reason_to_fail(self, pair: SourcePair) -> str | None:
        if pair.key in self.keys:
            return "duplicate_key: an earlier pair has the same key"
        if pair.problem is not None:
            return pair.problem
        if pair.caption is None or not pair.caption.strip():
            return "missing_caption"
        size = len(pair.caption.encode("utf-8"))
        if size > self.config.limits.max_caption_bytes:
            return f"caption_too_large: {size} bytes (limit {self.config.limits.max_caption_bytes})"
        return None


def convert_dataset(config: ConvertConfig, progress: ProgressCallback | None = None) -> ConvertResult:
    started = time.perf_counter()
    if config.shard_size < 1:
        raise ConvertError("the shard size must be at least 1")
    prefix = config.dataset_name
    out = Path(config.out).expanduser()
    reader_counts = ReaderCounts()
    pairs = _source_pairs(config, reader_counts)
    old_shards = _check_out_folder(out, prefix, config.overwrite)
    writer = ConvertedShardWriter(out, prefix, config.shard_size)
    converter = _Converter(config, writer)
    read = 0
    try:
        for pair in pairs:
            converter.add(pair)
            read += 1
            if progress is not None and read % 100 == 0:
                progress(read, read - len(converter.failures))
    except BaseException:
        writer.abort()
        raise
    shards = writer.commit()
    kept = {s.path for s in shards}
    for stale in old_shards:  # --overwrite: parts of an earlier, larger conversion
        if stale not in kept:
            stale.unlink(missing_ok=True)
    if progress is not None:
        progress(read, read - len(converter.failures))
    result = ConvertResult(
        name=prefix, kind=config.kind.value, out=out, shards=shards, read=read, failures=converter.failures,
        outside_split=reader_counts.outside_split, labels=converter.labels, notes=converter.notes,
        registration=None, wall_seconds=0.0,
    )
    if shards and config.register:
        specs = _registry_specs(out, prefix, shards)
        result.registration = Registration(prefix, register_dataset(prefix, specs, config.registry), specs)
    result.wall_seconds = time.perf_counter() - started
    _write_manifest(result)
    if not shards:
        reasons = ", ".join(f"{k} {v}" for k, v in result.by_reason.most_common()) or "no pairs in the annotations"
        raise ConvertError(f"no pair could be converted ({reasons}); see {result.manifest_path}")
    return result


def _write_manifest(result: ConvertResult) -> None:
    result.out.mkdir(parents=True, exist_ok=True)
    temporary = result.manifest_path.with_name(MANIFEST_NAME + ".tmp")
    temporary.write_text(json.dumps(result.to_dict(), indent=2, ensure_ascii=False, default=str) + "\n")
    os.replace(temporary, result.manifest_path)
