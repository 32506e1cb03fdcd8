"""`score --from-embeddings`: score tables from embeddings someone already computed.

LAION (clip-retrieval) and DataComp ship CLIP embeddings beside their metadata; a pair's cosine
similarity is then one dot product, no model, no images. Two layouts are read:

    clip-retrieval  img_emb/img_emb_{i}.npy, text_emb/text_emb_{i}.npy (rows aligned, float16),
                    metadata/metadata_{i}.parquet (key or image_path, caption, url, ...)
    datacomp        NNNNNNNN.npz (b32_img, b32_txt, l14_img, l14_txt) + NNNNNNNN.parquet (uid, url, text)

Each input file (one ``{i}``, one ``NNNNNNNN``) is one unit of work, like a shard: it gets
``{i}.parquet`` with SCORE_SCHEMA and then ``{i}_stats.json``, so resume (complete files are
skipped), merging folders and the one-model check work as for shard scoring. Memory stays
bounded: .npy files are memory-mapped and read in blocks, an .npz and a metadata file are read
one file at a time. The vectors are renormalised in float32 (the files claim unit length; a
wrong claim should not change a score), and a NaN, infinite or zero vector makes its row an
error row with a reason. Files that do not line up (row counts, dimensions, a missing partner)
are a clear `EmbeddingInputError`: rows cannot be paired by guessing.

The model recorded is the layout and embedding model ("precomputed:datacomp:b32", no weights),
so a folder never mixes these scores with those of a real model.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import clipguard
from clipguard.data.folderlock import exclusive_folder
from clipguard.data.storage import OutputFolder
from clipguard.errors import ClipguardError
from clipguard.scoring import stats as shard_stats
from clipguard.scoring.scorefiles import SCORE_SCHEMA, score_path, write_score_table

LAYOUTS = ("clip-retrieval", "datacomp")
DATACOMP_MODELS = ("b32", "l14")
MANIFEST_NAME = "manifest.json"  # clipguard.scoring.run.MANIFEST_NAME
# Values per block of a memory-mapped file, converted to float32 into buffers reused across
# blocks: 2 MB a side (1024 rows of 512 dims), within the cache while a block is read three times.
BLOCK_VALUES = 1 << 19
_PART_NUMBER = re.compile(r"img_emb_(.+)\.npy$")


class EmbeddingInputError(ClipguardError):
    """Precomputed embeddings that cannot be read or paired with their metadata."""


@dataclass(frozen=True)
class EmbeddingPart:
    """One input file of embeddings and its metadata; scored into ``{name}.parquet``."""

    name: str
    metadata: Path
    image: Path  # .npy (clip-retrieval) or .npz (datacomp, holding both sides)
    text: Path | None  # None where ``image`` is an .npz

    @property
    def files(self) -> list[Path]:
        return [p for p in (self.image, self.text, self.metadata) if p is not None]

    def source(self) -> dict:
        """Where the part came from, and its files' sizes and mtimes: a rewritten file is scored again."""
        return {
            "location": str((self.image.parent.parent if self.text is not None else self.image.parent).resolve()),
            "files": {p.name: {"size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in self.files},
        }


@dataclass
class PartResult:
    """The fields of `clipguard.scoring.run.ShardResult`, so a folder's stats read alike either way."""

    shard: str
    url: str
    score_file: str
    samples: int
    ok: int
    errors: int
    errors_by_reason: dict[str, int]
    caption_truncated: int = 0
    caption_invalid_utf8: int = 0
    truncated: bool = False
    read_error: str | None = None
    skipped_members: list = field(default_factory=list)
    skipped_on_resume: bool = False
    failed: bool = False
    source: dict | None = None


@dataclass
class EmbeddingScoreSummary:
    out_dir: str
    parts: list[PartResult]
    pairs: int
    ok: int
    errors_by_reason: dict[str, int]
    wall_seconds: float
    pairs_scored_this_run: int

    @property
    def pairs_per_second(self) -> float:
        return self.pairs_scored_this_run / self.wall_seconds if self.wall_seconds > 0 else 0.0


@dataclass(frozen=True)
class EmbeddingSource:
    folder: Path
    layout: str = "clip-retrieval"
    # datacomp: b32 or l14 (which arrays of the .npz); clip-retrieval: a label of the model that
    # made the files, recorded so that two folders of different models are not merged.
    embedding_model: str | None = None

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise EmbeddingInputError(f"unknown layout {self.layout!r}; choose one of {', '.join(LAYOUTS)}")
        if self.layout == "datacomp" and self.model_label not in DATACOMP_MODELS:
            raise EmbeddingInputError(
                f"DataComp ships {' and '.join(DATACOMP_MODELS)} embeddings; --embedding-model {self.model_label!r} is neither"
            )

    @property
    def model_label(self) -> str:
        return self.embedding_model or ("b32" if self.layout == "datacomp" else "unknown")

    def fingerprint(self) -> dict:
        return {
            "architecture": f"precomputed:{self.layout}:{self.model_label}",
            "weights_sha256": None,
            "precision": "precomputed",
            "preprocess": None,
        }


@dataclass
class EmbeddingProgress:
    """After each input file; the fields `clipguard.scoring.run.ScoreProgress` has, so the CLI's
    score progress bar draws either."""

    shards_done: int
    shards_total: int
    pairs_done: int
    shard: str


ProgressCallback = Callable[[EmbeddingProgress], None]


def find_parts(source: EmbeddingSource) -> list[EmbeddingPart]:
    folder = Path(source.folder)
    if not folder.is_dir():
        raise EmbeddingInputError(f"{folder} is not a folder of embeddings")
    parts = _clip_retrieval_parts(folder) if source.layout == "clip-retrieval" else _datacomp_parts(folder)
    if not parts:
        expected = "img_emb/img_emb_*.npy" if source.layout == "clip-retrieval" else "NNNNNNNN.npz"
        raise EmbeddingInputError(f"{folder} holds no {source.layout} embeddings ({expected})")
    return parts


def _clip_retrieval_parts(folder: Path) -> list[EmbeddingPart]:
    images = {m.group(1): p for p in (folder / "img_emb").glob("img_emb_*.npy") if (m := _PART_NUMBER.match(p.name))}
    texts = {p.name[len("text_emb_"):-len(".npy")] for p in (folder / "text_emb").glob("text_emb_*.npy")}
    if orphans := sorted(texts - set(images)):
        raise EmbeddingInputError(f"{folder}: text_emb/text_emb_{orphans[0]}.npy has no img_emb/img_emb_{orphans[0]}.npy")
    parts = []
    for number in sorted(images, key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n)):
        part = EmbeddingPart(
            name=number, image=images[number], text=folder / "text_emb" / f"text_emb_{number}.npy",
            metadata=folder / "metadata" / f"metadata_{number}.parquet",
        )
        _require_files(part)
        parts.append(part)
    return parts


def _datacomp_parts(folder: Path) -> list[EmbeddingPart]:
    parts = []
    for npz in sorted(folder.glob("*.npz")):
        part = EmbeddingPart(name=npz.stem, image=npz, text=None, metadata=npz.with_suffix(".parquet"))
        _require_files(part)
        parts.append(part)
    return parts


def _require_files(part: EmbeddingPart) -> None:
    for path in part.files:
        if not path.is_file():
            raise EmbeddingInputError(f"{path} is missing: part {part.name} needs {', '.join(p.name for p in part.files)}")


def score_from_embeddings(
    source: EmbeddingSource, out_dir: Path | str, progress: ProgressCallback | None = None
) -> EmbeddingScoreSummary:
    """Score every part of ``source`` not yet finished in ``out_dir`` (a folder or an object-store URL)."""
    parts = find_parts(source)
    folder = OutputFolder.at(out_dir)
    if not folder.is_local:
        return _score_parts(parts, source, folder, progress)
    with exclusive_folder(folder.staging):
        return _score_parts(parts, source, folder, progress)


def _score_parts(parts, source: EmbeddingSource, out: OutputFolder, progress) -> EmbeddingScoreSummary:
    start = time.perf_counter()
    run_meta = run_metadata(source)
    results: list[PartResult] = []
    scored = 0
    for done, part in enumerate(parts):
        result = _finished(out, part, run_meta)
        if result is None:
            shard_stats.write_stats(out, part.name, {"status": shard_stats.PENDING, "run": run_meta,
                                                     "result": {"shard": part.name, "url": str(part.image)}})
            result = score_part(part, source, out, run_meta)
            scored += result.samples
        results.append(result)
        if progress:
            progress(EmbeddingProgress(done + 1, len(parts), scored, part.name))
    _write_manifest(out)
    reasons: Counter = Counter()
    for r in results:
        reasons.update(r.errors_by_reason)
    return EmbeddingScoreSummary(
        out_dir=out.location, parts=results, pairs=sum(r.samples for r in results), ok=sum(r.ok for r in results),
        errors_by_reason=dict(reasons), wall_seconds=time.perf_counter() - start, pairs_scored_this_run=scored,
    )


def _write_manifest(out: OutputFolder) -> None:
    """The folder summary for people, as shard scoring writes it (not imported from
    `clipguard.scoring.run`: that imports open_clip, seconds that scoring vectors does not need)."""
    summary = shard_stats.folder_summary(out)
    out.write_bytes(MANIFEST_NAME, (json.dumps(summary, indent=2) + "\n").encode())


def run_metadata(source: EmbeddingSource) -> dict:
    fingerprint = source.fingerprint()
    return {
        "clipguard_version": clipguard.__version__,
        "model": {"architecture": fingerprint["architecture"], "weights_source": "precomputed",
                  "layout": source.layout, "embedding_model": source.model_label},
        "fingerprint": fingerprint,
    }


def _finished(out: OutputFolder, part: EmbeddingPart, run_meta: dict) -> PartResult | None:
    stats = shard_stats.read_stats(out, part.name)
    if stats is None or stats["status"] != shard_stats.COMPLETE or not out.exists(f"{part.name}.parquet"):
        return None
    if (stats.get("run") or {}).get("fingerprint") != run_meta["fingerprint"]:
        raise ClipguardError(
            f"{out} already holds scores for {part.name} from {shard_stats.describe_model(stats.get('run') or {})}; "
            "score these embeddings into a new --out folder"
        )
    recorded = stats.get("result") or {}
    location = (recorded.get("source") or {}).get("location")
    if location not in (None, part.source()["location"]):
        raise ClipguardError(
            f"{out} already holds scores for a different {part.name} (from {location}, not "
            f"{part.source()['location']}); score into a new --out folder"
        )
    if recorded.get("source") != part.source():
        return None  # rewritten (or another folder's part of the same name): score it again
    return PartResult(**{**recorded, "skipped_on_resume": True})


def score_part(part: EmbeddingPart, source: EmbeddingSource, out: OutputFolder, run_meta: dict) -> PartResult:
    """One part's score file, then its stats file (the mark that it is complete)."""
    seconds = {"read_seconds": 0.0, "decode_seconds": 0.0, "infer_seconds": 0.0, "write_seconds": 0.0}
    started = time.perf_counter()
    metadata = read_part_metadata(part)
    image, text = _open_arrays(part, source)
    _check_aligned(part, image, text, metadata.num_rows)
    seconds["read_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    similarity, error = pair_similarity(image, text)
    _mark_rows_without_key(metadata.column("key"), similarity, error)
    seconds["infer_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    reasons = Counter(error[row].split(":", 1)[0] for row in np.flatnonzero(np.isnan(similarity)))
    result = PartResult(
        shard=part.name, url=str(part.image.resolve()), score_file=f"{part.name}.parquet", samples=len(similarity),
        ok=len(similarity) - sum(reasons.values()), errors=sum(reasons.values()), errors_by_reason=dict(reasons),
        source=part.source(),
    )
    columns = _score_columns(part, metadata, similarity, error)
    write_score_table(score_path(out.staging, part.name), columns, {**run_meta, "shard": asdict(result)})
    out.publish(f"{part.name}.parquet")
    seconds["write_seconds"] = time.perf_counter() - started
    shard_stats.write_stats(out, part.name, {"status": shard_stats.COMPLETE, "result": asdict(result), "run": run_meta,
                                             "seconds": {k: round(v, 6) for k, v in seconds.items()}})
    return result


# Metadata columns read, by the score column they fill: the first present of each list wins.
_METADATA_COLUMNS = {
    "key": ("key", "image_path", "uid"),
    "shard": ("shard",),
    "uid": ("uid",),
    "url": ("url",),
    "source_status": ("status",),
    "source_error": ("error_message",),
    "image_sha256": ("image_sha256", "sha256"),
}


def read_part_metadata(part: EmbeddingPart) -> pa.Table:
    """Only the columns a score table uses, renamed to its names; a file without a key is refused."""
    try:
        names = set(pq.read_schema(part.metadata).names)
    except (OSError, pa.ArrowInvalid) as exc:
        raise EmbeddingInputError(f"{part.metadata} is not a readable Parquet file: {exc}") from exc
    chosen = {column: next((n for n in candidates if n in names), None) for column, candidates in _METADATA_COLUMNS.items()}
    if chosen["key"] is None:
        raise EmbeddingInputError(f"{part.metadata} has none of the columns {', '.join(_METADATA_COLUMNS['key'])}: rows have no key")
    wanted = sorted({n for n in chosen.values() if n is not None})
    table = pq.read_table(part.metadata, columns=wanted)
    arrays, fields = [], []
    for column, name in chosen.items():
        arrays.append(_as_string(table.column(name)) if name is not None else pa.nulls(table.num_rows, pa.string()))
        fields.append(column)
    return pa.table(arrays, names=fields)


def _as_string(column: pa.ChunkedArray) -> pa.ChunkedArray:
    return column if column.type == pa.string() else pc.cast(column, pa.string())


def _open_arrays(part: EmbeddingPart, source: EmbeddingSource) -> tuple[np.ndarray, np.ndarray]:
    try:
        if part.text is not None:
            return (np.load(part.image, mmap_mode="r", allow_pickle=False),
                    np.load(part.text, mmap_mode="r", allow_pickle=False))
        with np.load(part.image, allow_pickle=False) as arrays:
            keys = (f"{source.model_label}_img", f"{source.model_label}_txt")
            missing = [k for k in keys if k not in arrays.files]
            if missing:
                raise EmbeddingInputError(f"{part.image} has no {', '.join(missing)} (it holds {', '.join(arrays.files)})")
            return arrays[keys[0]], arrays[keys[1]]
    except (OSError, ValueError) as exc:
        raise EmbeddingInputError(f"{part.image} cannot be read as NumPy arrays: {exc}") from exc


def _check_aligned(part: EmbeddingPart, image: np.ndarray, text: np.ndarray, metadata_rows: int) -> None:
    if image.ndim != 2 or text.ndim != 2:
        raise EmbeddingInputError(f"part {part.name}: embeddings must be 2-D (rows x dims), not {image.shape} and {text.shape}")
    for side, array in (("image", image), ("text", text)):
        if array.dtype.kind != "f" or array.dtype.itemsize > 8:
            raise EmbeddingInputError(f"part {part.name}: {side} vectors are {array.dtype}, not floating point (float16 or float32)")
    if image.shape[1] != text.shape[1]:
        raise EmbeddingInputError(f"part {part.name}: image vectors have {image.shape[1]} dims, text vectors {text.shape[1]}")
    if not (len(image) == len(text) == metadata_rows):
        raise EmbeddingInputError(
            f"part {part.name}: rows do not line up: {len(image)} image vectors, {len(text)} text vectors, "
            f"{metadata_rows} metadata rows ({', '.join(str(p) for p in part.files)})"
        )


def pair_similarity(image: np.ndarray, text: np.ndarray, threads: int | None = None) -> tuple[np.ndarray, list[str | None]]:
    """Cosine similarity per row (NaN for a bad row) and the reason of each bad row (None if ok).

    float16 -> float32 is the cost that matters: numpy converts float16 one value at a time
    (about 0.6 M pairs/s at 512 dims here), torch with the CPU's F16C instructions (about 16 M
    pairs/s for the conversion alone). Blocks of BLOCK_VALUES values are converted into float32
    buffers reused across blocks and small enough to stay in the core's cache while the dot
    product and the two norms read them again (8192-row blocks, 16 MB a side, ran at a third of
    the speed). Each op on a block takes tens of microseconds, too short for torch's own
    threads to wake for (clipguard asks OpenMP to wait passively), so torch runs one thread and
    the blocks are dealt to ``threads`` Python threads (default: the usable cores), which torch
    lets run at once. The arithmetic is float32 throughout: ~1e-7 from float64."""
    import torch  # here, not at import: a folder of vectors is scored without it until now

    n = len(image)
    similarity = np.empty(n, dtype=np.float32)
    image_norm = np.empty(n, dtype=np.float32)
    text_norm = np.empty(n, dtype=np.float32)
    source_image, source_text = _as_tensor(torch, image), _as_tensor(torch, text)
    outputs = tuple(torch.from_numpy(a) for a in (similarity, image_norm, text_norm))
    rows = max(1, BLOCK_VALUES // max(1, image.shape[1]))
    starts = list(range(0, n, rows))
    threads = max(1, min(threads or len(os.sched_getaffinity(0)), len(starts)))

    def blocks(mine: list[int]) -> None:
        out_similarity, out_image_norm, out_text_norm = outputs
        a_buffer = torch.empty((min(rows, n), image.shape[1]), dtype=torch.float32)
        b_buffer = torch.empty_like(a_buffer)
        with torch.inference_mode():
            for start in mine:
                stop = min(start + rows, n)
                a, b = a_buffer[: stop - start], b_buffer[: stop - start]
                a.copy_(source_image[start:stop])
                b.copy_(source_text[start:stop])
                a_norm = torch.linalg.vector_norm(a, dim=1, out=out_image_norm[start:stop])
                b_norm = torch.linalg.vector_norm(b, dim=1, out=out_text_norm[start:stop])
                torch.div(torch.linalg.vecdot(a, b), a_norm * b_norm, out=out_similarity[start:stop])

    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(blocks, [starts[i::threads] for i in range(threads)]))
    finally:
        torch.set_num_threads(torch_threads)
    # A NaN or infinite value makes its norm NaN or infinite; a zero vector has norm 0.
    image_bad = ~(np.isfinite(image_norm) & (image_norm > 0))
    text_bad = ~(np.isfinite(text_norm) & (text_norm > 0))
    similarity[image_bad | text_bad] = np.nan
    error: list[str | None] = [None] * n
    for row in np.flatnonzero(image_bad | text_bad):
        error[row] = f"bad_embedding: {_bad_vector_reason(image[row], 'image')}" if image_bad[row] else \
            f"bad_embedding: {_bad_vector_reason(text[row], 'text')}"
    return similarity, error


def _as_tensor(torch, array: np.ndarray):
    """A tensor over the array's memory (a memory map stays one: nothing is read ahead)."""
    import warnings

    with warnings.catch_warnings():
        # A memory map opened read-only; the tensor is only ever read.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(array))


def _mark_rows_without_key(keys: pa.ChunkedArray, similarity: np.ndarray, error: list[str | None]) -> None:
    """A metadata row whose key is null cannot be joined back to its sample: an error row, not a score."""
    if keys.null_count == 0:
        return
    for row in np.flatnonzero(keys.is_null().to_numpy(zero_copy_only=False)):
        similarity[row] = np.nan
        error[row] = "no_key: the metadata row's key is null"


def _bad_vector_reason(vector: np.ndarray, side: str) -> str:
    return f"{side} vector is zero" if np.isfinite(vector).all() else f"{side} vector holds NaN or infinite values"


def _score_columns(part: EmbeddingPart, metadata: pa.Table, similarity: np.ndarray, error: list[str | None]) -> dict:
    n = len(similarity)
    invalid = np.isnan(similarity)
    cosine = pa.array(similarity, mask=invalid, type=pa.float32())
    distance = pa.array((1.0 - similarity).astype(np.float32), mask=invalid, type=pa.float32())
    shard = metadata.column("shard")
    if shard.null_count == n:  # a layout without shard names: the part is the shard
        shard = pa.repeat(pa.scalar(part.name, pa.string()), n)
    columns = {
        "key": metadata.column("key"),
        "shard": shard,
        "cosine_similarity": cosine,
        "cosine_distance": distance,
        "status": pc.if_else(pa.array(invalid), "error", "ok"),
        "error": pa.array(error, type=pa.string()) if invalid.any() else pa.nulls(n, pa.string()),
        "caption_tokens": pa.nulls(n, pa.int32()),
        "caption_truncated": pa.nulls(n, pa.bool_()),
        "caption_invalid_utf8": pa.nulls(n, pa.bool_()),
        "caption_clipped": pa.nulls(n, pa.bool_()),
        "image_sha256": metadata.column("image_sha256"),
    }
    for name in ("uid", "url", "source_status", "source_error"):
        columns[name] = metadata.column(name)
    return {name: columns[name] for name in SCORE_SCHEMA.names}
