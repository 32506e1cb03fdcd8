"""The audit's counting pass in bounded memory: distinct identities, distinct counts per group and
shared patch signatures, through partitions spilled to disk.

Done in memory, each of these holds several times its input beside it while it sorts. At 10^8
pairs, numbering the distinct captions (one `np.unique` of 10^8 hashes, with its argsort, sorted
copy, first rows and inverse) holds ~4 GB, counting distinct captions per image (a unique of
10^8 (image, caption) rows) ~5 GB, and grouping 8 patch signatures a pair by signature ~30 GB.
Here the rows are written to partition files a chunk at a time (`Runs`), at most about
``partition_rows`` rows to a partition, and each partition is worked alone as a task on the
executor (`executors.tasks.Tasks`), so what a process holds beside the input and the output is
one chunk or one partition's work. On Ray the partition files are read by the workers: they are
in the audit's output folder, which every worker must reach (as for the search's index).

The results equal the in-memory definitions (`grouping.factorize_codes`,
`grouping.distinct_per_group`, `patch_units`) down to the order of the numbers: hashes are
partitioned by their top bits and groups by ranges of their numbers, so taking the partitions in
turn keeps the global sort order, and a partition keeps its rows in input order.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from clipguard.audit.grouping import distinct_per_group, factorize_codes, run_starts
from clipguard.executors.tasks import Tasks, in_order

# Rows in a partition, about: 2^22 rows of (hash, row) are 64 MB, and their unique holds ~4x that.
PARTITION_ROWS = 1 << 22
CHUNK_ROWS = 1 << 20  # input rows spilled at a time


class Runs:
    """Rows spilled to partition files: one raw file per (partition, column), each partition's
    rows in the order they were added."""

    def __init__(self, folder: Path, name: str, partitions: int, dtypes: Sequence):
        folder.mkdir(parents=True, exist_ok=True)
        self.dtypes = tuple(np.dtype(d) for d in dtypes)
        self.paths = [tuple(str(folder / f"{name}-{p:05d}-{c}.bin") for c in range(len(self.dtypes)))
                      for p in range(partitions)]
        for files in self.paths:  # appended to from empty: what an earlier, killed run left goes
            for path in files:
                _remove(path)
        self.rows = np.zeros(partitions, np.int64)

    def add(self, partition: np.ndarray, *columns: np.ndarray) -> None:
        """Append each row of ``columns`` to its ``partition``'s files (a stable sort keeps order)."""
        order = np.argsort(partition, kind="stable")
        counts = np.bincount(partition, minlength=len(self.paths))
        bounds = np.concatenate([[0], np.cumsum(counts)])
        ordered = [np.ascontiguousarray(np.asarray(column)[order], dtype) for column, dtype in zip(columns, self.dtypes)]
        for p in np.flatnonzero(counts):
            for path, column in zip(self.paths[p], ordered):
                with open(path, "ab") as f:
                    column[bounds[p]:bounds[p + 1]].tofile(f)
        self.rows += counts

    def filled(self) -> list[int]:
        """The partitions that received rows, in order."""
        return [int(p) for p in np.flatnonzero(self.rows)]

    def remove(self, partition: int) -> None:
        for path in self.paths[partition]:
            _remove(path)


def read_run(paths: Sequence[str], dtypes: Sequence) -> list[np.ndarray]:
    return [np.fromfile(path, dtype=np.dtype(dtype)) for path, dtype in zip(paths, dtypes)]


def prefix_bits(rows: int, partition_rows: int) -> int:
    """Top bits of a hash that split ``rows`` into partitions of about ``partition_rows``; 0: one
    partition, worked in memory."""
    if partition_rows <= 0:
        raise ValueError(f"partition_rows must be positive, got {partition_rows}")
    return max(0, math.ceil(math.log2(max(1, math.ceil(rows / partition_rows)))))


def _prefix(codes: np.ndarray, bits: int) -> np.ndarray:
    return (np.asarray(codes, np.uint64) >> np.uint64(64 - bits)).astype(np.int64)


def distinct_ids(codes: np.ndarray, work: Path, tasks: Tasks | None = None,
                 partition_rows: int = PARTITION_ROWS, out: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """`grouping.factorize_codes` of uint64 hashes (each one's number in order of first
    appearance, and how many there are), a partition of hashes at a time; the numbers in ``out``
    where given (int64, one per hash: a memory-mapped file, `pairfiles.PairArrays`)."""
    n = len(codes)
    bits = prefix_bits(n, partition_rows)
    if not bits:
        ids, count = factorize_codes(codes)
        if out is None:
            return ids, count
        out[:] = ids
        return out, count
    runs = Runs(Path(work), "ids", 1 << bits, (np.uint64, np.int64))
    for start in range(0, n, CHUNK_ROWS):
        block = np.asarray(codes[start:start + CHUNK_ROWS], np.uint64)
        runs.add(_prefix(block, bits), block, np.arange(start, start + len(block), dtype=np.int64))
    filled = runs.filled()
    inverse_paths = [f"{runs.paths[p][0]}.inverse" for p in filled]
    # Per partition, its distinct hashes' first rows (in hash order); the inverse goes to a file,
    # so the driver holds the distinct items' first rows (8 bytes each), not every pair's number.
    firsts = (tasks or Tasks()).map(number_run, [(runs.paths[p], path) for p, path in zip(filled, inverse_paths)])
    first_rows = np.concatenate(firsts)
    rank = np.empty(len(first_rows), np.int64)
    rank[np.argsort(first_rows, kind="stable")] = np.arange(len(first_rows))
    del first_rows
    ids = np.empty(n, np.int64) if out is None else out
    offset = 0
    for p, path, first in zip(filled, inverse_paths, firsts):
        rows = np.fromfile(runs.paths[p][1], np.int64)
        ids[rows] = rank[offset + np.fromfile(path, np.int64)]
        offset += len(first)
        runs.remove(p)
        _remove(path)
    return ids, len(rank)


def number_run(paths: tuple[str, str], inverse_path: str) -> np.ndarray:
    """A task: one partition of (hash, row); writes each row's index among the partition's
    distinct hashes to ``inverse_path`` and returns each distinct hash's first row."""
    codes, rows = read_run(paths, (np.uint64, np.int64))
    _, first, inverse = np.unique(codes, return_index=True, return_inverse=True)
    inverse.ravel().astype(np.int64, copy=False).tofile(inverse_path)
    return rows[first]


def distinct_counts(group: np.ndarray, item: np.ndarray, groups: int, work: Path, tasks: Tasks | None = None,
                    partition_rows: int = PARTITION_ROWS) -> np.ndarray:
    """`grouping.distinct_per_group`: how many distinct items each of ``groups`` groups holds, a
    range of group numbers at a time."""
    runs = group_runs(Path(work), "counts", group, groups, (item,), (np.int64,), partition_rows)
    if runs is None:
        return distinct_per_group(group, item, groups)
    out = np.zeros(groups, np.int64)
    for numbers, counts in work_runs(runs, count_run, tasks):
        out[numbers] = counts
    return out


def count_run(paths: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """A task: one partition of (group, item) rows; its groups and their distinct items."""
    group, item = read_run(paths, (np.int64, np.int64))
    numbers, local = np.unique(group, return_inverse=True)
    return numbers, distinct_per_group(local.ravel(), item, len(numbers))


def group_runs(work: Path, name: str, group: np.ndarray, groups: int, columns: Sequence[np.ndarray],
               dtypes: Sequence, partition_rows: int = PARTITION_ROWS, keep: np.ndarray | None = None) -> Runs | None:
    """Rows (group, *columns), those where ``keep`` is true (all without it), spilled to
    partitions by ranges of the group numbers, so that a group's rows are in one partition, in
    input order, and the partitions hold increasing group numbers. None where one partition will
    do (the caller works the rows in memory)."""
    n = len(group)
    bits = prefix_bits(n, partition_rows)
    if not bits or groups < 2:
        return None
    partitions = min(1 << bits, groups)
    runs = Runs(work, name, partitions, (np.int64, *dtypes))
    for start in range(0, n, CHUNK_ROWS):
        chunk = slice(start, start + CHUNK_ROWS)
        block = np.asarray(group[chunk], np.int64)
        chosen = [np.asarray(column[chunk]) for column in columns]
        if keep is not None:
            kept = np.asarray(keep[chunk], bool)
            block, chosen = block[kept], [column[kept] for column in chosen]
        runs.add(block * partitions // groups, block, *chosen)
    return runs


def work_runs(runs: Runs, task: Callable, tasks: Tasks | None = None, *extra) -> Iterator:
    """``task(paths, *extra)``'s result for each filled partition, in partition order, each
    partition's files removed once its result is back."""
    filled = runs.filled()

    def removed(finished):
        for i, result in finished:
            runs.remove(filled[i])
            yield i, result

    yield from in_order(removed((tasks or Tasks()).imap(task, [(runs.paths[p], *extra) for p in filled])))


def patch_units(patches: np.ndarray | None, image_group: np.ndarray, work: Path | None = None,
                tasks: Tasks | None = None, partition_rows: int = PARTITION_ROWS) -> list[list[np.ndarray]]:
    """Per patch signature shared by at least two image groups (in signature order): per group,
    the rows whose image carries the signature. ``patches``: (rows, width) uint64, 0 = none.
    Without ``work`` (or with few signatures) in memory; else partitioned by the signature's top
    bits, and only the signatures on two or more groups leave a partition."""
    if patches is None or not patches.size:
        return []
    n, width = patches.shape
    bits = prefix_bits(n * width, partition_rows) if work is not None else 0
    if not bits:
        keys, rows = _signatures(patches, 0, n)
        return shared_units(keys, rows, image_group[rows])
    runs = Runs(Path(work), "patches", 1 << bits, (np.uint64, np.int64, np.int64))
    step = max(1, CHUNK_ROWS // width)
    for start in range(0, n, step):
        keys, rows = _signatures(patches, start, step)
        runs.add(_prefix(keys, bits), keys, rows, image_group[rows])
    return [unit for units in work_runs(runs, units_run, tasks) for unit in units]


def _signatures(patches: np.ndarray, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The signatures of rows start ... start + count - 1 that are there (not 0), and their rows."""
    block = np.asarray(patches[start:start + count], np.uint64)
    rows = np.repeat(np.arange(start, start + len(block), dtype=np.int64), block.shape[1])
    keys = block.ravel()
    present = keys != 0
    return keys[present], rows[present]


def units_run(paths: tuple[str, str, str]) -> list[list[np.ndarray]]:
    """A task: one partition of (signature, row, image group); `shared_units` of it."""
    return shared_units(*read_run(paths, (np.uint64, np.int64, np.int64)))


def shared_units(keys: np.ndarray, rows: np.ndarray, groups: np.ndarray) -> list[list[np.ndarray]]:
    """Of (signature, row, the row's image group) triples in row order: per signature on two or
    more groups, in signature order, the rows of each group (by group number, rows ascending)."""
    if not len(keys):
        return []
    order = np.lexsort((groups, keys))
    rows, keys, groups = rows[order], keys[order], groups[order]
    starts = np.flatnonzero(run_starts(keys))
    ends = np.r_[starts[1:], len(keys)]
    # A signature on one image group is reuse, which the fan-in test reads: only the others are
    # split (most signatures are on one image, so they are dropped without a Python step each).
    shared = groups[starts] != groups[ends - 1]
    # Copied: a view would keep the whole partition's rows alive as long as the finding's rows.
    return [np.split(rows[start:end].copy(), np.flatnonzero(np.diff(groups[start:end])) + 1)
            for start, end in zip(starts[shared], ends[shared])]


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
