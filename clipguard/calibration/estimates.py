"""What a labelled sample says about the whole dataset at a threshold gamma.

Notation. N pairs, all with known distance d_i; a pair is flagged when d_i >= gamma, so the number
flagged F(gamma) is known exactly. Poison labels y_i are known for the labelled sample only.
Strata h come from the sample design; within a stratum the labelled pairs are a simple random
sample. Crossing strata with flagged / not flagged gives cells c = (h, flagged) of known size N_c;
given how many labelled pairs fell in a cell (n_c), those are a simple random sample of the cell,
so the cells are valid post-strata.

Point estimates (post-stratified Horvitz–Thompson). The poison count of cell c is
    K_c = y_c + (N_c - n_c) * y_c / n_c  ( = N_c * y_c / n_c ),
with y_c the labelled poisons in the cell. A cell with no labelled pair borrows its stratum's rate
y_h / n_h (collapsed post-stratum). Then TP = sum of K_c over flagged cells, FN over the others,
and
    poisons   = TP + FN
    precision = TP / F
    recall    = TP / (TP + FN)
    FPR       = (F - TP) / (N - TP - FN)
    F1        = 2 TP / (F + TP + FN)
    flagged fraction = F / N   (exact, from the full distance array)

Intervals, 95% by default.
- "clopper-pearson" (uniform samples): each ratio is then a plain proportion among sampled pairs
  (precision among flagged, recall among poisons, FPR among clean), with an exact
  Clopper–Pearson interval. With no sampled poison recall is undefined and its interval is [0, 1].
- "beta-bound-simulation" (stratified samples, or on request): each cell's unseen poisons are
  simulated as K_c = y_c + Binomial(N_c - n_c, p_c), with p_c drawn from Beta(y_c, n_c - y_c + 1)
  for a low draw and from Beta(y_c + 1, n_c - y_c) for a high draw (the Beta distributions whose
  quantiles are the Clopper–Pearson bounds; Beta(0, .) is 0). Every metric is monotone in TP and
  FN, so its lower bound is the 2.5% quantile of the metric over draws that push it down (low TP
  cells, high FN cells) and its upper bound the 97.5% quantile over draws that push it up. The
  finite-population step makes fully labelled cells exact; a cell where no poison was seen keeps
  room for unseen ones, so with 0 or 1 labelled poisons recall comes out wide, and a cell with no
  labelled pair spans [0, N_c]. A symmetric Jeffreys posterior was tried first and under-covered
  badly (67% for the poison count): it puts too much mass on hidden poisons in the large
  low-distance stratum, which drags the whole interval up. The interval is widened to contain the
  point estimate where the two disagree (only in nearly empty cells).
The coverage of both methods is checked by simulation in tests/test_calibration_stats.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy import stats

from clipguard.calibration.sampling import LabelledSample, SampleDesign, validate_distances
from clipguard.errors import CalibrationError, NoLabelledSampleError

IntervalMethod = Literal["auto", "clopper-pearson", "beta-bound-simulation"]

DEFAULT_CONFIDENCE = 0.95
DEFAULT_DRAWS = 4000
_GAMMA_CHUNK = 32


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its interval. `point` is None where the quantity is undefined
    (e.g. recall when no poison was labelled); the interval is then the whole range."""

    name: str
    point: float | None
    lower: float
    upper: float
    method: str
    source: str

    @property
    def width(self) -> float:
        return self.upper - self.lower

    def to_dict(self) -> dict[str, Any]:
        return {
            "point": self.point,
            "lower": self.lower,
            "upper": self.upper,
            "method": self.method,
            "source": self.source,
        }


@dataclass(frozen=True)
class ThresholdEstimates:
    """Everything estimated about the full dataset at one gamma."""

    gamma: float
    confidence: float
    n_poisons: Estimate
    precision: Estimate
    recall: Estimate
    false_positive_rate: Estimate
    flagged_fraction: Estimate
    f1: float | None

    def interval_estimates(self) -> dict[str, Estimate]:
        """The label-based ratios whose width more labels can narrow."""
        return {
            "precision": self.precision,
            "recall": self.recall,
            "false_positive_rate": self.false_positive_rate,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "gamma": self.gamma,
            "confidence": self.confidence,
            "n_poisons": self.n_poisons.to_dict(),
            "precision": self.precision.to_dict(),
            "recall": self.recall.to_dict(),
            "false_positive_rate": self.false_positive_rate.to_dict(),
            "flagged_fraction": self.flagged_fraction.to_dict(),
            "f1": self.f1,
        }


@dataclass(frozen=True)
class CurveMetric:
    """One metric over a grid of gammas: point (NaN where undefined), lower and upper bounds."""

    point: np.ndarray
    lower: np.ndarray
    upper: np.ndarray


@dataclass(frozen=True)
class EstimateCurve:
    """Estimates over a grid of gammas (increasing), from one labelled sample."""

    gammas: np.ndarray
    confidence: float
    method: str
    flagged_fraction: np.ndarray
    n_poisons: CurveMetric
    precision: CurveMetric
    recall: CurveMetric
    false_positive_rate: CurveMetric
    f1: np.ndarray

    def at(self, i: int) -> ThresholdEstimates:
        """The estimates at gammas[i] as named values."""

        def named(name: str, metric: CurveMetric) -> Estimate:
            point = float(metric.point[i])
            return Estimate(
                name, None if np.isnan(point) else point,
                float(metric.lower[i]), float(metric.upper[i]), self.method, "labels",
            )

        flagged = float(self.flagged_fraction[i])
        f1 = float(self.f1[i])
        return ThresholdEstimates(
            gamma=float(self.gammas[i]),
            confidence=self.confidence,
            n_poisons=named("n_poisons", self.n_poisons),
            precision=named("precision", self.precision),
            recall=named("recall", self.recall),
            false_positive_rate=named("false_positive_rate", self.false_positive_rate),
            flagged_fraction=Estimate("flagged_fraction", flagged, flagged, flagged, "exact", "population"),
            f1=None if np.isnan(f1) else f1,
        )


@dataclass(frozen=True)
class Population:
    """The full distance array, sorted within each stratum of a sample design, so that the number
    of flagged pairs per stratum at any gamma is a binary search."""

    size: int
    sorted_by_stratum: tuple[np.ndarray, ...]

    @classmethod
    def from_distances(cls, distances: np.ndarray, design: SampleDesign, flagged_as: np.ndarray | None = None) -> "Population":
        """``flagged_as``: the values the rule compares with gamma, when they are not the distances
        the design's strata were drawn by (calibration/combined.py); strata always come from ``distances``."""
        distances = validate_distances(distances)
        if distances.size != design.population_size:
            raise CalibrationError(
                f"the sample was drawn from {design.population_size} pairs but {distances.size} "
                "distances were given; score the same shards the sample came from"
            )
        stratum = design.stratum_of(distances)
        sizes = np.bincount(stratum, minlength=len(design.strata))
        expected = np.array([s.population_size for s in design.strata])
        if not np.array_equal(sizes, expected):
            raise CalibrationError(
                "these distances do not match the ones the sample was drawn from (stratum sizes "
                f"{sizes.tolist()} vs {expected.tolist()}); score the same shards with the same model"
            )
        order = np.argsort(stratum, kind="stable")
        grouped = (distances if flagged_as is None else np.asarray(flagged_as, dtype=np.float64))[order]
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        return cls(
            size=int(distances.size),
            sorted_by_stratum=tuple(np.sort(grouped[bounds[h]:bounds[h + 1]]) for h in range(sizes.size)),
        )

    @property
    def stratum_sizes(self) -> np.ndarray:
        return np.array([s.size for s in self.sorted_by_stratum], dtype=np.int64)

    def flagged_counts(self, gammas: np.ndarray) -> np.ndarray:
        """(G, H) array: pairs of stratum h with d >= gamma."""
        return np.stack(
            [s.size - np.searchsorted(s, gammas, side="left") for s in self.sorted_by_stratum], axis=1
        )


@dataclass(frozen=True)
class _Cells:
    """Per (gamma, stratum): population, labelled and labelled-poison counts, flagged and not."""

    big_flagged: np.ndarray
    big_unflagged: np.ndarray
    n_flagged: np.ndarray
    n_unflagged: np.ndarray
    y_flagged: np.ndarray
    y_unflagged: np.ndarray


def _cells(sample: LabelledSample, population: Population, gammas: np.ndarray) -> _Cells:
    big_flagged = population.flagged_counts(gammas)
    big_unflagged = population.stratum_sizes[None, :] - big_flagged
    n_flagged = np.zeros_like(big_flagged)
    y_flagged = np.zeros_like(big_flagged)
    for h in range(population.stratum_sizes.size):
        in_h = sample.strata == h
        order = np.argsort(sample.distances[in_h])
        d = sample.distances[in_h][order]
        y = sample.labels[in_h][order].astype(np.int64)
        first = np.searchsorted(d, gammas, side="left")
        positives_from = np.concatenate([np.cumsum(y[::-1])[::-1], [0]])
        n_flagged[:, h] = d.size - first
        y_flagged[:, h] = positives_from[first]
    n_total = sample.labelled_per_stratum[None, :]
    y_total = np.bincount(sample.strata, weights=sample.labels, minlength=n_total.size).astype(np.int64)[None, :]
    return _Cells(
        big_flagged, big_unflagged, n_flagged, n_total - n_flagged, y_flagged, y_total - y_flagged
    )


def _cell_point_counts(big: np.ndarray, n: np.ndarray, y: np.ndarray, stratum_rate: np.ndarray) -> np.ndarray:
    """Post-stratified poison count of each cell; empty cells borrow their stratum's rate."""
    rate = np.where(n > 0, y / np.maximum(n, 1), stratum_rate)
    return y + (big - n) * rate


def _ratios(tp: np.ndarray, fn: np.ndarray, flagged: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """The metrics as functions of TP and FN (NaN where undefined)."""
    poisons = tp + fn
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "n_poisons": poisons,
            "precision": np.where(flagged > 0, tp / flagged, np.nan),
            "recall": np.where(poisons > 0, tp / poisons, np.nan),
            "false_positive_rate": np.where(size - poisons > 0, (flagged - tp) / (size - poisons), np.nan),
            "f1": np.where(flagged + poisons > 0, 2 * tp / (flagged + poisons), np.nan),
        }


def _post_stratified_points(cells: _Cells, size: int) -> dict[str, np.ndarray]:
    n_h = cells.n_flagged + cells.n_unflagged
    y_h = cells.y_flagged + cells.y_unflagged
    stratum_rate = y_h / n_h
    tp = _cell_point_counts(cells.big_flagged, cells.n_flagged, cells.y_flagged, stratum_rate).sum(axis=1)
    fn = _cell_point_counts(cells.big_unflagged, cells.n_unflagged, cells.y_unflagged, stratum_rate).sum(axis=1)
    return _ratios(tp, fn, cells.big_flagged.sum(axis=1), size)


def _bound_cell_draws(
    big: np.ndarray, n: np.ndarray, y: np.ndarray, side: str, draws: int, rng: np.random.Generator
) -> np.ndarray:
    """(draws, G, H) counts of poisons per cell: seen poisons plus Binomial(N_c - n_c, p_c).

    side="low" draws p_c from Beta(y, n - y + 1), side="high" from Beta(y + 1, n - y): the two
    distributions whose quantiles are the Clopper–Pearson bounds of y / n. Beta(0, .) is a point
    mass at 0 and Beta(., 0) one at 1, so an unseen cell spans [0, N_c].
    """
    a, b = (y, n - y + 1) if side == "low" else (y + 1, n - y)
    shape = (draws,) + big.shape
    rate = rng.beta(np.maximum(a, 1), np.maximum(b, 1), size=shape)
    rate = np.where(a == 0, 0.0, np.where(b == 0, 1.0, rate))
    return y + rng.binomial(big - n, rate)


def _bound_intervals(
    cells: _Cells, size: int, confidence: float, draws: int, seed: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each bound of each metric from the cell draws that push it that way.

    Every metric is monotone in TP and in FN (precision and recall rise with TP; recall falls and
    FPR rises with FN; FPR falls with TP), so its lower bound combines the pessimistic draws of the
    cells that raise it with the optimistic draws of those that lower it, and vice versa.
    """
    rng = np.random.default_rng(seed)
    tail = (1.0 - confidence) / 2
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    n_gammas = cells.big_flagged.shape[0]
    for start in range(0, n_gammas, _GAMMA_CHUNK):
        rows = slice(start, start + _GAMMA_CHUNK)
        flagged_cells = (cells.big_flagged[rows], cells.n_flagged[rows], cells.y_flagged[rows])
        unflagged_cells = (cells.big_unflagged[rows], cells.n_unflagged[rows], cells.y_unflagged[rows])
        tp = {side: _bound_cell_draws(*flagged_cells, side, draws, rng).sum(axis=2) for side in ("low", "high")}
        fn = {side: _bound_cell_draws(*unflagged_cells, side, draws, rng).sum(axis=2) for side in ("low", "high")}
        flagged = cells.big_flagged[rows].sum(axis=1)[None, :]
        pushes_up = _ratios(tp["high"], fn["low"], flagged, size)
        pushes_down = _ratios(tp["low"], fn["high"], flagged, size)
        low_count = _ratios(tp["low"], fn["low"], flagged, size)
        high_count = _ratios(tp["high"], fn["high"], flagged, size)
        sources = {
            "n_poisons": (low_count, high_count),
            "precision": (pushes_down, pushes_up),
            "recall": (pushes_down, pushes_up),
            "false_positive_rate": (pushes_up, pushes_down),
        }
        for name, (for_lower, for_upper) in sources.items():
            lower, _ = _equal_tailed(for_lower[name], tail, name)
            _, upper = _equal_tailed(for_upper[name], tail, name)
            parts.setdefault(name, []).append((lower, upper))
    return {
        name: (np.concatenate([lo for lo, _ in chunks]), np.concatenate([hi for _, hi in chunks]))
        for name, chunks in parts.items()
    }


def _equal_tailed(values: np.ndarray, tail: float, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Equal-tailed interval over axis 0, ignoring draws where the metric is undefined."""
    undefined = np.all(np.isnan(values), axis=0)
    filled = np.where(undefined[None, :], 0.0, values)
    # Outward-rounded quantiles: counts stay whole numbers and the interval never shrinks.
    lower = np.nanquantile(filled, tail, axis=0, method="lower")
    upper = np.nanquantile(filled, 1.0 - tail, axis=0, method="higher")
    if name != "n_poisons":
        lower = np.where(undefined, 0.0, lower)
        upper = np.where(undefined, 1.0, upper)
    return lower, upper


def clopper_pearson(successes: np.ndarray, trials: np.ndarray, confidence: float = DEFAULT_CONFIDENCE
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Exact binomial interval; [0, 1] where there are no trials."""
    successes = np.asarray(successes, dtype=float)
    trials = np.asarray(trials, dtype=float)
    tail = (1.0 - confidence) / 2
    with np.errstate(invalid="ignore"):
        lower = np.where(successes > 0, stats.beta.ppf(tail, successes, trials - successes + 1), 0.0)
        upper = np.where(successes < trials, stats.beta.ppf(1 - tail, successes + 1, trials - successes), 1.0)
    lower = np.where(trials > 0, np.nan_to_num(lower), 0.0)
    upper = np.where(trials > 0, np.nan_to_num(upper, nan=1.0), 1.0)
    return lower, upper


def _proportion(successes: np.ndarray, trials: np.ndarray, confidence: float) -> CurveMetric:
    with np.errstate(divide="ignore", invalid="ignore"):
        point = np.where(trials > 0, successes / np.maximum(trials, 1), np.nan)
    lower, upper = clopper_pearson(successes, trials, confidence)
    return CurveMetric(point, lower, upper)


def _clopper_pearson_curve(cells: _Cells, size: int, confidence: float, gammas: np.ndarray,
                           flagged_fraction: np.ndarray) -> EstimateCurve:
    """Uniform sample: every ratio is a sample proportion with an exact interval."""
    n = (cells.n_flagged + cells.n_unflagged).sum(axis=1)
    y = (cells.y_flagged + cells.y_unflagged).sum(axis=1)
    n_f = cells.n_flagged.sum(axis=1)
    y_f = cells.y_flagged.sum(axis=1)
    rate = _proportion(y, n, confidence)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(n_f + y > 0, 2 * y_f / (n_f + y), np.nan)
    return EstimateCurve(
        gammas=gammas,
        confidence=confidence,
        method="clopper-pearson",
        flagged_fraction=flagged_fraction,
        n_poisons=CurveMetric(rate.point * size, rate.lower * size, rate.upper * size),
        precision=_proportion(y_f, n_f, confidence),
        recall=_proportion(y_f, y, confidence),
        false_positive_rate=_proportion(n_f - y_f, n - y, confidence),
        f1=f1,
    )


def _resolve_method(method: IntervalMethod, sample: LabelledSample) -> str:
    if method == "auto":
        return "clopper-pearson" if len(sample.design.strata) == 1 else "beta-bound-simulation"
    if method == "clopper-pearson" and len(sample.design.strata) > 1:
        raise CalibrationError(
            "Clopper–Pearson intervals need a uniform sample; a stratified sample uses 'beta-bound-simulation'"
        )
    return method


def estimate_curve(
    sample: LabelledSample,
    population: Population | np.ndarray,
    gammas: np.ndarray,
    confidence: float = DEFAULT_CONFIDENCE,
    method: IntervalMethod = "auto",
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
) -> EstimateCurve:
    """Estimates and intervals at each gamma of a grid (see the module docstring for the estimators).

    `method="auto"` uses Clopper–Pearson for a uniform (one-stratum) sample and the beta-bound
    simulation for a stratified one. `draws` and `seed` fix the simulation.
    """
    if sample.n == 0:
        raise NoLabelledSampleError("no labelled pairs: label the pairs listed by `clipguard sample`")
    if not isinstance(population, Population):
        population = Population.from_distances(population, sample.design)
    empty = [h for h, m in enumerate(sample.labelled_per_stratum) if m == 0]
    if empty:
        raise NoLabelledSampleError(
            f"stratum {empty[0]} of the sample has no labelled pair, so nothing is known about it; "
            "label at least a few pairs of every stratum"
        )
    gammas = np.atleast_1d(np.asarray(gammas, dtype=float))
    cells = _cells(sample, population, gammas)
    flagged_fraction = cells.big_flagged.sum(axis=1) / population.size
    resolved = _resolve_method(method, sample)
    if resolved == "clopper-pearson":
        return _clopper_pearson_curve(cells, population.size, confidence, gammas, flagged_fraction)
    points = _post_stratified_points(cells, population.size)
    bounds = _bound_intervals(cells, population.size, confidence, draws, seed)

    def metric(name: str) -> CurveMetric:
        point = points[name]
        lower, upper = bounds[name]
        known = ~np.isnan(point)
        return CurveMetric(
            point, np.where(known, np.fmin(lower, point), lower), np.where(known, np.fmax(upper, point), upper)
        )

    return EstimateCurve(
        gammas=gammas,
        confidence=confidence,
        method="beta-bound-simulation",
        flagged_fraction=flagged_fraction,
        n_poisons=metric("n_poisons"),
        precision=metric("precision"),
        recall=metric("recall"),
        false_positive_rate=metric("false_positive_rate"),
        f1=points["f1"],
    )


def estimate_at(
    sample: LabelledSample,
    population: Population | np.ndarray,
    gamma: float,
    confidence: float = DEFAULT_CONFIDENCE,
    method: IntervalMethod = "auto",
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
) -> ThresholdEstimates:
    """Poison count, precision, recall, FPR (each with an interval) and the exact flagged fraction
    of the full dataset at one gamma."""
    return estimate_curve(sample, population, np.array([gamma]), confidence, method, draws, seed).at(0)


def canary_recall_curve(
    canary_distances: np.ndarray, gammas: np.ndarray, confidence: float = DEFAULT_CONFIDENCE
) -> CurveMetric:
    """Share of canaries with d >= gamma at each gamma, with Clopper–Pearson intervals."""
    canaries = np.sort(validate_distances(canary_distances))
    gammas = np.atleast_1d(np.asarray(gammas, dtype=float))
    caught = canaries.size - np.searchsorted(canaries, gammas, side="left")
    return _proportion(caught, np.full(gammas.shape, canaries.size), confidence)


def canary_recall(
    canary_distances: np.ndarray, gamma: float, confidence: float = DEFAULT_CONFIDENCE
) -> Estimate:
    """Canary recall: the fraction of canaries (mismatched pairs built from the user's own data,
    all known positives) flagged at gamma, with a Clopper–Pearson interval.

    It estimates recall against canary-like mismatches, not against the real attack: poisons that
    are better matched than a random mismatch (e.g. clean-label poisons) are caught less often.
    """
    curve = canary_recall_curve(canary_distances, np.array([gamma]), confidence)
    return Estimate(
        "canary_recall", float(curve.point[0]), float(curve.lower[0]), float(curve.upper[0]),
        "clopper-pearson", "canaries",
    )


def weighted_roc_auc(distances: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float | None:
    """Area under the ROC curve of distance as a poison score, with each labelled pair counted
    1 / pi times, i.e. the estimated chance that a random poison of the full data scores above a
    random clean pair (ties count one half). None when the sample holds only one class."""
    distances = np.asarray(distances, dtype=float)
    labels = np.asarray(labels, dtype=bool)
    weights = np.asarray(weights, dtype=float)
    if labels.all() or not labels.any():
        return None
    order = np.argsort(distances, kind="stable")
    d, y, w = distances[order], labels[order], weights[order]
    values, group = np.unique(d, return_inverse=True)
    clean_at = np.bincount(group, weights=np.where(y, 0.0, w), minlength=values.size)
    poison_at = np.bincount(group, weights=np.where(y, w, 0.0), minlength=values.size)
    clean_below = np.concatenate([[0.0], np.cumsum(clean_at)[:-1]])
    wins = np.sum(poison_at * (clean_below + 0.5 * clean_at))
    return float(np.clip(wins / (poison_at.sum() * clean_at.sum()), 0.0, 1.0))
