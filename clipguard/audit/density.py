"""Density in an embedding space: the distance to the k-th nearest neighbour, and a local
outlier ratio (a point's k-distance over the mean k-distance of its neighbours, LOF-style).
Huang et al. (ICLR 2025) find backdoor samples by such local-density scores.

The neighbours may be memory-mapped files (`searchtasks.own_neighbours` with ``into``): both
passes read them a block of rows at a time, so what is held is two floats per vector."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from clipguard.audit.neighbours import Neighbours

DENSITY_BLOCK = 65_536  # neighbour rows read at a time: ~8 MB of neighbours and their distances at k = 10


@dataclass(frozen=True)
class Density:
    knn_distance: np.ndarray  # cosine distance to the k-th nearest neighbour; NaN without one
    outlier_ratio: np.ndarray


def density(neighbours: Neighbours, block: int = DENSITY_BLOCK) -> Density:
    n, k = neighbours.index.shape
    if k == 0:
        nan = np.full(n, np.nan)
        return Density(nan, nan.copy())
    kth = np.full(n, np.nan)
    for start in range(0, n, block):  # first pass: every row's k-distance
        index, similarity = neighbours.index[start:start + block], neighbours.similarity[start:start + block]
        valid = index >= 0
        last = k - 1 - np.argmax(valid[:, ::-1], axis=1)  # the last found neighbour's column
        rows = np.arange(len(index))
        found = valid[rows, last]
        kth[start:start + block][found] = 1.0 - similarity[rows[found], last[found]].astype(np.float64)
    ratio = np.full(n, np.nan)
    for start in range(0, n, block):  # second pass: against the neighbours' k-distances
        index = np.asarray(neighbours.index[start:start + block])
        valid = index >= 0
        if not valid.any():
            continue
        around = np.where(valid, kth[np.maximum(index, 0)], np.nan)
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a row whose neighbours have no k-distance: NaN
            mean_around = np.nanmean(around, axis=1)
            # Eps keeps exact duplicates (k-distance 0 around) finite instead of 0/0.
            ratio[start:start + block] = (kth[start:start + block] + 1e-6) / (mean_around + 1e-6)
    return Density(kth, ratio)
