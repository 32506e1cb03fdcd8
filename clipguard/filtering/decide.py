"""One scored sample -> kept, flagged or errored, with the reason a person will read."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from clipguard.filtering.scores import ScoredSample
from clipguard.filtering.threshold import Threshold


# Decoder messages can embed object addresses ("<_io.BytesIO object at 0x7f...>"), which differ
# between runs; dropped so that the same input always gives byte-identical quarantine shards.
_OBJECT_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class Verdict(str, Enum):
    kept = "kept"
    flagged = "flagged"  # scored, and cosine distance >= gamma, or flagged by an audit
    errored = "errored"  # could not be scored (or could not be read safely), so it cannot be vetted


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str | None
    distance: float | None

    @property
    def quarantined(self) -> bool:
        return self.verdict is not Verdict.kept


def decide(scored: ScoredSample, threshold: Threshold, audit_reason: str | None = None) -> Decision:
    """``audit_reason``: why an audit flags this pair (a finding it belongs to, a cross-pair
    signal over its threshold), or None; see `clipguard.filtering.auditflags`."""
    # The reader's problems come first: a sample with an unsafe or truncated member must never be
    # kept, whatever a score file says about it.
    if scored.sample.problems:
        return Decision(Verdict.errored, "error: " + "; ".join(scored.sample.problems), scored.distance)
    if scored.error is not None:
        return Decision(Verdict.errored, "error: " + _OBJECT_ADDRESS.sub("", scored.error), None)
    if scored.distance is None:
        return Decision(Verdict.errored, "error: the score file holds no distance for this pair", None)
    why = []
    if threshold.flags(scored.distance):
        why.append(f"distance {scored.distance:.4f} >= gamma {threshold.gamma:.4f}")
    if audit_reason:
        why.append(f"audit: {audit_reason}")
    if why:
        return Decision(Verdict.flagged, "flagged: " + "; ".join(why), scored.distance)
    return Decision(Verdict.kept, None, scored.distance)
