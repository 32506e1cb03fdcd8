"""Which pairs a person should label, and with what probability each one was picked.

Poison rates are tiny (0.1%–1%), so a uniform sample of a few hundred pairs holds about one
poison and says almost nothing about recall. A stratified sample cuts the distance axis at
population quantiles (by default the top 1%, the next 4% and the remaining 95%) and spends most of
the labels in the high-distance tail, where poisons live. Within each stratum the draw is a simple
random sample without replacement, so every pair in stratum h has the same, known inclusion
probability pi_h = n_h / N_h; the estimators in `estimates.py` weight by 1 / pi_h.

A uniform sample is the one-stratum case: pi = n / N for every pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from clipguard.errors import CalibrationError, NoLabelledSampleError

DEFAULT_TAIL_FRACTIONS = (0.01, 0.04)
DEFAULT_ALLOCATION = (0.4, 0.3, 0.3)


@dataclass(frozen=True)
class Stratum:
    """One band of the distance axis: pairs with lower <= d < upper.

    `lower` is -inf for the lowest stratum and `upper` is +inf for the highest, so that every
    distance, including ones scored later, falls in exactly one stratum.
    """

    index: int
    lower: float
    upper: float
    population_size: int
    sample_size: int

    @property
    def inclusion_probability(self) -> float:
        """pi_h = n_h / N_h, the chance that any one pair of this stratum is in the sample."""
        return self.sample_size / self.population_size

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "lower": None if np.isneginf(self.lower) else float(self.lower),
            "upper": None if np.isposinf(self.upper) else float(self.upper),
            "population_size": self.population_size,
            "sample_size": self.sample_size,
            "inclusion_probability": self.inclusion_probability,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Stratum":
        lower = -np.inf if data["lower"] is None else float(data["lower"])
        upper = np.inf if data["upper"] is None else float(data["upper"])
        return cls(int(data["index"]), lower, upper, int(data["population_size"]), int(data["sample_size"]))


@dataclass(frozen=True)
class SampleDesign:
    """A drawn sample: which pairs (row indices into the distance array) and how they were drawn.

    Strata are ordered by distance, lowest first. `indices`, `strata` and
    `inclusion_probabilities` are aligned arrays of length n, sorted by index.
    """

    population_size: int
    seed: int
    stratified: bool
    strata: tuple[Stratum, ...]
    indices: np.ndarray
    stratum_of_selected: np.ndarray
    inclusion_probabilities: np.ndarray

    @property
    def n(self) -> int:
        return int(self.indices.size)

    @property
    def edges(self) -> np.ndarray:
        """Inner cut points between strata (H - 1 values, increasing)."""
        return np.array([s.lower for s in self.strata[1:]], dtype=float)

    def stratum_of(self, distances: np.ndarray) -> np.ndarray:
        """Stratum index of each distance; a distance equal to a cut point goes to the upper stratum."""
        return np.searchsorted(self.edges, np.asarray(distances, dtype=float), side="right")

    def to_dict(self) -> dict[str, Any]:
        return {
            "population_size": self.population_size,
            "seed": self.seed,
            "stratified": self.stratified,
            "strata": [s.to_dict() for s in self.strata],
            "indices": self.indices.tolist(),
            "stratum_of_selected": self.stratum_of_selected.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SampleDesign":
        strata = tuple(Stratum.from_dict(s) for s in data["strata"])
        indices = np.asarray(data["indices"], dtype=np.int64)
        stratum_of_selected = np.asarray(data["stratum_of_selected"], dtype=np.int64)
        pi = np.array([s.inclusion_probability for s in strata])[stratum_of_selected]
        return cls(
            population_size=int(data["population_size"]),
            seed=int(data["seed"]),
            stratified=bool(data["stratified"]),
            strata=strata,
            indices=indices,
            stratum_of_selected=stratum_of_selected,
            inclusion_probabilities=pi,
        )


@dataclass(frozen=True)
class LabelledSample:
    """The labelled part of a sample, ready for estimation.

    Pairs of the design that were not labelled are left out and counted in `n_unlabelled`. The
    estimators then treat the labelled pairs of stratum h as a simple random sample of that stratum
    (labels missing at random within a stratum), so the effective inclusion probability is
    m_h / N_h with m_h the labelled count.
    """

    design: SampleDesign
    indices: np.ndarray
    distances: np.ndarray
    labels: np.ndarray
    strata: np.ndarray
    labelled_per_stratum: np.ndarray
    n_unlabelled: int

    @property
    def n(self) -> int:
        return int(self.indices.size)

    @property
    def n_positive(self) -> int:
        return int(self.labels.sum())

    @property
    def stratum_sizes(self) -> np.ndarray:
        return np.array([s.population_size for s in self.design.strata], dtype=np.int64)

    @property
    def inclusion_probabilities(self) -> np.ndarray:
        """Effective pi of each labelled pair: labelled count / population size of its stratum."""
        return (self.labelled_per_stratum / self.stratum_sizes)[self.strata]

    @property
    def weights(self) -> np.ndarray:
        """Horvitz–Thompson weights 1 / pi: how many population pairs each labelled pair stands for."""
        return 1.0 / self.inclusion_probabilities


def validate_distances(distances: np.ndarray) -> np.ndarray:
    distances = np.asarray(distances, dtype=float)
    if distances.ndim != 1 or distances.size == 0:
        raise CalibrationError("distances must be a non-empty one-dimensional array")
    if not np.all(np.isfinite(distances)):
        bad = int(np.count_nonzero(~np.isfinite(distances)))
        raise CalibrationError(
            f"{bad} distances are NaN or infinite; drop or re-score the pairs that failed to score first"
        )
    return distances


def draw_sample(
    distances: np.ndarray,
    n: int,
    seed: int,
    stratify: bool = False,
    tail_fractions: tuple[float, ...] = DEFAULT_TAIL_FRACTIONS,
    allocation: tuple[float, ...] = DEFAULT_ALLOCATION,
) -> SampleDesign:
    """Draw n pairs to label, deterministically for a seed.

    Uniform (stratify=False): a simple random sample without replacement, pi = n / N.

    Stratified: `tail_fractions` are the population shares of the strata counted from the top
    (default: the top 1% and the next 4%; the rest forms the last stratum). `allocation` gives the
    share of the n labels spent in each stratum, in the same top-down order and one longer than
    `tail_fractions` (default 40% / 30% / 30%, so the top 1% is over-sampled 40-fold relative to
    uniform). Cut points are population distance quantiles; ties at a cut go to the upper stratum.
    A stratum's allocation never exceeds its size; what is left over goes to the other strata.
    """
    distances = validate_distances(distances)
    population_size = distances.size
    if not 0 < n <= population_size:
        raise CalibrationError(f"sample size must be between 1 and the {population_size} scored pairs, got {n}")
    rng = np.random.default_rng(seed)
    if not stratify:
        indices = np.sort(rng.choice(population_size, size=n, replace=False))
        stratum = Stratum(0, -np.inf, np.inf, population_size, n)
        return SampleDesign(
            population_size, seed, False, (stratum,), indices,
            np.zeros(n, dtype=np.int64), np.full(n, n / population_size),
        )
    edges, shares = _stratum_edges(distances, tail_fractions, allocation)
    stratum_index = np.searchsorted(edges, distances, side="right")
    sizes = np.bincount(stratum_index, minlength=edges.size + 1)
    sample_sizes = _allocate(n, shares, sizes)
    bounds = np.concatenate([[-np.inf], edges, [np.inf]])
    strata = tuple(
        Stratum(h, float(bounds[h]), float(bounds[h + 1]), int(sizes[h]), int(sample_sizes[h]))
        for h in range(sizes.size)
    )
    chosen = [
        rng.choice(np.flatnonzero(stratum_index == h), size=int(sample_sizes[h]), replace=False)
        for h in range(sizes.size)
    ]
    indices = np.sort(np.concatenate(chosen))
    selected_strata = stratum_index[indices]
    pi = (sample_sizes / sizes)[selected_strata]
    return SampleDesign(population_size, seed, True, strata, indices, selected_strata, pi)


def _stratum_edges(
    distances: np.ndarray, tail_fractions: tuple[float, ...], allocation: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Cut points (increasing) and the label shares of the strata they make (lowest stratum first)."""
    tails = np.asarray(tail_fractions, dtype=float)
    shares_top_down = np.asarray(allocation, dtype=float)
    if shares_top_down.size != tails.size + 1:
        raise CalibrationError(
            f"allocation needs one share per stratum ({tails.size + 1}), got {shares_top_down.size}"
        )
    if np.any(tails <= 0) or tails.sum() >= 1:
        raise CalibrationError("tail fractions must be positive and sum to less than 1")
    if np.any(shares_top_down <= 0) or not np.isclose(shares_top_down.sum(), 1.0):
        raise CalibrationError("allocation shares must be positive and sum to 1")
    ordered = np.sort(distances)
    above = np.cumsum(tails)  # population share above each cut, top-down
    ranks = np.clip(np.round(ordered.size * (1.0 - above)).astype(np.int64), 0, ordered.size - 1)
    edges_top_down = ordered[ranks]
    shares = shares_top_down[::-1].copy()
    edges = edges_top_down[::-1]
    # Heavy ties can make two cuts coincide; merge the empty stratum into the one below it.
    keep_edges: list[float] = []
    merged_shares = [shares[0]]
    for edge, share in zip(edges, shares[1:]):
        if (keep_edges and edge <= keep_edges[-1]) or edge <= ordered[0]:
            merged_shares[-1] += share
            continue
        keep_edges.append(float(edge))
        merged_shares.append(share)
    return np.array(keep_edges, dtype=float), np.array(merged_shares)


def _allocate(n: int, shares: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Integer n_h summing to n, proportional to shares, at least 1 each, capped at N_h."""
    if n < sizes.size:
        raise CalibrationError(f"a stratified sample needs at least one pair per stratum ({sizes.size}), got n={n}")
    allocated = np.ones(sizes.size, dtype=np.int64)
    while allocated.sum() < n:
        room = sizes - allocated
        open_strata = room > 0
        remaining = n - allocated.sum()
        want = shares * n - allocated
        want[~open_strata] = -np.inf
        # Give one label to the stratum furthest below its target share; ties go to the top.
        best = int(np.flatnonzero(want == want.max())[-1])
        step = int(min(room[best], max(1, np.floor(want[best])), remaining))
        allocated[best] += step
    return allocated


def label_sample(
    design: SampleDesign,
    distances: np.ndarray,
    labelled_indices: np.ndarray,
    labels: np.ndarray,
) -> LabelledSample:
    """Attach labels (True = poison) to the design's pairs, given by their row indices.

    Every labelled index must belong to the design, since only those have a known inclusion
    probability. Design pairs without a label are counted, not guessed.
    """
    distances = validate_distances(distances)
    if distances.size != design.population_size:
        raise CalibrationError(
            f"the sample was drawn from {design.population_size} pairs but {distances.size} distances "
            "were given; score the same shards the sample came from"
        )
    labelled_indices = np.asarray(labelled_indices, dtype=np.int64)
    labels = np.asarray(labels)
    if labelled_indices.shape != labels.shape or labels.ndim != 1:
        raise CalibrationError("labelled indices and labels must be one-dimensional and of equal length")
    if labelled_indices.size == 0:
        raise NoLabelledSampleError(
            "no labelled pairs: run `clipguard sample` and label the pairs it lists (poison or clean)"
        )
    if np.unique(labelled_indices).size != labelled_indices.size:
        raise CalibrationError("a pair is labelled more than once; keep one label per pair")
    if labels.dtype != bool:
        if not np.all(np.isin(labels, (0, 1))):
            raise CalibrationError("labels must be 0/1 or True/False (True = poison)")
        labels = labels.astype(bool)
    foreign = ~np.isin(labelled_indices, design.indices)
    if np.any(foreign):
        raise CalibrationError(
            f"{int(foreign.sum())} labelled pairs are not in the drawn sample (first: row "
            f"{int(labelled_indices[foreign][0])}); their inclusion probability is unknown, so "
            "label only pairs listed by `clipguard sample`"
        )
    if np.any(design.stratum_of(distances[design.indices]) != design.stratum_of_selected):
        raise CalibrationError(
            "these distances do not match the ones the sample was drawn from (strata differ); "
            "score the same shards with the same reference model"
        )
    order = np.argsort(labelled_indices)
    labelled_indices, labels = labelled_indices[order], labels[order]
    labelled_distances = distances[labelled_indices]
    strata = design.stratum_of(labelled_distances)
    per_stratum = np.bincount(strata, minlength=len(design.strata))
    return LabelledSample(
        design=design,
        indices=labelled_indices,
        distances=labelled_distances,
        labels=labels,
        strata=strata,
        labelled_per_stratum=per_stratum,
        n_unlabelled=design.n - labelled_indices.size,
    )
