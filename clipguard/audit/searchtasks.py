"""The audit's neighbour search as executor tasks: the index's own rows, a range at a time.

Finding every distinct image's and caption's neighbours is nearly all of a large audit's time
(95% at 100,000 pairs, benchmarks/README.md), and each query is independent of the others, so
above the exact limit the search is cut into ranges (``TASKS_PER_SLOT`` for each task that can
run at once, of ``MIN_TASK_ROWS`` to ``SEARCH_TASK_ROWS`` rows), each a task
(`executors.tasks.Tasks`). A task is sent the index through Ray's object store once per map:
the path of its memory-mapped file (`NeighbourIndex` with ``index_dir``; the audit's) or else the
faiss index serialised, and the vectors' file paths (`vectorfiles.VectorFiles`). It opens the
index once per worker, reads its queries and its candidates' vectors from the embedding files,
which every worker must reach, as for the per-part pass, and returns its rows' neighbours, which
the driver puts in place as they come: in the audit, into memory-mapped files beside the index
(``into``), so that they too are file pages, not memory the driver holds. With the local executor the same ranges run in this
process, one after another (faiss uses every core for each); the exact search (small data) is
one call. Either way the results are
those of `NeighbourIndex.self_neighbours` (a test holds Ray's equal to this process's).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from clipguard.audit.neighbours import NeighbourIndex, Neighbours, faiss_threads
from clipguard.executors.tasks import Tasks

SEARCH_TASK_ROWS = 65_536  # the most queries a task gets: ~8 MB of neighbours back at k = 10
MIN_TASK_ROWS = 4_096  # the fewest, so that a task's fixed costs (the index unpickled, files mapped) stay small
TASKS_PER_SLOT = 4  # ranges per task that can run at once, so that the last ranges and slow workers even out


def own_neighbours(index: NeighbourIndex, k: int, tasks: Tasks | None = None,
                   on_done: Callable[[int, int], None] | None = None, into: Path | None = None) -> Neighbours:
    """`NeighbourIndex.self_neighbours` for every row, a range per task of ``tasks`` above the exact
    limit; ``on_done(rows searched, rows)`` as ranges finish. With ``into`` (a folder) the faiss
    search's neighbours are written there as each range comes (``index.npy``, ``similarity.npy``)
    and returned memory-mapped read-only, so they are file pages, not memory this process holds
    (12 bytes a neighbour: 12 GB for 10^8 vectors at k = 10)."""
    done = on_done or (lambda searched, total: None)
    done(0, len(index))
    if index.exact:
        neighbours = index.self_neighbours(k)
        done(len(index), len(index))
        return neighbours
    tasks = tasks or Tasks()
    n, width = len(index), index.neighbour_count(k, exclude_self=True)
    found, similarity = _result_arrays(n, width, into)
    threads = tasks.task_threads
    rows = range_rows(n, tasks.slots())
    ranges = [(start, min(start + rows, n), k, threads) for start in range(0, n, rows)]
    searched = 0
    for i, block in tasks.imap(search_range, ranges, shared=(index,)):
        start, stop = ranges[i][:2]
        found[start:stop], similarity[start:stop] = block.index, block.similarity
        searched += stop - start
        done(searched, n)
    if not isinstance(found, np.memmap):
        return Neighbours(found, similarity)
    found.flush(), similarity.flush()
    del found, similarity
    return Neighbours(np.load(into / "index.npy", mmap_mode="r"), np.load(into / "similarity.npy", mmap_mode="r"))


def _result_arrays(n: int, width: int, into: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """Where the ranges' neighbours go: arrays here, or ``.npy`` files in ``into`` (every row of
    both is written by a range, so the files need no filling; an empty result stays here)."""
    if into is None or n * width == 0:
        return np.full((n, width), -1, np.int64), np.full((n, width), -np.inf, np.float32)
    into.mkdir(parents=True, exist_ok=True)
    return (np.lib.format.open_memmap(into / "index.npy", "w+", np.int64, (n, width)),
            np.lib.format.open_memmap(into / "similarity.npy", "w+", np.float32, (n, width)))


def range_rows(vectors: int, slots: int) -> int:
    """Rows per task: ``TASKS_PER_SLOT`` ranges for each of ``slots`` tasks at once, within the bounds."""
    return min(SEARCH_TASK_ROWS, max(MIN_TASK_ROWS, -(-vectors // (TASKS_PER_SLOT * slots))))


def search_range(index: NeighbourIndex, start: int, stop: int, k: int, threads: int | None = None) -> Neighbours:
    """One task: the neighbours of the index's own rows ``start``..``stop``, on ``threads`` threads."""
    with faiss_threads(threads):
        return index.self_neighbours(k, start, stop)
