"""Resolve what the user typed (folders, globs, brace patterns, URLs) into an ordered shard list.

Local paths and ``file://`` URLs are checked on disk; ``http(s)://`` URLs are only brace-expanded
(an HTTP server cannot be listed); object-store URLs (``s3://``, ``gs://``, ``hf://`` ... through
fsspec) are resolved like local paths: a folder prefix gives its ``*.tar`` objects, a glob its
matches, each sorted, and a named object that is not there is an error before any work starts.
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import braceexpand

from clipguard.data.remotefs import is_fsspec_url
from clipguard.errors import ShardSpecError

REMOTE_SCHEMES = ("http://", "https://")


@dataclass(frozen=True)
class Shard:
    """One tar shard. ``name`` is unique within a run and names its output files."""

    url: str
    name: str

    @property
    def is_remote(self) -> bool:
        """Read over the network (http or an object store), not a file on this machine."""
        return self.url.startswith(REMOTE_SCHEMES) or is_fsspec_url(self.url)

    @property
    def is_local(self) -> bool:
        return not self.is_remote and not self.url.startswith("pipe:")

    @property
    def location(self) -> str:
        """Where the bytes come from, the same string however the path was typed."""
        return os.path.realpath(self.url) if self.is_local else self.url

    def local_stat(self) -> dict[str, int] | None:
        """Size and modification time of a local shard, to notice that it was rewritten."""
        if not self.is_local:
            return None
        try:
            stat = os.stat(self.url)
        except OSError:
            return None
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def resolve_shards(specs: list[str] | str, allow_pipe: bool = False) -> list[Shard]:
    """Expand each spec in order; raise ShardSpecError for anything that names no shard."""
    if isinstance(specs, (str, Path)):
        specs = [str(specs)]
    urls: list[str] = []
    for spec in specs:
        urls.extend(_expand_one(str(spec), allow_pipe))
    if not urls:
        raise ShardSpecError("no shards given")
    return _name_uniquely(_dedupe(urls))


def _expand_one(spec: str, allow_pipe: bool) -> list[str]:
    if spec.startswith("pipe:"):
        if not allow_pipe:
            raise ShardSpecError(
                f"refusing '{spec[:60]}': pipe: URLs run a shell command. Pass --allow-pipe if you "
                "trust this source."
            )
        return list(braceexpand.braceexpand(spec))
    if spec.startswith(REMOTE_SCHEMES):
        return list(braceexpand.braceexpand(spec))
    if is_fsspec_url(spec):
        from clipguard.data.remoteshards import expand_remote  # fsspec only for runs that use it

        return expand_remote(spec)
    if spec.startswith("file://"):
        spec = spec[len("file://"):]
    path = Path(spec).expanduser()
    if path.is_dir():
        found = sorted(str(p) for p in path.glob("*.tar"))
        if not found:
            raise ShardSpecError(f"folder {path} holds no .tar shards")
        return found
    expanded = list(braceexpand.braceexpand(spec))
    urls: list[str] = []
    for item in expanded:
        if glob.has_magic(item):
            matches = sorted(glob.glob(item))
            if not matches:
                raise ShardSpecError(f"pattern {item} matches no file")
            urls.extend(matches)
        elif Path(item).is_file():
            urls.append(item)
        else:
            raise ShardSpecError(f"shard {item} does not exist")
    return urls


def _dedupe(urls: list[str]) -> list[str]:
    """One entry per shard: ``x``, ``./x`` and ``d/../x`` name the same local file."""
    seen: dict[str, str] = {}
    for url in urls:
        if url.startswith(REMOTE_SCHEMES) or url.startswith("pipe:") or is_fsspec_url(url):
            seen.setdefault(url, url)
        else:
            seen.setdefault(os.path.realpath(url), os.path.abspath(url))
    return list(seen.values())


def _name_uniquely(urls: list[str]) -> list[Shard]:
    stems = [_stem(url) for url in urls]
    counts: dict[str, int] = {}
    for stem in stems:
        counts[stem] = counts.get(stem, 0) + 1
    shards = []
    for url, stem in zip(urls, stems):
        # Two folders may both hold 00000.tar; a short hash of the full URL keeps outputs apart.
        name = stem if counts[stem] == 1 else f"{stem}-{hashlib.sha1(url.encode()).hexdigest()[:8]}"
        shards.append(Shard(url=url, name=name))
    return shards


def _stem(url: str) -> str:
    base = url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if base.endswith(suffix):
            return base[: -len(suffix)] or "shard"
    return base or "shard"
