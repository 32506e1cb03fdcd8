"""Filter outputs other tools read: the list of kept pairs (key / uid / url / shard) as Parquet,
DataComp's subset file for its resharder, and open_clip's ``sizes.json``.

Kept pairs are recorded per input shard (``<shard>.kept.parquet`` beside its filter record),
written before the record that marks the shard finished, so a resumed run joins the lists of
finished shards and new ones without reading any shard again.

DataComp's resharder takes a NumPy array of dtype ``u8,u8``: each 128-bit uid (32 hex digits)
as its high and low 64 bits, sorted (it looks uids up by binary search).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipguard.errors import ClipguardError
from clipguard.scoring.scorefiles import atomic_write_bytes, temporary_path

KEPT_SUFFIX = ".kept.parquet"
SIZES_NAME = "sizes.json"
SUBSET_DTYPE = np.dtype("u8,u8")
KEPT_SCHEMA = pa.schema([("key", pa.string()), ("uid", pa.string()), ("url", pa.string()), ("shard", pa.string())])
_UID = re.compile(r"^[0-9a-fA-F]{32}$")


@dataclass(frozen=True)
class KeptPair:
    key: str
    uid: str | None
    url: str | None
    shard: str


def kept_path(clean_dir: Path, shard_name: str) -> Path:
    return Path(clean_dir) / f"{shard_name}{KEPT_SUFFIX}"


def _write_parquet(path: Path, rows: list[KeptPair]) -> None:
    table = pa.Table.from_pydict(
        {name: [getattr(r, name) for r in rows] for name in KEPT_SCHEMA.names}, schema=KEPT_SCHEMA
    )
    tmp = temporary_path(Path(path))
    pq.write_table(table, tmp)
    tmp.replace(path)


def write_shard_kept(clean_dir: Path, shard_name: str, rows: list[KeptPair]) -> None:
    _write_parquet(kept_path(clean_dir, shard_name), rows)


def shard_kept_present(clean_dir: Path, shard_name: str) -> bool:
    return kept_path(clean_dir, shard_name).is_file()


def read_kept(clean_dir: Path, shard_names: list[str]) -> pa.Table:
    tables = [pq.read_table(kept_path(clean_dir, name), schema=KEPT_SCHEMA) for name in shard_names]
    return pa.concat_tables(tables) if tables else KEPT_SCHEMA.empty_table()


def write_keep_list(path: Path, kept: pa.Table) -> None:
    tmp = temporary_path(Path(path))
    pq.write_table(kept, tmp)
    tmp.replace(path)


def uid_pair(uid: str) -> tuple[int, int]:
    """'0123...ef' (32 hex digits) -> (high 64 bits, low 64 bits), as DataComp stores it."""
    return int(uid[:16], 16), int(uid[16:], 16)


def subset_array(uids: list[str | None]) -> np.ndarray:
    """Sorted, unique uids as ``u8,u8``; a kept pair without a 128-bit uid cannot be named in the
    subset, so it is an error rather than a pair silently left out."""
    bad = [u for u in uids if u is None or not _UID.match(u)]
    if bad:
        raise ClipguardError(
            f"{len(bad)} kept pair(s) have no 128-bit uid (32 hex digits), e.g. {bad[0]!r}; DataComp's "
            "subset file names pairs by uid. Use --keep-list alone for data without DataComp uids"
        )
    pairs = sorted(set(uid_pair(u.lower()) for u in uids))
    return np.array(pairs, dtype=SUBSET_DTYPE) if pairs else np.zeros(0, dtype=SUBSET_DTYPE)


def write_subset_file(path: Path, uids: list[str | None]) -> int:
    array = subset_array(uids)
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return len(array)


def write_sizes(folder: Path, parts: list[dict]) -> None:
    """open_clip's ``sizes.json``: shard file name -> sample count, for every part in the folder."""
    sizes = {p["file"]: p["samples"] for p in sorted(parts, key=lambda p: p["file"])}
    atomic_write_bytes(Path(folder) / SIZES_NAME, (json.dumps(sizes, indent=2) + "\n").encode())
