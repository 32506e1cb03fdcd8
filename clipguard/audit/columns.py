"""The audit's per-pair signal columns, kept as the tables they are looked up in.

Most cross-pair signals are a property of a group or a distinct vector (an image's fan-in, a
caption group's fan-out, a vector's k-distance), so a pair's value is ``table[of[pair]]``. Kept
that way, the columns cost the driver their tables and the per-pair numbers it holds anyway (ids,
groups, classes); a column is gathered for one shard's rows when that shard's file is written, not
for every pair at once (16 columns of 8 bytes: 12.8 GB at 10^8 pairs). `SignalColumns` is also a
read-only mapping from a column's name to the whole column, for the library and the tests."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PairColumn:
    """A per-pair column: ``table`` itself (one value a pair), or ``table[of]`` (``of``: per pair, a row of ``table``)."""

    table: np.ndarray
    of: np.ndarray | None = None

    def rows(self, rows) -> np.ndarray:
        return self.table[rows] if self.of is None else self.table[self.of[rows]]


def per_group(table: np.ndarray, of: np.ndarray) -> PairColumn:
    return PairColumn(np.asarray(table), np.asarray(of))


def class_names(classes: list[str], number: np.ndarray) -> PairColumn:
    """Class numbers as names; NO_CLASS (-1) is the table's last entry, None."""
    return PairColumn(np.asarray([*classes, None], dtype=object), np.asarray(number))


class SignalColumns(Mapping):
    """Column name -> `PairColumn`; indexing by name gathers the whole column."""

    def __init__(self, columns: dict[str, PairColumn]):
        self._columns = dict(columns)

    def rows(self, name: str, rows) -> np.ndarray:
        """One column's values for these pairs only."""
        return self._columns[name].rows(rows)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.rows(name, slice(None))

    def __iter__(self) -> Iterator[str]:
        return iter(self._columns)

    def __len__(self) -> int:
        return len(self._columns)
