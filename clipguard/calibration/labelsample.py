"""`clipguard sample`: draw pairs for a person to label, and write what they need to label them.

score folder (or shards, scored first) -> population of ok pairs -> `draw_sample` ->
captions and thumbnails streamed back from the shards -> sample.csv, sample_design.json,
index.html.

``sample_design.json`` (format ``clipguard-sample-design/1``) is what makes the labels usable:
the design (`SampleDesign.to_dict`: strata, row indices, inclusion probabilities), the pairs it
names as (shard, key), the score folder, the scoring model's fingerprint, and a digest of the
population's ordered (shard, key) list, so that `calibrate` can prove it is looking at the same
pairs scored by the same model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipguard.calibration.sampling import SampleDesign, draw_sample
from clipguard.calibration.scored import PairId, ScoredPopulation, fetch_samples, load_population
from clipguard.data.pairs import DecodeLimits, image_field, read_caption
from clipguard.data.shardspec import Shard
from clipguard.errors import CalibrationError
from clipguard.labelling import LABEL_HELP, SampleRow, render_sample_page, thumbnail_data_uri, write_sample_csv
from clipguard.model.loading import LoadedModel
from clipguard.scoring.run import ProgressCallback, ScoreConfig, ScoreSummary, score_shards
from clipguard.scoring.scorefiles import atomic_write_json

DESIGN_NAME = "sample_design.json"
DESIGN_FORMAT = "clipguard-sample-design/1"
CSV_NAME = "sample.csv"
PAGE_NAME = "index.html"
ILLUSTRATIVE_RATE = 0.001  # the paper's lowest effective poison rates are about 0.1%


@dataclass(frozen=True)
class ScoringJob:
    """Shards to score before sampling, exactly as `clipguard score` would."""

    shards: list[Shard]
    loaded: LoadedModel
    config: ScoreConfig


@dataclass(frozen=True)
class SampleRequest:
    n: int
    seed: int = 0
    stratify: bool = False
    allow_pipe: bool = False


@dataclass(frozen=True)
class SampleOutput:
    out_dir: Path
    scores_dir: Path
    csv_path: Path
    design_path: Path
    page_path: Path
    design: SampleDesign
    rows: tuple[SampleRow, ...]
    population_size: int
    n_error_pairs: int
    notes: tuple[str, ...]
    scored: ScoreSummary | None = None

    @property
    def unavailable(self) -> list[SampleRow]:
        return [row for row in self.rows if row.unavailable is not None]


@dataclass(frozen=True)
class StoredDesign:
    """A sample_design.json read back."""

    path: Path
    design: SampleDesign
    fingerprint: dict[str, Any]
    keys_sha256: str
    scores: str
    pairs: tuple[PairId, ...]


def sample_for_labelling(
    scores_dir: Path,
    out_dir: Path,
    request: SampleRequest,
    scoring: ScoringJob | None = None,
    progress: ProgressCallback | None = None,
) -> SampleOutput:
    """Score (when asked), draw the sample, read its pairs back, write the three files."""
    scores_dir, out_dir = Path(scores_dir), Path(out_dir)
    summary = None
    if scoring is not None:
        summary = score_shards(scoring.shards, scoring.loaded, scores_dir, scoring.config, progress)
    population = load_population(scores_dir)
    design = draw_sample(population.distances, request.n, request.seed, request.stratify)
    rows = read_back_rows(population, design, request.allow_pipe)
    out_dir.mkdir(parents=True, exist_ok=True)
    notes = tuple(statistics_notes(design))
    paths = out_dir / CSV_NAME, out_dir / DESIGN_NAME, out_dir / PAGE_NAME
    write_sample_csv(paths[0], rows)
    atomic_write_json(paths[1], design_payload(design, population))
    title = f"clipguard sample: {design.n} pairs of {population.size:,} to label"
    paths[2].write_text(render_sample_page(rows, title, list(notes)), encoding="utf-8")
    return SampleOutput(
        out_dir=out_dir, scores_dir=scores_dir, csv_path=paths[0], design_path=paths[1], page_path=paths[2],
        design=design, rows=tuple(rows), population_size=population.size,
        n_error_pairs=len(population.error_pairs), notes=notes, scored=summary,
    )


def read_back_rows(population: ScoredPopulation, design: SampleDesign, allow_pipe: bool) -> list[SampleRow]:
    """Caption and thumbnail of every sampled pair, streamed from its shard (never extracted)."""
    ids = [population.pair(int(i)) for i in design.indices]
    fetched = fetch_samples(ids, population.shard_urls, allow_pipe)
    limits = DecodeLimits(**population.manifest.get("limits", {}))
    rows = []
    for pair_id, index, pi, stratum in zip(ids, design.indices, design.inclusion_probabilities,
                                          design.stratum_of_selected):
        caption, thumbnail, reason = None, None, fetched.missing.get(pair_id)
        sample = fetched.found.get(pair_id)
        if sample is not None:
            caption, _, _ = read_caption(sample, limits)
            ext = image_field(sample)
            if ext is None:
                reason = "the sample has no image field"
            else:
                thumbnail, reason = thumbnail_data_uri(sample.fields[ext], limits)
        rows.append(SampleRow(
            key=pair_id[1], shard=pair_id[0], caption=caption, distance=float(population.distances[index]),
            inclusion_probability=float(pi), stratum=int(stratum), thumbnail=thumbnail, unavailable=reason,
        ))
    return rows


def statistics_notes(design: SampleDesign) -> list[str]:
    """What this sample can and cannot say about recall, in numbers."""
    n = design.n
    expected_uniform = n * ILLUSTRATIVE_RATE
    notes = [
        f"At a poison rate of {ILLUSTRATIVE_RATE:.1%} a uniform sample of {n} pairs holds about "
        f"{expected_uniform:.1f} poison(s), so recall cannot be estimated from it: an interval from 0 or 1 "
        "labelled poison spans most of [0, 1]."
    ]
    if design.stratified:
        top = design.strata[-1]
        oversampling = top.inclusion_probability / (n / design.population_size)
        notes.append(
            f"This sample is stratified: {top.sample_size} of the {top.population_size:,} pairs in the "
            f"highest-distance stratum (d >= {top.lower:.4f}) are to be labelled, {oversampling:.0f}x the "
            "uniform rate, so poisons in the tail are far more likely to be seen. Add "
            "`clipguard calibrate --canaries N` for known positives as well."
        )
    else:
        notes.append(
            "Draw with --stratify to over-sample the high-distance tail where poisons sit, and/or add "
            "`clipguard calibrate --canaries N` (mismatched pairs built from your data) for known positives."
        )
    notes.append(f"Label values: {LABEL_HELP}.")
    return notes


def design_payload(design: SampleDesign, population: ScoredPopulation) -> dict[str, Any]:
    return {
        "format": DESIGN_FORMAT,
        "scores": str(population.scores_dir.resolve()),
        "fingerprint": population.fingerprint,
        "model": population.model,
        "population": {
            "pairs": population.size,
            "error_pairs_excluded": len(population.error_pairs),
            "keys_sha256": population.keys_digest(),
        },
        "label_values": LABEL_HELP,
        "design": design.to_dict(),
        "pairs": [{"shard": s, "key": k} for s, k in (population.pair(int(i)) for i in design.indices)],
    }


def read_design(path: Path) -> StoredDesign:
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CalibrationError(
            f"no sample design at {path}: labels from a CSV need the {DESIGN_NAME} that `clipguard sample` "
            "wrote next to sample.csv (it holds the inclusion probabilities); pass --design FILE if it moved"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CalibrationError(f"sample design {path} is not readable JSON: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != DESIGN_FORMAT:
        raise CalibrationError(f"{path} is not a clipguard sample design (format {DESIGN_FORMAT})")
    try:
        design = SampleDesign.from_dict(payload["design"])
        pairs = tuple((p["shard"], p["key"]) for p in payload["pairs"])
        keys_sha256 = payload["population"]["keys_sha256"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CalibrationError(f"sample design {path} is incomplete: {exc}") from None
    if len(pairs) != design.n or not np.all(np.diff(design.indices) > 0):
        raise CalibrationError(f"sample design {path} is inconsistent (pairs and indices differ); draw it again")
    return StoredDesign(path, design, payload.get("fingerprint") or {}, keys_sha256, str(payload.get("scores")), pairs)
