"""Where each shard's scores come from, and how score rows are joined back to the samples.

Scores are reused from a score folder (``--scores``) when that folder was scored by the same
model; shards it lacks are scored now with `score_shards`. The join is positional: a score file
holds one row per sample in tar order, so the i-th sample of a shard meets the i-th row. Keys may
repeat inside a scrape, so a key alone cannot join; the key and the image's sha256 are checked
at every row, and a shard whose content changed since it was scored is an error, not a guess.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from clipguard.data.pairs import image_field
from clipguard.data.shardspec import Shard
from clipguard.data.tarstream import DEFAULT_MAX_MEMBER_BYTES, RawSample, ShardReport, iter_samples
from clipguard.errors import ClipguardError
from clipguard.filtering.threshold import describe_fingerprint, same_fingerprint
from clipguard.model.loading import LoadedModel
from clipguard.scoring.run import ProgressCallback, ScoreConfig, load_manifest, score_shards
from clipguard.scoring.scorefiles import read_metadata, score_path

_COLUMNS = ["key", "cosine_distance", "status", "error", "image_sha256"]


class ScoresFromOtherModelError(ClipguardError):
    """A score folder or file was written by a different model than the one asked for."""


class ScoresMismatchError(ClipguardError):
    """A score file does not describe the shard it is named after (the shard changed)."""


@dataclass(frozen=True)
class ScoreSources:
    """The score file of every shard, and which of them were reused rather than scored now."""

    files: dict[str, Path]
    reused: frozenset[str]
    reused_from: Path | None
    scored_into: Path | None
    failed: dict[str, str] = field(default_factory=dict)  # shard -> why it could not be scored

    def origin(self, shard_name: str) -> str:
        return "reused" if shard_name in self.reused else "scored"


@dataclass
class ShardScores:
    """The rows of one score file, in tar order."""

    shard: str
    path: Path
    keys: list[str]
    distances: list[float | None]
    errors: list[str | None]  # None for ok rows
    image_sha256: list[str | None]
    read_error: str | None
    truncated: bool

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class ScoredSample:
    """One sample with its score row."""

    sample: RawSample
    position: int  # row index within its shard
    distance: float | None
    error: str | None


def gather_scores(
    shards: list[Shard],
    loaded: LoadedModel,
    reuse_dir: Path | None,
    scratch_dir: Path,
    config: ScoreConfig,
    progress: ProgressCallback | None = None,
) -> ScoreSources:
    """Reuse what ``reuse_dir`` holds for these shards (same model only) and score the rest
    into ``scratch_dir``."""
    fingerprint = loaded.info.fingerprint()
    if reuse_dir is not None and Path(reuse_dir).resolve() == Path(scratch_dir).resolve():
        reuse_dir = None  # score_shards resumes its own folder (and checks its model) by itself
    reusable = reusable_score_files(shards, Path(reuse_dir), fingerprint) if reuse_dir is not None else {}
    missing = [shard for shard in shards if shard.name not in reusable]
    failed: dict[str, str] = {}
    if missing:
        summary = score_shards(missing, loaded, scratch_dir, config, progress=progress)
        failed = {r.shard: r.read_error or "could not be read" for r in summary.failed}
    files = {shard.name: reusable.get(shard.name) or score_path(scratch_dir, shard.name) for shard in shards}
    return ScoreSources(
        files=files,
        reused=frozenset(reusable),
        reused_from=Path(reuse_dir) if reuse_dir is not None else None,
        scored_into=Path(scratch_dir) if missing else None,
        failed=failed,
    )


def reusable_score_files(shards: list[Shard], scores_dir: Path, fingerprint: dict[str, Any]) -> dict[str, Path]:
    """Score files in ``scores_dir`` for these shards; an error if the folder used another model."""
    manifest = load_manifest(scores_dir)
    if not same_fingerprint(manifest.get("fingerprint"), fingerprint):
        raise ScoresFromOtherModelError(_other_model_message(scores_dir, manifest.get("fingerprint"), fingerprint))
    found: dict[str, Path] = {}
    for shard in shards:
        path = score_path(scores_dir, shard.name)
        meta = read_metadata(path)
        if meta is None:
            continue
        if not same_fingerprint(meta.get("fingerprint"), fingerprint):
            raise ScoresFromOtherModelError(_other_model_message(path, meta.get("fingerprint"), fingerprint))
        found[shard.name] = path
    return found


def _other_model_message(where: Path, theirs: dict | None, ours: dict) -> str:
    return (
        f"scores in {where} come from a different model: {describe_fingerprint(theirs)}; this run uses "
        f"{describe_fingerprint(ours)}. Pass the model options the scores were made with, or drop "
        "--scores to score again"
    )


def read_shard_scores(shard_name: str, path: Path) -> ShardScores:
    meta = read_metadata(path)
    if meta is None:
        raise ClipguardError(f"score file {path} is missing or unreadable; delete it and rerun to score again")
    table = pq.read_table(path, columns=_COLUMNS).to_pydict()
    shard_meta = meta.get("shard") or {}
    return ShardScores(
        shard=shard_name,
        path=path,
        keys=table["key"],
        distances=[_finite_or_none(d) for d in table["cosine_distance"]],
        errors=[
            (error or "unknown_error") if status != "ok" else None
            for status, error in zip(table["status"], table["error"])
        ],
        image_sha256=table["image_sha256"],
        read_error=shard_meta.get("read_error"),
        truncated=bool(shard_meta.get("truncated", False)),
    )


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def scored_samples(
    shard: Shard,
    scores: ShardScores,
    report: ShardReport,
    keep_oversized: bool = False,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> Iterator[ScoredSample]:
    """Stream the shard and pair each sample with its score row, checking that they belong
    together. A source that fails midway ends the stream early with ``report.failed`` set; the
    caller must not take what came before for the whole shard."""
    count = 0
    for position, sample in enumerate(iter_samples(shard, report, max_member_bytes, keep_oversized)):
        if position >= len(scores):
            raise _mismatch(scores, f"the shard now holds more than the {len(scores)} samples scored")
        _check_row(scores, position, sample)
        yield ScoredSample(
            sample=sample,
            position=position,
            distance=scores.distances[position],
            error=scores.errors[position],
        )
        count = position + 1
    if report.failed:
        return
    if count != len(scores):
        raise _mismatch(scores, f"the shard now holds {count} samples, the score file {len(scores)}")


def _check_row(scores: ShardScores, position: int, sample: RawSample) -> None:
    if scores.keys[position] != sample.key:
        raise _mismatch(
            scores, f"sample {position} has key {sample.key!r}, the score row key {scores.keys[position]!r}"
        )
    field = image_field(sample)
    digest = hashlib.sha256(sample.fields[field]).hexdigest() if field else None
    if digest != scores.image_sha256[position]:
        raise _mismatch(scores, f"the image of sample {position} ({sample.key!r}) is not the one scored")


def _mismatch(scores: ShardScores, detail: str) -> ScoresMismatchError:
    return ScoresMismatchError(
        f"scores in {scores.path} do not match shard {scores.shard}: {detail}. The shard changed since "
        f"it was scored; score it again (delete {scores.path.name} or drop --scores)"
    )
