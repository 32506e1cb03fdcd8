"""`clipguard sample`: draw pairs for a person to label, and write what they need to label them.

score folder (or shards, scored first) -> population of ok pairs -> `draw_sample` ->
captions and thumbnails streamed back from the shards -> sample.csv, sample_design.json,
index.html.

``sample_design.json`` (format ``clipguard-sample-design/1``) is what makes the labels usable:
the design (`SampleDesign.to_dict`: strata, row indices, inclusion probabilities), the pairs it
names as (shard, key), the score folder, the scoring model's fingerprint, and a digest of the
population's ordered (shard, key) list, so that `calibrate` can prove it is looking at the same
pairs scored by the same model. Its ``page`` entry records how the page showed the pairs: blind
or not, the seed of the shuffled order and the order itself, and the ``sample_id`` under which the
browser saves the labels. The page's labels.csv carries this same JSON in its first line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipguard.calibration.sampling import SampleDesign, draw_sample
from clipguard.calibration.scored import PairId, ScoredPopulation, fetch_samples, load_population, recorded_sources
from clipguard.data.pairs import DecodeLimits, image_field, read_caption
from clipguard.data.shardspec import Shard
from clipguard.errors import CalibrationError
from clipguard.data.sourcemeta import SourceMeta, meta_from_json
from clipguard.labelling import LABEL_HELP, SampleRow, design_comment_line, write_sample_csv
from clipguard.labelpage import PageSpec, page_images, render_sample_page
from clipguard.model.loading import LoadedModel
from clipguard.scoring.run import ProgressCallback, ScoreConfig, ScoreSummary, score_shards
from clipguard.scoring.scorefiles import atomic_write_json

DESIGN_NAME = "sample_design.json"
DESIGN_FORMAT = "clipguard-sample-design/1"
CSV_NAME = "sample.csv"
PAGE_NAME = "index.html"
ILLUSTRATIVE_RATE = 0.001  # the paper's lowest effective poison rates are about 0.1%
# The page order comes from its own stream of the seed, so it says nothing about the draw.
ORDER_STREAM = 1
ORDER_RULE = "numpy.random.default_rng(numpy.random.SeedSequence(order_seed, spawn_key=(1,))).permutation(n)"


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
    show_scores: bool = False  # the page shows distance, stratum and weight (else it is blind)


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
    sample_id: str
    page_order: tuple[int, ...]
    show_scores: bool = False
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
    order = page_order(design.n, request.seed)
    sid = sample_id(design, population)
    payload = design_payload(design, population, page_record(sid, request.seed, order, request.show_scores))
    write_sample_csv(paths[0], rows)
    atomic_write_json(paths[1], payload)
    spec = PageSpec(
        title=f"clipguard sample: {design.n} pairs of {population.size:,} to label",
        notes=notes, sample_id=sid, design_line=design_comment_line(payload),
        calibrate_command=f"clipguard calibrate {population.scores_dir.resolve()} --labels labels.csv",
        order=order, show_scores=request.show_scores,
    )
    paths[2].write_text(render_sample_page(rows, spec), encoding="utf-8")
    return SampleOutput(
        out_dir=out_dir, scores_dir=scores_dir, csv_path=paths[0], design_path=paths[1], page_path=paths[2],
        design=design, rows=tuple(rows), population_size=population.size,
        n_error_pairs=len(population.error_pairs), notes=notes, sample_id=sid, page_order=order,
        show_scores=request.show_scores, scored=summary,
    )


def page_order(n: int, order_seed: int) -> tuple[int, ...]:
    """The shuffled order in which the page shows the n pairs (display position -> row)."""
    rng = np.random.default_rng(np.random.SeedSequence(order_seed, spawn_key=(ORDER_STREAM,)))
    return tuple(int(i) for i in rng.permutation(n))


def sample_id(design: SampleDesign, population: ScoredPopulation) -> str:
    """A name unique to one drawn sample (its pairs, seed and population), for the browser's saves."""
    digest = hashlib.sha256()
    digest.update(json.dumps([design.seed, design.stratified, population.keys_digest()]).encode())
    digest.update(np.asarray(design.indices, dtype="<i8").tobytes())
    return digest.hexdigest()[:24]


def page_record(sid: str, order_seed: int, order: tuple[int, ...], show_scores: bool) -> dict[str, Any]:
    return {
        "sample_id": sid,
        "blind": not show_scores,
        "order_seed": order_seed,
        "order_rule": ORDER_RULE,
        "order": list(order),
    }


def read_back_rows(population: ScoredPopulation, design: SampleDesign, allow_pipe: bool) -> list[SampleRow]:
    """Caption and thumbnail of every sampled pair, streamed from its shard (never extracted)."""
    ids = [population.pair(int(i)) for i in design.indices]
    fetched = fetch_samples(ids, population.shard_urls, allow_pipe)
    recorded = recorded_sources(population.scores_dir, ids)
    limits = DecodeLimits(**population.manifest.get("limits", {}))
    rows = []
    for pair_id, index, pi, stratum in zip(ids, design.indices, design.inclusion_probabilities,
                                          design.stratum_of_selected):
        caption, images, reason = None, None, fetched.missing.get(pair_id)
        sample = fetched.found.get(pair_id)
        source = SourceMeta()
        if sample is not None:
            caption, _, _ = read_caption(sample, limits)
            source = meta_from_json(sample.fields.get("json"))
            ext = image_field(sample)
            if ext is None:
                reason = "the sample has no image field"
            else:
                images = page_images(sample.fields[ext], limits)
                reason = images.error
        # What scoring recorded first (it also read the shard's img2dataset parquet), the json after.
        source = recorded.get(pair_id, SourceMeta()).filled_from(source)
        rows.append(SampleRow(
            key=pair_id[1], shard=pair_id[0], caption=caption, distance=float(population.distances[index]),
            inclusion_probability=float(pi), stratum=int(stratum), images=images, unavailable=reason,
            uid=source.uid, url=source.url,
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


def design_payload(design: SampleDesign, population: ScoredPopulation, page: dict[str, Any]) -> dict[str, Any]:
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
        "page": page,
    }


def read_design(path: Path) -> StoredDesign:
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CalibrationError(
            f"no sample design at {path}: labels from a CSV need the {DESIGN_NAME} that `clipguard sample` "
            "wrote next to sample.csv (it holds the inclusion probabilities); pass --design FILE if it moved, "
            "or use the labels.csv downloaded from the page, which carries its design"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CalibrationError(f"sample design {path} is not readable JSON: {exc}") from None
    return parse_design(payload, path, f"sample design {path}")


def parse_design(payload: Any, path: Path, where: str) -> StoredDesign:
    """Check a design JSON (from a file, or embedded in a page's labels.csv: ``where`` says which)."""
    if not isinstance(payload, dict) or payload.get("format") != DESIGN_FORMAT:
        raise CalibrationError(f"{where} is not a clipguard sample design (format {DESIGN_FORMAT})")
    try:
        design = SampleDesign.from_dict(payload["design"])
        pairs = tuple((p["shard"], p["key"]) for p in payload["pairs"])
        keys_sha256 = payload["population"]["keys_sha256"]
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise CalibrationError(f"{where} is incomplete: {exc!r}") from None
    if len(pairs) != design.n or not np.all(np.diff(design.indices) > 0):
        raise CalibrationError(f"{where} is inconsistent (pairs and indices differ); draw it again")
    return StoredDesign(path, design, payload.get("fingerprint") or {}, keys_sha256, str(payload.get("scores")), pairs)


def same_sample(a: StoredDesign, b: StoredDesign) -> bool:
    """Whether two stored designs describe the same drawn sample of the same population."""
    return a.keys_sha256 == b.keys_sha256 and a.pairs == b.pairs and a.design.to_dict() == b.design.to_dict()
