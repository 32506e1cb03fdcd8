"""A score folder seen as the population a labelled sample is drawn from.

The population is every pair that scored (status ok): pairs that could not be scored have no
distance, so no threshold can flag them, and `filter` quarantines them with their own reason.
Pairs are named by (shard, key), since keys need only be unique within a shard. The folder's
manifest says which model scored it (its fingerprint) and where each shard lives, so that
captions and images can be streamed back for a labelling page or for canaries.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from clipguard.data.shardspec import Shard
from clipguard.data.sourcemeta import SourceMeta
from clipguard.data.tarstream import RawSample, ShardReport, iter_samples
from clipguard.errors import ClipguardError
from clipguard.scoring.run import load_manifest
from clipguard.scoring.scorefiles import read_scores, score_path

PairId = tuple[str, str]  # (shard name, key)


@dataclass(frozen=True)
class ScoredPopulation:
    """The ok pairs of a score folder, in score-file order, with their distances."""

    scores_dir: Path
    manifest: dict[str, Any]
    shards: np.ndarray  # object array of shard names, one per ok pair
    keys: np.ndarray  # object array of keys
    distances: np.ndarray  # float64, all finite
    error_pairs: frozenset[PairId]

    @property
    def size(self) -> int:
        return int(self.distances.size)

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.manifest.get("fingerprint") or {}

    @property
    def model(self) -> dict[str, Any]:
        return self.manifest.get("model") or {}

    @property
    def shard_urls(self) -> dict[str, str]:
        return {entry["shard"]: entry["url"] for entry in self.manifest.get("shards", [])}

    @cached_property
    def index_of(self) -> dict[PairId, int]:
        return {(s, k): i for i, (s, k) in enumerate(zip(self.shards, self.keys))}

    @cached_property
    def indices_of_key(self) -> dict[str, list[int]]:
        found: dict[str, list[int]] = {}
        for i, key in enumerate(self.keys):
            found.setdefault(key, []).append(i)
        return found

    def pair(self, index: int) -> PairId:
        return str(self.shards[index]), str(self.keys[index])

    def keys_digest(self) -> str:
        """sha256 over the ordered (shard, key) list: a sample design's row indices mean the same
        pairs only while this digest is unchanged."""
        digest = hashlib.sha256()
        for shard, key in zip(self.shards, self.keys):
            digest.update(f"{shard}\0{key}\n".encode("utf-8", errors="surrogatepass"))
        return digest.hexdigest()

    def locate(self, key: str, shard: str | None = None) -> int | None:
        """Row of a pair given by key (and shard, needed only where the key repeats across shards)."""
        if shard:
            return self.index_of.get((shard, key))
        rows = self.indices_of_key.get(key, [])
        return rows[0] if len(rows) == 1 else None

    def is_ambiguous(self, key: str) -> bool:
        return len(self.indices_of_key.get(key, [])) > 1

    def is_error_pair(self, key: str, shard: str | None = None) -> bool:
        if shard:
            return (shard, key) in self.error_pairs
        return any(k == key for _, k in self.error_pairs)


def load_population(scores_dir: Path) -> ScoredPopulation:
    """Read a complete score folder; refuse a partial one (its population is not the data's)."""
    scores_dir = Path(scores_dir)
    manifest = load_manifest(scores_dir)
    if not manifest.get("complete", False):
        raise ClipguardError(
            f"scoring in {scores_dir} is incomplete ({manifest.get('shards_done', '?')} of "
            f"{manifest.get('shards_total', '?')} shards); rerun `clipguard score` with the same "
            "shards and --out to finish it (finished shards are skipped)"
        )
    table = read_scores(scores_dir)
    ok = (table.status == "ok") & np.isfinite(table.cosine_distance)
    if not ok.any():
        raise ClipguardError(f"no pair in {scores_dir} was scored successfully; nothing to sample or calibrate")
    errors = frozenset((str(s), str(k)) for s, k in zip(table.shard[~ok], table.key[~ok]))
    return ScoredPopulation(
        scores_dir=scores_dir,
        manifest=manifest,
        shards=table.shard[ok],
        keys=table.key[ok],
        distances=table.cosine_distance[ok].astype(np.float64),
        error_pairs=errors,
    )


def recorded_sources(scores_dir: Path, wanted: Iterable[PairId]) -> dict[PairId, SourceMeta]:
    """uid / url / img2dataset status as scoring recorded them (from the sample's json and its
    shard's img2dataset parquet), for the wanted pairs; only their shards' score files are read.
    A score file from before these columns gives nothing (the sample's json is then all there is)."""
    names = ("uid", "url", "source_status", "source_error")
    by_shard: dict[str, set[str]] = {}
    for shard, key in wanted:
        by_shard.setdefault(shard, set()).add(key)
    found: dict[PairId, SourceMeta] = {}
    for shard, keys in by_shard.items():
        path = score_path(scores_dir, shard)
        try:
            columns = [n for n in names if n in pq.read_schema(path).names]
            if not columns:
                continue
            table = pq.read_table(path, columns=["key", *columns]).to_pydict()
        except (OSError, ValueError):
            continue  # the folder was checked when it was loaded; a vanished file only costs the metadata
        for i, key in enumerate(table["key"]):
            if key in keys:
                found[(shard, key)] = SourceMeta(**{n: table[n][i] for n in columns})
    return found


@dataclass
class FetchedSamples:
    """Raw samples read back from the shards, and why the others could not be."""

    found: dict[PairId, RawSample] = field(default_factory=dict)
    missing: dict[PairId, str] = field(default_factory=dict)


def fetch_samples(
    wanted: Iterable[PairId], shard_urls: dict[str, str], allow_pipe: bool = False
) -> FetchedSamples:
    """Stream only the shards that hold wanted pairs, keeping only those pairs' members.

    Nothing is extracted to disk; a shard stops being read once all its wanted keys are found.
    """
    by_shard: dict[str, set[str]] = {}
    for shard, key in wanted:
        by_shard.setdefault(shard, set()).add(key)
    result = FetchedSamples()
    for shard_name, keys in by_shard.items():
        url = shard_urls.get(shard_name)
        reason = _unreadable_reason(url, allow_pipe)
        if reason is None:
            reason = _read_keys(Shard(url=url, name=shard_name), keys, result)
        for key in keys:
            if (shard_name, key) not in result.found:
                result.missing[(shard_name, key)] = reason or "key not found in the shard (did it change?)"
    return result


def _unreadable_reason(url: str | None, allow_pipe: bool) -> str | None:
    if url is None:
        return "the score manifest does not say where this shard is"
    if url.startswith("pipe:") and not allow_pipe:
        return "pipe: shard URL not re-run without --allow-pipe"
    if "://" not in url and not url.startswith("pipe:") and not Path(url).is_file():
        return f"shard file {url} no longer exists"
    return None


def _read_keys(shard: Shard, keys: set[str], result: FetchedSamples) -> str | None:
    report = ShardReport(shard=shard.name, url=shard.url)
    remaining = set(keys)
    for sample in iter_samples(shard, report):
        if sample.key in remaining:
            result.found[(shard.name, sample.key)] = sample
            remaining.discard(sample.key)
            if not remaining:
                break
    return report.read_error
