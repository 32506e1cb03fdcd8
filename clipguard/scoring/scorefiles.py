"""Score files: one Parquet per input shard, written atomically, readable back as tables.

The Parquet file is the completion marker: it appears (by rename) only after its embeddings
have been written, so a file that exists is complete, and a rerun can skip its shard.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCORE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("cosine_similarity", pa.float32()),
        ("cosine_distance", pa.float32()),
        ("status", pa.string()),  # "ok" or "error"
        ("error", pa.string()),
        ("caption_tokens", pa.int32()),
        ("caption_truncated", pa.bool_()),
        ("caption_invalid_utf8", pa.bool_()),
        ("caption_clipped", pa.bool_()),
        ("image_sha256", pa.string()),
        ("uid", pa.string()),
        ("url", pa.string()),
        ("source_status", pa.string()),
        ("source_error", pa.string()),
    ]
)
METADATA_KEY = b"clipguard"
# Columns with few distinct values, worth a Parquet dictionary.
DICTIONARY_COLUMNS = ("shard", "status", "error", "source_status", "source_error")


def score_path(out_dir: Path, shard_name: str) -> Path:
    return Path(out_dir) / f"{shard_name}.parquet"


def embedding_paths(out_dir: Path, shard_name: str) -> tuple[Path, Path, Path]:
    """`--save-embeddings` in clip-retrieval's layout, the shard's name as its number: image and
    text vectors and their metadata, rows aligned, error rows left out (see `left_out_path`)."""
    out_dir = Path(out_dir)
    return (
        out_dir / "img_emb" / f"img_emb_{shard_name}.npy",
        out_dir / "text_emb" / f"text_emb_{shard_name}.npy",
        out_dir / "metadata" / f"metadata_{shard_name}.parquet",
    )


def left_out_path(out_dir: Path, shard_name: str) -> Path:
    """The rows `embedding_paths` leave out (key, shard, error): outside ``metadata/``, whose
    files clip-retrieval's readers expect aligned with the vectors."""
    return Path(out_dir) / "embeddings_left_out" / f"left_out_{shard_name}.parquet"


def write_parquet(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def temporary_path(path: Path) -> Path:
    """A name beside ``path`` that no other writer uses, renamed over ``path`` when complete."""
    return path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = temporary_path(path)
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(payload, indent=2, sort_keys=False) + "\n").encode())


def write_score_table(path: Path, columns: dict[str, list], metadata: dict[str, Any]) -> None:
    rows = len(next(iter(columns.values()))) if columns else 0
    # A writer that knows nothing of a column (every column after "status" may be null) leaves it null.
    columns = {name: columns[name] if name in columns else pa.nulls(rows, SCORE_SCHEMA.field(name).type)
               for name in SCORE_SCHEMA.names}
    table = pa.Table.from_pydict(columns, schema=SCORE_SCHEMA)
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata).encode()})
    tmp = temporary_path(path)
    # Dictionary-encoding a column of distinct values (keys, urls, uids, hashes) only to fall back
    # to plain encoding is a quarter of the write time of a million rows; only the repetitive
    # columns get a dictionary.
    pq.write_table(table, tmp, use_dictionary=list(DICTIONARY_COLUMNS))
    os.replace(tmp, path)


def write_embeddings(path: Path, embeddings: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    with open(tmp, "wb") as handle:
        np.save(handle, embeddings.astype(np.float16), allow_pickle=False)
    os.replace(tmp, path)


def read_metadata(path: Path) -> dict[str, Any] | None:
    """The run metadata stored in a score file, or None if the file is absent or unreadable."""
    try:
        raw = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    try:
        return json.loads(raw.get(METADATA_KEY, b"null"))
    except json.JSONDecodeError:
        return None


@dataclass
class ScoreTable:
    """All score rows of a run, as columns (numpy arrays)."""

    key: np.ndarray
    shard: np.ndarray
    cosine_distance: np.ndarray  # NaN for error rows
    status: np.ndarray
    error: np.ndarray

    def __len__(self) -> int:
        return len(self.key)

    @property
    def ok(self) -> np.ndarray:
        return self.status == "ok"


def find_score_files(scores: Path) -> list[Path]:
    scores = Path(scores)
    if scores.is_file():
        return [scores]
    return sorted(p for p in scores.glob("*.parquet"))


def check_one_model(files: list[Path]) -> None:
    """Scores of two models are not one population: refuse them, naming a file of each."""
    first_file, first = None, None
    for path in files:
        fingerprint = (read_metadata(path) or {}).get("fingerprint")
        if first_file is None:
            first_file, first = path, fingerprint
        elif fingerprint != first:
            from clipguard.errors import MixedModelsError
            from clipguard.scoring.stats import describe_fingerprint

            raise MixedModelsError(
                f"score files from two models: {first_file} ({describe_fingerprint(first)}) and {path} "
                f"({describe_fingerprint(fingerprint)}). Keep one model per score folder"
            )


def existing_score_files(scores: Path) -> list[Path]:
    """`find_score_files`, refusing a folder without any."""
    files = find_score_files(scores)
    if not files:
        from clipguard.errors import ClipguardError

        raise ClipguardError(f"no score files (*.parquet) in {scores}; run `clipguard score` first")
    return files


def read_score_columns(files: list[Path], columns: list[str]) -> pa.Table:
    """These columns of every score file, as one arrow table (refusing files of two models)."""
    check_one_model(files)
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])


def read_scores(scores: Path) -> ScoreTable:
    """Read one score file or a folder of them into columns."""
    table = read_score_columns(existing_score_files(scores), ["key", "shard", "cosine_distance", "status", "error"])
    distance = table.column("cosine_distance").to_numpy(zero_copy_only=False).astype(np.float64)
    return ScoreTable(
        key=np.asarray(table.column("key").to_pylist(), dtype=object),
        shard=np.asarray(table.column("shard").to_pylist(), dtype=object),
        cosine_distance=np.where(np.isnan(distance), np.nan, distance),
        status=np.asarray(table.column("status").to_pylist(), dtype=object),
        error=np.asarray(table.column("error").to_pylist(), dtype=object),
    )
