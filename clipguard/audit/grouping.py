"""Which pairs share an image or a caption: normalised captions, unique images, and groups
joined by near-duplicate edges (union-find over neighbour pairs above a similarity)."""

from __future__ import annotations

import re
import unicodedata

import numpy as np

from clipguard.audit.neighbours import Neighbours

COMPONENT_BLOCK = 65_536  # neighbour rows whose edges are merged at a time
_NOT_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalise_caption(caption: str) -> str:
    """Case, width, punctuation and spacing removed: "A  Sheep!" and "a sheep" are one caption."""
    return _NOT_WORD.sub(" ", unicodedata.normalize("NFKC", caption).casefold()).strip()


def factorize_codes(codes: np.ndarray) -> tuple[np.ndarray, int]:
    """Each integer's number (in order of first appearance) and how many distinct integers there are."""
    if len(codes) == 0:
        return np.zeros(0, np.int64), 0
    distinct, first, inverse = np.unique(codes, return_index=True, return_inverse=True)
    rank = np.empty(len(distinct), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(distinct))
    return rank[inverse.ravel()], len(distinct)


def combined_codes(*columns: np.ndarray) -> np.ndarray | None:
    """One int64 a row that sorts as the rows of the non-negative integer ``columns`` do, so a
    distinct-rows question is a 1-D `np.unique` (8 bytes a row) and not `np.unique(axis=0)` over
    a stacked copy (8 bytes a column a row, and its row view sorts slowly). None where the columns'
    ranges do not fit in 63 bits together."""
    code = np.zeros(len(columns[0]), np.int64)
    span = 1
    for column in columns:
        width = int(column.max()) + 1 if len(column) else 1
        span *= width
        if span >= 2**63:
            return None
        code = code * width + np.asarray(column, np.int64)
    return code


def components(n: int, neighbours: Neighbours, min_similarity: float, block: int = COMPONENT_BLOCK) -> np.ndarray:
    """Group numbers (in order of first appearance) of rows joined by any neighbour edge at or above
    ``min_similarity``. The neighbours are read a block of rows at a time (they may be memory-mapped
    files), and each block's edges are merged into one parent array, so what is held beside it is a
    block's edges, not all of them."""
    parent = np.arange(n, dtype=np.int64)  # parent[i] <= i: each set's root is its smallest row
    for start in range(0, n, block):
        index = np.asarray(neighbours.index[start:start + block])
        rows, cols = np.nonzero((np.asarray(neighbours.similarity[start:start + block]) >= min_similarity) & (index >= 0))
        _union(parent, rows + start, index[rows, cols])
    return factorize_codes(_roots(parent, np.arange(n, dtype=np.int64)))[0]


def _roots(parent: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Each item's root, by pointer jumping (every step halves the path that is left)."""
    found = parent[items]
    while True:
        up = parent[found]
        if np.array_equal(up, found):
            return found
        found = up


def _union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Join the sets of each edge (a[i], b[i]), vectorised: hook each larger root under the smallest
    root it meets, compress, and repeat until every edge's ends share a root (an edge whose hook
    lost to a smaller one joins in a later round)."""
    while len(a):
        ra, rb = _roots(parent, a), _roots(parent, b)
        apart = ra != rb
        if not apart.any():
            return
        ra, rb, a, b = ra[apart], rb[apart], a[apart], b[apart]
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        touched = np.unique(np.concatenate([a, b]))
        parent[touched] = _roots(parent, touched)  # path compression keeps later rounds short


def run_starts(*columns: np.ndarray) -> np.ndarray:
    """Where each run of equal rows begins in ``columns`` sorted together (a boolean per row)."""
    new = np.zeros(len(columns[0]), bool)
    new[:1] = True
    for column in columns:
        new[1:] |= column[1:] != column[:-1]
    return new


def distinct_per_group(group: np.ndarray, item: np.ndarray, groups: int) -> np.ndarray:
    """How many distinct items each group holds."""
    order = np.lexsort((item, group))
    group, item = group[order], item[order]
    return np.bincount(group[run_starts(group, item)], minlength=groups)
