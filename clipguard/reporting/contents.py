"""Everything the audit report shows, gathered from a score folder (and optional calibration,
audit findings, filter results and keyword labels) into dataclasses; html.py only renders them.

Counting rules are those of `gate`: the flagged rate is flagged / scored ("ok") pairs, flagged
meaning cosine distance >= gamma; pairs that could not be scored are errors, counted by reason
and never flagged. A verdict of pass / fail needs a policy (--max-flagged-rate); without one the
report says how many pairs need review.

Signals. A signal is a numeric per-pair column of the score Parquet files: today only
``cosine_distance`` (the one gamma applies to), but any numeric column beyond the ones the
scorer writes (SCORE_SCHEMA) is taken as an extra signal and gets its own table, so a new
detector only has to add its column.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipguard.errors import ClipguardError
from clipguard.filtering.gate import DEFAULT_MAX_ERROR_RATE, GatePolicy, policy_failures
from clipguard.filtering.threshold import (
    Threshold,
    check_threshold_model,
    describe_fingerprint,
    load_calibration,
    resolve_threshold,
    same_fingerprint,
)
from clipguard.labels import Label, make_labeler
from clipguard.reporting.figures import Interval, density_png, shard_rate_png
from clipguard.reporting.findings import Finding, read_findings
from clipguard.reporting.readback import SHARD_UNREADABLE, PairId, ReadBack, Thumbnail, read_back
from clipguard.scoring.run import MANIFEST_NAME, load_manifest
from clipguard.scoring.scorefiles import SCORE_SCHEMA, find_score_files

PRIMARY_SIGNAL = "cosine_distance"
# Columns the scorer writes that are not signals: identity, status, caption bookkeeping, and the
# similarity, which is the primary signal again (1 - distance).
NON_SIGNAL_COLUMNS = frozenset(SCORE_SCHEMA.names) - {PRIMARY_SIGNAL}
FILTER_MANIFEST_NAME = "filter_manifest.json"
DEFAULT_WORST = 12
FINDING_THUMBNAILS = 8
SHOWN_ERRORS = 20
SIGNAL_TOP = 5
QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)


class ReportError(ClipguardError):
    """Report inputs that cannot be used (missing scores, unreadable calibration or filter results)."""


@dataclass(frozen=True)
class ReportRequest:
    scores: Path
    out: Path
    calibration: Path | None = None
    gamma: float | None = None
    audit: Path | None = None
    filter_dir: Path | None = None
    keywords: Path | None = None
    shard_urls: dict[str, str] | None = None  # where the shards are now (default: the score manifest's URLs)
    worst: int = DEFAULT_WORST
    max_flagged_rate: float | None = None
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE
    allow_pipe: bool = False
    title: str = "clipguard audit report"


@dataclass
class ScoreRows:
    """Every row of a score folder as columns; ``signals`` holds float arrays, NaN where absent."""

    key: np.ndarray
    shard: np.ndarray
    status: np.ndarray
    error: np.ndarray
    signals: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.key)

    @property
    def distance(self) -> np.ndarray:
        return self.signals[PRIMARY_SIGNAL]

    @property
    def ok(self) -> np.ndarray:
        return (self.status == "ok") & np.isfinite(self.distance)


@dataclass(frozen=True)
class Verdict:
    status: str  # "pass", "fail", "review" (flagged pairs, no policy), "clean", "unknown" (no gamma)
    headline: str
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class Summary:
    pairs: int
    ok: int
    errors: int
    errors_by_reason: dict[str, int]
    gamma: float | None
    gamma_source: str | None
    flagged: int | None
    policy: GatePolicy | None

    @property
    def flagged_rate(self) -> float | None:
        if self.flagged is None or not self.ok:
            return None
        return self.flagged / self.ok

    @property
    def error_rate(self) -> float:
        return self.errors / self.pairs if self.pairs else 0.0


@dataclass(frozen=True)
class ModelSection:
    description: str
    model: dict[str, Any]
    fingerprint: dict[str, Any]
    clipguard_version: str | None
    complete: bool
    shards_total: int
    shards_done: int


@dataclass(frozen=True)
class SignalRow:
    shard: str
    key: str
    value: float


@dataclass(frozen=True)
class SignalTable:
    name: str
    primary: bool
    n: int  # rows with a finite value
    missing: int
    mean: float | None
    quantiles: dict[str, float]
    maximum: float | None
    flagged: int | None  # primary signal only: d >= gamma
    top: tuple[SignalRow, ...]


@dataclass(frozen=True)
class ShardRow:
    shard: str
    pairs: int
    ok: int
    errors: int
    flagged: int | None
    truncated: bool
    read_error: str | None

    @property
    def flagged_rate(self) -> float | None:
        return None if self.flagged is None or not self.ok else self.flagged / self.ok


@dataclass(frozen=True)
class PairView:
    shard: str
    key: str
    distance: float | None
    flagged: bool
    reason: str
    thumbnail: Thumbnail
    label: str | None = None


@dataclass(frozen=True)
class ErrorRow:
    shard: str
    key: str
    error: str


@dataclass(frozen=True)
class FindingView:
    finding: Finding
    shown: tuple[PairView, ...]
    scored: int  # pairs of the finding that are among the scored pairs
    flagged: int | None
    unknown: int  # pairs the score folder does not hold


@dataclass(frozen=True)
class ClassRow:
    name: str
    pairs: int
    ok: int
    flagged: int | None
    median_distance: float | None

    @property
    def flagged_rate(self) -> float | None:
        return None if self.flagged is None or not self.ok else self.flagged / self.ok


@dataclass(frozen=True)
class ClassTable:
    keywords: Path
    rows: tuple[ClassRow, ...]
    unlabelled: dict[str, int]  # reason -> pairs


@dataclass(frozen=True)
class EstimateView:
    name: str
    point: float | None
    lower: float
    upper: float


@dataclass(frozen=True)
class CalibrationSection:
    path: Path
    gamma: float
    method: str | None
    criterion: str | None
    targets: dict[str, Any]
    confidence: float | None
    n_labelled: int | None
    n_positive_labels: int | None
    roc_auc: float | None
    estimates: tuple[EstimateView, ...]
    densities_png: bytes | None  # the calibration's own Figure 6, when it sits beside the file


@dataclass(frozen=True)
class FilterSection:
    path: Path
    complete: bool
    gamma: float | None
    gamma_source: str | None
    totals: dict[str, int]
    errors_by_reason: dict[str, int]
    inputs: tuple[dict[str, Any], ...]
    clean_parts: int
    quarantine_parts: int
    same_model: bool


@dataclass
class ReportData:
    title: str
    generated_at: str
    scores: Path
    summary: Summary
    verdict: Verdict
    model: ModelSection
    signals: list[SignalTable]
    shards: list[ShardRow]
    worst: list[PairView]
    errors: list[ErrorRow]
    density_png: bytes | None = None
    shard_png: bytes | None = None
    calibration: CalibrationSection | None = None
    findings: list[FindingView] | None = None
    findings_path: Path | None = None
    classes: ClassTable | None = None
    filter: FilterSection | None = None
    unreadable_shards: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Reading the score folder


def read_score_rows(scores: Path) -> ScoreRows:
    """All rows of the folder's Parquet files, with every numeric signal column."""
    files = find_score_files(scores)
    if not files:
        raise ReportError(f"no score files (*.parquet) in {scores}; run `clipguard score` first")
    tables = []
    for path in files:
        try:
            tables.append(pq.read_table(path))
        except (OSError, pa.ArrowInvalid) as exc:
            raise ReportError(f"score file {path} is not readable Parquet: {exc}") from None
    names = [PRIMARY_SIGNAL] + sorted({c for t in tables for c in t.column_names if _is_signal(t.schema.field(c))})
    signals = {name: np.concatenate([_float_column(t, name) for t in tables]) for name in names}

    def strings(column: str) -> np.ndarray:
        return np.asarray([v for t in tables for v in t.column(column).to_pylist()], dtype=object)

    return ScoreRows(key=strings("key"), shard=strings("shard"), status=strings("status"), error=strings("error"),
                     signals=signals)


def _is_signal(schema_field: pa.Field) -> bool:
    kind = schema_field.type
    numeric = pa.types.is_floating(kind) or pa.types.is_integer(kind)
    return numeric and schema_field.name not in NON_SIGNAL_COLUMNS and schema_field.name != PRIMARY_SIGNAL


def _float_column(table: pa.Table, name: str) -> np.ndarray:
    if name not in table.column_names:
        return np.full(table.num_rows, np.nan)
    values = table.column(name).to_pylist()
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def load_score_manifest(scores: Path) -> dict[str, Any]:
    scores = Path(scores)
    if not scores.is_dir():
        raise ReportError(f"score folder {scores} does not exist")
    if not (scores / MANIFEST_NAME).is_file():
        raise ReportError(f"{scores} has no {MANIFEST_NAME}; it is not a clipguard score folder (run `clipguard score`)")
    try:
        return load_manifest(scores)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportError(f"{scores / MANIFEST_NAME} is not readable JSON: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Gathering


def gather_report(request: ReportRequest) -> ReportData:
    manifest = load_score_manifest(request.scores)
    rows = read_score_rows(request.scores)
    if len(rows) == 0:
        raise ReportError(f"the score files in {request.scores} hold no pairs; nothing to report")
    warnings: list[str] = []
    if not manifest.get("complete", False):
        warnings.append(f"scoring is incomplete: {manifest.get('shards_done', '?')} of "
                        f"{manifest.get('shards_total', '?')} shards; this report covers the scored ones only")
    fingerprint = manifest.get("fingerprint") or {}
    calibration = _calibration_section(request.calibration, fingerprint) if request.calibration else None
    filter_section = _filter_section(request.filter_dir, fingerprint) if request.filter_dir else None
    threshold = _threshold(request, calibration, filter_section)
    if filter_section is not None:
        warnings.extend(_filter_warnings(filter_section, threshold))
    flagged_mask = rows.ok & (rows.distance >= threshold.gamma) if threshold else None
    policy = GatePolicy(request.max_flagged_rate, request.max_error_rate) if request.max_flagged_rate is not None else None
    summary = _summary(rows, threshold, flagged_mask, policy)

    audit = read_findings(request.audit) if request.audit else None
    worst_ids = _worst_ids(rows, request.worst)
    # The first row of a (shard, key) that repeats, as the reader keeps the first sample.
    index = {(str(s), str(k)): i for i, (s, k) in reversed(list(enumerate(zip(rows.shard, rows.key))))}
    # Pairs a finding names that were never scored are shown as such, not looked for in the shards.
    finding_ids = [(p.shard, p.key) for f in (audit.findings if audit else ()) for p in f.pairs[:FINDING_THUMBNAILS]
                   if (p.shard, p.key) in index]
    shard_urls = {**_manifest_urls(manifest, rows), **(request.shard_urls or {})}
    # Classes of the caption, not of json metadata: a poison keeps its image's metadata, and what
    # an attack changes is which class a caption names next to that image.
    labeler = make_labeler("keywords", request.keywords) if request.keywords else None
    readback = read_back(shard_urls, worst_ids + finding_ids, labeler, request.allow_pipe)

    data = ReportData(
        title=request.title,
        generated_at=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        scores=Path(request.scores),
        summary=summary,
        verdict=_verdict(summary),
        model=_model_section(manifest),
        signals=[_signal_table(rows, name, flagged_mask) for name in rows.signals],
        shards=_shard_rows(rows, manifest, flagged_mask),
        worst=[_pair_view(rows, index, pid, threshold, readback) for pid in worst_ids],
        errors=_error_rows(rows),
        calibration=calibration,
        filter=filter_section,
        unreadable_shards=readback.unreadable_shards,
        warnings=warnings,
    )
    if audit is not None:
        data.findings = [_finding_view(f, rows, index, threshold, readback) for f in audit.findings]
        data.findings_path = audit.path
    if labeler is not None:
        data.classes = _class_table(Path(request.keywords), rows, flagged_mask, readback)
    intervals = [Interval(e.name, e.point, e.lower, e.upper) for e in calibration.estimates] if calibration else []
    data.density_png = density_png(rows.distance[rows.ok], summary.gamma, intervals)
    if flagged_mask is not None:
        rated = [s for s in data.shards if s.flagged_rate is not None]
        data.shard_png = shard_rate_png([s.shard for s in rated], [s.flagged_rate for s in rated],
                                        summary.flagged_rate or 0.0)
    return data


def _threshold(request: ReportRequest, calibration: CalibrationSection | None,
               filter_section: FilterSection | None) -> Threshold | None:
    """--gamma, else the calibration's gamma, else the gamma the filter ran with, else none."""
    if request.gamma is not None and calibration is not None:
        raise ReportError("give at most one of --gamma G and --calibration FILE")
    if request.gamma is not None:
        return resolve_threshold(request.gamma, None)
    if calibration is not None:
        return Threshold(gamma=calibration.gamma, source=f"calibration {calibration.path}")
    if filter_section is not None and filter_section.gamma is not None:
        return Threshold(gamma=filter_section.gamma, source=f"filter run {filter_section.path}")
    return None


def _summary(rows: ScoreRows, threshold: Threshold | None, flagged: np.ndarray | None,
             policy: GatePolicy | None) -> Summary:
    ok = rows.ok
    reasons = Counter(_reason_class(e, s) for e, s, good in zip(rows.error, rows.status, ok) if not good)
    return Summary(
        pairs=len(rows), ok=int(ok.sum()), errors=int((~ok).sum()), errors_by_reason=dict(sorted(reasons.items())),
        gamma=None if threshold is None else threshold.gamma,
        gamma_source=None if threshold is None else threshold.source,
        flagged=None if flagged is None else int(flagged.sum()), policy=policy,
    )


def _reason_class(error: str | None, status: str) -> str:
    """'corrupt_image: OSError: ...' -> 'corrupt_image', as the score manifest counts them."""
    if error:
        return str(error).split(":", 1)[0]
    return "no_distance" if status == "ok" else "unknown_error"


def _verdict(summary: Summary) -> Verdict:
    if summary.flagged is None:
        return Verdict("unknown", f"no threshold given: {summary.pairs:,} pairs scored, {summary.errors:,} errors; "
                                  "pass --calibration or --gamma to flag pairs")
    rate = summary.flagged_rate
    counted = f"{summary.flagged:,} of {summary.ok:,} scored pairs flagged ({rate:.3%})" if rate is not None else \
        "no pair could be scored"
    if summary.policy is not None:
        failures = policy_failures(summary.pairs, summary.ok, summary.flagged, summary.policy)
        if failures:
            return Verdict("fail", f"FAIL: {counted}", tuple(failures))
        return Verdict("pass", f"PASS: {counted}", (
            f"flagged rate within {summary.policy.max_flagged_rate:.3%}",
            f"error rate {summary.error_rate:.3%} within {summary.policy.max_error_rate:.3%}"))
    if summary.flagged or summary.errors:
        return Verdict("review", f"REVIEW: {counted}, {summary.errors:,} could not be scored",
                       ("no policy given (--max-flagged-rate), so no pass / fail",))
    return Verdict("clean", f"CLEAN: {counted}, no errors")


def _model_section(manifest: dict[str, Any]) -> ModelSection:
    fingerprint = manifest.get("fingerprint") or {}
    return ModelSection(
        description=describe_fingerprint(fingerprint), model=manifest.get("model") or {}, fingerprint=fingerprint,
        clipguard_version=manifest.get("clipguard_version"), complete=bool(manifest.get("complete", False)),
        shards_total=int(manifest.get("shards_total", 0)), shards_done=int(manifest.get("shards_done", 0)),
    )


def _manifest_urls(manifest: dict[str, Any], rows: ScoreRows) -> dict[str, str]:
    urls = {e["shard"]: e["url"] for e in manifest.get("shards", []) if isinstance(e, dict) and "url" in e}
    return {str(s): urls.get(str(s)) for s in dict.fromkeys(rows.shard)} | urls


def _signal_table(rows: ScoreRows, name: str, flagged: np.ndarray | None) -> SignalTable:
    values = rows.signals[name]
    finite = np.isfinite(values)
    present = values[finite]
    quantiles = {f"p{round(q * 100)}": float(np.quantile(present, q)) for q in QUANTILES} if present.size else {}
    top_index = np.flatnonzero(finite)[np.argsort(-present, kind="stable")[:SIGNAL_TOP]] if present.size else []
    primary = name == PRIMARY_SIGNAL
    return SignalTable(
        name=name, primary=primary, n=int(present.size), missing=int((~finite).sum()),
        mean=float(present.mean()) if present.size else None, quantiles=quantiles,
        maximum=float(present.max()) if present.size else None,
        flagged=int(flagged.sum()) if primary and flagged is not None else None,
        top=tuple(SignalRow(str(rows.shard[i]), str(rows.key[i]), float(values[i])) for i in top_index),
    )


def _shard_rows(rows: ScoreRows, manifest: dict[str, Any], flagged: np.ndarray | None) -> list[ShardRow]:
    recorded = {e["shard"]: e for e in manifest.get("shards", []) if isinstance(e, dict) and "shard" in e}
    order = list(dict.fromkeys(str(s) for s in rows.shard))
    position = {name: i for i, name in enumerate(order)}
    # One pass of bincounts, not one mask per shard: a scrape has thousands of shards.
    which = np.fromiter((position[str(s)] for s in rows.shard), dtype=np.int64, count=len(rows))

    def count(mask: np.ndarray) -> np.ndarray:
        return np.bincount(which[mask], minlength=len(order))

    pairs, ok = count(np.ones(len(rows), bool)), count(rows.ok)
    flagged_counts = None if flagged is None else count(flagged)
    return [ShardRow(
        shard=name, pairs=int(pairs[i]), ok=int(ok[i]), errors=int(pairs[i] - ok[i]),
        flagged=None if flagged_counts is None else int(flagged_counts[i]),
        truncated=bool(recorded.get(name, {}).get("truncated", False)), read_error=recorded.get(name, {}).get("read_error"),
    ) for i, name in enumerate(order)]


def _worst_ids(rows: ScoreRows, n: int) -> list[PairId]:
    ok = np.flatnonzero(rows.ok)
    order = ok[np.argsort(-rows.distance[ok], kind="stable")[:max(n, 0)]]
    return [(str(rows.shard[i]), str(rows.key[i])) for i in order]


def _flag_reason(distance: float | None, threshold: Threshold | None, error: str | None) -> tuple[bool, str]:
    if distance is None:
        return False, f"not scored: {error or 'no distance'}"
    if threshold is None:
        return False, f"distance {distance:.4f} (no threshold given)"
    if threshold.flags(distance):
        return True, f"flagged: distance {distance:.4f} >= gamma {threshold.gamma:.4f}"
    return False, f"kept: distance {distance:.4f} < gamma {threshold.gamma:.4f}"


def _pair_view(rows: ScoreRows, index: dict[PairId, int], pair: PairId, threshold: Threshold | None,
               readback: ReadBack) -> PairView:
    row = index.get(pair)
    label = readback.labels.get(pair)
    if row is None:
        thumbnail = Thumbnail(pair[0], pair[1], None, None, "not among the scored pairs")
        return PairView(pair[0], pair[1], None, False, "not among the scored pairs", thumbnail,
                        label.name if label else None)
    thumbnail = readback.thumbnails.get(pair) or Thumbnail(pair[0], pair[1], None, None, "not read back")
    distance = float(rows.distance[row]) if rows.ok[row] else None
    flagged, reason = _flag_reason(distance, threshold, rows.error[row])
    return PairView(pair[0], pair[1], distance, flagged, reason, thumbnail, label.name if label else None)


def _error_rows(rows: ScoreRows) -> list[ErrorRow]:
    bad = np.flatnonzero(~rows.ok)[:SHOWN_ERRORS]
    return [ErrorRow(str(rows.shard[i]), str(rows.key[i]), str(rows.error[i] or "no distance")) for i in bad]


def _finding_view(finding: Finding, rows: ScoreRows, index: dict[PairId, int], threshold: Threshold | None,
                  readback: ReadBack) -> FindingView:
    ids = [(p.shard, p.key) for p in finding.pairs]
    rows_of = [index.get(pid) for pid in ids]
    scored = [r for r in rows_of if r is not None and rows.ok[r]]
    flagged = None if threshold is None else sum(threshold.flags(float(rows.distance[r])) for r in scored)
    shown = tuple(_pair_view(rows, index, pid, threshold, readback) for pid in ids[:FINDING_THUMBNAILS])
    return FindingView(finding=finding, shown=shown, scored=len(scored), flagged=flagged,
                       unknown=sum(r is None for r in rows_of))


def _class_table(keywords: Path, rows: ScoreRows, flagged: np.ndarray | None, readback: ReadBack) -> ClassTable:
    """One row per class that captions name; unlabelled pairs by reason."""
    per_row: list[Label | None] = [readback.labels.get((str(s), str(k))) for s, k in zip(rows.shard, rows.key)]
    unlabelled: Counter = Counter()
    members: dict[str, list[int]] = {}
    for i, label in enumerate(per_row):
        if label is None:
            unlabelled[SHARD_UNREADABLE if str(rows.shard[i]) in readback.unreadable_shards else "not_read"] += 1
        elif label.name is None:
            unlabelled[label.reason] += 1
        else:
            members.setdefault(label.name, []).append(i)
    table_rows = []
    for name, idx in sorted(members.items(), key=lambda item: (-len(item[1]), item[0])):
        idx = np.asarray(idx)
        ok = idx[rows.ok[idx]]
        table_rows.append(ClassRow(
            name=name, pairs=idx.size, ok=ok.size, flagged=None if flagged is None else int(flagged[idx].sum()),
            median_distance=float(np.median(rows.distance[ok])) if ok.size else None,
        ))
    return ClassTable(keywords=keywords, rows=tuple(table_rows), unlabelled=dict(sorted(unlabelled.items())))


# ---------------------------------------------------------------------------------------------
# Calibration and filter results


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{what} {path} is not readable JSON: {exc}") from None
    if not isinstance(content, dict):
        raise ReportError(f"{what} {path} is not a JSON object")
    return content


MAX_EMBEDDED_PNG_BYTES = 8 << 20
ESTIMATE_NAMES = (("recall", "recall"), ("false_positive_rate", "FPR"), ("precision", "precision"),
                  ("flagged_fraction", "flagged"))


def _calibration_section(path: Path, fingerprint: dict[str, Any]) -> CalibrationSection:
    path = Path(path)
    threshold = load_calibration(path)  # the same checks as filter and gate
    check_threshold_model(threshold, fingerprint)
    payload = _read_json(path, "calibration file")
    estimates = payload.get("estimates") if isinstance(payload.get("estimates"), dict) else {}
    views = []
    for key, name in ESTIMATE_NAMES:
        e = estimates.get(key)
        if isinstance(e, dict) and isinstance(e.get("lower"), (int, float)) and isinstance(e.get("upper"), (int, float)):
            views.append(EstimateView(name, e.get("point"), float(e["lower"]), float(e["upper"])))
    densities = path.parent / str(payload.get("densities") or "densities.png")
    return CalibrationSection(
        path=path, gamma=threshold.gamma, method=payload.get("method"), criterion=payload.get("criterion"),
        targets=payload.get("targets") or {}, confidence=payload.get("confidence"),
        n_labelled=payload.get("n_labelled"), n_positive_labels=payload.get("n_positive_labels"),
        roc_auc=payload.get("roc_auc"), estimates=tuple(views), densities_png=_png_or_none(densities),
    )


def _png_or_none(path: Path) -> bytes | None:
    try:
        if not path.is_file() or path.stat().st_size > MAX_EMBEDDED_PNG_BYTES:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    return data if data.startswith(b"\x89PNG\r\n\x1a\n") else None


def _filter_section(path: Path, fingerprint: dict[str, Any]) -> FilterSection:
    path = Path(path)
    manifest_path = path / FILTER_MANIFEST_NAME if path.is_dir() else path
    manifest = _read_json(manifest_path, "filter manifest")
    totals = manifest.get("totals")
    if not isinstance(totals, dict) or not all(isinstance(totals.get(k), int) for k in ("read", "kept", "flagged", "errored")):
        raise ReportError(f"{manifest_path} has no \"totals\" with read, kept, flagged and errored; "
                          "pass the folder `clipguard filter` wrote (with filter_manifest.json)")
    gamma = manifest.get("gamma")
    outputs = manifest.get("outputs") if isinstance(manifest.get("outputs"), dict) else {}
    return FilterSection(
        path=manifest_path, complete=bool(manifest.get("complete", False)),
        gamma=float(gamma) if isinstance(gamma, (int, float)) and not isinstance(gamma, bool) else None,
        gamma_source=manifest.get("gamma_source"), totals={k: int(v) for k, v in totals.items() if isinstance(v, int)},
        errors_by_reason=dict(manifest.get("errors_by_reason") or {}),
        inputs=tuple(e for e in manifest.get("inputs", []) if isinstance(e, dict)),
        clean_parts=len(outputs.get("clean", []) or []), quarantine_parts=len(outputs.get("quarantine", []) or []),
        same_model=same_fingerprint(manifest.get("model_fingerprint"), fingerprint),
    )


def _filter_warnings(section: FilterSection, threshold: Threshold | None) -> list[str]:
    warnings = []
    if not section.same_model:
        warnings.append(f"the filter run in {section.path} used another model than these scores; its counts "
                        "describe that model's distances")
    if threshold is not None and section.gamma is not None and section.gamma != threshold.gamma:
        warnings.append(f"the filter ran with gamma {section.gamma:.4f}, this report flags at "
                        f"{threshold.gamma:.4f} ({threshold.source})")
    if not section.complete:
        warnings.append(f"the filter run in {section.path} is incomplete")
    totals = section.totals
    if totals["kept"] + totals["flagged"] + totals["errored"] != totals["read"]:
        warnings.append(f"the filter's counts do not add up: kept + flagged + errored != read ({totals})")
    return warnings

