"""What a signal is: a name, its columns, where they are written, and its flag rule."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

from clipguard.errors import ClipguardError


class SignalError(ClipguardError):
    """An unknown signal, or a folder that does not hold the signal's column."""


class Scope(str, Enum):
    """Where a signal's columns are written."""

    pair = "pair"  # by `clipguard score`, in the score files (<shard>.parquet)
    cross_pair = "cross_pair"  # by `clipguard audit`, in AUDIT/signals/<shard>.parquet


@dataclass(frozen=True)
class Signal:
    """One signal. Higher values of `column` are more suspicious; NaN means not measured."""

    name: str
    scope: Scope
    description: str
    columns: tuple[str, ...]  # the first is the one `flags` compares with the threshold

    @property
    def column(self) -> str:
        return self.columns[0]

    def flags(self, values: np.ndarray, threshold: float) -> np.ndarray:
        """True where a value is over the threshold; a pair the signal did not measure is never flagged."""
        values = np.asarray(values, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            return np.nan_to_num(values, nan=-np.inf) > threshold


@dataclass(frozen=True)
class SignalValues:
    """One signal's main column for a set of pairs, rows aligned (NaN: pair not measured)."""

    signal: Signal
    shard: np.ndarray  # object array of str
    key: np.ndarray
    values: np.ndarray  # float64

    def __len__(self) -> int:
        return len(self.key)

    def flags(self, threshold: float) -> np.ndarray:
        return self.signal.flags(self.values, threshold)
