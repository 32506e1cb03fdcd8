"""Choosing gamma from a labelled sample (and canaries), and planning how many more labels to get.

Three ways to choose, exactly one per call:
- target FPR F: the smallest gamma (hence the largest recall, since recall can only fall as gamma
  rises) such that the FPR at that gamma and at every larger candidate gamma is at most F. With
  criterion="bound" (the default) "FPR" means its upper confidence bound, so the promise holds with
  97.5% one-sided confidence; with criterion="point" the point estimate.
- target recall R: the largest gamma such that the recall at that gamma and at every smaller
  candidate is at least R. criterion="bound" uses the lower confidence bound, "point" the point
  estimate. Recall comes from the canaries when they are given (recall_source="auto"), else from
  the labels; which one was used is recorded.
- max F1: the gamma with the largest F1 point estimate, 2 TP / (F + poisons); where several
  candidates tie (a gap between the classes), the middle one of the tied run.
Candidates are the labelled distances, the canary distances and population quantiles (thinned to
at most `max_candidates`). No candidate may flag more than `max_flagged_fraction` of the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from clipguard.calibration.estimates import (
    DEFAULT_CONFIDENCE,
    DEFAULT_DRAWS,
    Estimate,
    EstimateCurve,
    IntervalMethod,
    Population,
    ThresholdEstimates,
    canary_recall,
    canary_recall_curve,
    estimate_at,
    estimate_curve,
    weighted_roc_auc,
)
from clipguard.calibration.sampling import LabelledSample, validate_distances
from clipguard.errors import CalibrationError, OneClassLabelsError, UnreachableTargetError

Criterion = Literal["bound", "point"]
RecallSource = Literal["auto", "labels", "canaries"]

CANARY_NOTE = (
    "canary recall is the share of canaries (mismatched pairs built from this dataset) that are "
    "flagged; it estimates recall against canary-like mismatches, not against the real attack"
)
SCAN_DRAWS = 1000
DEFAULT_MAX_CANDIDATES = 600


@dataclass(frozen=True)
class Calibration:
    """A chosen gamma with everything estimated about it; `to_dict` is calibration.json."""

    gamma: float
    method: str
    criterion: str
    targets: dict[str, float | None]
    confidence: float
    design: str
    interval_method: str
    population_size: int
    n_labelled: int
    n_positive_labels: int
    n_unlabelled: int
    n_canaries: int
    estimates: ThresholdEstimates
    canary_recall: Estimate | None
    recall_source: str
    roc_auc: float | None
    flagged_fraction: float
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        estimates = self.estimates.to_dict()
        estimates["canary_recall"] = None if self.canary_recall is None else self.canary_recall.to_dict()
        return {
            "gamma": self.gamma,
            "method": self.method,
            "criterion": self.criterion,
            "targets": dict(self.targets),
            "confidence": self.confidence,
            "design": self.design,
            "interval_method": self.interval_method,
            "population_size": self.population_size,
            "n_labelled": self.n_labelled,
            "n_positive_labels": self.n_positive_labels,
            "n_unlabelled": self.n_unlabelled,
            "n_canaries": self.n_canaries,
            "flagged_fraction": self.flagged_fraction,
            "roc_auc": self.roc_auc,
            "roc_auc_source": "labels, weighted by 1/inclusion probability",
            "recall_source": self.recall_source,
            "estimates": estimates,
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class LabelPlan:
    """How many labels in total would bring one interval down to a target width.

    Interval widths shrink like 1 / sqrt(n) when the design stays the same, so
        n_total = ceil(n_labelled * (current_width / target_width) ** 2).
    This is a planning figure, not a promise. `reliable` is False when the metric rests on fewer
    than 5 labelled poisons: the rule then undercounts, since an interval needs a few poisons
    before it starts to shrink. Where the width comes from strata in which no poison has been seen
    (the bulk of a stratified sample, which could hide poisons), the bound shrinks like 1 / n
    rather than 1 / sqrt(n), and the rule overcounts.
    """

    metric: str
    current_width: float
    target_width: float
    n_labelled: int
    n_total: int
    n_additional: int
    reliable: bool


def choose_threshold(
    sample: LabelledSample,
    population: Population | np.ndarray,
    *,
    target_fpr: float | None = None,
    target_recall: float | None = None,
    max_f1: bool = False,
    canary_distances: np.ndarray | None = None,
    criterion: Criterion = "bound",
    recall_source: RecallSource = "auto",
    confidence: float = DEFAULT_CONFIDENCE,
    interval_method: IntervalMethod = "auto",
    max_flagged_fraction: float = 0.5,
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
) -> Calibration:
    """Pick gamma for one target (see the module docstring) and estimate everything at it."""
    method = _one_target(target_fpr, target_recall, max_f1)
    canaries = None if canary_distances is None else validate_distances(canary_distances)
    source = _recall_source(recall_source, canaries, method)
    _check_labels(sample, has_canaries=canaries is not None, needs_labelled_poisons=source == "labels")
    if not isinstance(population, Population):
        population = Population.from_distances(population, sample.design)
    gammas = _candidate_gammas(sample, population, canaries, max_candidates)
    curve = estimate_curve(
        sample, population, gammas, confidence, interval_method, draws=min(draws, SCAN_DRAWS), seed=seed
    )
    allowed = curve.flagged_fraction <= max_flagged_fraction
    if method == "target_fpr":
        gamma = _gamma_for_fpr(curve, allowed, target_fpr, criterion)
    elif method == "target_recall":
        gamma = _gamma_for_recall(curve, allowed, canaries, source, target_recall, criterion, confidence,
                                  max_flagged_fraction)
    else:
        gamma = _gamma_for_f1(curve, allowed)

    def estimate(candidate: float) -> ThresholdEstimates:
        return estimate_at(sample, population, candidate, confidence, interval_method, draws, seed)

    if criterion == "bound" and (method == "target_fpr" or (method == "target_recall" and source == "labels")):
        gamma, estimates = _confirm_bound(curve, allowed, gamma, method, target_fpr or target_recall, estimate)
    else:
        estimates = estimate(gamma)
    canary = None if canaries is None else canary_recall(canaries, gamma, confidence)
    notes = (CANARY_NOTE,) if canary is not None else ()
    return Calibration(
        gamma=gamma,
        method=method,
        criterion=criterion if method != "max_f1" else "point",
        targets={"fpr": target_fpr, "recall": target_recall},
        confidence=confidence,
        design="stratified" if sample.design.stratified else "uniform",
        interval_method=estimates.precision.method,
        population_size=population.size,
        n_labelled=sample.n,
        n_positive_labels=sample.n_positive,
        n_unlabelled=sample.n_unlabelled,
        n_canaries=0 if canaries is None else int(canaries.size),
        estimates=estimates,
        canary_recall=canary,
        recall_source=source,
        roc_auc=weighted_roc_auc(sample.distances, sample.labels, sample.weights),
        flagged_fraction=float(estimates.flagged_fraction.point),
        notes=notes,
    )


def _one_target(target_fpr: float | None, target_recall: float | None, max_f1: bool) -> str:
    chosen = [name for name, on in (("target_fpr", target_fpr is not None),
                                    ("target_recall", target_recall is not None),
                                    ("max_f1", max_f1)) if on]
    if len(chosen) != 1:
        raise CalibrationError("choose exactly one of --target-fpr, --target-recall, --max-f1")
    for name, value in (("target FPR", target_fpr), ("target recall", target_recall)):
        if value is not None and not 0 < value < 1:
            raise CalibrationError(f"{name} must be strictly between 0 and 1, got {value}")
    return chosen[0]


def _check_labels(sample: LabelledSample, has_canaries: bool, needs_labelled_poisons: bool) -> None:
    if sample.n_positive == sample.n:
        raise OneClassLabelsError(
            f"all {sample.n} labelled pairs are poison, so the false-positive rate cannot be "
            "estimated: label more pairs, including clean ones from below the suspected threshold"
        )
    if sample.n_positive == 0 and needs_labelled_poisons:
        advice = "add --canaries" if not has_canaries else "take recall from the canaries (not with --max-f1)"
        raise OneClassLabelsError(
            f"all {sample.n} labelled pairs are clean, so recall and precision cannot be estimated "
            f"from labels: label more pairs, draw the sample with --stratify so that the "
            f"high-distance tail (where poisons are) is over-sampled, or {advice}"
        )


def _recall_source(requested: RecallSource, canaries: np.ndarray | None, method: str) -> str:
    if requested == "canaries" and canaries is None:
        raise CalibrationError("recall from canaries needs canary distances (--canaries)")
    if requested == "auto":
        return "canaries" if canaries is not None and method != "max_f1" else "labels"
    return requested


def _candidate_gammas(
    sample: LabelledSample, population: Population, canaries: np.ndarray | None, max_candidates: int
) -> np.ndarray:
    """Labelled and canary distances (where the estimates change) plus population quantiles."""
    everything = np.concatenate(population.sorted_by_stratum)
    levels = np.unique(np.concatenate([np.linspace(0, 1, 101), 1 - np.logspace(-5, -1, 100)]))
    parts = [sample.distances, np.quantile(everything, levels)]
    if canaries is not None:
        parts.append(canaries)
    gammas = np.unique(np.concatenate(parts))
    if gammas.size > max_candidates:
        keep = np.unique(np.round(np.linspace(0, gammas.size - 1, max_candidates)).astype(np.int64))
        gammas = gammas[keep]
    return gammas


def _gamma_for_fpr(curve: EstimateCurve, allowed: np.ndarray, target: float, criterion: Criterion) -> float:
    fpr = curve.false_positive_rate.upper if criterion == "bound" else curve.false_positive_rate.point
    meets = (fpr <= target) & allowed
    # The feasible set must run to the top of the grid: a lone low gamma that passes by chance
    # between failing ones is not a threshold anyone could defend.
    failing = np.flatnonzero(~meets)
    first_ok = 0 if failing.size == 0 else int(failing[-1]) + 1
    if first_ok >= curve.gammas.size:
        best = int(np.nanargmin(np.where(allowed, fpr, np.nan)))
        raise UnreachableTargetError(
            f"no gamma meets FPR <= {target:g}: the lowest {_describe(criterion, 'upper bound')} FPR is "
            f"{fpr[best]:.4g} at gamma = {curve.gammas[best]:.4f}; label more pairs, or relax the target"
        )
    return float(curve.gammas[first_ok])


def _gamma_for_recall(
    curve: EstimateCurve,
    allowed: np.ndarray,
    canaries: np.ndarray | None,
    source: str,
    target: float,
    criterion: Criterion,
    confidence: float,
    max_flagged_fraction: float,
) -> float:
    if source == "canaries":
        recall = canary_recall_curve(canaries, curve.gammas, confidence)
    else:
        recall = curve.recall
    values = recall.lower if criterion == "bound" else recall.point
    meets = values >= target  # NaN (undefined recall) never meets
    failing = np.flatnonzero(~meets)
    last_ok = curve.gammas.size - 1 if failing.size == 0 else int(failing[0]) - 1
    if last_ok < 0 or not allowed[last_ok]:
        reach = (
            f"it is only met by flagging {curve.flagged_fraction[last_ok]:.1%} of the data "
            f"(more than the {max_flagged_fraction:.0%} allowed)" if last_ok >= 0
            else f"the best is {np.nanmax(values):.3f}" if np.any(~np.isnan(values)) else "it is undefined"
        )
        advice = (
            "add --canaries (known positives measure recall directly), label more pairs with --stratify, "
            "or use the point estimate" if source == "labels"
            else "use more canaries, or the point estimate"
        )
        raise UnreachableTargetError(
            f"no gamma meets recall >= {target:g} ({_describe(criterion, 'lower bound')}, from {source}): "
            f"{reach}; {advice}"
        )
    return float(curve.gammas[last_ok])


def _confirm_bound(
    curve: EstimateCurve, allowed: np.ndarray, gamma: float, method: str, target: float, estimate
) -> tuple[float, ThresholdEstimates]:
    """The reported estimates at gamma, stepping to safer candidates while their bound breaks the target.

    The scan's simulated bounds use fewer draws (and other random numbers) than the reported ones,
    so the two can disagree by Monte Carlo noise; the bound that is reported must keep the promise.
    Safer means a higher gamma for an FPR target and a lower (still allowed) one for a recall target.
    """
    def keeps(e: ThresholdEstimates) -> bool:
        return e.false_positive_rate.upper <= target if method == "target_fpr" else e.recall.lower >= target

    if method == "target_fpr":
        safer = curve.gammas[curve.gammas > gamma]
    else:
        safer = curve.gammas[(curve.gammas < gamma) & allowed][::-1]
    current = estimate(gamma)
    for candidate in safer:
        if keeps(current):
            break
        gamma, current = float(candidate), estimate(float(candidate))
    if not keeps(current):
        raise UnreachableTargetError(
            f"no gamma keeps the {'FPR upper' if method == 'target_fpr' else 'recall lower'} bound "
            f"{'<=' if method == 'target_fpr' else '>='} {target:g} once estimated with the full simulation; "
            "label more pairs, or relax the target"
        )
    return gamma, current


def _gamma_for_f1(curve: EstimateCurve, allowed: np.ndarray) -> float:
    f1 = np.where(allowed, curve.f1, np.nan)
    if np.all(np.isnan(f1)):
        raise UnreachableTargetError("F1 is undefined at every candidate gamma; label more poisons")
    best = np.nanmax(f1)
    tied = np.flatnonzero(f1 == best)
    run = tied[: np.argmax(np.diff(np.concatenate([tied, [tied[-1] + 2]])) > 1) + 1]
    return float(curve.gammas[run[run.size // 2]])


def _describe(criterion: Criterion, bound: str) -> str:
    return bound if criterion == "bound" else "point estimate of"


def labels_needed(current: Calibration, target_width: float, metric: str | None = None) -> LabelPlan:
    """Labels needed (same design) to bring the widest label-based interval, or `metric`'s, down to
    `target_width`; see `LabelPlan` for the formula."""
    if not 0 < target_width <= 1:
        raise CalibrationError(f"target width must be in (0, 1], got {target_width}")
    intervals = current.estimates.interval_estimates()
    if metric is None:
        metric = max(intervals, key=lambda name: intervals[name].width)
    elif metric not in intervals:
        raise CalibrationError(f"no interval named {metric!r}; choose one of {sorted(intervals)}")
    width = intervals[metric].width
    total = current.n_labelled if width <= target_width else math.ceil(
        current.n_labelled * (width / target_width) ** 2
    )
    return LabelPlan(
        metric=metric,
        current_width=width,
        target_width=target_width,
        n_labelled=current.n_labelled,
        n_total=total,
        n_additional=total - current.n_labelled,
        reliable=current.n_positive_labels >= 5 or metric == "false_positive_rate",
    )
