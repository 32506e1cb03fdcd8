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
        wanted = k + 1 if exclude_self else k
        for start in range(0, len(queries), BLOCK):
            block = queries[start:start + BLOCK]
            if self.exact:
                sims, found = _exact_block(block, self.vectors, wanted)
            else:
                sims, found = self._faiss.search(block, min(wanted, len(self)))
            for row in range(len(block)):
                ids, ss = found[row], sims[row]
                keep = ids >= 0
                if exclude_self:
                    keep &= ids != start + row
                ids, ss = ids[keep], ss[keep]
                order = np.lexsort((ids, -ss))[:k]
                index[start + row, :len(order)] = ids[order]
                similarity[start + row, :len(order)] = ss[order]
        return Neighbours(index, similarity)

    def self_neighbours(self, k: int) -> Neighbours:
        return self.search(self.vectors, k, exclude_self=True)


def _exact_block(block: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = block @ vectors.T
    k = min(k, vectors.shape[0])
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < vectors.shape[0] else np.tile(np.arange(k), (len(block), 1))
    return np.take_along_axis(sims, top, axis=1), top


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
