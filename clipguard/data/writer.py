"""Write samples into tar shards that are byte-for-byte reproducible and appear atomically.

Every member gets the same mtime, owner and mode, so the same samples always give the same
bytes (and the same sha256) whatever machine or day writes them. A writer fills numbered parts
under temporary names; nothing carries a final ``.tar`` name until ``commit()`` renames it, so a
crash never leaves a half-written shard that looks complete.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, Union

from clipguard.data.tarstream import unsafe_name_reason

# 2000-01-01T00:00:00Z: fixed so reruns are identical, and late enough that GNU tar does not
# warn about an "implausibly old time stamp" on extraction.
FIXED_MTIME = 946_684_800
FIXED_MODE = 0o444
FIXED_OWNER = "clipguard"
TEMPORARY_SUFFIX = ".tmp"


@dataclass(frozen=True)
class WrittenShard:
    """One finished output tar."""

    path: Path
    samples: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict:
        return {"file": self.path.name, "samples": self.samples, "bytes": self.bytes, "sha256": self.sha256}


class StreamedPayload(Protocol):
    """A member too large to hold in memory: its size and a file to copy it from."""

    size: int

    def open(self) -> BinaryIO: ...


Payload = Union[bytes, StreamedPayload]


def member_name(key: str, ext: str) -> str:
    """WebDataset's naming: ``<key>.<ext>``; a member that had no extension keeps the bare key."""
    return f"{key}.{ext}" if ext else key


def part_path(directory: Path, prefix: str, part: int) -> Path:
    return Path(directory) / f"{prefix}-{part:06d}.tar"


class _HashingFile(io.RawIOBase):
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, handle: BinaryIO):
        self.handle = handle
        self.digest = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    def write(self, data) -> int:
        view = memoryview(data)
        self.digest.update(view)
        self.size += len(view)
        self.handle.write(view)
        return len(view)


class _OpenPart:
    def __init__(self, final_path: Path):
        self.final_path = final_path
        self.temporary_path = final_path.with_name(final_path.name + TEMPORARY_SUFFIX)
        self.handle = open(self.temporary_path, "wb")
        self.hashing = _HashingFile(self.handle)
        self.archive = tarfile.open(fileobj=self.hashing, mode="w", format=tarfile.PAX_FORMAT)
        self.samples = 0
        self.last_key: str | None = None

    def add(self, name: str, data: Payload) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data) if isinstance(data, bytes) else data.size
        info.mtime = FIXED_MTIME
        info.mode = FIXED_MODE
        info.uid = info.gid = 0
        info.uname = info.gname = FIXED_OWNER
        self.archive.addfile(info, io.BytesIO(data) if isinstance(data, bytes) else data.open())

    def close(self) -> WrittenShard:
        self.archive.close()
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        return WrittenShard(self.final_path, self.samples, self.hashing.size, self.hashing.digest.hexdigest())

    def discard(self) -> None:
        self.handle.close()
        self.temporary_path.unlink(missing_ok=True)


class ShardSequenceWriter:
    """Samples -> ``<prefix>-000000.tar``, ``<prefix>-000001.tar``, ... at most ``max_samples`` each.

    A new part also starts when a sample has the same key as the sample just before it: readers
    group consecutive members by key, so two such samples in one tar would merge into one.
    No part is created for zero samples.
    """

    def __init__(self, directory: Path, prefix: str, max_samples: int):
        if max_samples < 1:
            raise ValueError("max_samples must be at least 1")
        self.directory = Path(directory)
        self.prefix = prefix
        self.max_samples = max_samples
        self._current: _OpenPart | None = None
        self._closed: list[WrittenShard] = []

    def write(self, key: str, members: list[tuple[str, Payload]], allow_repeated_names: bool = False) -> None:
        """Write one sample; ``members`` are (full member name, bytes or a streamed payload) in
        the order they should appear. Repeated names are refused unless asked for (a quarantine
        copy keeps a sample exactly as it came, repeats included)."""
        names = [name for name, _ in members]
        for name in names:
            reason = unsafe_name_reason(name)
            if reason is not None:
                raise ValueError(f"refusing to write member {name!r}: {reason}")
        if not allow_repeated_names and len(set(names)) != len(names):
            raise ValueError(f"sample {key!r} has two members with the same name")
        part = self._part_for(key)
        for name, data in members:
            part.add(name, data)
        part.samples += 1
        part.last_key = key

    def _part_for(self, key: str) -> _OpenPart:
        current = self._current
        if current is not None and (current.samples >= self.max_samples or current.last_key == key):
            self._closed.append(current.close())
            current = None
        if current is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            current = _OpenPart(part_path(self.directory, self.prefix, len(self._closed)))
            self._current = current
        return current

    def commit(self) -> list[WrittenShard]:
        """Finish the last part and give every part its final name."""
        if self._current is not None:
            self._closed.append(self._current.close())
            self._current = None
        for shard in self._closed:
            os.replace(shard.path.with_name(shard.path.name + TEMPORARY_SUFFIX), shard.path)
        _fsync_directory(self.directory)
        written, self._closed = self._closed, []
        return written

    def abort(self) -> None:
        """Remove every temporary part; nothing final has been written."""
        if self._current is not None:
            self._current.discard()
            self._current = None
        for shard in self._closed:
            shard.path.with_name(shard.path.name + TEMPORARY_SUFFIX).unlink(missing_ok=True)
        self._closed = []


def _fsync_directory(directory: Path) -> None:
    if not directory.exists():
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open directories; the renames are still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
