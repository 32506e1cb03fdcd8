"""Seconds per audit stage: what each signal costs, in the audit's summary and the benchmark."""

from __future__ import annotations

import time
from contextlib import contextmanager


class StageClock:
    """Wall-clock seconds per named stage; a stage timed twice adds up."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self._add(name, time.perf_counter() - started)

    def per(self, pairs: int, unit: int) -> dict[str, float]:
        return {name: round(s / max(pairs, 1) * unit, 4) for name, s in self.seconds.items()}

    def _add(self, name: str, seconds: float) -> None:
        self.seconds[name] = round(self.seconds.get(name, 0.0) + seconds, 4)
