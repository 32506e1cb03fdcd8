"""Which pairs share an image or a caption: normalised captions, unique images, and groups
joined by near-duplicate edges (union-find over neighbour pairs above a similarity)."""

from __future__ import annotations

import re
import unicodedata

import numpy as np

from clipguard.audit.neighbours import Neighbours

_NOT_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalise_caption(caption: str) -> str:
    """Case, width, punctuation and spacing removed: "A  Sheep!" and "a sheep" are one caption."""
    return _NOT_WORD.sub(" ", unicodedata.normalize("NFKC", caption).casefold()).strip()


def factorize(values) -> tuple[np.ndarray, int]:
    """Each value's number (in order of first appearance) and how many distinct values there are."""
    numbers: dict = {}
    codes = np.fromiter((numbers.setdefault(v, len(numbers)) for v in values), dtype=np.int64, count=len(values))
    return codes, len(numbers)


def factorize_codes(codes: np.ndarray) -> tuple[np.ndarray, int]:
    """`factorize` for an integer array (the per-part pass's hashes), without a Python dict."""
    if len(codes) == 0:
        return np.zeros(0, np.int64), 0
    distinct, first, inverse = np.unique(codes, return_index=True, return_inverse=True)
    rank = np.empty(len(distinct), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(distinct))
    return rank[inverse.ravel()], len(distinct)


def components(n: int, neighbours: Neighbours, min_similarity: float) -> np.ndarray:
    """Group numbers of rows joined by any neighbour edge at or above ``min_similarity``."""
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    rows, cols = np.nonzero((neighbours.similarity >= min_similarity) & (neighbours.index >= 0))
    for r, c in zip(rows, cols):
        a, b = root(r), root(int(neighbours.index[r, c]))
        if a != b:
            parent[max(a, b)] = min(a, b)
    roots = np.array([root(i) for i in range(n)], dtype=np.int64)
    return factorize(roots.tolist())[0]


def distinct_per_group(group: np.ndarray, item: np.ndarray, groups: int) -> np.ndarray:
    """How many distinct items each group holds."""
    if len(group) == 0:
        return np.zeros(groups, np.int64)
    pairs = np.unique(np.stack([group, item], axis=1), axis=0)
    return np.bincount(pairs[:, 0], minlength=groups)
