"""Thresholds for cross-pair signals, under the same false-positive budget as gamma.

`calibrate --audit AUDIT --signal NAME` gives each named signal (a column `clipguard audit`
wrote: `clipguard.signals.registry`) a share of the budget and picks its threshold from the whole
scored population, not from the labels: a signal that flags a share s of all pairs flags at most
s / (1 - phi) of the clean ones, where phi is the poisoned share. phi's upper confidence bound
comes from the labelled sample (Clopper-Pearson on its poison labels), so the signal's FPR bound
holds with that confidence, and it is tight: the population is every pair, where 500 labels would
say nothing finer than 1 in 500 of a signal's false alarms. Gamma is then chosen for "distance >=
gamma or in a finding" at the rest of the budget, so the whole rule's FPR is at most gamma's bound
plus the signals' (the union bound).

A signal's threshold is the smallest value v such that "value > v" flags at most the allowed
number of pairs; a pair the signal did not measure (NaN) is never flagged. Values tied at the
threshold stay unflagged, so a signal whose values tie a lot may flag fewer pairs than allowed
(calibration.json says how many).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from clipguard.calibration.estimates import clopper_pearson
from clipguard.errors import CalibrationError
from clipguard.signals import Scope, get_signal, read_signal


@dataclass(frozen=True)
class SignalThreshold:
    """One calibrated cross-pair rule: flag a pair whose ``signal`` is above ``threshold``."""

    signal: str
    threshold: float
    budget: float  # the FPR share it was given
    flagged_pairs: int  # pairs of the population it flags
    population: int
    poisoned_share_upper: float  # phi's upper bound that the FPR bound divides by
    fpr_upper: float  # flagged / population / (1 - phi upper)
    labelled_clean_flagged: int
    labelled_poisons_flagged: int

    def to_dict(self) -> dict:
        return {**asdict(self), "rule": f"{self.signal} > {self.threshold:g}"}


def poisoned_share_upper(labels: np.ndarray, confidence: float) -> float:
    """One-sided upper bound of the poisoned share from labels drawn from the population. A
    distance-stratified sample over-draws the far pairs, where poisons are, so the unweighted share
    errs high: a conservative bound for the division it is used in."""
    labels = np.asarray(labels, dtype=bool)
    upper = clopper_pearson(np.array([labels.sum()]), np.array([len(labels)]), confidence=2 * confidence - 1)[1]
    return float(upper[0])


def calibrate_signals(audit_folder: Path, names: tuple[str, ...], pairs: list[tuple[str, str]], budget: float,
                      labelled_rows: np.ndarray, labels: np.ndarray, confidence: float = 0.95) -> list[SignalThreshold]:
    """Each of ``names`` gets ``budget / len(names)``; ``pairs`` are the population's (shard, key)
    in its order, ``labelled_rows`` the sample's rows in it and ``labels`` their poison labels."""
    if not names:
        return []
    phi = poisoned_share_upper(labels, confidence)
    if phi >= 1:
        raise CalibrationError("every labelled pair is a poison: no signal threshold can be bounded")
    share = budget / len(names)
    out = []
    for name in names:
        signal = get_signal(name)
        if signal.scope is not Scope.cross_pair:
            raise CalibrationError(f"{name} is a per-pair signal, decided by gamma; give cross-pair signals with --signal")
        values = read_signal(signal, audit_folder, pairs).values
        measured = np.isfinite(values)
        allowed = int(np.floor(share * (1.0 - phi) * len(values)))
        threshold = _smallest_threshold(values[measured], allowed)
        flagged = measured & (np.nan_to_num(values, nan=-np.inf) > threshold)
        on_labels = flagged[labelled_rows]
        out.append(SignalThreshold(
            signal=name, threshold=float(threshold), budget=share, flagged_pairs=int(flagged.sum()),
            population=len(values), poisoned_share_upper=phi,
            fpr_upper=float(flagged.sum() / max(len(values), 1) / (1.0 - phi)),
            labelled_clean_flagged=int((on_labels & ~labels).sum()),
            labelled_poisons_flagged=int((on_labels & labels).sum()),
        ))
    return out


def _smallest_threshold(values: np.ndarray, allowed: int) -> float:
    """The smallest v with #(values > v) <= allowed: the (allowed + 1)-th largest value, or below
    them all. Values tied at v stay unflagged, so a signal whose values tie a lot flags fewer."""
    if allowed >= len(values):
        return float(np.min(values)) - 1.0 if len(values) else 0.0
    return float(np.sort(values)[::-1][allowed])
