"""Nearest neighbours by cosine similarity: exact on small data, faiss above a size threshold.

The vectors are a `VectorReader`: rows read by number when needed (from the memory-mapped
embedding parts), so the large path never holds them whole. Exact: the vectors in memory (at
most ``exact_limit`` of them) and blocked matrix products (a block of queries against every
vector, the block sized so it holds about ``BLOCK_CELLS`` similarities). Large: a faiss IVF index
trained on a sample and filled block by block, its vectors stored as ``codes``: "sq8" (the
default: a byte per dimension, 512 bytes a vector at 512 dimensions against 2,048 as float32),
"pq" (product-quantised, ``pq_bytes`` a vector: 64 at 512 dimensions, for 10^8 vectors) or "flat"
(float32). For sq8 and pq it is asked for ``RERANK[codes]`` times the candidates wanted, and
those are scored exactly from the vectors' files, so every similarity returned is exact and only
the choice of candidates is approximate (measured in benchmarks/README.md: pq's choice misses
far more neighbours than sq8's on hard data). Given a folder, the index is filled into files
there, a block per task (`indexfill`), and searched from them memory-mapped, so no process holds
all its codes, and those it reads are file pages shared by every process on a machine. When
``nprobe`` covers every list the search finds what exact search finds, up to the codes'
candidate choice, which is how the tests check one path against the other. faiss is an optional
extra (``pip install 'clipguard[audit]'``), imported through `faiss_module` only, and only when
the data is large.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from clipguard.errors import ClipguardError
from clipguard.threadcount import thread_count

if TYPE_CHECKING:
    from clipguard.executors.tasks import Tasks

EXACT_LIMIT = 50_000  # up to this many vectors, exact search is cheaper than building an index
BLOCK_CELLS = 1 << 22  # similarities per exact block: with the negated copy and argpartition's int64, ~64 MB
MAX_BLOCK = 1024
FAISS_BLOCK = 256  # queries per faiss search: RERANK x (k + 1) candidates each are re-read
TRAIN_SAMPLE = 100_000  # the fewest vectors the index is trained on, where there are more
TRAIN_PER_LIST = 39  # faiss warns with fewer training vectors per list: its k-means centroids are poor
ADD_BLOCK = 65_536
TRAIN_CPUS = 16  # the most CPUs the training task asks for on Ray: faiss's k-means uses every thread it has
CODES = ("sq8", "pq", "flat")
RERANK = {"sq8": 2, "pq": 4, "flat": 1}  # candidates asked per neighbour wanted, then re-scored exactly
PQ_MIN_VECTORS = 10_000  # product quantisation's 256 centroids per subspace want ~10^4 points to train


class MissingFaissError(ClipguardError):
    """More vectors than exact search handles, and faiss is not installed."""


class SearchIndexUnreachable(ClipguardError):
    """A search task cannot open the index file the driver wrote."""


@dataclass(frozen=True)
class Neighbours:
    """Per query row, its nearest rows, nearest first (ties by row number)."""

    index: np.ndarray  # (q, k) int64; -1 where fewer rows were found
    similarity: np.ndarray  # (q, k) float32 cosine similarity; -inf where index is -1


class VectorReader:
    """``count`` unit float32 vectors of ``dims`` dimensions, read by row number when needed."""

    def __init__(self, count: int, dims: int, read: Callable[[np.ndarray], np.ndarray]):
        self.count, self.dims, self._read = int(count), int(dims), read

    @classmethod
    def of(cls, vectors: np.ndarray) -> "VectorReader":
        array = np.ascontiguousarray(vectors, dtype=np.float32)
        return cls(len(array), array.shape[1] if array.ndim == 2 else 0, _ArrayRows(array))

    def __len__(self) -> int:
        return self.count

    def rows(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        return np.ascontiguousarray(self._read(rows), dtype=np.float32).reshape(len(rows), self.dims)

    def block(self, start: int, stop: int) -> np.ndarray:
        return self.rows(np.arange(start, stop))


class _ArrayRows:
    """Rows of an array in memory, as a picklable reader (a lambda is not)."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        return self.array[rows]


class NeighbourIndex:
    """Unit vectors to search (an array or a `VectorReader`); ``search`` and ``self_neighbours``
    return `Neighbours`.

    With ``index_dir`` the faiss index is filled into a file there, a block of rows per task of
    ``tasks`` (`indexfill.fill_on_disk`), and searched from it: its inverted lists are in
    `lists_file`, memory-mapped, so its codes are file pages, which the kernel shares between
    every process on a machine that maps them and may drop, not memory a process holds. It pickles
    (for a search task elsewhere: `searchtasks`) as its reader and that file's path, so a worker
    maps the same file (which must be on storage it reaches); without ``index_dir``, as the faiss
    index serialised. A process sent the same index twice opens it once. `close` lets the index go
    and deletes its files."""

    def __init__(self, vectors: "np.ndarray | VectorReader", exact_limit: int = EXACT_LIMIT, nprobe: int = 64,
                 seed: int = 0, codes: str = "sq8", index_dir: "Path | str | None" = None, tasks: "Tasks | None" = None):
        if codes not in CODES:
            raise ValueError(f"unknown index codes {codes!r}; choose one of {', '.join(CODES)}")
        self.reader = vectors if isinstance(vectors, VectorReader) else VectorReader.of(vectors)
        self.exact = len(self.reader) <= exact_limit
        self._matrix = self.reader.block(0, len(self.reader)) if self.exact else None
        # What the index stores; pq below PQ_MIN_VECTORS would train on too few points.
        self.codes = None if self.exact else ("sq8" if codes == "pq" and len(self.reader) < PQ_MIN_VECTORS else codes)
        self._token = uuid.uuid4().hex  # names this index's faiss state across processes
        self.path = None if self.exact or index_dir is None else str(Path(index_dir) / f"{self._token}.faiss")
        self._faiss = None
        if self.exact:
            return
        trained = _trained(self.reader, nprobe, seed, self.codes, tasks)
        if self.path is None:
            for start in range(0, len(self.reader), ADD_BLOCK):
                trained.add(self.reader.block(start, min(start + ADD_BLOCK, len(self.reader))))
            self._faiss = trained
        else:  # filled a block per task into the file (`indexfill`), never whole in this process
            from clipguard.audit.indexfill import fill_on_disk

            fill_on_disk(trained, self.reader, self.path, tasks)
            del trained
            self._faiss = _mapped(self.path, nprobe)

    def __len__(self) -> int:
        return len(self.reader)

    def close(self) -> None:
        """Let the index go (its file too, if it has one); it cannot be searched afterwards."""
        self._faiss, self._matrix = None, None
        if self.path is not None:
            Path(self.path).unlink(missing_ok=True)
            Path(lists_file(self.path)).unlink(missing_ok=True)

    def __getstate__(self) -> dict:
        inline = not self.exact and self.path is None  # only an index without a file travels as bytes
        return {"reader": self.reader, "exact": self.exact, "codes": self.codes, "token": self._token,
                "nprobe": None if self.exact else self._faiss.nprobe, "path": self.path,
                "faiss": faiss_module().serialize_index(self._faiss) if inline else None}

    def __setstate__(self, state: dict) -> None:
        self.reader, self.exact, self.codes, self._token = state["reader"], state["exact"], state["codes"], state["token"]
        self.path = state["path"]
        self._matrix = self.reader.block(0, len(self.reader)) if self.exact else None
        self._faiss = None if self.exact else _opened(state["token"], state["path"], state["faiss"], state["nprobe"])

    def neighbour_count(self, k: int, exclude_self: bool) -> int:
        """How many neighbours a search for ``k`` returns per query (fewer where there are fewer rows)."""
        return max(0, min(k, len(self) - (1 if exclude_self else 0)))

    def search(self, queries: np.ndarray, k: int, exclude_self: bool = False) -> Neighbours:
        """The k nearest rows of each query; with ``exclude_self`` the queries are rows 0..q-1 of the
        index itself, and a row is never its own neighbour."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        step = self._block_rows()
        blocks = ((start, queries[start:start + step]) for start in range(0, len(queries), step))
        return self._search(blocks, len(queries), k, exclude_self)

    def self_neighbours(self, k: int, start: int = 0, stop: int | None = None) -> Neighbours:
        """The k nearest other rows of each of the index's own rows ``start``..``stop`` (default: all)."""
        stop, step = len(self) if stop is None else min(stop, len(self)), self._block_rows()
        blocks = ((first - start, self._own_rows(first, min(first + step, stop))) for first in range(start, stop, step))
        return self._search(blocks, max(0, stop - start), k, exclude_self=True, offset=start)

    def _own_rows(self, start: int, stop: int) -> np.ndarray:
        return self._matrix[start:stop] if self.exact else self.reader.block(start, stop)

    def _block_rows(self) -> int:
        if not self.exact:
            return FAISS_BLOCK
        return int(max(1, min(MAX_BLOCK, BLOCK_CELLS // max(1, len(self)))))

    def _search(self, blocks: Iterator[tuple[int, np.ndarray]], total: int, k: int, exclude_self: bool,
                offset: int = 0) -> Neighbours:
        """Each block's queries into rows ``start``.. of the result; with ``exclude_self`` query
        ``start + i`` is the index's own row ``offset + start + i``."""
        k = self.neighbour_count(k, exclude_self)
        index = np.full((total, k), -1, np.int64)
        similarity = np.full((total, k), -np.inf, np.float32)
        if k == 0:
            return Neighbours(index, similarity)
        for start, block in blocks:
            own = offset + start if exclude_self else None
            if self.exact:
                self._exact_block(block, own, k, index[start:], similarity[start:])
            else:
                self._faiss_block(block, own, k, index[start:], similarity[start:])
        return Neighbours(index, similarity)

    def _exact_block(self, block: np.ndarray, self_start: int | None, k: int, index: np.ndarray,
                     similarity: np.ndarray) -> None:
        sims = block @ self._matrix.T
        if self_start is not None:
            rows = np.arange(len(block))
            sims[rows, self_start + rows] = -np.inf  # never its own neighbour
        n = sims.shape[1]
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (len(block), 1))
        _sorted_into(top, np.take_along_axis(sims, top, axis=1), index, similarity)

    def _faiss_block(self, block: np.ndarray, self_start: int | None, k: int, index: np.ndarray,
                     similarity: np.ndarray) -> None:
        wanted = (k + (self_start is not None)) * RERANK[self.codes]
        sims, found = self._faiss.search(block, min(wanted, len(self)))
        if self.codes != "flat":  # the codes' similarities only choose candidates; they are re-scored exactly
            sims = self._exact_similarities(block, found)
        if self_start is not None:
            mine = found == (self_start + np.arange(len(block)))[:, None]
            found, sims = np.where(mine, -1, found), np.where(mine, -np.inf, sims)
        sims = np.where(found >= 0, sims, -np.inf).astype(np.float32)
        _sorted_into(found, sims, index, similarity)

    def _exact_similarities(self, block: np.ndarray, found: np.ndarray) -> np.ndarray:
        valid = found >= 0
        ids, inverse = np.unique(found[valid], return_inverse=True)
        query_rows = np.nonzero(valid)[0]
        out = np.full(found.shape, -np.inf, np.float32)
        out[valid] = np.einsum("ij,ij->i", block[query_rows], self.reader.rows(ids)[inverse.ravel()])
        return out


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


def pq_bytes(dims: int) -> int:
    """Bytes of product-quantised code per vector: the largest divisor of ``dims`` up to dims / 8
    (at least 8, when dims has one): 64 at 512 dimensions, 96 at 768."""
    limit = max(8, dims // 8)
    return max(d for d in range(1, min(limit, dims) + 1) if dims % d == 0)


def lists_file(path: str) -> str:
    """Where the index file at ``path`` keeps its inverted lists (`indexfill`)."""
    return path + ".ivfdata"


def faiss_threads(threads: int | None) -> contextlib.AbstractContextManager[None]:
    """faiss's OpenMP threads set to ``threads`` inside (None: as they are). A task given one CPU
    must use one: a worker inherits OMP_NUM_THREADS from the environment it was started in, and
    two workers on two cores each running two threads are slower than two running one."""
    if threads is None:
        return contextlib.nullcontext()
    faiss = faiss_module()
    return thread_count(faiss.omp_get_max_threads, faiss.omp_set_num_threads, threads)


def faiss_module(vectors: int | None = None):
    """faiss, or a clear error: for ``vectors`` too many for exact search, or (None) for a search
    task, which runs wherever the executor put it."""
    try:
        import faiss
    except ImportError:
        why = (f"{vectors:,} vectors are more than exact search handles ({EXACT_LIMIT:,})" if vectors is not None
               else "a neighbour search task runs faiss on every worker")
        raise MissingFaissError(f"{why}; install faiss (pip install 'clipguard[audit]') for approximate neighbours") from None
    return faiss


_OPENED: dict[str, object] = {}  # token -> faiss index: the last one this process was sent


def _opened(token: str, path: str | None, data: np.ndarray | None, nprobe: int):
    """The index a task was sent: mapped from ``path``, or deserialised from ``data``; kept until
    the next one arrives (a worker serves one search, then the next)."""
    if token not in _OPENED:
        _OPENED.clear()
        if path is not None:
            index = _mapped(path, nprobe)
        else:
            index = faiss_module().deserialize_index(np.ascontiguousarray(data))
            index.nprobe = nprobe
        _OPENED[token] = index
    return _OPENED[token]


def _mapped(path: str, nprobe: int):
    faiss = faiss_module()
    try:
        # Read-only: the lists file is mapped, not loaded, and a worker never needs to write it.
        index = faiss.read_index(path, faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as exc:
        raise SearchIndexUnreachable(
            f"the search index {path} cannot be opened here ({str(exc).splitlines()[0]}): on a cluster, the audit's "
            "output folder must be on storage every worker reaches, as the embeddings are") from None
    index.nprobe = nprobe
    # Its lists' own prefetch threads (32 by default) only compete with the search for the cores:
    # 25% slower on 2 cores, with the file already in the page cache (benchmarks/README.md).
    faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists).prefetch_nthread = 0
    return index


def list_count(vectors: int) -> int:
    """The IVF index's lists: 4 sqrt(n), as faiss's guidelines suggest, with at least
    ``TRAIN_PER_LIST`` vectors to train each."""
    return max(1, min(int(4 * np.sqrt(vectors)), vectors // TRAIN_PER_LIST))


def train_size(vectors: int) -> int:
    """How many vectors the index is trained on: ``TRAIN_SAMPLE``, or ``TRAIN_PER_LIST`` per list
    where there are more lists (above ~410,000 vectors: at 10^8, 40,000 lists and 1.56 million
    vectors, 3.2 GB as float32 at 512 dimensions while it trains), never more than there are."""
    return min(vectors, max(TRAIN_SAMPLE, TRAIN_PER_LIST * list_count(vectors)))


def _trained(reader: VectorReader, nprobe: int, seed: int, codes: str, tasks: "Tasks | None"):
    """`_trained_faiss`, here, or on Ray as one task of up to ``TRAIN_CPUS`` CPUs: the training
    sample and the residuals faiss computes from it (~400 MB at 100,000 vectors of 512
    dimensions, 6.4 GB at 10^8) are the driver's largest transient, and this keeps them off it;
    only the trained, empty index comes back (its centroids: 80 MB at 10^8)."""
    if tasks is None or not tasks.distributed:
        return _trained_faiss(reader, nprobe, seed, codes)
    cpus = tasks.node_cpus(TRAIN_CPUS)
    (data,) = tasks.map(train_task, [(reader, nprobe, seed, codes, cpus)], cpus=cpus)
    return faiss_module().deserialize_index(data)


def train_task(reader: VectorReader, nprobe: int, seed: int, codes: str, threads: int) -> np.ndarray:
    """One task: the trained, empty index, serialised, trained on ``threads`` threads."""
    with faiss_threads(threads):
        return faiss_module().serialize_index(_trained_faiss(reader, nprobe, seed, codes))


def _trained_faiss(reader: VectorReader, nprobe: int, seed: int, codes: str):
    """An empty IVF index over ``codes`` (see the module's docstring), trained on a sample."""
    faiss = faiss_module(len(reader))
    n, dim = len(reader), reader.dims
    lists = list_count(n)
    quantizer, ip = faiss.IndexFlatIP(dim), faiss.METRIC_INNER_PRODUCT
    if codes == "pq":
        index = faiss.IndexIVFPQ(quantizer, dim, lists, pq_bytes(dim), 8, ip)
    elif codes == "sq8":
        index = faiss.IndexIVFScalarQuantizer(quantizer, dim, lists, faiss.ScalarQuantizer.QT_8bit, ip)
    else:
        index = faiss.IndexIVFFlat(quantizer, dim, lists, ip)
    sample = np.arange(n)
    if n > train_size(n):
        sample = np.sort(np.random.default_rng(seed).choice(n, train_size(n), replace=False))
    index.train(reader.rows(sample))
    index.nprobe = min(nprobe, lists)
    return index
