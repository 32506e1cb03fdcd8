"""Density in an embedding space: the distance to the k-th nearest neighbour, and a local
outlier ratio (a point's k-distance over the mean k-distance of its neighbours, LOF-style).
Huang et al. (ICLR 2025) find backdoor samples by such local-density scores."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clipguard.audit.neighbours import Neighbours


@dataclass(frozen=True)
class Density:
    knn_distance: np.ndarray  # cosine distance to the k-th nearest neighbour; NaN without one
    outlier_ratio: np.ndarray


def density(neighbours: Neighbours) -> Density:
    n = len(neighbours.index)
    if neighbours.index.shape[1] == 0:
        nan = np.full(n, np.nan)
        return Density(nan, nan.copy())
    valid = neighbours.index >= 0
    distance = np.where(valid, 1.0 - neighbours.similarity.astype(np.float64), np.nan)
    kth = np.array([row[ok][-1] if ok.any() else np.nan for row, ok in zip(distance, valid)])
    around = np.where(valid, kth[np.maximum(neighbours.index, 0)], np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_around = np.nanmean(np.where(valid, around, np.nan), axis=1) if valid.any() else np.full(n, np.nan)
        # Eps keeps exact duplicates (k-distance 0 around) finite instead of 0/0.
        ratio = (kth + 1e-6) / (mean_around + 1e-6)
    return Density(kth, ratio)
