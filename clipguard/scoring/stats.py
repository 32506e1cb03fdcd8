"""Per-shard stats files, and the folder summary derived from them.

Each shard of a score folder has ``<shard>_stats.json``: its status, counts by status and reason,
seconds spent reading, decoding, embedding and writing, the model fingerprint, clipguard's
version and where the shard came from. Status is one of

    pending    claimed by a run that has not finished it (a killed run leaves these)
    complete   ``<shard>.parquet`` holds every sample of the shard
    failed     the source failed; no score file; a rerun reads it again

The folder's summary (`folder_summary`, and ``manifest.json``, which is only its copy for people
to read) is computed from these files alone. So any number of workers on any number of
machines can write into one folder, and folders scored separately merge by copying their
files together: the summary of the merged folder is the summary of the whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipguard.errors import ClipguardError, MixedModelsError
from clipguard.scoring.scorefiles import atomic_write_json, read_metadata

STATS_SUFFIX = "_stats.json"
PENDING, COMPLETE, FAILED = "pending", "complete", "failed"
TIMING_KEYS = ("read_seconds", "decode_seconds", "infer_seconds", "write_seconds")


class NotAScoreFolderError(ClipguardError):
    """The folder holds no clipguard score files."""


def stats_path(out_dir: Path, shard_name: str) -> Path:
    return Path(out_dir) / f"{shard_name}{STATS_SUFFIX}"


def write_stats(out_dir: Path, shard_name: str, stats: dict[str, Any]) -> None:
    atomic_write_json(stats_path(out_dir, shard_name), stats)


def read_stats(path: Path) -> dict[str, Any] | None:
    try:
        stats = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return stats if isinstance(stats, dict) and stats.get("status") in (PENDING, COMPLETE, FAILED) else None


@dataclass(frozen=True)
class ShardEntry:
    """One shard of a folder as its files describe it."""

    name: str
    status: str
    result: dict[str, Any]  # the ShardResult fields
    run: dict[str, Any]  # model, fingerprint and settings of the run that wrote it
    where: Path  # the file the entry was read from


def folder_entries(out_dir: Path) -> list[ShardEntry]:
    """Every shard the folder knows, by name. A score file without a stats file (a folder made
    before stats files existed) counts as complete, described by its own metadata."""
    out_dir = Path(out_dir)
    entries: dict[str, ShardEntry] = {}
    for path in sorted(out_dir.glob(f"*{STATS_SUFFIX}")):
        stats = read_stats(path)
        if stats is None:
            continue
        name = path.name[: -len(STATS_SUFFIX)]
        status = stats["status"]
        if status == COMPLETE and not (out_dir / f"{name}.parquet").is_file():
            status = PENDING  # the stats outlived their score file: the shard must be scored again
        entries[name] = ShardEntry(name, status, stats.get("result") or {}, stats.get("run") or {}, path)
    for path in sorted(out_dir.glob("*.parquet")):
        name = path.stem
        if name in entries:
            continue
        meta = read_metadata(path)
        if meta is not None:
            run = {k: v for k, v in meta.items() if k != "shard"}
            entries[name] = ShardEntry(name, COMPLETE, meta.get("shard") or {}, run, path)
    return [entries[name] for name in sorted(entries)]


def check_one_model(entries: list[ShardEntry], where: Path) -> dict[str, Any] | None:
    """The one run metadata all complete shards share; an error naming files and models if not."""
    first: ShardEntry | None = None
    for entry in entries:
        if entry.status != COMPLETE:
            continue
        if first is None:
            first = entry
        elif entry.run.get("fingerprint") != first.run.get("fingerprint"):
            raise MixedModelsError(
                f"{where} mixes scores from two models: {first.where.name} was scored with "
                f"{describe_model(first.run)}, {entry.where.name} with {describe_model(entry.run)}. "
                "Keep one model per score folder (score into separate --out folders)"
            )
    return first.run if first is not None else None


def describe_model(run: dict[str, Any]) -> str:
    return describe_fingerprint(run.get("fingerprint"))


def describe_fingerprint(fingerprint: dict[str, Any] | None) -> str:
    fingerprint = fingerprint or {}
    sha = fingerprint.get("weights_sha256")
    return (
        f"{fingerprint.get('architecture', '?')} ({(sha or 'random')[:12]}, {fingerprint.get('precision', '?')})"
    )


def folder_summary(out_dir: Path) -> dict[str, Any]:
    """The score folder's manifest, from its per-shard files alone."""
    out_dir = Path(out_dir)
    entries = folder_entries(out_dir)
    if not entries:
        raise NotAScoreFolderError(f"{out_dir} holds no score files; it is not a clipguard score folder (run `clipguard score`)")
    run = check_one_model(entries, out_dir) or next((e.run for e in entries if e.run), {})
    done = [e for e in entries if e.status == COMPLETE]
    failed = [e for e in entries if e.status == FAILED]
    return {
        **run,
        "complete": len(done) == len(entries),
        "shards_total": len(entries),
        "shards_done": len(done),
        "pairs": sum(e.result.get("samples", 0) for e in done),
        "ok": sum(e.result.get("ok", 0) for e in done),
        "errors": sum(e.result.get("errors", 0) for e in done),
        "truncated_shards": [e.name for e in done if e.result.get("truncated")],
        "failed_shards": [
            {"shard": e.name, "url": e.result.get("url"), "reason": e.result.get("read_error"),
             "samples_read": e.result.get("samples", 0)}
            for e in failed
        ],
        "pending_shards": [e.name for e in entries if e.status == PENDING],
        "shards": [e.result for e in done],
    }
