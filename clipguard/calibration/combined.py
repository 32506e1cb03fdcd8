"""Calibrating the combination: a pair is flagged when its distance is at least gamma *or* it is
one of an audit's findings' pairs, and gamma is chosen so that this union meets the one
false-positive budget (or recall target) asked for.

The estimators count, per stratum of the sample design, the pairs with d >= gamma. Giving every
finding member an effective distance of MAX_DISTANCE (2, the largest a cosine distance can be)
makes "d >= gamma" true for them at every gamma a threshold can take, so the same estimators,
intervals and confirmation step measure the union with no change. The strata stay those the
sample was drawn with (computed from the real distances), so the design's weights still hold.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from clipguard.calibration.estimates import Population
from clipguard.calibration.sampling import LabelledSample, SampleDesign
from clipguard.filtering.threshold import MAX_DISTANCE


def finding_members(shards: np.ndarray, keys: np.ndarray, finding_of: dict[tuple[str, str], str]) -> np.ndarray:
    """True for the population's pairs that some finding holds."""
    return np.fromiter(((str(s), str(k)) in finding_of for s, k in zip(shards, keys)), dtype=bool, count=len(keys))


def with_members_flagged(
    distances: np.ndarray, members: np.ndarray, design: SampleDesign, sample: LabelledSample
) -> tuple[Population, LabelledSample]:
    """The population and labelled sample as the union rule sees them (see the module docstring)."""
    effective = np.where(members, MAX_DISTANCE, np.asarray(distances, dtype=np.float64))
    population = Population.from_distances(distances, design, flagged_as=effective)
    return population, dataclasses.replace(sample, distances=effective[sample.indices])
