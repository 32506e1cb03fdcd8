"""Vectors left in their embedding files: item i is row ``row[i]`` of the file ``paths[part[i]]``.

A `VectorFiles` is what a neighbour search reads its vectors through (`neighbours.VectorReader`)
and what a search task on another machine is sent: the file paths and two integer columns (12
bytes an item), never the vectors. The files are memory-mapped on first use in each process and
read as unit float32 rows (`partpass.unit_rows`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from clipguard.audit.partpass import load_vectors, unit_rows


class VectorFiles:
    def __init__(self, paths: tuple[str, ...], part: np.ndarray, row: np.ndarray, dims: int):
        self.paths, self.dims = tuple(paths), int(dims)
        self.part, self.row = np.asarray(part, np.int32), np.asarray(row, np.int64)
        self._mapped: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.part)

    def subset(self, items: np.ndarray) -> "VectorFiles":
        """The items ``items`` (in that order) as a `VectorFiles` of their own."""
        items = np.asarray(items, np.int64)
        return VectorFiles(self.paths, self.part[items], self.row[items], self.dims)

    def __call__(self, items: np.ndarray) -> np.ndarray:
        """Unit float32 vectors of ``items``, (len(items), dims), read part by part."""
        items = np.asarray(items, np.int64)
        out = np.empty((len(items), self.dims), np.float32)
        for part, where in by_part(self.part[items]):
            out[where] = unit_rows(self._file(part), self.row[items[where]])
        return out

    def _file(self, part: int) -> np.ndarray:
        if part not in self._mapped:  # a memory map: the OS pages in only the rows read
            self._mapped[part] = load_vectors(Path(self.paths[part]))
        return self._mapped[part]

    def __getstate__(self) -> dict:
        return {"paths": self.paths, "part": self.part, "row": self.row, "dims": self.dims}  # maps are per process

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)


def by_part(part_of_rows: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(part, positions) for each part among the rows, positions into the rows given."""
    order = np.argsort(part_of_rows, kind="stable")
    parts, starts = np.unique(part_of_rows[order], return_index=True)
    for part, where in zip(parts, np.split(order, starts[1:])):
        yield int(part), where
