"""Converted pairs -> numbered WebDataset shards, written with webdataset's own TarWriter.

Like clipguard's other writers, the output is reproducible (fixed mtime and owner, so the same
input gives the same bytes) and atomic (parts carry a temporary name until ``commit``), so an
interrupted conversion never leaves a shard that looks finished.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import webdataset as wds

from clipguard.data.writer import FIXED_MTIME, FIXED_OWNER, TEMPORARY_SUFFIX, WrittenShard, part_path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _Part:
    def __init__(self, final_path: Path):
        self.final_path = final_path
        self.temporary_path = final_path.with_name(final_path.name + TEMPORARY_SUFFIX)
        self.handle = open(self.temporary_path, "wb")
        # PAX, not TarWriter's USTAR default: folder keys can be longer than USTAR's 100 bytes.
        self.tar = wds.TarWriter(self.handle, encoder=False, mtime=FIXED_MTIME, user=FIXED_OWNER,
                                 group=FIXED_OWNER, format="PAX_FORMAT")
        self.samples = 0

    def close(self) -> WrittenShard:
        self.tar.close()
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        size = self.temporary_path.stat().st_size
        return WrittenShard(self.final_path, self.samples, size, _sha256(self.temporary_path))

    def discard(self) -> None:
        self.tar.close()
        self.handle.close()
        self.temporary_path.unlink(missing_ok=True)


class ConvertedShardWriter:
    """Samples -> ``<prefix>-000000.tar``, ``<prefix>-000001.tar``, ... at most ``shard_size`` each."""

    def __init__(self, directory: Path, prefix: str, shard_size: int):
        if shard_size < 1:
            raise ValueError("shard_size must be at least 1")
        self.directory = Path(directory)
        self.prefix = prefix
        self.shard_size = shard_size
        self._current: _Part | None = None
        self._closed: list[WrittenShard] = []

    def write(self, key: str, members: dict[str, bytes]) -> None:
        current = self._current
        if current is not None and current.samples >= self.shard_size:
            self._closed.append(current.close())
            current = None
        if current is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            current = self._current = _Part(part_path(self.directory, self.prefix, len(self._closed)))
        current.tar.write({"__key__": key, **members})
        current.samples += 1

    def commit(self) -> list[WrittenShard]:
        if self._current is not None:
            self._closed.append(self._current.close())
            self._current = None
        for shard in self._closed:
            os.replace(shard.path.with_name(shard.path.name + TEMPORARY_SUFFIX), shard.path)
        written, self._closed = self._closed, []
        return written

    def abort(self) -> None:
        if self._current is not None:
            self._current.discard()
            self._current = None
        for shard in self._closed:
            shard.path.with_name(shard.path.name + TEMPORARY_SUFFIX).unlink(missing_ok=True)
        self._closed = []
