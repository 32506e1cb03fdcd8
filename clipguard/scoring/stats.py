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

from clipguard.data.storage import OutputFolder
from clipguard.errors import ClipguardError, MixedModelsError
from clipguard.scoring.scorefiles import read_metadata

STATS_SUFFIX = "_stats.json"
PENDING, COMPLETE, FAILED = "pending", "complete", "failed"
TIMING_KEYS = ("read_seconds", "decode_seconds", "infer_seconds", "write_seconds")


class NotAScoreFolderError(ClipguardError):
    """The folder holds no clipguard score files."""


def as_folder(out: Path | str | OutputFolder) -> OutputFolder:
    return out if isinstance(out, OutputFolder) else OutputFolder.at(out)


def stats_name(shard_name: str) -> str:
    return f"{shard_name}{STATS_SUFFIX}"


def stats_path(out_dir: Path, shard_name: str) -> Path:
    return Path(out_dir) / stats_name(shard_name)


def write_stats(out: Path | OutputFolder, shard_name: str, stats: dict[str, Any]) -> None:
    """Atomically, locally or in an object store (one PUT)."""
    as_folder(out).write_bytes(stats_name(shard_name), (json.dumps(stats, indent=2) + "\n").encode())


def read_stats(out: Path | OutputFolder, shard_name: str) -> dict[str, Any] | None:
    try:
        return parse_stats(as_folder(out).read_bytes(stats_name(shard_name)))
    except FileNotFoundError:
        return None


def parse_stats(data: bytes) -> dict[str, Any] | None:
    try:
        stats = json.loads(data)
    except ValueError:
        return None
    return stats if isinstance(stats, dict) and stats.get("status") in (PENDING, COMPLETE, FAILED) else None


@dataclass(frozen=True)
class ShardEntry:
    """One shard of a folder as its files describe it."""

    name: str
    status: str
    result: dict[str, Any]  # the ShardResult fields
    run: dict[str, Any]  # model, fingerprint and settings of the run that wrote it
    where: str  # the file the entry was read from


def folder_entries(out: Path | OutputFolder) -> list[ShardEntry]:
    """Every shard the folder knows, by name. A score file without a stats file (a folder made
    before stats files existed) counts as complete, described by its own metadata."""
    folder = as_folder(out)
    names = folder.list()
    score_files = {n for n in names if n.endswith(".parquet")}
    entries: dict[str, ShardEntry] = {}
    for file_name in (n for n in names if n.endswith(STATS_SUFFIX)):
        stats = parse_stats(folder.read_bytes(file_name))
        if stats is None:
            continue
        name = file_name[: -len(STATS_SUFFIX)]
        status = stats["status"]
        if status == COMPLETE and f"{name}.parquet" not in score_files:
            status = PENDING  # the stats outlived their score file: the shard must be scored again
        entries[name] = ShardEntry(name, status, stats.get("result") or {}, stats.get("run") or {}, file_name)
    for file_name in sorted(score_files):
        name = file_name[: -len(".parquet")]
        if name in entries:
            continue
        meta = read_metadata(folder.fetch(file_name))
        if meta is not None:
            run = {k: v for k, v in meta.items() if k != "shard"}
            entries[name] = ShardEntry(name, COMPLETE, meta.get("shard") or {}, run, file_name)
    return [entries[name] for name in sorted(entries)]


def check_one_model(entries: list[ShardEntry], where: Path | str) -> dict[str, Any] | None:
    """The one run metadata all complete shards share; an error naming files and models if not."""
    first: ShardEntry | None = None
    for entry in entries:
        if entry.status != COMPLETE:
            continue
        if first is None:
            first = entry
        elif entry.run.get("fingerprint") != first.run.get("fingerprint"):
            raise MixedModelsError(
                f"{where} mixes scores from two models: {first.where} was scored with "
                f"{describe_model(first.run)}, {entry.where} with {describe_model(entry.run)}. "
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


def folder_summary(out: Path | OutputFolder) -> dict[str, Any]:
    """The score folder's manifest, from its per-shard files alone."""
    folder = as_folder(out)
    entries = folder_entries(folder)
    if not entries:
        raise NotAScoreFolderError(f"{folder} holds no score files; it is not a clipguard score folder (run `clipguard score`)")
    run = check_one_model(entries, folder) or next((e.run for e in entries if e.run), {})
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
        # Downloads img2dataset recorded as failed: lost by the scrape, before clipguard saw them.
        "scrape_lost": sum((e.result.get("scrape") or {}).get("failed", 0) for e in done),
        "shards": [e.result for e in done],
    }
