"""Resolve an object-store shard spec (``s3://b/prefix/``, ``s3://b/p/*.tar``, ``s3://b/{0..9}.tar``).

The same rules as for local paths: a folder gives the ``*.tar`` objects directly in it, a glob
its matches, both sorted; a brace pattern expands in the order written. Every object is checked
before any work starts, so a typo is a ShardSpecError, not a shard that fails an hour later. A
long brace list is checked with one listing per prefix rather than one request per object.
"""

from __future__ import annotations

import glob
import posixpath

import braceexpand

from clipguard.data import remotefs
from clipguard.data.sources import SourceReadError
from clipguard.errors import ShardSpecError

# Up to this many objects under one prefix are checked one by one; more share a listing.
_SINGLE_CHECKS = 16


def expand_remote(spec: str) -> list[str]:
    try:
        fs, _ = remotefs.filesystem(spec)
        return _expand(fs, spec)
    except (remotefs.Missing, remotefs.Denied, remotefs.NoBackend, SourceReadError) as exc:
        raise ShardSpecError(str(exc)) from None


def _expand(fs, spec: str) -> list[str]:
    urls: list[str] = []
    plain: list[str] = []
    for item in braceexpand.braceexpand(spec):
        if glob.has_magic(item.split("://", 1)[1]):
            urls.extend(_matches(fs, item))
        elif item.endswith("/") or (not item.endswith((".tar", ".tar.gz", ".tgz")) and _is_folder(fs, item)):
            urls.extend(_folder(fs, item))
        else:
            urls.append(item)
            plain.append(item)
    _check_exist(fs, plain)
    return urls


def _matches(fs, pattern: str) -> list[str]:
    found = remotefs.with_retries(lambda: fs.glob(fs._strip_protocol(pattern), detail=True), pattern)
    files = sorted(path for path, info in found.items() if info.get("type") != "directory")
    if not files:
        raise ShardSpecError(f"pattern {pattern} matches no object")
    return [fs.unstrip_protocol(path) for path in files]


def _is_folder(fs, url: str) -> bool:
    return remotefs.with_retries(lambda: fs.isdir(fs._strip_protocol(url)), url)


def _folder(fs, url: str) -> list[str]:
    entries = _listing(fs, url)
    if entries is None:
        raise ShardSpecError(f"folder {url} does not exist")
    found = sorted(path for path, kind in entries.items() if kind != "directory" and path.endswith(".tar"))
    if not found:
        raise ShardSpecError(f"folder {url} holds no .tar shards")
    return [fs.unstrip_protocol(path) for path in found]


def _listing(fs, url: str) -> dict[str, str] | None:
    """Path -> type of what lies directly under ``url``; None where nothing does."""
    path = fs._strip_protocol(url).rstrip("/")
    fs.invalidate_cache(path)  # another worker may have written here since we last looked
    try:
        entries = remotefs.with_retries(lambda: fs.ls(path, detail=True), url)
    except remotefs.Missing:
        return None
    return {entry["name"].rstrip("/"): entry.get("type", "file") for entry in entries}


def _check_exist(fs, urls: list[str]) -> None:
    by_parent: dict[str, list[str]] = {}
    for url in urls:
        by_parent.setdefault(posixpath.dirname(url), []).append(url)
    for parent, items in by_parent.items():
        if len(items) <= _SINGLE_CHECKS:
            for url in items:
                _check_one(fs, url)
            continue
        present = _listing(fs, parent) or {}
        for url in items:
            if fs._strip_protocol(url) not in present:
                raise ShardSpecError(f"shard {url} does not exist")


def _check_one(fs, url: str) -> None:
    try:
        info = remotefs.with_retries(lambda: fs.info(fs._strip_protocol(url)), url)
    except remotefs.Missing:
        raise ShardSpecError(f"shard {url} does not exist") from None
    if info.get("type") == "directory":
        raise ShardSpecError(f"shard {url} is a folder; give the folder itself to read its .tar shards")
