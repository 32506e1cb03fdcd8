"""Stream a tar shard into samples without ever touching the disk or trusting member names.

A sample is every member sharing a key, WebDataset-style: ``dir/000123.jpg`` and
``dir/000123.txt`` form key ``dir/000123`` with fields ``jpg`` and ``txt``. Members are read into
memory (bounded in size) and never extracted. Unsafe or odd members are reported, and a sample
that contains one becomes an error row rather than disappearing.

Each sample also keeps every member as it was in the tar (`Member`: the exact name, its bytes, in
order, repeats included), so that `filter` can copy a sample byte for byte and name for name;
``fields`` is the decoding view (safe regular members only, the first of a repeated extension).
"""

from __future__ import annotations

import io
import re
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import BinaryIO

from clipguard.data.shardspec import Shard
from clipguard.data.sources import HttpRetry, SourceReadError, open_source

DEFAULT_MAX_MEMBER_BYTES = 64 << 20
_SPOOL_IN_MEMORY_BYTES = 8 << 20
_COPY_CHUNK = 1 << 20
_WINDOWS_ABSOLUTE = re.compile(r"^[A-Za-z]:[\\/]")


@dataclass
class Member:
    """One tar member as it was: name (non-UTF-8 bytes kept as surrogate escapes) and bytes."""

    name: str
    ext: str
    size: int
    data: bytes | None = None  # None where the bytes were not held in memory (see spool)
    spool: BinaryIO | None = None  # an oversized member kept for copying (keep_oversized)
    unsafe: str | None = None  # why this member must not be written under its own name
    link: str | None = None  # the target of a symbolic or hard link (never followed)

    @property
    def has_bytes(self) -> bool:
        return self.data is not None or self.spool is not None

    def open(self) -> BinaryIO:
        if self.spool is not None:
            self.spool.seek(0)
            return self.spool
        return io.BytesIO(self.data or b"")


@dataclass
class RawSample:
    key: str
    fields: dict[str, bytes] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # reasons this sample cannot be trusted
    members: list[Member] = field(default_factory=list)  # every member, in tar order


@dataclass
class ShardReport:
    """What happened while reading one shard, for the run manifest."""

    shard: str
    url: str
    samples: int = 0
    truncated: bool = False
    read_error: str | None = None
    skipped_members: list[dict[str, str]] = field(default_factory=list)
    # The source itself failed (cannot open, connection lost after retries, disk error): the
    # shard is not finished, and a rerun must read it again. Distinct from a tar that is cut.
    source_failed: bool = False

    @property
    def failed(self) -> bool:
        """Not read in full for a reason a rerun may cure, or nothing at all could be read."""
        return self.source_failed or (self.read_error is not None and self.samples == 0)


def open_shard(shard: Shard, retry: HttpRetry | None = None) -> BinaryIO:
    return open_source(shard.url, shard.is_remote, retry)


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is everything before the first dot of the basename."""
    path = PurePosixPath(name)
    base = path.name
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    parent = str(path.parent)
    key = stem if parent in (".", "") else f"{parent}/{stem}"
    return key, ext.lower()


def printable_key(key: str) -> str:
    """A key with non-UTF-8 name bytes (kept by tarfile as surrogates) written as ``\\xNN``, so
    that it can be stored in Parquet and JSON."""
    return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def unsafe_name_reason(name: str) -> str | None:
    """Names that would land outside the folder they are extracted into, on POSIX or Windows.
    A colon elsewhere (``a:colon0001``) is an ordinary character."""
    if name.startswith(("/", "\\")) or _WINDOWS_ABSOLUTE.match(name):
        return "absolute member name"
    if ".." in re.split(r"[\\/]", name):
        return "member name with '..'"
    return None


class _Truncated(Exception):
    """The tar stream ended inside a member or header."""


def iter_samples(
    shard: Shard,
    report: ShardReport,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    keep_oversized: bool = False,
) -> Iterator[RawSample]:
    """Yield samples in tar order. A truncated tar ends the stream with ``report.truncated``;
    the sample cut in half is yielded with a problem, never dropped. With ``keep_oversized``
    a member over ``max_member_bytes`` is kept in a temporary spool file for copying (never
    decoded); otherwise only its size is known."""
    try:
        stream = open_shard(shard)
    except OSError as exc:  # includes urllib's HTTPError and SourceReadError
        report.read_error = f"cannot open shard: {exc}"
        report.source_failed = True
        return
    current: RawSample | None = None
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|*") as archive:
            for member in _members(archive, report):
                key, ext = split_key(member.name)
                key = printable_key(key)
                if current is not None and current.key != key:
                    report.samples += 1
                    yield current
                    current = None
                if current is None:
                    current = RawSample(key=key)
                _add_member(current, archive, member, ext, report, max_member_bytes, keep_oversized)
    except _Truncated as exc:
        report.truncated = True
        report.read_error = f"tar stream ended early: {exc}"
        if current is not None:
            current.problems.append("truncated_shard")
    except SourceReadError as exc:
        _source_failure(report, current, exc)
    except (tarfile.ReadError, EOFError) as exc:
        # The header of the very first member is unreadable: not a tar, or cut before it.
        if "empty file" in str(exc):
            return  # a zero-byte shard holds no samples; that is not an error
        report.truncated = True
        if current is None and report.samples == 0:
            report.read_error = f"not a readable tar: {exc}"
        else:
            report.read_error = f"tar stream failed: {exc}"
            if current is not None:
                current.problems.append("truncated_shard")
    except OSError as exc:
        _source_failure(report, current, exc)
    if current is not None:
        report.samples += 1
        yield current


def _source_failure(report: ShardReport, current: RawSample | None, exc: OSError) -> None:
    report.source_failed = True
    report.read_error = f"could not read the shard in full: {exc}"
    if current is not None:
        current.problems.append("source_read_failed")


def _members(archive: tarfile.TarFile, report: ShardReport) -> Iterator[tarfile.TarInfo]:
    while True:
        try:
            member = archive.next()
        except (tarfile.ReadError, EOFError, tarfile.HeaderError) as exc:
            if archive.offset == 0 and "empty file" in str(exc):
                raise
            raise _Truncated(exc) from None
        if member is None:
            return
        if not member.isdir():
            yield member


def _add_member(
    sample: RawSample,
    archive: tarfile.TarFile,
    info: tarfile.TarInfo,
    ext: str,
    report: ShardReport,
    max_member_bytes: int,
    keep_oversized: bool,
) -> None:
    member = Member(name=info.name, ext=ext, size=info.size, unsafe=unsafe_name_reason(info.name))
    sample.members.append(member)
    if member.unsafe is None and not info.isfile():
        member.unsafe = f"non-regular member ({_kind(info)})"
        member.link = info.linkname or None
    if member.unsafe is not None:
        report.skipped_members.append({"member": printable_key(info.name), "reason": member.unsafe})
        sample.problems.append(f"unsafe_member: {member.unsafe}")
        if info.isfile() and info.size <= max_member_bytes:
            member.data = _read_exactly(archive, info)  # kept for quarantine, never decoded
        return
    if info.size > max_member_bytes:
        report.skipped_members.append({"member": printable_key(info.name), "reason": "member too large"})
        sample.problems.append(f"member_too_large: {ext} is {info.size} bytes")
        if keep_oversized:
            member.spool = _spool_exactly(archive, info)
        return
    member.data = _read_exactly(archive, info)
    if ext in sample.fields:
        # Two members with one key and extension: keeping either would hide the other.
        sample.problems.append(f"duplicate_member: two '{ext}' members for key {sample.key}")
        return
    sample.fields[ext] = member.data


def _read_exactly(archive: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    try:
        data = archive.extractfile(info).read()
    except (tarfile.ReadError, EOFError) as exc:
        raise _Truncated(exc) from None
    if len(data) < info.size:
        raise _Truncated("tar stream ended inside a member")
    return data


def _spool_exactly(archive: tarfile.TarFile, info: tarfile.TarInfo) -> BinaryIO:
    """Copy a large member into an anonymous temporary file (never a named extraction)."""
    spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY_BYTES)
    source = archive.extractfile(info)
    copied = 0
    try:
        while chunk := source.read(_COPY_CHUNK):
            spool.write(chunk)
            copied += len(chunk)
    except (tarfile.ReadError, EOFError) as exc:
        spool.close()
        raise _Truncated(exc) from None
    if copied < info.size:
        spool.close()
        raise _Truncated("tar stream ended inside a member")
    return spool


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hard link"
    if member.isdev():
        return "device"
    if member.isfifo():
        return "fifo"
    return "special"
