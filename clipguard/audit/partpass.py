"""The audit's per-part pass: what the cross-pair tests need of one embedding part, as fixed-width
columns, computed where the part is (a task on an executor).

A part is one clip-retrieval file triple (``img_emb_<stem>.npy``, ``text_emb_<stem>.npy``,
``metadata_<stem>.parquet``). Its pass hashes each row's normalised caption and its image (the
sha256 where the metadata has it, else the stored vector's bytes) to 64 bits, labels the caption
by keyword, takes the pair's cosine similarity and the image's patch signatures. About 30 bytes
a pair plus 8 per patch signature leave the task, so the driver never holds a caption or a vector
it does not need: it later reads back only the distinct images' and captions' vectors
(`inputs.AuditPairs.vectors`) and the captions of findings (`inputs.AuditPairs.captions`).

Two different captions (or images) share a 64-bit hash with probability about n^2 / 2^65: 3e-4 at
10^8 distinct captions; such a pair would be counted as one caption, never lost.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipguard.audit.classes import NO_CLASS, caption_classes
from clipguard.audit.errors import AuditInputError
from clipguard.audit.grouping import normalise_caption
from clipguard.labels import KeywordLabeler

BLOCK_ROWS = 16_384  # rows converted to float32 at a time for the pair similarity


@dataclass(frozen=True)
class PartFiles:
    stem: str
    image: str  # paths as strings: a task on another machine gets them as sent
    text: str
    metadata: str


@dataclass
class PartCodes:
    """One part's rows, in file order: identities, caption class, pair similarity, signatures."""

    shard: np.ndarray  # object array of str, one object per distinct shard; None where the metadata has no shard column
    key: pa.Array  # str, one buffer: ~8 bytes a key besides its text, against ~60 for a Python str each
    caption_hash: np.ndarray  # uint64, of `grouping.normalise_caption`
    image_hash: np.ndarray  # uint64
    caption_class: np.ndarray  # int64 index into the keyword classes, NO_CLASS for none or several
    similarity: np.ndarray  # float32 cosine similarity of the pair's vectors
    patches: np.ndarray | None  # (rows, width) uint64, 0 where an image has fewer; None: no column
    dims: int

    def __len__(self) -> int:
        return len(self.key)


def code_part(files: PartFiles, keywords: dict[str, list[str]] | None = None) -> PartCodes:
    """The pass itself: one part in, its `PartCodes` out. Raises `AuditInputError` on a part that
    is not aligned, not readable or missing a column, naming the file."""
    meta = _read_metadata(Path(files.metadata))
    image, text = load_vectors(Path(files.image)), load_vectors(Path(files.text))
    if not (len(image) == len(text) == meta.num_rows):
        raise AuditInputError(f"embedding files of {files.stem} are not aligned: {len(image)} image and {len(text)} text "
                              f"vectors, {meta.num_rows} metadata rows")
    if image.shape[1] != text.shape[1]:
        raise AuditInputError(f"{files.image}: image vectors have {image.shape[1]} dimensions and text vectors {text.shape[1]}")
    names = set(meta.column_names)
    captions = [c if c is not None else "" for c in meta.column("caption").to_pylist()]
    shas = meta.column("image_sha256").to_pylist() if "image_sha256" in names else [None] * len(captions)
    labeler = KeywordLabeler(keywords) if keywords else None
    return PartCodes(
        shard=shared_strings(meta.column("shard")) if "shard" in names else np.full(len(captions), None, object),
        key=meta.column("key").cast(pa.string()).fill_null("None").combine_chunks(),
        caption_hash=np.fromiter((_hash64(normalise_caption(c).encode("utf-8")) for c in captions), np.uint64, len(captions)),
        # An image without a sha256 is known by its vector's stored bytes (one image scored twice
        # has the same vector); the "v" keeps these apart from hashes of sha256 strings.
        image_hash=np.fromiter((_hash64(s.encode("utf-8")) if s else _hash64(b"v" + np.ascontiguousarray(image[i]).tobytes())
                                for i, s in enumerate(shas)), np.uint64, len(shas)),
        caption_class=caption_classes(captions, labeler) if labeler else np.full(len(captions), NO_CLASS, np.int64),
        similarity=_similarity(image, text),
        patches=_patch_matrix(meta, files.metadata) if "image_patches" in names else None,
        dims=int(image.shape[1]),
    )


def shared_strings(column: pa.ChunkedArray) -> np.ndarray:
    """An object array of the column's values as strings, one str object per distinct value: a
    part has a few shards, and a str per row would cost ~60 bytes a pair in the driver."""
    encoded = column.cast(pa.string()).fill_null("None").combine_chunks().dictionary_encode()
    names = np.asarray(encoded.dictionary.to_pylist(), dtype=object)
    return names[encoded.indices.to_numpy(zero_copy_only=False)]


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def load_vectors(path: Path) -> np.ndarray:
    """A part's vectors, memory-mapped as stored (float16 or float32): rows are read when used."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise AuditInputError(f"{path} is not a readable .npy array: {exc}") from None
    if array.ndim != 2 or array.dtype.kind != "f":
        raise AuditInputError(f"{path} holds an array of shape {array.shape} and type {array.dtype}, not (rows, dims) floats")
    return array


def unit_rows(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Rows of a stored array as unit float32 vectors (fp16 storage loses a little length, and
    neighbours are found by inner product, so they are renormalised)."""
    vectors = np.asarray(array[np.asarray(rows, np.int64)], dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True) if vectors.size else np.ones((len(vectors), 1), np.float32)
    return vectors / np.maximum(norms, 1e-12)


def _read_metadata(path: Path) -> pa.Table:
    try:
        meta = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise AuditInputError(f"{path} is not a readable Parquet file: {exc}") from None
    if not {"key", "caption"} <= set(meta.column_names):
        raise AuditInputError(f"{path} needs columns key and caption (it has {sorted(meta.column_names)})")
    return meta


def _similarity(image: np.ndarray, text: np.ndarray) -> np.ndarray:
    out = np.empty(len(image), np.float32)
    for start in range(0, len(image), BLOCK_ROWS):
        rows = np.arange(start, min(start + BLOCK_ROWS, len(image)))
        out[rows] = np.einsum("ij,ij->i", unit_rows(image, rows), unit_rows(text, rows))
    return out


def _patch_matrix(meta: pa.Table, path: str) -> np.ndarray:
    column = meta.column("image_patches")
    if not (pa.types.is_list(column.type) and pa.types.is_integer(column.type.value_type)):
        raise AuditInputError(f"{path}: image_patches holds {column.type}, not a list of integer signatures per row "
                        "(`clipguard score --save-embeddings` writes it); drop the column or score again")
    rows = column.to_pylist()
    width = max((len(r) for r in rows if r), default=0)
    matrix = np.zeros((len(rows), width), np.uint64)
    for i, r in enumerate(rows):
        if r:
            matrix[i, : len(r)] = r
    return matrix
