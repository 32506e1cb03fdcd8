"""Stream a tar shard into samples without ever touching the disk or trusting member names.

A sample is every member sharing a key, WebDataset-style: ``dir/000123.jpg`` and
``dir/000123.txt`` form key ``dir/000123`` with fields ``jpg`` and ``txt``. Members are read into
memory (bounded in size) and never extracted. Unsafe or odd members are reported, and a sample
that contains one becomes an error row rather than disappearing.
"""

from __future__ import annotations

import io
import tarfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from clipguard.data.shardspec import Shard

DEFAULT_MAX_MEMBER_BYTES = 64 << 20
HTTP_TIMEOUT_S = 30


@dataclass
class RawSample:
    key: str
    fields: dict[str, bytes] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # reasons this sample cannot be trusted


@dataclass
class ShardReport:
    """What happened while reading one shard, for the run manifest."""

    shard: str
    url: str
    samples: int = 0
    truncated: bool = False
    read_error: str | None = None
    skipped_members: list[dict[str, str]] = field(default_factory=list)


def open_shard(shard: Shard) -> io.BufferedIOBase:
    if shard.is_remote:
        return urllib.request.urlopen(shard.url, timeout=HTTP_TIMEOUT_S)  # noqa: S310 (http/https only)
    if shard.url.startswith("pipe:"):
        import subprocess

        process = subprocess.Popen(shard.url[len("pipe:"):], shell=True, stdout=subprocess.PIPE)  # noqa: S602
        return process.stdout
    return open(shard.url, "rb")


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


def unsafe_name_reason(name: str) -> str | None:
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "absolute member name"
    if ".." in PurePosixPath(name).parts:
        return "member name with '..'"
    return None


def iter_samples(
    shard: Shard, report: ShardReport, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
) -> Iterator[RawSample]:
    """Yield samples in tar order. A truncated tar ends the stream with ``report.truncated``;
    the sample cut in half is yielded with a problem, never dropped."""
    try:
        stream = open_shard(shard)
    except OSError as exc:
        report.read_error = f"cannot open shard: {exc}"
        return
    current: RawSample | None = None
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|*") as archive:
            while True:
                try:
                    member = archive.next()
                except (tarfile.ReadError, EOFError, OSError, tarfile.HeaderError) as exc:
                    report.truncated = True
                    report.read_error = f"tar stream ended early: {exc}"
                    if current is not None:
                        current.problems.append("truncated_shard")
                    break
                if member is None:
                    break
                if member.isdir():
                    continue
                key, ext = split_key(member.name)
                reason = unsafe_name_reason(member.name)
                if reason is None and not member.isfile():
                    reason = f"non-regular member ({_kind(member)})"
                if current is not None and current.key != key:
                    report.samples += 1
                    yield current
                    current = None
                if current is None:
                    current = RawSample(key=key)
                if reason is not None:
                    report.skipped_members.append({"member": member.name, "reason": reason})
                    current.problems.append(f"unsafe_member: {reason}")
                    continue
                if member.size > max_member_bytes:
                    report.skipped_members.append({"member": member.name, "reason": "member too large"})
                    current.problems.append(f"member_too_large: {ext} is {member.size} bytes")
                    continue
                try:
                    data = archive.extractfile(member).read()
                except (tarfile.ReadError, EOFError, OSError) as exc:
                    report.truncated = True
                    report.read_error = f"tar stream ended early: {exc}"
                    current.problems.append("truncated_shard")
                    break
                if len(data) < member.size:
                    report.truncated = True
                    report.read_error = "tar stream ended inside a member"
                    current.problems.append("truncated_shard")
                    break
                if ext in current.fields:
                    # Two members with one key and extension: keeping either would hide the other.
                    current.problems.append(f"duplicate_member: two '{ext}' members for key {key}")
                current.fields[ext] = data
    except (tarfile.ReadError, OSError) as exc:
        # The header of the very first member is unreadable: not a tar, or cut before it.
        if "empty file" in str(exc):
            return  # a zero-byte shard holds no samples; that is not an error
        if current is None and report.samples == 0:
            report.read_error = f"not a readable tar: {exc}"
            report.truncated = True
        else:
            report.truncated = True
            report.read_error = f"tar stream failed: {exc}"
            if current is not None:
                current.problems.append("truncated_shard")
    if current is not None:
        report.samples += 1
        yield current


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
