"""A trained faiss IVF index filled into a file, a block of vectors per executor task.

Filling an index in memory holds every vector's codes in the process that fills it (512 bytes
a vector with sq8 codes: 51 GB at 10^8 vectors) until the index is written. Here each block of
``ADD_BLOCK`` rows is a task (`executors.tasks.Tasks`) that adds its rows to a copy of the
trained, empty index and writes that small index to a file beside the final one; the driver
then merges the blocks' inverted lists into one ``<index>.ivfdata`` file (faiss's
`OnDiskInvertedLists`, which keeps its lists in a memory-mapped file) and writes the index's
header (the coarse quantizer and the lists' offsets) to ``<index>``. So no process holds more
than a block's vectors and codes, the blocks' coarse assignment (most of the filling's work)
spreads over the cluster with the search that follows, and the index is searched from file
pages that every process on a machine shares. The result is the index that adding the blocks
in order to the trained index would make: the same lists, in the same order, with the same ids.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
import ctypes

import numpy as np

from clipguard.audit.neighbours import ADD_BLOCK, VectorReader, faiss_module, faiss_threads, lists_file
from clipguard.executors.tasks import Tasks

def fill_on_disk(trained, reader: VectorReader, path: str, tasks: Tasks | None = None) -> None:
    """Write ``trained`` (an empty, trained IVF index) filled with every row of ``reader`` to
    ``path`` and `lists_file(path)`, a block per task of ``tasks`` (default: here, one by one)."""
    faiss = faiss_module()
    tasks = tasks or Tasks()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    empty = faiss.serialize_index(trained)  # a few MB (the coarse centroids): sent once per map
    n = len(reader)
    threads = tasks.task_threads
    blocks = [(start, min(start + ADD_BLOCK, n), f"{path}.block-{start}", threads) for start in range(0, n, ADD_BLOCK)]
    written = tasks.map(fill_block, blocks, shared=(empty, reader))
    try:
        # Each block's lists are read memory-mapped, so the merge holds none of their codes.
        parts = [faiss.read_index(block, faiss.IO_FLAG_MMAP) for block in written]
        ivf = faiss.extract_index_ivf(trained)
        lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, lists_file(path))
        sources = faiss.InvertedListsPtrVector()
        for part in parts:
            sources.push_back(faiss.extract_index_ivf(part).invlists)
        with _c_stdout_quiet():  # faiss prints "resizing <file>" on C's stdout, which is the CLI's
            total = lists.merge_from_multiple(sources.data(), sources.size(), False)
        if total != n:
            raise RuntimeError(f"the index's blocks hold {total} vectors, not {n}")
        trained.ntotal = ivf.ntotal = total
        ivf.replace_invlists(lists, True)
        lists.this.disown()  # the index owns the lists now, and frees them with itself
        faiss.write_index(trained, path)
        del parts, sources
    finally:
        for block in written:
            Path(block).unlink(missing_ok=True)


def fill_block(empty: np.ndarray, reader: VectorReader, start: int, stop: int, path: str,
               threads: int | None = None) -> str:
    """One task: rows ``start``..``stop`` added (as ids start..stop) to a copy of the trained,
    empty index, written to ``path``; returns ``path``."""
    faiss = faiss_module()
    with faiss_threads(threads):
        block = faiss.deserialize_index(np.ascontiguousarray(empty))
        block.add_with_ids(reader.block(start, stop), np.arange(start, stop, dtype=np.int64))
    faiss.write_index(block, path)
    return path


@contextlib.contextmanager
def _c_stdout_quiet():
    """File descriptor 1 pointed at /dev/null inside (faiss's C++ printf goes there, not through
    sys.stdout). Python's buffered output is flushed before, so none of it is lost, and C's
    after, so what faiss printed reaches /dev/null rather than the restored descriptor later."""
    sys.stdout.flush()
    libc = ctypes.CDLL(None)
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
