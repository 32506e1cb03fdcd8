"""The threshold gamma, where it came from, and the check that it belongs to the scoring model.

A pair is flagged when its cosine distance is at least gamma (``d >= gamma``), the rule the
calibration estimates use. Gamma is only meaningful for the model whose distances it was chosen
on, so a calibration file that names its model must name the one that scores now.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipguard.errors import ClipguardError

FLAG_RULE = "cosine_distance >= gamma"
MAX_DISTANCE = 2.0


@dataclass(frozen=True)
class Threshold:
    gamma: float
    source: str  # "--gamma" or "calibration <path>"
    calibration_sha256: str | None = None
    fingerprint: dict[str, Any] | None = None  # the model the calibration was computed with
    # The audit findings the calibration counted as flagged (their file's sha256), if any: gamma
    # was chosen for "distance >= gamma or in a finding", and holds only with that audit.
    audit_findings_sha256: str | None = None
    # Cross-pair rules calibrated with gamma under one budget ((signal, threshold): flag a pair
    # whose value is above it); they hold only with that audit's signals (`auditflags.calibrated_audit`).
    signal_rules: tuple[tuple[str, float], ...] = ()

    def flags(self, distance: float) -> bool:
        return distance >= self.gamma

    def to_dict(self) -> dict[str, Any]:
        return {
            "gamma": self.gamma,
            "source": self.source,
            "calibration_sha256": self.calibration_sha256,
            "flag_rule": FLAG_RULE,
        }


def resolve_threshold(gamma: float | None, calibration: Path | None) -> Threshold:
    """Exactly one of --gamma and --calibration must be given."""
    if (gamma is None) == (calibration is None):
        raise ClipguardError("give exactly one of --gamma G and --calibration FILE")
    if gamma is not None:
        return Threshold(gamma=_valid_gamma(gamma, "--gamma"), source="--gamma")
    return load_calibration(Path(calibration))


def load_calibration(path: Path) -> Threshold:
    """Read gamma (and the model fingerprint, when present) from a calibration JSON."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ClipguardError(f"cannot read calibration file {path}: {exc.strerror or exc}") from None
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ClipguardError(f"calibration file {path} is not valid JSON: {exc}") from None
    if not isinstance(payload, dict) or "gamma" not in payload:
        raise ClipguardError(
            f"calibration file {path} has no top-level \"gamma\"; produce it with `clipguard calibrate`"
        )
    gamma = _valid_gamma(payload["gamma"], f"\"gamma\" in {path}")
    fingerprint = _calibration_fingerprint(payload, path)
    audit = payload.get("audit")
    return Threshold(
        gamma=gamma,
        source=f"calibration {path}",
        calibration_sha256=hashlib.sha256(raw).hexdigest(),
        fingerprint=fingerprint,
        audit_findings_sha256=audit.get("findings_sha256") if isinstance(audit, dict) else None,
        signal_rules=_signal_rules(payload, path),
    )


def _signal_rules(payload: dict, path: Path) -> tuple[tuple[str, float], ...]:
    rules = payload.get("signal_rules") or []
    try:
        return tuple((str(r["signal"]), float(r["threshold"])) for r in rules)
    except (TypeError, KeyError, ValueError):
        raise ClipguardError(f"\"signal_rules\" in calibration file {path} must be a list of "
                             "{\"signal\": NAME, \"threshold\": VALUE}; produce it with `clipguard calibrate`") from None


def _calibration_fingerprint(payload: dict, path: Path) -> dict | None:
    fingerprint = payload.get("fingerprint")
    if fingerprint is None and isinstance(payload.get("model"), dict):
        fingerprint = payload["model"].get("fingerprint")
    if fingerprint is not None and not isinstance(fingerprint, dict):
        raise ClipguardError(f"\"fingerprint\" in calibration file {path} must be an object")
    return fingerprint


def _valid_gamma(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ClipguardError(f"{what} must be a number, got {value!r}")
    gamma = float(value)
    if not math.isfinite(gamma) or not 0.0 <= gamma <= MAX_DISTANCE:
        raise ClipguardError(f"{what} is {value!r}; a cosine-distance threshold lies in [0, 2]")
    return gamma


def same_fingerprint(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Compare as JSON, so that a tuple in memory equals the list it became in a file."""
    return _canonical(a) == _canonical(b)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def describe_fingerprint(fingerprint: dict[str, Any] | None) -> str:
    if not fingerprint:
        return "unknown model"
    weights = fingerprint.get("weights_sha256")
    weights_text = f"weights sha256 {weights[:12]}" if weights else "random weights"
    return f"{fingerprint.get('architecture', '?')} ({weights_text}, {fingerprint.get('precision', '?')})"


def check_threshold_model(threshold: Threshold, fingerprint: dict[str, Any]) -> None:
    if threshold.fingerprint is not None and not same_fingerprint(threshold.fingerprint, fingerprint):
        raise ClipguardError(
            f"{threshold.source} was calibrated on distances from {describe_fingerprint(threshold.fingerprint)}, "
            f"but this run scores with {describe_fingerprint(fingerprint)}; a gamma does not transfer "
            "between models. Pass the calibration's model options, or recalibrate."
        )
