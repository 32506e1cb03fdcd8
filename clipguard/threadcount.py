"""A library's thread count set for a block of work and put back after: torch's for a shard's
inference, faiss's for a search task that Ray gave one CPU."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def thread_count(get: Callable[[], int], set_to: Callable[[int], None], threads: int | None) -> Iterator[None]:
    """``set_to(threads)`` inside, the count ``get()`` gave before restored after; None: left alone."""
    if threads is None:
        yield
        return
    before = get()
    set_to(threads)
    try:
        yield
    finally:
        set_to(before)
