"""One writer per output folder: a second clipguard run into the same folder is refused at once.

Two runs writing one folder would rename files over each other's half-finished work. An
advisory `flock` on ``<folder>/.clipguard.lock`` is released by the kernel when the process
ends, however it ends, so a run killed with -9 never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from clipguard.errors import ClipguardError

LOCK_NAME = ".clipguard.lock"


class FolderInUseError(ClipguardError):
    """Another process is writing the same output folder."""


@contextmanager
def exclusive_folder(folder: Path) -> Iterator[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK_NAME, "a+")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise FolderInUseError(
                f"{folder} is being written by another clipguard run (pid {holder}); wait for it to "
                "finish or write to another folder"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield folder
    finally:
        handle.close()  # closing releases the lock
