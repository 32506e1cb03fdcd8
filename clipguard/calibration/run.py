"""`clipguard calibrate`: labels (and canaries) + a score folder -> gamma with error bars.

Where labels come from:
- a label CSV (the filled-in sample.csv, or the page's labels.csv): the sample design gives each
  pair's inclusion probability, so the estimates weight every labelled pair by 1 / pi. It is
  --design when given, else the one the page embedded in its labels.csv, else the
  sample_design.json next to the CSV. The design must have been drawn from these very scores:
  same model fingerprint, same ordered (shard, key) list.
- an attack's poison_manifest.json (the ground truth of a synthetic or red-team run): by default
  a census, every scored pair labelled (manifest keys = poison, the rest clean), so the
  "estimates" are the exact full-data values and the intervals have zero width. With
  --labels-sample N a sample is drawn (uniform, or --stratify) and only its pairs take their
  labels from the manifest, exactly as if a person had labelled them; that is the honest
  rehearsal of the labelling workflow.

Outputs in --out: calibration.json (Calibration.to_dict plus the model fingerprint, the label
source and the label plan; `filter` and `gate` read its top-level "gamma" and "fingerprint"),
densities.png (the paper's Figure 6 for this data) and, with canaries, canaries.csv.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipguard.attacks.manifest import MANIFEST_NAME as POISON_MANIFEST_NAME, read_manifest
from clipguard.calibration.canaries import CanarySet, build_canaries
from clipguard.calibration.combined import finding_members, with_members_flagged
from clipguard.calibration.signals import SignalThreshold, calibrate_signals
from clipguard.calibration.estimates import Population, weighted_roc_auc
from clipguard.calibration.labelsample import DESIGN_NAME, StoredDesign, parse_design, read_design, same_sample
from clipguard.calibration.plots import plot_distance_densities
from clipguard.calibration.sampling import LabelledSample, SampleDesign, draw_sample, label_sample
from clipguard.calibration.scored import ScoredPopulation, load_population
from clipguard.calibration.threshold import Calibration, LabelPlan, choose_threshold, labels_needed
from clipguard.errors import CalibrationError
from clipguard.filtering.threshold import FLAG_RULE, describe_fingerprint, same_fingerprint
from clipguard.labelling import LabelFile, read_label_file
from clipguard.scoring.scorefiles import atomic_write_json

CALIBRATION_NAME = "calibration.json"
CALIBRATION_FORMAT = "clipguard-calibration/1"
DENSITIES_NAME = "densities.png"
CANARIES_NAME = "canaries.csv"
RECALL_LABELS = "recall (labels)"
RECALL_CANARIES = "recall (canaries: mismatched pairs, not the real attack)"
POISON_MANIFEST_FORMAT_PREFIX = "clipguard-poison-manifest/"
MAX_PLOTTED_PAIRS = 20_000
SHOWN_EXAMPLES = 5


@dataclass(frozen=True)
class CalibrateRequest:
    labels: Path
    out_dir: Path
    target_fpr: float | None = None
    target_recall: float | None = None
    max_f1: bool = False
    criterion: str = "bound"
    confidence: float = 0.95
    width: float = 0.1
    design: Path | None = None
    labels_sample: int | None = None
    stratify: bool = False
    seed: int = 0
    canaries: int = 0
    canary_shard_urls: dict[str, str] | None = None
    device: str = "cpu"
    allow_pipe: bool = False
    # An audit (clipguard.filtering.auditflags.AuditFlags): its findings' pairs count as flagged
    # at every gamma, and gamma is chosen for the union (calibration/combined.py).
    audit: Any = None
    # Cross-pair signals of that audit to give thresholds (calibration/signals.py): they share
    # ``signal_share`` of the FPR budget, gamma gets the rest.
    signals: tuple[str, ...] = ()
    signal_share: float = 0.5


@dataclass(frozen=True)
class LabelSource:
    """Where the labels came from, for the report and calibration.json."""

    kind: str  # "label-file" or "poison-manifest"
    path: Path
    mode: str  # "sample" (a drawn sample, labelled), "census" (every pair labelled)
    design: str  # "uniform" or "stratified"
    n_labelled: int
    n_poison_labels: int
    n_unlabelled: int
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


@dataclass(frozen=True)
class CalibrationRun:
    calibration: Calibration
    plan: LabelPlan
    source: LabelSource
    population_size: int
    n_error_pairs: int
    canaries: CanarySet | None
    canary_auc: float | None
    calibration_path: Path
    densities_path: Path
    canaries_path: Path | None
    audit: dict[str, Any] | None = None  # the audit whose findings the rule counts, and its pairs
    signals: list[SignalThreshold] = field(default_factory=list)  # calibrated cross-pair rules


def calibrate_scores(scores_dir: Path, request: CalibrateRequest) -> CalibrationRun:
    population = load_population(scores_dir)
    sample, source = labelled_sample(population, request)
    canaries = None
    if request.canaries:
        canaries = build_canaries(population, request.canaries, request.seed, request.device,
                                  request.canary_shard_urls, request.allow_pipe)
        if canaries.distances.size == 0:
            raise CalibrationError(
                f"none of the {request.canaries} canaries could be built or scored "
                f"({_describe_counts(canaries.failures_by_reason())}); check that the shards are readable"
            )
    rule_sample, rule_population = sample, Population.from_distances(population.distances, sample.design)
    members = None
    if request.audit is not None:
        members = finding_members(population.shards, population.keys, request.audit.finding_of)
        rule_population, rule_sample = with_members_flagged(population.distances, members, sample.design, sample)
    signals, gamma_budget = _calibrated_signals(request, population, sample)
    calibration = choose_threshold(
        rule_sample,
        rule_population,
        target_fpr=gamma_budget,
        target_recall=request.target_recall,
        max_f1=request.max_f1,
        canary_distances=None if canaries is None else canaries.distances,
        criterion=request.criterion,
        confidence=request.confidence,
        # A census labels every pair; the simulated bounds then collapse to the exact values,
        # where Clopper–Pearson would still pretend the pairs were drawn from a larger population.
        interval_method="beta-bound-simulation" if source.mode == "census" else "auto",
        seed=request.seed,
    )
    plan = labels_needed(calibration, request.width)
    out_dir = Path(request.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    densities_path = out_dir / DENSITIES_NAME
    _plot(sample, calibration.gamma, canaries, densities_path, request.seed)
    canaries_path = None
    if canaries is not None:
        canaries_path = out_dir / CANARIES_NAME
        canaries.write_csv(canaries_path)
    canary_auc = None if canaries is None else _canary_auc(sample, canaries)
    run = CalibrationRun(
        calibration=calibration, plan=plan, source=source, population_size=population.size,
        n_error_pairs=len(population.error_pairs), canaries=canaries, canary_auc=canary_auc,
        calibration_path=out_dir / CALIBRATION_NAME, densities_path=densities_path, canaries_path=canaries_path,
        audit=None if members is None else {
            **request.audit.settings(), "findings": request.audit.n_findings,
            "finding_pairs_in_population": int(members.sum()),
            "finding_pairs_labelled": int(members[sample.indices].sum()),
            "finding_pairs_labelled_clean": int((members[sample.indices] & ~sample.labels.astype(bool)).sum()),
        },
        signals=signals,
    )
    atomic_write_json(run.calibration_path, calibration_payload(run, population))
    return run


def _calibrated_signals(request: CalibrateRequest, population: ScoredPopulation,
                        sample: LabelledSample) -> tuple[list[SignalThreshold], float | None]:
    """The signals' thresholds and the FPR budget left for gamma (the target itself without signals)."""
    if not request.signals:
        return [], request.target_fpr
    if request.audit is None:
        raise CalibrationError("--signal needs --audit AUDIT: the signals are the columns `clipguard audit` wrote there")
    if request.target_fpr is None:
        raise CalibrationError("--signal shares a false-positive budget: give --target-fpr")
    if not 0 < request.signal_share < 1:
        raise CalibrationError(f"--signal-share must be in (0, 1), not {request.signal_share}")
    pairs = list(zip(population.shards.tolist(), population.keys.tolist()))
    signals = calibrate_signals(request.audit.folder, tuple(dict.fromkeys(request.signals)), pairs,
                                request.target_fpr * request.signal_share, sample.indices,
                                sample.labels.astype(bool), request.confidence)
    return signals, request.target_fpr - sum(s.fpr_upper for s in signals)


def labelled_sample(population: ScoredPopulation, request: CalibrateRequest) -> tuple[LabelledSample, LabelSource]:
    labels = Path(request.labels)
    manifest_path = poison_manifest_path(labels)
    if manifest_path is not None:
        return _from_poison_manifest(population, manifest_path, request)
    if request.labels_sample is not None:
        raise CalibrationError("--labels-sample draws a sample from a poison manifest; a label CSV is already a sample")
    return _from_label_file(population, labels, request.design)


def poison_manifest_path(path: Path) -> Path | None:
    """The poison manifest that ``path`` is or holds, else None (then it is a label CSV)."""
    if path.is_dir():
        candidate = path / POISON_MANIFEST_NAME
        if candidate.is_file():
            return candidate
        raise CalibrationError(f"{path} is a folder without {POISON_MANIFEST_NAME}; pass a label CSV or a poison manifest")
    if path.suffix.lower() != ".json":
        return None
    try:
        head = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CalibrationError(f"labels file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CalibrationError(f"labels file {path} is not readable JSON: {exc}") from None
    if not (isinstance(head, dict) and str(head.get("format", "")).startswith(POISON_MANIFEST_FORMAT_PREFIX)):
        raise CalibrationError(
            f"{path} is JSON but not a clipguard poison manifest; labels come from a CSV (sample.csv "
            "with its label column filled) or from an attack's poison_manifest.json"
        )
    return path


def _from_label_file(population: ScoredPopulation, path: Path, design_path: Path | None) -> tuple[LabelledSample, LabelSource]:
    label_file = read_label_file(path)
    stored = design_of(label_file, design_path)
    check_design_matches(stored, population)
    indices = _locate_labels(label_file, population, stored)
    labels = np.array([e.poison for e in label_file.entries], dtype=bool)
    sample = label_sample(stored.design, population.distances, indices, labels)
    source = LabelSource(
        kind="label-file", path=path, mode="sample", design=_design_name(stored.design),
        n_labelled=sample.n, n_poison_labels=sample.n_positive,
        n_unlabelled=sample.n_unlabelled,
        details={"design_file": str(stored.path), "design_embedded": stored.path == label_file.path,
                 "rows_without_label": label_file.unlabelled_rows},
    )
    return sample, source


def design_of(label_file: LabelFile, design_path: Path | None) -> StoredDesign:
    """--design, else the design embedded in a page download, else sample_design.json beside the CSV."""
    embedded = None
    if label_file.embedded_design is not None:
        embedded = parse_design(label_file.embedded_design, label_file.path,
                                f"the sample design embedded in {label_file.path}")
    if design_path is None:
        return embedded if embedded is not None else read_design(label_file.path.parent / DESIGN_NAME)
    stored = read_design(design_path)
    if embedded is not None and not same_sample(stored, embedded):
        raise CalibrationError(
            f"{label_file.path} was downloaded from the page of another sample than {design_path}; "
            "drop --design (the file carries its own design) or pass the design it was labelled from"
        )
    return stored


def check_design_matches(stored: StoredDesign, population: ScoredPopulation) -> None:
    if not same_fingerprint(stored.fingerprint, population.fingerprint):
        raise CalibrationError(
            f"the sample in {stored.path} was drawn from distances of {describe_fingerprint(stored.fingerprint)}, "
            f"but {population.scores_dir} was scored by {describe_fingerprint(population.fingerprint)}; "
            "distances (and gamma) do not transfer between models: calibrate with the score folder the sample "
            "came from, or draw a new sample from these scores"
        )
    if stored.keys_sha256 != population.keys_digest() or stored.design.population_size != population.size:
        raise CalibrationError(
            f"{population.scores_dir} does not hold the pairs the sample in {stored.path} was drawn from "
            f"({population.size:,} scored pairs now, {stored.design.population_size:,} then, or a different "
            f"order); calibrate with the score folder {stored.scores}, or draw a new sample"
        )


def _locate_labels(label_file: LabelFile, population: ScoredPopulation, stored: StoredDesign) -> np.ndarray:
    """Population rows of the labelled pairs; unknown, ambiguous and unsampled keys are errors."""
    rows, unknown, ambiguous = [], [], []
    for entry in label_file.entries:
        row = population.locate(entry.key, entry.shard)
        if row is None:
            (ambiguous if entry.shard is None and population.is_ambiguous(entry.key) else unknown).append(entry)
        rows.append(row)
    if ambiguous:
        raise CalibrationError(
            f"{len(ambiguous)} labelled key(s) occur in several shards ({_examples(ambiguous)}); keep the "
            "shard column of sample.csv so that each label names one pair"
        )
    if unknown:
        unscored = sum(population.is_error_pair(e.key, e.shard) for e in unknown)
        detail = f"; {unscored} of them could not be scored (error rows)" if unscored else ""
        raise CalibrationError(
            f"{len(unknown)} labelled key(s) in {label_file.path} are not among the {population.size:,} scored "
            f"pairs of {population.scores_dir} ({_examples(unknown)}){detail}; label the pairs listed by "
            "`clipguard sample` for this score folder"
        )
    indices = np.array(rows, dtype=np.int64)
    outside = ~np.isin(indices, stored.design.indices)
    if outside.any():
        entries = [e for e, out in zip(label_file.entries, outside) if out]
        raise CalibrationError(
            f"{len(entries)} labelled pair(s) are scored but not in the drawn sample ({_examples(entries)}); "
            "their chance of being picked is unknown, so they would bias the estimates: label only the "
            "pairs listed in sample.csv"
        )
    return indices


def _examples(entries) -> str:
    shown = ", ".join(
        f"line {e.line}: {e.shard + '/' if e.shard else ''}{e.key}" for e in entries[:SHOWN_EXAMPLES]
    )
    return shown + (", ..." if len(entries) > SHOWN_EXAMPLES else "")


def _from_poison_manifest(
    population: ScoredPopulation, path: Path, request: CalibrateRequest
) -> tuple[LabelledSample, LabelSource]:
    manifest = read_manifest(path)
    is_poison, unscored = poison_flags(population, [(p.shard, p.key) for p in manifest.poisons], path)
    if request.labels_sample is None:
        design = draw_sample(population.distances, population.size, request.seed)
        mode = "census"
    else:
        design = draw_sample(population.distances, request.labels_sample, request.seed, request.stratify)
        mode = "sample"
    sample = label_sample(design, population.distances, design.indices, is_poison[design.indices])
    source = LabelSource(
        kind="poison-manifest", path=path, mode=mode, design=_design_name(design),
        n_labelled=sample.n, n_poison_labels=sample.n_positive, n_unlabelled=0,
        details={
            "attack": manifest.kind, "poison_rate": manifest.rate, "poisons_in_manifest": manifest.count,
            "poisons_scored": int(is_poison.sum()), "poisons_not_scored": unscored,
            "true_poison_rate_of_scored_pairs": float(is_poison.mean()),
        },
    )
    return sample, source


def poison_flags(population: ScoredPopulation, poisons: list[tuple[str, str]], path: Path) -> tuple[np.ndarray, int]:
    """A poison flag per population row; poisons that failed to score are counted, unknown keys refused."""
    flags = np.zeros(population.size, dtype=bool)
    unknown, unscored = [], 0
    for shard, key in poisons:
        row = population.locate(key, shard)
        if row is None:
            row = population.locate(key)  # the manifest may name shards differently from the score folder
        if row is not None:
            flags[row] = True
        elif population.is_error_pair(key, shard) or population.is_error_pair(key):
            unscored += 1
        else:
            unknown.append(f"{shard}/{key}")
    if unknown:
        shown = ", ".join(unknown[:SHOWN_EXAMPLES]) + (", ..." if len(unknown) > SHOWN_EXAMPLES else "")
        raise CalibrationError(
            f"{len(unknown)} of the {len(poisons)} poison keys in {path} are not among the scored pairs of "
            f"{population.scores_dir} ({shown}); score the poisoned shards this manifest describes"
        )
    return flags, unscored


def _design_name(design: SampleDesign) -> str:
    return "stratified" if design.stratified else "uniform"


def _describe_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items())) or "no reason recorded"


def _canary_auc(sample: LabelledSample, canaries: CanarySet) -> float | None:
    """AUC of canaries against the labelled clean pairs (weighted like the population)."""
    clean = ~sample.labels
    if not clean.any():
        return None
    distances = np.concatenate([sample.distances[clean], canaries.distances])
    labels = np.concatenate([np.zeros(int(clean.sum()), bool), np.ones(canaries.distances.size, bool)])
    weights = np.concatenate([sample.weights[clean], np.ones(canaries.distances.size)])
    return weighted_roc_auc(distances, labels, weights)


def _plot(sample: LabelledSample, gamma: float, canaries: CanarySet | None, path: Path, seed: int) -> None:
    """Figure 6; a census of a large dataset is thinned (clean pairs only, weights scaled) to keep
    the kernel estimate small: the figure shows shapes, not counts."""
    distances, labels, weights = sample.distances, sample.labels, sample.weights
    if distances.size > MAX_PLOTTED_PAIRS:
        clean_rows = np.flatnonzero(~labels)
        keep_clean = np.random.default_rng(seed).choice(clean_rows, MAX_PLOTTED_PAIRS, replace=False)
        keep = np.sort(np.concatenate([keep_clean, np.flatnonzero(labels)]))
        scale = np.where(labels, 1.0, clean_rows.size / MAX_PLOTTED_PAIRS)
        distances, labels, weights = distances[keep], labels[keep], (weights * scale)[keep]
    plot_distance_densities(distances, labels, weights, gamma, path,
                            None if canaries is None else canaries.distances)


def _flag_rule(run: CalibrationRun) -> str:
    rule = FLAG_RULE if run.audit is None else f"{FLAG_RULE} or in a finding of the audit"
    return rule + "".join(f" or {s.signal} > {s.threshold:g}" for s in run.signals)


def calibration_payload(run: CalibrationRun, population: ScoredPopulation) -> dict[str, Any]:
    calibration = run.calibration
    canary = calibration.canary_recall
    payload = {
        "format": CALIBRATION_FORMAT,
        **calibration.to_dict(),
        "flag_rule": _flag_rule(run),
        "audit": run.audit,
        # The calibrated cross-pair rules (filter and gate apply them with --audit); the whole
        # rule's FPR is at most the estimates' bound plus each rule's fpr_upper.
        "signal_rules": [s.to_dict() for s in run.signals],
        "fingerprint": population.fingerprint,
        "model": population.model,
        "scores": str(population.scores_dir.resolve()),
        "population": {"pairs": population.size, "error_pairs_excluded": len(population.error_pairs)},
        "labels": run.source.to_dict(),
        "recall_estimates": {
            RECALL_LABELS: calibration.estimates.recall.to_dict(),
            RECALL_CANARIES: None if canary is None else canary.to_dict(),
        },
        "canaries": None if run.canaries is None else {
            "requested": run.canaries.requested,
            "scored": int(run.canaries.distances.size),
            "failed": run.canaries.failures_by_reason(),
            "roc_auc_vs_labelled_clean": run.canary_auc,
            "file": CANARIES_NAME,
            "construction": "caption of one scored pair + image of another, random, different caption and image",
        },
        "labels_needed": asdict(run.plan),
        "densities": DENSITIES_NAME,
    }
    return payload
