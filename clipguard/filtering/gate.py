"""`gate`: does a dataset pass a flagged-rate policy? For CI: pass, fail, or could not tell.

Policy. The flagged rate is flagged / scored, over pairs that could be scored ("ok" rows), with
flagged meaning cosine distance >= gamma. Pairs that could not be scored (corrupt image, missing
caption, unsafe member, truncated shard) are not evidence of poisoning, so they do not count as
flagged; but the gate could not vet them either, so they have their own limit, the error rate
errors / pairs (``max_error_rate``, 1% by default). A dataset passes when both rates are within
policy. A truncated shard (cut inside a member, so pairs after the cut are gone and were never
vetted) fails the gate unless ``allow_truncated`` is set. A shard that cannot be read at all, no
pairs at all, or a bad threshold or model is not a verdict but an error (the CLI exits 2).
"""

from __future__ import annotations

import dataclasses
import heapq
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from clipguard.data.pairs import DecodeLimits, read_caption
from clipguard.data.shardspec import Shard
from clipguard.data.sourcemeta import SourceMeta, meta_from_json
from clipguard.data.tarstream import ShardReport
from clipguard.errors import ClipguardError
from clipguard.filtering.auditflags import AuditFlags, AuditReason, calibrated_audit, parse_name_value
from clipguard.filtering.scores import ScoreSources, ShardScores, gather_scores, read_shard_scores, scored_samples
from clipguard.filtering.threshold import FLAG_RULE, Threshold, check_threshold_model
from clipguard.model.loading import LoadedModel
from clipguard.scoring.run import ProgressCallback, ScoreConfig

DEFAULT_MAX_ERROR_RATE = 0.01
DEFAULT_EXAMPLES = 5
CAPTION_SNIPPET_CHARS = 80


@dataclass(frozen=True)
class GatePolicy:
    max_flagged_rate: float
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE
    allow_truncated: bool = False
    # With an audit: at most this many of its findings may hold pairs of these shards (None: no
    # limit), counting only findings of kinds without a limit of their own in max_findings_of.
    max_findings: int | None = None
    # Per finding kind (`reporting.findings.KIND_TITLES`): the most findings of that kind allowed.
    max_findings_of: tuple[tuple[str, int], ...] = ()
    # Per rule ("distance", "finding" or a cross-pair signal name): the most of the scored pairs it
    # alone may flag, beside max_flagged_rate for all rules together.
    max_rate_by: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        for name in ("max_flagged_rate", "max_error_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ClipguardError(f"--{name.replace('_', '-')} must lie in [0, 1], got {value}")
        for rule, value in self.max_rate_by:
            if not 0.0 <= value <= 1.0:
                raise ClipguardError(f"--max-rate-by {rule}={value}: the rate must lie in [0, 1]")
        # Here, not at import: clipguard.reporting imports the gate.
        from clipguard.reporting.findings import KIND_TITLES

        for kind, count in self.max_findings_of:
            if kind not in KIND_TITLES:
                raise ClipguardError(f"--max-findings-of names {kind!r}, which is not a kind of finding; the kinds are "
                                     f"{', '.join(KIND_TITLES)}")
            if not isinstance(count, int) or count < 0:
                raise ClipguardError(f"--max-findings-of {kind}={count}: the count must be a whole number >= 0")


def parse_findings_of(texts: list[str] | None) -> tuple[tuple[str, int], ...]:
    """``KIND=COUNT`` as typed (``stamped_images=0``, ``image_fan_in=2``)."""
    parsed = (parse_name_value(text, "--max-findings-of", "stamped_images=0 or image_fan_in=2", "count", "KIND=COUNT")
              for text in texts or ())
    # A whole count becomes an int; anything else is left for GatePolicy to refuse.
    return tuple((kind, int(count) if count == int(count) else count) for kind, count in parsed)


def finding_limit_failures(names: list[str], kind_of: dict[str, str | None], policy: GatePolicy) -> list[str]:
    """Each kind with a limit of its own against that limit; the other findings (those of other
    kinds, and any whose file gives no kind) against --max-findings."""
    own = dict(policy.max_findings_of)
    failures = []
    for kind, limit in policy.max_findings_of:
        of_kind = [n for n in names if kind_of.get(n) == kind]
        if len(of_kind) > limit:
            failures.append(f"the audit holds {len(of_kind)} {kind} finding(s) in these shards, more than its maximum "
                            f"{limit}: {_shown(of_kind)}")
    rest = [n for n in names if kind_of.get(n) not in own]
    if policy.max_findings is not None and len(rest) > policy.max_findings:
        other = " of other kinds" if own else ""
        failures.append(f"the audit holds {len(rest)} finding(s){other} in these shards, more than the maximum "
                        f"{policy.max_findings}: {_shown(rest)}")
    return failures


def _shown(names: list[str]) -> str:
    return "; ".join(names[:3]) + ("; ..." if len(names) > 3 else "")


def parse_rate_by(texts: list[str] | None) -> tuple[tuple[str, float], ...]:
    """``RULE=RATE`` as typed (``finding=0``, ``image_fan_in=0.001``, ``distance=0.01``)."""
    return tuple(parse_name_value(text, "--max-rate-by", "finding=0 or image_fan_in=0.001", "rate", "RULE=RATE") for text in texts or ())


def _check_rate_rules(policy: GatePolicy, audit: AuditFlags | None) -> None:
    """A --max-rate-by rule the gate does not apply would never fail: say so instead."""
    known = {"distance"} | ({"finding"} if audit is not None and audit.use_findings else set()) \
        | {r.signal for r in (audit.rules if audit is not None else ())}
    unknown = [rule for rule, _ in policy.max_rate_by if rule not in known]
    if unknown:
        raise ClipguardError(f"--max-rate-by names {', '.join(unknown)}, which this gate does not flag by; its rules "
                             f"are {', '.join(sorted(known))} (a signal needs --signal-threshold or a calibration that sets it)")


@dataclass(frozen=True)
class GateConfig:
    policy: GatePolicy
    reuse_scores: Path | None = None  # a score folder to reuse (read only)
    save_scores: Path | None = None  # where to score missing shards; a temporary folder if None
    examples: int = DEFAULT_EXAMPLES
    score: ScoreConfig = field(default_factory=ScoreConfig)
    audit: AuditFlags | None = None  # its findings' pairs and signal rules count as flagged too


@dataclass(frozen=True)
class FlaggedExample:
    shard: str
    key: str
    position: int
    distance: float
    caption: str | None  # a one-line snippet; None where the caption could not be read
    uid: str | None = None  # from the sample's metadata, to find it at its source
    url: str | None = None


@dataclass
class GateShard:
    shard: str
    pairs: int
    ok: int
    errors: int
    flagged: int
    truncated: bool
    scores: str  # "reused" or "scored"


@dataclass
class GateReport:
    passed: bool
    failures: list[str]  # why it failed, one line each; empty when it passed
    pairs: int
    ok: int
    errors: int
    errors_by_reason: dict[str, int]
    flagged: int
    policy: GatePolicy
    threshold: Threshold
    fingerprint: dict[str, Any]
    shards: list[GateShard]
    top_flagged: list[FlaggedExample]
    wall_seconds: float
    audit: dict[str, Any] | None = None  # findings in these shards, flagged counts by rule

    @property
    def flagged_rate(self) -> float | None:
        return self.flagged / self.ok if self.ok else None

    @property
    def error_rate(self) -> float:
        return self.errors / self.pairs if self.pairs else 0.0

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "fail"

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "passed": self.passed,
            "failures": self.failures,
            "pairs": self.pairs,
            "ok": self.ok,
            "errors": self.errors,
            "errors_by_reason": self.errors_by_reason,
            "flagged": self.flagged,
            "flagged_rate": self.flagged_rate,
            "max_flagged_rate": self.policy.max_flagged_rate,
            "error_rate": self.error_rate,
            "max_error_rate": self.policy.max_error_rate,
            "gamma": self.threshold.gamma,
            "gamma_source": self.threshold.source,
            "calibration_sha256": self.threshold.calibration_sha256,
            "flag_rule": FLAG_RULE,
            "model_fingerprint": self.fingerprint,
            "shards": [vars(s) for s in self.shards],
            "truncated_shards": [s.shard for s in self.shards if s.truncated],
            "top_flagged": [vars(e) for e in self.top_flagged],
            "audit": self.audit,
            "max_findings": self.policy.max_findings,
            "max_rate_by": dict(self.policy.max_rate_by),
            "max_findings_of": dict(self.policy.max_findings_of),
            "wall_seconds": self.wall_seconds,
        }


def gate_shards(
    shards: list[Shard],
    loaded: LoadedModel,
    threshold: Threshold,
    config: GateConfig,
    progress: ProgressCallback | None = None,
) -> GateReport:
    start = time.perf_counter()
    fingerprint = loaded.info.fingerprint()
    check_threshold_model(threshold, fingerprint)
    config = dataclasses.replace(config, audit=calibrated_audit(threshold, config.audit))
    _check_rate_rules(config.policy, config.audit)
    with tempfile.TemporaryDirectory(prefix="clipguard-gate-") as scratch:
        scores_dir = Path(config.save_scores) if config.save_scores is not None else Path(scratch)
        sources = gather_scores(shards, loaded, config.reuse_scores, scores_dir, config.score, progress)
        _refuse_failed(sources)
        tables = [read_shard_scores(s.name, sources.files[s.name]) for s in shards]
        _refuse_unreadable(tables)
        examples = _top_flagged(tables, threshold, config.examples)
        captions = _verify_and_read_captions(shards, tables, sources, examples)
    audit = _audit_verdicts(tables, config.audit) if config.audit is not None else None
    return _report(tables, sources, threshold, fingerprint, config.policy, examples, captions, start, audit)


@dataclass
class _AuditVerdicts:
    """Per shard, the keys the audit flags and by what; the findings that hold pairs of these shards."""

    by_shard: dict[str, dict[str, AuditReason]]
    findings: list[str]
    folder: str
    kind_of: dict[str, str | None] = field(default_factory=dict)

    def flags(self, shard: str, key: str) -> bool:
        return key in self.by_shard.get(shard, {})


def _audit_verdicts(tables: list[ShardScores], audit: AuditFlags) -> _AuditVerdicts:
    names = {t.shard for t in tables}
    findings = list(dict.fromkeys(name for (shard, _), name in audit.finding_of.items() if shard in names))
    return _AuditVerdicts({t.shard: audit.shard_reasons(t.shard) for t in tables}, findings, str(audit.folder),
                          {name: audit.kind_of.get(name) for name in findings})


def _refuse_failed(sources: ScoreSources) -> None:
    if sources.failed:
        detail = "; ".join(f"{name}: {why}" for name, why in list(sources.failed.items())[:5])
        raise ClipguardError(
            f"{len(sources.failed)} shard(s) could not be read, so the gate cannot vet them ({detail}); "
            "rerun once the source is reachable"
        )


def _refuse_unreadable(tables: list[ShardScores]) -> None:
    unreadable = [t for t in tables if t.read_error is not None and len(t) == 0]
    if unreadable:
        detail = "; ".join(f"{t.shard}: {t.read_error}" for t in unreadable[:5])
        raise ClipguardError(f"{len(unreadable)} shard(s) could not be read, so the gate cannot vet them ({detail})")
    if sum(len(t) for t in tables) == 0:
        raise ClipguardError("the shards hold no pairs; there is nothing to gate")


@dataclass(frozen=True)
class _Candidate:
    distance: float
    shard_index: int
    position: int


def _top_flagged(tables: list[ShardScores], threshold: Threshold, count: int) -> list[_Candidate]:
    flagged = (
        _Candidate(d, index, position)
        for index, table in enumerate(tables)
        for position, (d, error) in enumerate(zip(table.distances, table.errors))
        if error is None and d is not None and threshold.flags(d)
    )
    # Highest distance first; ties keep shard and tar order.
    return heapq.nsmallest(count, flagged, key=lambda c: (-c.distance, c.shard_index, c.position))


def _verify_and_read_captions(
    shards: list[Shard], tables: list[ShardScores], sources: ScoreSources, examples: list[_Candidate]
) -> "_ReadBack":
    """Read back the shards whose scores were reused (checking that every row still matches its
    sample) and the shards that hold the examples shown (for their captions)."""
    wanted: dict[int, set[int]] = {}
    for candidate in examples:
        wanted.setdefault(candidate.shard_index, set()).add(candidate.position)
    captions: dict[tuple[int, int], str | None] = {}
    sources_of: dict[tuple[int, int], SourceMeta] = {}
    limits = DecodeLimits()
    for index, (shard, table) in enumerate(zip(shards, tables)):
        if shard.name not in sources.reused and index not in wanted:
            continue
        positions = wanted.get(index, set())
        for scored in scored_samples(shard, table, ShardReport(shard=shard.name, url=shard.url)):
            if scored.position in positions:
                caption, _, _ = read_caption(scored.sample, limits)
                captions[(index, scored.position)] = caption_snippet(caption)
                sources_of[(index, scored.position)] = meta_from_json(scored.sample.fields.get("json"))
    return _ReadBack(captions, sources_of)


@dataclass
class _ReadBack:
    """What the gate read back from the shards for the examples it shows."""

    captions: dict[tuple[int, int], str | None]
    sources: dict[tuple[int, int], SourceMeta]


def caption_snippet(caption: str | None, limit: int = CAPTION_SNIPPET_CHARS) -> str | None:
    """One printable line: captions are attacker-written, and end up in CI logs and PR comments."""
    if caption is None:
        return None
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in caption).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _report(
    tables: list[ShardScores],
    sources: ScoreSources,
    threshold: Threshold,
    fingerprint: dict[str, Any],
    policy: GatePolicy,
    examples: list[_Candidate],
    captions: "_ReadBack",
    start: float,
    audit: _AuditVerdicts | None = None,
) -> GateReport:
    shard_rows, reasons, flagged_by = [], Counter(), Counter()
    for table in tables:
        ok = sum(error is None for error in table.errors)
        flagged = 0
        for key, d, error in zip(table.keys, table.distances, table.errors):
            if error is not None:
                continue
            by = ["distance"] if d is not None and threshold.flags(d) else []
            if audit is not None and audit.flags(table.shard, key):
                by += list(audit.by_shard[table.shard][key].by)
            flagged += bool(by)
            flagged_by.update(by)
        reasons.update(error.split(":", 1)[0] for error in table.errors if error is not None)
        shard_rows.append(
            GateShard(table.shard, len(table), ok, len(table) - ok, flagged, table.truncated, sources.origin(table.shard))
        )
    pairs = sum(s.pairs for s in shard_rows)
    ok = sum(s.ok for s in shard_rows)
    flagged = sum(s.flagged for s in shard_rows)
    failures = policy_failures(pairs, ok, flagged, policy, [t.shard for t in tables if t.truncated])
    audit_entry = None
    if audit is not None:
        audit_entry = {"folder": audit.folder, "findings": audit.findings, "flagged_by": dict(sorted(flagged_by.items())),
                       "findings_by_kind": dict(sorted(Counter(k or "unknown" for k in audit.kind_of.values()).items()))}
        for rule, rate in policy.max_rate_by:
            if ok and Fraction(flagged_by[rule], ok) > Fraction(repr(rate)):
                failures.append(f"{rule} alone flagged {flagged_by[rule]} of {ok} scored pairs ({flagged_by[rule] / ok:.3%}), "
                                f"more than its maximum {rate:.3%}")
        failures += finding_limit_failures(audit.findings, audit.kind_of, policy)
    return GateReport(
        passed=not failures,
        failures=failures,
        pairs=pairs,
        ok=ok,
        errors=pairs - ok,
        errors_by_reason=dict(sorted(reasons.items())),
        flagged=flagged,
        policy=policy,
        threshold=threshold,
        fingerprint=fingerprint,
        shards=shard_rows,
        top_flagged=[
            FlaggedExample(
                shard=tables[c.shard_index].shard,
                key=tables[c.shard_index].keys[c.position],
                position=c.position,
                distance=c.distance,
                caption=captions.captions.get((c.shard_index, c.position)),
                uid=caption_snippet(captions.sources.get((c.shard_index, c.position), SourceMeta()).uid),
                url=caption_snippet(captions.sources.get((c.shard_index, c.position), SourceMeta()).url),
            )
            for c in examples
        ],
        wall_seconds=time.perf_counter() - start,
        audit=audit_entry,
    )


def policy_failures(
    pairs: int, ok: int, flagged: int, policy: GatePolicy, truncated_shards: list[str] = ()
) -> list[str]:
    """Rates are compared exactly (as fractions), so 1 flagged in 1000 passes a 0.001 limit."""
    failures = []
    if truncated_shards and not policy.allow_truncated:
        failures.append(
            f"{len(truncated_shards)} shard(s) are truncated, so pairs after the cut were never vetted "
            f"({', '.join(truncated_shards[:5])}); allow_truncated accepts them"
        )
    errors = pairs - ok
    if ok == 0:
        failures.append(f"no pair could be scored ({errors} errors), so the flagged rate is unknown")
    elif Fraction(flagged, ok) > Fraction(repr(policy.max_flagged_rate)):
        failures.append(
            f"flagged rate {flagged / ok:.3%} ({flagged} of {ok} scored pairs) exceeds the maximum {policy.max_flagged_rate:.3%}"
        )
    if pairs and Fraction(errors, pairs) > Fraction(repr(policy.max_error_rate)):
        failures.append(
            f"error rate {errors / pairs:.3%} ({errors} of {pairs} pairs) exceeds the maximum {policy.max_error_rate:.3%}"
        )
    return failures
