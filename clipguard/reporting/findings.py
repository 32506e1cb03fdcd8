"""Audit findings: what a structural audit found, in a small JSON format that the report renders.

`clipguard audit` writes this format (`clipguard/audit/output.py`, with kind, goal, observed,
expected and each pair's caption added; this reader ignores what it does not show).

``findings.json`` (a file, or an audit folder holding one)::

    {
      "format": "clipguard-audit/1",          # optional; when present it must be this
      "findings": [
        {
          "name": "one image, many captions",  # short title, required, non-empty
          "description": "image sha256 9f2c... carries 41 distinct captions",  # required (may be "")
          "p_value": 0.0003,                   # a number in [0, 1], or null when the test gives none
          "pairs": [{"shard": "00000", "key": "000123"}, ...]   # the pairs involved, may be empty
        }
      ]
    }

A bare JSON list of findings is accepted too. Shard names are the names in the score manifest
(the shard file's stem). Anything else is refused with the path and the position of the bad
entry, never skipped: a finding that silently vanished from an audit report would be worse than
no report.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipguard.errors import ClipguardError

FINDINGS_NAME = "findings.json"
FINDINGS_FORMAT = "clipguard-audit/1"
MAX_FINDINGS_BYTES = 64 << 20


# The kinds of finding `clipguard audit` writes ("kind" in findings.json), with their titles: the
# format's vocabulary, so that a gate can hold each kind to its own limit (`--max-findings-of`).
KIND_TITLES = {
    "class_pair": "class-pair concentration",
    "image_fan_in": "image fan-in",
    "image_cluster": "near-duplicate image cluster",
    "caption_fan_out": "caption fan-out",
    "relabelled_images": "relabelled images",
    "stamped_images": "stamped images (one patch on many images)",
}


class AuditFormatError(ClipguardError):
    """An audit findings file that is missing, unreadable or not in the findings format."""


@dataclass(frozen=True)
class PairRef:
    shard: str
    key: str


@dataclass(frozen=True)
class Finding:
    name: str
    description: str
    p_value: float | None
    pairs: tuple[PairRef, ...]
    kind: str | None = None  # one of KIND_TITLES for clipguard's own audits; absent in other tools' files


@dataclass(frozen=True)
class AuditFindings:
    path: Path
    findings: tuple[Finding, ...]


def findings_path(audit: Path) -> Path:
    """The findings file that ``audit`` is, or holds."""
    audit = Path(audit)
    if audit.is_dir():
        candidate = audit / FINDINGS_NAME
        if not candidate.is_file():
            raise AuditFormatError(f"audit folder {audit} has no {FINDINGS_NAME}")
        return candidate
    if not audit.is_file():
        raise AuditFormatError(f"audit findings {audit} do not exist")
    return audit


def read_findings(audit: Path) -> AuditFindings:
    path = findings_path(audit)
    try:
        if path.stat().st_size > MAX_FINDINGS_BYTES:
            raise AuditFormatError(f"audit findings {path} are larger than {MAX_FINDINGS_BYTES} bytes")
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AuditFormatError(f"audit findings {path} are not readable JSON: {exc}") from None
    return AuditFindings(path=path, findings=parse_findings(content, str(path)))


def parse_findings(content: Any, where: str = "findings") -> tuple[Finding, ...]:
    if isinstance(content, dict):
        fmt = content.get("format")
        if fmt is not None and fmt != FINDINGS_FORMAT:
            raise AuditFormatError(f"{where} has format {fmt!r}; this clipguard reads {FINDINGS_FORMAT!r}")
        if "findings" not in content:
            raise AuditFormatError(f"{where} is a JSON object without \"findings\" (a list of findings)")
        content = content["findings"]
    if not isinstance(content, list):
        raise AuditFormatError(f"{where} must hold a list of findings {{name, description, p_value, pairs}}")
    return tuple(_parse_finding(entry, f"{where}: finding {i}") for i, entry in enumerate(content))


def _parse_finding(entry: Any, where: str) -> Finding:
    if not isinstance(entry, dict):
        raise AuditFormatError(f"{where} is not an object")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise AuditFormatError(f"{where} needs a non-empty string \"name\"")
    description = entry.get("description")
    if not isinstance(description, str):
        raise AuditFormatError(f"{where} ({name!r}) needs a string \"description\"")
    kind = entry.get("kind")
    if kind is not None and not (isinstance(kind, str) and kind.strip()):
        raise AuditFormatError(f"{where} ({name!r}): \"kind\" must be a non-empty string or absent, got {kind!r}")
    return Finding(name=name.strip(), description=description, p_value=_p_value(entry.get("p_value"), f"{where} ({name!r})"),
                   pairs=_pairs(entry.get("pairs", []), f"{where} ({name!r})"), kind=kind.strip() if kind else None)


def _p_value(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
        raise AuditFormatError(f"{where}: \"p_value\" must be a number in [0, 1] or null, got {value!r}")
    return float(value)


def _pairs(value: Any, where: str) -> tuple[PairRef, ...]:
    if not isinstance(value, list):
        raise AuditFormatError(f"{where}: \"pairs\" must be a list of {{shard, key}}")
    pairs = []
    for i, pair in enumerate(value):
        if not (isinstance(pair, dict) and isinstance(pair.get("shard"), str) and isinstance(pair.get("key"), str)):
            raise AuditFormatError(f"{where}: pair {i} must be an object with string \"shard\" and \"key\"")
        pairs.append(PairRef(shard=pair["shard"], key=pair["key"]))
    return tuple(pairs)
