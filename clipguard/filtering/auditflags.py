"""What an audit adds to a pair's verdict: membership in a finding, or a signal over its threshold.

Pair distance alone misses the poisons whose captions fit their images well enough; `clipguard
audit` finds them by structure (one image behind many captions, an over-represented class cell,
a tight cluster of near-identical images) and writes, per shard, each pair's cross-pair signal
values. A filter or gate given an audit folder flags a pair when

- it is one of a finding's pairs (``findings.json``), or
- a cross-pair signal given a threshold (``SignalRule``) is over it for that pair (the signal's
  own flag rule: a value above the threshold; a pair the signal did not measure is never flagged),

on top of the distance rule. The reason names what flagged it, so a person reading the
quarantine knows which signal to look at. Memory: findings' pairs (a few per attack) are held;
signal columns are read one shard at a time, as the filter reaches that shard.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from clipguard.errors import ClipguardError
from clipguard.signals import Scope, get_signal
from clipguard.signals.registry import AUDIT_SIGNALS_DIR


class AuditFlagsError(ClipguardError):
    """An audit folder or a signal rule that a filter cannot use."""


@dataclass(frozen=True)
class SignalRule:
    """Flag a pair whose value of ``signal`` is above ``threshold``."""

    signal: str
    threshold: float

    @classmethod
    def parse(cls, text: str) -> "SignalRule":
        """``NAME=VALUE`` as typed on the command line (``image_fan_in=5``)."""
        name, threshold = parse_name_value(text, "a signal threshold", "image_fan_in=5", "threshold")
        return cls(validated_cross_pair(name), threshold)

    def to_dict(self) -> dict:
        return {"signal": self.signal, "threshold": self.threshold, "rule": f"{self.signal} > {self.threshold:g}"}


def parse_name_value(text: str, what: str, example: str, value_name: str, form: str = "NAME=VALUE") -> tuple[str, float]:
    """``NAME=VALUE`` with a finite number: ``--signal-threshold`` and gate's ``--max-rate-by``."""
    name, sep, value = text.partition("=")
    if not sep:
        raise AuditFlagsError(f"{what} is {form} (e.g. {example}), not {text!r}")
    try:
        number = float(value)
    except ValueError:
        raise AuditFlagsError(f"the {value_name} of {name} must be a number, not {value!r}") from None
    if not np.isfinite(number):
        raise AuditFlagsError(f"the {value_name} of {name} must be finite, not {value!r}")
    return name.strip(), number


def validated_cross_pair(name: str) -> str:
    signal = get_signal(name)  # an unknown name is a SignalError listing the known ones
    if signal.scope is not Scope.cross_pair:
        raise AuditFlagsError(
            f"{name} is a per-pair signal, decided by gamma (--gamma / --calibration); give a cross-pair signal "
            "written by `clipguard audit`"
        )
    return signal.name


@dataclass
class AuditFlags:
    """An audit's findings and signal rules, looked up shard by shard."""

    folder: Path
    rules: tuple[SignalRule, ...] = ()
    use_findings: bool = True
    # (shard, key) -> the name of the most significant finding that holds the pair
    finding_of: dict[tuple[str, str], str] = field(default_factory=dict)
    findings_sha256: str | None = None
    n_findings: int = 0
    kind_of: dict[str, str | None] = field(default_factory=dict)  # finding name -> its kind (None: not given)

    @classmethod
    def load(cls, folder: Path | str, rules: tuple[SignalRule, ...] = (), use_findings: bool = True) -> "AuditFlags":
        # Here, not at import: clipguard.reporting imports the gate, which imports this module.
        from clipguard.reporting.findings import FINDINGS_NAME, findings_path, read_findings

        folder = Path(folder)
        if not (folder / FINDINGS_NAME).is_file():
            raise AuditFlagsError(f"{folder} holds no {FINDINGS_NAME}; run `clipguard audit SCORES --out {folder}` first")
        path = findings_path(folder)
        audit = read_findings(folder)
        finding_of: dict[tuple[str, str], str] = {}
        kind_of = {finding.name: finding.kind for finding in audit.findings}
        for finding in audit.findings:  # ranked most significant first: a pair keeps its first finding
            for pair in finding.pairs:
                finding_of.setdefault((pair.shard, pair.key), finding.name)
        if rules and not (folder / AUDIT_SIGNALS_DIR).is_dir():
            raise AuditFlagsError(f"{folder} has no {AUDIT_SIGNALS_DIR}/ folder, so signal thresholds cannot be applied")
        return cls(folder=folder, rules=tuple(rules), use_findings=use_findings,
                   finding_of=finding_of if use_findings else {},
                   findings_sha256=hashlib.sha256(path.read_bytes()).hexdigest(), n_findings=len(audit.findings),
                   kind_of=kind_of)

    @cached_property
    def findings_by_shard(self) -> dict[str, dict[str, str]]:
        """shard -> key -> finding name: each shard looks up only its own pairs."""
        by_shard: dict[str, dict[str, str]] = {}
        for (shard, key), name in self.finding_of.items():
            by_shard.setdefault(shard, {})[key] = name
        return by_shard

    def settings(self) -> dict:
        """What a finished shard's outputs depend on: a changed audit or rule redoes the shard."""
        return {"folder": str(self.folder.resolve()), "findings_sha256": self.findings_sha256,
                "use_findings": self.use_findings, "rules": [r.to_dict() for r in self.rules]}

    def shard_reasons(self, shard: str) -> dict[str, "AuditReason"]:
        """key -> why the audit flags that pair of ``shard`` (absent keys: the audit does not)."""
        reasons: dict[str, list[tuple[str, str]]] = {}
        for key, name in self.findings_by_shard.get(shard, {}).items():
            reasons.setdefault(key, []).append(("finding", f"finding '{name}'"))
        if self.rules:
            path = self.folder / AUDIT_SIGNALS_DIR / f"{shard}.parquet"
            if not path.is_file():
                raise AuditFlagsError(
                    f"the audit in {self.folder} has no signals for shard {shard} ({path} is missing): audit the "
                    "scores these shards were scored into"
                )
            columns = {r.signal: get_signal(r.signal).column for r in self.rules}
            present = set(pq.read_schema(path).names)
            missing = sorted(c for c in columns.values() if c not in present)
            if missing:
                raise AuditFlagsError(f"{path} has no column {', '.join(missing)}")
            table = pq.read_table(path, columns=["key", *sorted(set(columns.values()))])
            keys = table.column("key").to_pylist()
            for rule in self.rules:
                signal = get_signal(rule.signal)
                values = table.column(signal.column).to_numpy(zero_copy_only=False).astype(np.float64)
                for row in np.flatnonzero(signal.flags(values, rule.threshold)):
                    reasons.setdefault(keys[row], []).append((rule.signal, f"{rule.signal} {values[row]:g} > {rule.threshold:g}"))
        return {key: AuditReason(tuple(t for t, _ in why), "; ".join(text for _, text in why)) for key, why in reasons.items()}


@dataclass(frozen=True)
class AuditReason:
    """What flagged a pair: ``by`` names ("finding", signal names) for counting, ``text`` for people."""

    by: tuple[str, ...]
    text: str


def audit_flags_from_options(folder: Path | str | None, signal_thresholds: list[str] | None = None,
                             use_findings: bool = True) -> AuditFlags | None:
    """``--audit``, ``--signal-threshold NAME=VALUE`` (repeated) and ``--findings/--no-findings``,
    as filter and gate take them."""
    if folder is None:
        if signal_thresholds:
            raise AuditFlagsError("--signal-threshold needs --audit AUDIT (the folder `clipguard audit` wrote)")
        return None
    rules = tuple(SignalRule.parse(text) for text in signal_thresholds or ())
    if not use_findings and not rules:
        raise AuditFlagsError("--audit with --no-findings flags nothing: give --signal-threshold NAME=VALUE too")
    return AuditFlags.load(folder, rules, use_findings=use_findings)


def calibrated_audit(threshold, audit: AuditFlags | None) -> AuditFlags | None:
    """The audit flags a threshold holds with: the audit its gamma was calibrated with
    (`check_audit_matches`), plus the signal rules the calibration chose beside gamma (rules given
    on the command line for the same signal win: the person asked for them)."""
    check_audit_matches(threshold, audit)
    rules = getattr(threshold, "signal_rules", ())
    if not rules:
        return audit
    if audit is None:
        shown = ", ".join(f"{name} > {value:g}" for name, value in rules)
        raise AuditFlagsError(f"the {threshold.source} chose thresholds for audit signals too ({shown}): pass the "
                              "audit they were calibrated on with --audit")
    given = {r.signal for r in audit.rules}
    added = tuple(SignalRule(validated_cross_pair(name), value) for name, value in rules if name not in given)
    if added and not (audit.folder / AUDIT_SIGNALS_DIR).is_dir():
        raise AuditFlagsError(f"{audit.folder} has no {AUDIT_SIGNALS_DIR}/ folder, so the calibrated signal thresholds "
                              "cannot be applied")
    return dataclasses.replace(audit, rules=audit.rules + added)


def check_audit_matches(threshold, audit: AuditFlags | None) -> None:
    """A gamma calibrated together with an audit's findings is only the calibrated rule with them."""
    wanted = getattr(threshold, "audit_findings_sha256", None)
    if wanted is None:
        return
    if audit is None or not audit.use_findings:
        raise AuditFlagsError(
            f"the {threshold.source} chose gamma for 'distance >= gamma or in a finding of an audit': pass that "
            "audit with --audit (and its findings), or calibrate again without --audit"
        )
    if audit.findings_sha256 != wanted:
        raise AuditFlagsError(
            f"the {threshold.source} was calibrated with another audit's findings than {audit.folder}'s: pass the "
            "audit it was calibrated with, or calibrate again with this one"
        )
