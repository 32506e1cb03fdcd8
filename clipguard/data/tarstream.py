"""Stream a tar shard into samples without ever touching the disk or trusting member names.

A sample is every member sharing a key, WebDataset-style: ``dir/000123.jpg`` and
``dir/000123.txt`` form key ``dir/000123`` with fields ``jpg`` and ``txt``. Members are read into
memory (bounded in size) and never extracted. Unsafe or odd members are reported, and a sample
that contains one becomes an error row rather than disappearing.

Each sample also keeps every member as it was in the tar (`Member`: the exact name, its bytes, in
order, repeats included), so that `filter` can copy a sample byte for byte and name for name;
``fields`` is the decoding view (safe regular members only, the first of a repeated extension).

The reader is three stages, each Iterator -> Iterator: `open_shards` (bytes, through
`data/sources.py`) -> `tar_members` (names and sizes checked, bytes read, never extracted) ->
`group_by_key`. A `ShardStart` and a `ShardEnd` mark each shard's members, so that its
`ShardReport` (and, at a cut, the problem of the half sample) reaches whoever consumes the
stream. A shard that cannot be read in full is recorded in its report, then handed to the
stage's ``handler`` (`data/handlers.py`), which says whether the pipeline goes on.
`data/stages.py` adds decoding, preprocessing, batching and tokenizing; `iter_samples` is the
three stages for one shard with failures recorded, not raised.
"""

from __future__ import annotations

import io
import re
import tarfile
import tempfile
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import BinaryIO

from clipguard.data.handlers import Handler, ShardReadError, record_and_continue, reraise
from clipguard.data.shardspec import Shard
from clipguard.data.sources import HttpRetry, open_source

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
    problem: str | None = None  # why its sample cannot be trusted (unsafe, too large), if any

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
    shard: str = ""  # the name of the shard it came from


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

    @classmethod
    def for_shard(cls, shard: Shard) -> ShardReport:
        return cls(shard=shard.name, url=shard.url)

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
    """Yield samples in tar order, recording what went wrong in ``report``: the reading stages
    for one shard, failures recorded and not raised. A truncated tar ends the stream with
    ``report.truncated``; the sample cut in half is yielded with a problem, never dropped. With
    ``keep_oversized`` a member over ``max_member_bytes`` is kept in a temporary spool file for
    copying (never decoded); otherwise only its size is known."""
    opened = open_shards([shard], record_and_continue, report_for=lambda _shard: report)
    members = tar_members(opened, max_member_bytes, keep_oversized, record_and_continue)
    yield from (item for item in group_by_key(members) if isinstance(item, RawSample))


# ------------------------------------------------------------------------------------ stages
# open_shards -> tar_members -> group_by_key, each Iterator -> Iterator. The shard marks
# (ShardStart, ShardEnd) travel with the members so that each shard's report reaches the end of
# the pipeline, failed shards included.


@dataclass
class OpenedShard:
    shard: Shard
    report: ShardReport
    stream: BinaryIO | None  # None: the shard could not be opened (the report says why)


@dataclass
class ShardStart:
    report: ShardReport


@dataclass
class ShardEnd:
    report: ShardReport
    cut: str | None = None  # the problem of the sample the end of the stream cut in two


def open_shards(
    shards: Iterable[Shard], handler: Handler = reraise, report_for: Callable[[Shard], ShardReport] | None = None
) -> Iterator[OpenedShard]:
    for shard in shards:
        opened = _open(shard, (report_for or ShardReport.for_shard)(shard))
        keep_going = opened.stream is not None or handler(ShardReadError(opened.report))
        yield opened  # a shard that failed to open still reaches the end of the pipeline
        if not keep_going:
            return


def _open(shard: Shard, report: ShardReport) -> OpenedShard:
    try:
        return OpenedShard(shard, report, open_shard(shard))
    except OSError as exc:  # includes urllib's HTTPError and SourceReadError
        report.read_error = f"cannot open shard: {exc}"
        report.source_failed = True
        return OpenedShard(shard, report, None)


def tar_members(
    opened: Iterable[OpenedShard],
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    keep_oversized: bool = False,
    handler: Handler = reraise,
) -> Iterator[ShardStart | Member | ShardEnd]:
    """Each shard's members between its marks, bytes read (bounded), names checked, never
    extracted. A stream that breaks ends its shard with a ShardEnd that says so."""
    for item in opened:
        yield ShardStart(item.report)
        end = yield from _shard_members(item, max_member_bytes, keep_oversized)
        yield end
        if item.stream is not None and item.report.read_error and not handler(ShardReadError(item.report)):
            return


def group_by_key(items: Iterable[ShardStart | Member | ShardEnd]) -> Iterator[RawSample | ShardEnd]:
    """WebDataset's grouping: consecutive members sharing a key form one sample."""
    current: RawSample | None = None
    report: ShardReport | None = None
    for item in items:
        if isinstance(item, ShardStart):
            report = item.report
        elif isinstance(item, ShardEnd):
            yield from _close_shard(current, item)
            current = None
        else:
            key = printable_key(split_key(item.name)[0])
            if current is not None and current.key != key:
                yield _counted(current, report)
                current = None
            current = current or RawSample(key=key, shard=report.shard)
            _add_member(current, item)


def _close_shard(current: RawSample | None, end: ShardEnd) -> Iterator[RawSample | ShardEnd]:
    if current is not None:
        if end.cut:
            current.problems.append(end.cut)
        yield _counted(current, end.report)
    yield end


def _counted(sample: RawSample, report: ShardReport) -> RawSample:
    report.samples += 1
    return sample


def _add_member(sample: RawSample, member: Member) -> None:
    sample.members.append(member)
    if member.problem is not None:
        sample.problems.append(member.problem)
    elif member.data is None:
        return  # the stream ended inside it; the shard's end mark gives the sample its problem
    elif member.ext in sample.fields:
        # Two members with one key and extension: keeping either would hide the other.
        sample.problems.append(f"duplicate_member: two '{member.ext}' members for key {sample.key}")
    else:
        sample.fields[member.ext] = member.data


def _shard_members(
    item: OpenedShard, max_member_bytes: int, keep_oversized: bool
) -> Generator[Member, None, ShardEnd]:
    if item.stream is None:
        return ShardEnd(item.report)
    seen = False
    try:
        with item.stream, tarfile.open(fileobj=item.stream, mode="r|*") as archive:
            for info in _tar_infos(archive):
                seen = True
                yield from _read_member(archive, info, item.report, max_member_bytes, keep_oversized)
    except (_Truncated, tarfile.ReadError, EOFError, OSError) as exc:
        return _broken_end(item.report, exc, seen)
    return ShardEnd(item.report)


def _broken_end(report: ShardReport, exc: Exception, seen_member: bool) -> ShardEnd:
    """Record why the stream ended early: the data is cut (truncated) or the source failed."""
    if isinstance(exc, _Truncated):
        report.truncated, report.read_error = True, f"tar stream ended early: {exc}"
        return ShardEnd(report, "truncated_shard")
    if isinstance(exc, OSError):  # SourceReadError, a disk error: a rerun must read it again
        report.source_failed, report.read_error = True, f"could not read the shard in full: {exc}"
        return ShardEnd(report, "source_read_failed")
    # The header of the very first member is unreadable: not a tar, or cut before it.
    if "empty file" in str(exc):
        return ShardEnd(report)  # a zero-byte shard holds no samples; that is not an error
    report.truncated = True
    if not seen_member:
        report.read_error = f"not a readable tar: {exc}"
        return ShardEnd(report)
    report.read_error = f"tar stream failed: {exc}"
    return ShardEnd(report, "truncated_shard")


def _tar_infos(archive: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
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


def _read_member(
    archive: tarfile.TarFile, info: tarfile.TarInfo, report: ShardReport, max_member_bytes: int, keep_oversized: bool
) -> Iterator[Member]:
    member = _checked_member(info, report, max_member_bytes)
    try:
        _read_bytes(member, archive, info, max_member_bytes, keep_oversized)
    except (_Truncated, OSError):
        yield member  # the member the cut split stays in its sample, as far as it was read
        raise
    yield member


def _checked_member(info: tarfile.TarInfo, report: ShardReport, max_member_bytes: int) -> Member:
    """The member with its name checked; any reason it must not be decoded is reported."""
    member = Member(name=info.name, ext=split_key(info.name)[1], size=info.size, unsafe=unsafe_name_reason(info.name))
    if member.unsafe is None and not info.isfile():
        member.unsafe = f"non-regular member ({_kind(info)})"
        member.link = info.linkname or None
    if member.unsafe is not None:
        member.problem, reason = f"unsafe_member: {member.unsafe}", member.unsafe
    elif info.size > max_member_bytes:
        member.problem, reason = f"member_too_large: {member.ext} is {info.size} bytes", "member too large"
    else:
        return member
    report.skipped_members.append({"member": printable_key(info.name), "reason": reason})
    return member


def _read_bytes(
    member: Member, archive: tarfile.TarFile, info: tarfile.TarInfo, max_member_bytes: int, keep_oversized: bool
) -> None:
    if info.size > max_member_bytes:
        if keep_oversized and member.unsafe is None:
            member.spool = _spool_exactly(archive, info)
    elif member.unsafe is None or info.isfile():
        member.data = _read_exactly(archive, info)  # an unsafe member's bytes are kept for quarantine, never decoded


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
