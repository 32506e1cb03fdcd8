"""Nearest neighbours by cosine similarity: exact on small data, faiss above a size threshold.

Exact: blocked matrix products (a block of queries against every vector; memory is block x n
floats). Large: a faiss IVF index trained on a sample of the vectors and searched in blocks,
visiting ``nprobe`` lists; when ``nprobe`` covers every list the search is exact, which is how
the tests check one path against the other. faiss is an optional extra (``pip install
'clipguard[audit]'``), imported here only, and only when the data is large.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clipguard.errors import ClipguardError

EXACT_LIMIT = 50_000  # up to this many vectors, exact search is cheaper than building an index
BLOCK = 1024
TRAIN_SAMPLE = 100_000


class MissingFaissError(ClipguardError):
    """More vectors than exact search handles, and faiss is not installed."""


@dataclass(frozen=True)
class Neighbours:
    """Per query row, its nearest rows, nearest first (ties by row number)."""

    index: np.ndarray  # (q, k) int64; -1 where fewer rows were found
    similarity: np.ndarray  # (q, k) float32 cosine similarity; -inf where index is -1


class NeighbourIndex:
    """Unit vectors to search; ``search`` and ``self_neighbours`` return `Neighbours`."""

    def __init__(self, vectors: np.ndarray, exact_limit: int = EXACT_LIMIT, nprobe: int = 64, seed: int = 0):
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.exact = len(vectors) <= exact_limit
        self._faiss = None if self.exact else _build_faiss(self.vectors, nprobe, seed)

    def __len__(self) -> int:
        return len(self.vectors)

    def search(self, queries: np.ndarray, k: int, exclude_self: bool = False) -> Neighbours:
        """The k nearest rows of each query; with ``exclude_self`` the queries are rows 0..q-1 of the
        index itself, and a row is never its own neighbour."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = max(0, min(k, len(self) - (1 if exclude_self else 0)))
        index = np.full((len(queries), k), -1, np.int64)
        similarity = np.full((len(queries), k), -np.inf, np.float32)
        if k == 0:
            return Neighbours(index, similarity)
        for start in range(0, len(queries), BLOCK):
            block = queries[start:start + BLOCK]
            if self.exact:
                self._exact_block(block, start if exclude_self else None, k, index[start:], similarity[start:])
            else:
                self._faiss_block(block, start if exclude_self else None, k, index[start:], similarity[start:])
        return Neighbours(index, similarity)

    def self_neighbours(self, k: int) -> Neighbours:
        return self.search(self.vectors, k, exclude_self=True)

    def _exact_block(self, block: np.ndarray, self_start: int | None, k: int, index: np.ndarray,
                     similarity: np.ndarray) -> None:
        sims = block @ self.vectors.T
        if self_start is not None:
            rows = np.arange(len(block))
            sims[rows, self_start + rows] = -np.inf  # never its own neighbour
        n = sims.shape[1]
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (len(block), 1))
        _sorted_into(top, np.take_along_axis(sims, top, axis=1), index, similarity)

    def _faiss_block(self, block: np.ndarray, self_start: int | None, k: int, index: np.ndarray,
                     similarity: np.ndarray) -> None:
        sims, found = self._faiss.search(block, min(k + (self_start is not None), len(self)))
        if self_start is not None:
            mine = found == (self_start + np.arange(len(block)))[:, None]
            found, sims = np.where(mine, -1, found), np.where(mine, -np.inf, sims)
        sims = np.where(found >= 0, sims, -np.inf).astype(np.float32)
        _sorted_into(found, sims, index, similarity)


def _sorted_into(found: np.ndarray, sims: np.ndarray, index: np.ndarray, similarity: np.ndarray) -> None:
    """Nearest first, ties by row number (so exact and faiss agree), cut to the k columns given."""
    key = np.where(found >= 0, found, np.iinfo(np.int64).max)
    order = np.lexsort((key, -sims), axis=-1)
    found, sims = np.take_along_axis(found, order, axis=1), np.take_along_axis(sims, order, axis=1)
    k = index.shape[1]
    rows = len(found)
    width = min(k, found.shape[1])
    index[:rows, :width] = np.where(np.isfinite(sims[:, :width]), found[:, :width], -1)
    similarity[:rows, :width] = sims[:, :width]


def _build_faiss(vectors: np.ndarray, nprobe: int, seed: int):
    try:
        import faiss
    except ImportError:
        raise MissingFaissError(
            f"{len(vectors):,} vectors are more than exact search handles ({EXACT_LIMIT:,}); install faiss "
            "(pip install 'clipguard[audit]') for approximate neighbours"
        ) from None
    n, dim = vectors.shape
    lists = max(1, min(int(4 * np.sqrt(n)), n // 39))  # faiss wants about 39 training points per list
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
    sample = vectors
    if n > TRAIN_SAMPLE:
        sample = vectors[np.sort(np.random.default_rng(seed).choice(n, TRAIN_SAMPLE, replace=False))]
    index.train(sample)
    index.add(vectors)
    index.nprobe = min(nprobe, lists)
    return index
