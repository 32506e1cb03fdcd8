"""Where a pair came from, as the scraper recorded it: uid, url, and img2dataset's own
per-sample status / error_message, from the sample's ``.json`` member and, beside a local shard,
img2dataset's ``{shard}.parquet`` sidecar and ``{shard}_stats.json``.

The sidecar also lists the downloads img2dataset failed (no tar member): pairs the scrape lost,
counted apart from the pairs clipguard could not use, so a summary never blames either for the
other's losses.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from clipguard.data.shardspec import Shard

# img2dataset's statuses; anything but success has no image in the tar.
SCRAPE_SUCCESS = "success"
MAX_METADATA_BYTES = 1 << 20  # a .json member larger than this is not metadata worth parsing


@dataclass(frozen=True)
class SourceMeta:
    uid: str | None = None
    url: str | None = None
    source_status: str | None = None
    source_error: str | None = None

    def filled_from(self, other: "SourceMeta | None") -> "SourceMeta":
        """Fields this one lacks, taken from ``other`` (the sidecar fills what the json lacks)."""
        if other is None:
            return self
        return SourceMeta(**{k: v if v is not None else getattr(other, k) for k, v in asdict(self).items()})


def _text(value) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def meta_from_record(record: dict) -> SourceMeta:
    return SourceMeta(
        uid=_text(record.get("uid")),
        url=_text(record.get("url")),
        source_status=_text(record.get("status")),
        source_error=_text(record.get("error_message")),
    )


def meta_from_json(raw: bytes | None) -> SourceMeta:
    """The four fields from a ``.json`` member; an unreadable one gives nothing (the caption
    reader records its own reason if the caption lived there)."""
    if raw is None or len(raw) > MAX_METADATA_BYTES:
        return SourceMeta()
    try:
        record = json.loads(raw.decode("utf-8", errors="replace"))
    except (ValueError, RecursionError):
        return SourceMeta()
    return meta_from_record(record) if isinstance(record, dict) else SourceMeta()


@dataclass
class ScrapeReport:
    """img2dataset's account of one shard: what it tried, and what it failed to download."""

    attempted: int = 0
    succeeded: int = 0
    failed: int = 0  # pairs the scrape lost (rows with a status other than success)
    failed_by_status: dict[str, int] = field(default_factory=dict)
    failed_uids: list[str] = field(default_factory=list)
    failed_urls: list[str] = field(default_factory=list)
    source: str = ""  # which file said so

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ScrapeSidecar:
    """Per-key metadata from img2dataset's parquet, and its report on the shard."""

    by_key: dict[str, SourceMeta]
    report: ScrapeReport | None

    def meta(self, key: str) -> SourceMeta | None:
        return self.by_key.get(key)


NO_SIDECAR = ScrapeSidecar({}, None)


def sidecar_paths(shard: Shard) -> tuple[Path, Path] | None:
    """img2dataset writes ``00000.tar``, ``00000.parquet`` and ``00000_stats.json`` side by side."""
    if shard.is_remote or shard.url.startswith("pipe:"):
        return None
    tar = Path(shard.url)
    stem = tar.name[: -len(".tar")] if tar.name.endswith(".tar") else tar.stem
    return tar.with_name(f"{stem}.parquet"), tar.with_name(f"{stem}_stats.json")


def read_sidecar(shard: Shard) -> ScrapeSidecar:
    """What img2dataset left beside a local shard, or nothing when it left nothing (or something
    unreadable: the sidecar only adds detail, so it never fails a shard)."""
    paths = sidecar_paths(shard)
    if paths is None:
        return NO_SIDECAR
    parquet, stats = paths
    sidecar = _from_parquet(parquet) if parquet.is_file() else None
    if sidecar is None:
        return ScrapeSidecar({}, _from_stats(stats) if stats.is_file() else None)
    return sidecar


def _from_parquet(path: Path) -> ScrapeSidecar | None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException):
        return None
    if "key" not in table.column_names or "status" not in table.column_names:
        return None  # not img2dataset's
    wanted = [c for c in ("key", "uid", "url", "status", "error_message") if c in table.column_names]
    by_key: dict[str, SourceMeta] = {}
    report = ScrapeReport(source=str(path))
    failed_by_status: dict[str, int] = {}
    for record in table.select(wanted).to_pylist():
        meta = meta_from_record(record)
        report.attempted += 1
        if meta.source_status == SCRAPE_SUCCESS:
            report.succeeded += 1
            if record.get("key") is not None:
                by_key[str(record["key"])] = meta
            continue
        report.failed += 1
        status = meta.source_status or "unknown"
        failed_by_status[status] = failed_by_status.get(status, 0) + 1
        if meta.uid is not None:
            report.failed_uids.append(meta.uid)
        if meta.url is not None:
            report.failed_urls.append(meta.url)
    report.failed_by_status = dict(sorted(failed_by_status.items()))
    return ScrapeSidecar(by_key, report)


def _from_stats(path: Path) -> ScrapeReport | None:
    """Counts only, from ``{shard}_stats.json`` when the parquet is absent."""
    try:
        stats = json.loads(path.read_text())
        attempted, succeeded = int(stats["count"]), int(stats["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    failed = int(stats.get("failed_to_download", 0) or 0)
    resized = int(stats.get("failed_to_resize", 0) or 0)
    by_status = {k: v for k, v in (("failed_to_download", failed), ("failed_to_resize", resized)) if v}
    return ScrapeReport(attempted, succeeded, attempted - succeeded, by_status, source=str(path))
