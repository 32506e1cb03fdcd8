"""Canaries: known positives made from the user's own data, for a recall that labels cannot give.

At a poison rate of 0.1% a few hundred labels hold almost no poison, so recall estimated from
labels is nearly uninformative. A canary is built the way Yang et al.'s Attacks I/II build
poisons: the caption of one pair with the image of another pair whose caption is about something
else. Without class labels "something else" is approximated by a random other pair; a canary
whose image donor has the same caption or the same image as its caption donor is not a
mismatch and is skipped, with its reason. Canaries are scored by the model that scored the
folder (loaded from the manifest, checked against its fingerprint) through the scorer's own
decode and embedding code, so their distances are comparable with the population's.

What canary recall means: the share of *random mismatches* flagged at gamma. Real poisons pair
a caption with a chosen, semantically distant image, and adaptive or clean-label poisons can be
much better matched than a random mismatch, so canary recall is an upper-bound-flavoured proxy,
not the attack's recall.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip

from clipguard.calibration.scored import FetchedSamples, PairId, ScoredPopulation, fetch_samples
from clipguard.data.pairs import DecodeLimits, Pair, decode_pair, image_field, read_caption
from clipguard.data.shardspec import Shard
from clipguard.data.tarstream import RawSample
from clipguard.errors import CalibrationError, ModelLoadError
from clipguard.model.loading import LoadedModel, ModelSpec, load_model, register_builtin_configs
from clipguard.scoring.chunks import ShardChunks
from clipguard.scoring.embedder import EmbeddingCache, ShardEmbedder

CAPTION_FIELDS = ("txt", "json")
CANARY_SHARD = Shard(url="canaries", name="canaries")
CANARY_COLUMNS = ("canary", "caption_shard", "caption_key", "image_shard", "image_key", "caption", "distance", "error")


@dataclass(frozen=True)
class Canary:
    key: str
    caption_source: PairId
    image_source: PairId
    caption: str | None
    distance: float | None  # None when it could not be built or scored (see error)
    error: str | None = None


@dataclass(frozen=True)
class CanarySet:
    canaries: tuple[Canary, ...]
    requested: int

    @property
    def distances(self) -> np.ndarray:
        return np.array([c.distance for c in self.canaries if c.distance is not None], dtype=float)

    @property
    def failed(self) -> list[Canary]:
        return [c for c in self.canaries if c.distance is None]

    def failures_by_reason(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for canary in self.failed:
            reason = (canary.error or "unknown").split(":", 1)[0]
            counts[reason] = counts.get(reason, 0) + 1
        return counts

    def write_csv(self, path: Path) -> None:
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(CANARY_COLUMNS)
            for c in self.canaries:
                writer.writerow([
                    c.key, *c.caption_source, *c.image_source, c.caption or "",
                    "" if c.distance is None else f"{c.distance:.6f}", c.error or "",
                ])


def plan_donors(population_size: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of n caption donors and n image donors, all 2n rows distinct."""
    if n < 1:
        raise CalibrationError(f"--canaries must be at least 1, got {n}")
    if 2 * n > population_size:
        raise CalibrationError(
            f"{n} canaries need {2 * n} distinct scored pairs (a caption donor and an image donor "
            f"each), but only {population_size} pairs scored; ask for at most {population_size // 2}"
        )
    rows = np.random.default_rng(seed).choice(population_size, size=2 * n, replace=False)
    return rows[:n], rows[n:]


def build_canaries(
    population: ScoredPopulation,
    n: int,
    seed: int,
    device: str = "cpu",
    shard_urls: dict[str, str] | None = None,
    allow_pipe: bool = False,
) -> CanarySet:
    """Make n mismatched pairs from the population's shards and score them with its model."""
    loaded = load_scoring_model(population.manifest, device)
    caption_rows, image_rows = plan_donors(population.size, n, seed)
    caption_ids = [population.pair(int(i)) for i in caption_rows]
    image_ids = [population.pair(int(i)) for i in image_rows]
    fetched = fetch_samples(caption_ids + image_ids, shard_urls or population.shard_urls, allow_pipe)
    limits = DecodeLimits(**population.manifest.get("limits", {}))
    built: list[tuple[int, RawSample]] = []
    canaries: list[Canary | None] = []
    for number, (caption_id, image_id) in enumerate(zip(caption_ids, image_ids)):
        key = f"canary-{number:06d}"
        sample, caption, error = _mismatch(key, caption_id, image_id, fetched, limits)
        if sample is None:
            canaries.append(Canary(key, caption_id, image_id, caption, None, error))
        else:
            built.append((number, sample))
            canaries.append(None)
    batch_size = int(population.manifest.get("batch_size", 64))
    trim = bool(population.manifest.get("trim_text", True))
    for number, pair, distance in _score(built, loaded, limits, batch_size, trim):
        caption_id, image_id = caption_ids[number], image_ids[number]
        canaries[number] = Canary(pair.key, caption_id, image_id, pair.caption, distance, pair.error)
    return CanarySet(canaries=tuple(c for c in canaries if c is not None), requested=n)


def _mismatch(
    key: str,
    caption_id: PairId,
    image_id: PairId,
    fetched: FetchedSamples,
    limits: DecodeLimits,
) -> tuple[RawSample | None, str | None, str | None]:
    """The canary's raw sample (caption fields of one donor, image field of the other), or why not."""
    for donor in (caption_id, image_id):
        if donor not in fetched.found:
            reason = fetched.missing.get(donor, "not found")
            return None, None, f"donor_unavailable: {donor[0]}/{donor[1]}: {reason}"
    caption_donor, image_donor = fetched.found[caption_id], fetched.found[image_id]
    caption_fields = {f: caption_donor.fields[f] for f in CAPTION_FIELDS if f in caption_donor.fields}
    image_ext = image_field(image_donor)
    own_image = image_field(caption_donor)
    caption = _caption_text(caption_fields, limits)
    if image_ext is None or not caption_fields:
        return None, caption, "donor_incomplete: a donor lost its image or caption since scoring"
    image_donor_caption = {f: image_donor.fields[f] for f in CAPTION_FIELDS if f in image_donor.fields}
    if _caption_text(image_donor_caption, limits) == caption:
        return None, caption, "not_a_mismatch: the image donor has the same caption"
    if own_image is not None and _sha(caption_donor.fields[own_image]) == _sha(image_donor.fields[image_ext]):
        return None, caption, "not_a_mismatch: the image donor has the same image"
    return RawSample(key=key, fields={**caption_fields, image_ext: image_donor.fields[image_ext]}), caption, None


def _caption_text(fields: dict[str, bytes], limits: DecodeLimits) -> str | None:
    caption, _, _ = read_caption(RawSample(key="", fields=fields), limits)
    return caption


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _score(
    built: list[tuple[int, RawSample]], loaded: LoadedModel, limits: DecodeLimits, batch_size: int, trim: bool
):
    """Yield (canary number, decoded pair, distance or None) through the scorer's own stages."""
    chunker = ShardChunks([], loaded.preprocess, loaded.tokenizer, batch_size, limits)
    embedder = ShardEmbedder(loaded, batch_size, trim)
    for start in range(0, len(built), batch_size):
        part = built[start:start + batch_size]
        pairs: list[Pair] = [decode_pair(sample, limits) for _, sample in part]
        chunk = chunker.make_chunk(CANARY_SHARD, pairs)
        embeddings = embedder.embed(chunk, EmbeddingCache())
        distances: dict[int, float] = {}
        if embeddings is not None:
            similarity = (embeddings.image * embeddings.text).sum(dim=-1).numpy()
            distances = {row: float(1.0 - s) for row, s in zip(chunk.ok_index, similarity)}
        for position, ((number, _), pair) in enumerate(zip(part, pairs)):
            yield number, pair, distances.get(position)


def model_spec_from_manifest(model: dict, device: str) -> ModelSpec:
    """The ModelSpec that reloads the model a score folder names (weights file, hub tag or bundle)."""
    architecture = model.get("architecture")
    source = model.get("weights_source")
    if not architecture:
        raise ModelLoadError("the score manifest names no model; rescore with `clipguard score`")
    if source == "random":
        raise ModelLoadError(
            "the scores came from a model with random weights, which cannot be loaded again, so canaries "
            "could not be scored by the same model; score with a weights file (--pretrained FILE)"
        )
    if source == "hub":
        # The tag (not the cached file) carries open_clip's per-tag settings such as QuickGELU.
        return ModelSpec(name=architecture, pretrained=model.get("pretrained"), device=device,
                         precision=model.get("precision", "fp32"))
    weights = model.get("weights_path")
    if not weights or not Path(weights).is_file():
        raise ModelLoadError(
            f"canaries must be scored by the model that scored these pairs, but its weights file "
            f"{weights} (sha256 {str(model.get('weights_sha256'))[:12]}...) is not available here; "
            "put the file back at that path, or calibrate without --canaries"
        )
    register_builtin_configs()
    # A checkpoint of a custom architecture names it in its sidecar, which loading by path reads.
    name = architecture if architecture in open_clip.list_models() else weights
    return ModelSpec(name=name, pretrained=weights, device=device, precision=model.get("precision", "fp32"))


def load_scoring_model(manifest: dict, device: str = "cpu") -> LoadedModel:
    """Load the score folder's model and prove it is the same one (equal fingerprints)."""
    spec = model_spec_from_manifest(manifest.get("model") or {}, device)
    loaded = load_model(spec)
    if _canonical(loaded.info.fingerprint()) != _canonical(manifest.get("fingerprint")):
        raise ModelLoadError(
            "the model loaded for canaries is not the one that scored these pairs (fingerprints differ: "
            f"weights sha256 {str(loaded.info.weights_sha256)[:12]} vs "
            f"{str((manifest.get('fingerprint') or {}).get('weights_sha256'))[:12]}); restore the original weights"
        )
    return loaded


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)
