"""An audit's input: the scored pairs with their identities, caption classes and a way back to
their captions and vectors.

Embeddings are in clip-retrieval's layout (``img_emb/img_emb_<n>.npy``, ``text_emb/text_emb_<n>.npy``,
``metadata/metadata_<n>.parquet``, rows aligned): the score folder's own (``score
--save-embeddings``) or another folder (LAION's). Metadata rows need ``key`` and ``caption``;
``shard``, ``image_sha256`` and ``image_patches`` (`clipguard.signals.patches`) are used where
present. Each part goes through `partpass.code_part` as one task on the executor given; the
driver keeps its fixed-width columns and reads vectors and captions back by (part, row) when a
stage needs them. Pairs are those of the score folder with status ok that have vectors; the
others are counted, never silently lost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from clipguard.audit.errors import AuditInputError, MissingEmbeddingsError
from clipguard.audit.partpass import PartCodes, PartFiles, code_part
from clipguard.audit.vectorfiles import VectorFiles, by_part
from clipguard.executors.tasks import Tasks
from clipguard.scoring.scorefiles import read_scores

__all__ = ["AuditInputError", "AuditPairs", "MissingEmbeddingsError", "load_pairs"]


@dataclass
class AuditPairs:
    """The pairs audited, rows aligned: per pair about 40 bytes of codes (and 8 per patch
    signature) besides its shard and key; captions and vectors stay in their files."""

    shard: np.ndarray  # object arrays of str
    key: np.ndarray
    caption_hash: np.ndarray  # uint64 of the normalised caption
    image_hash: np.ndarray  # uint64 of the image's sha256 (or stored vector)
    caption_class: np.ndarray  # int64 keyword class, NO_CLASS without one (or without keywords)
    similarity: np.ndarray  # float32 cosine similarity of the pair
    part: np.ndarray  # int32: which of ``parts`` holds the row
    row: np.ndarray  # int64: the row in that part
    parts: list[PartFiles]
    scored: int  # pairs in the score folder
    without_embeddings: int  # scored pairs (status ok) with no vectors
    dims: int = 0
    # (n, KEEP) uint64 patch signatures, 0 where an image has fewer; None where no metadata had them.
    patches: np.ndarray | None = None
    _vectors: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.key)

    def vector_files(self, side: str) -> VectorFiles:
        """Every pair's ``side`` ("image" or "text") vector where it lies (kept per side, so each
        part is memory-mapped once)."""
        if side not in self._vectors:
            paths = tuple(f.image if side == "image" else f.text for f in self.parts)
            self._vectors[side] = VectorFiles(paths, self.part, self.row, self.dims)
        return self._vectors[side]

    def vectors(self, side: str, rows: np.ndarray) -> np.ndarray:
        """Unit float32 ``side`` vectors of the pairs ``rows``, read part by part."""
        return self.vector_files(side)(rows)

    def captions(self, rows) -> list[str]:
        """The captions of the pairs ``rows`` as written (for findings and people), read back."""
        rows = np.asarray(rows, np.int64)
        out: list[str] = [""] * len(rows)
        for part, where in by_part(self.part[rows]):
            column = pq.read_table(self.parts[part].metadata, columns=["caption"]).column("caption")
            picked = column.take(self.row[rows[where]]).to_pylist()
            for i, caption in zip(where, picked):
                out[i] = caption if caption is not None else ""
        return out


def load_pairs(scores: Path, embeddings: Path | None = None, keywords: dict[str, list[str]] | None = None,
               tasks: Tasks | None = None, on_part: Callable[[int, int], None] | None = None) -> AuditPairs:
    """Read the score folder, run each embedding part's pass as one of ``tasks`` (default: here),
    and keep the rows of pairs scored ok. ``on_part(done, total)`` reports parts finished."""
    scores = Path(scores)
    if not scores.is_dir():
        raise AuditInputError(f"score folder {scores} does not exist (run `clipguard score` first)")
    table = read_scores(scores)
    folder = Path(embeddings) if embeddings is not None else scores
    parts = _embedding_parts(folder)
    if not parts:
        hint = ("run `clipguard score SHARDS --out SCORES --save-embeddings` to write them beside the scores, "
                "or pass --embeddings DIR for a clip-retrieval folder")
        raise MissingEmbeddingsError(f"no embeddings in {folder} (img_emb/img_emb_*.npy with text_emb/ and metadata/): {hint}")
    ok = {(s, k) for s, k, good in zip(table.shard, table.key, table.ok) if good}
    shard_of_key: dict[str, str | None] = {}
    for s, k in ok:  # for metadata without a shard column (LAION's): a key's shard, if it is unique
        shard_of_key[k] = s if k not in shard_of_key else None
    files = [PartFiles(stem, str(img), str(txt), str(meta)) for stem, (img, txt, meta) in parts.items()]
    codes: list[PartCodes] = (tasks or Tasks()).map(code_part, [(f, keywords) for f in files], on_done=on_part)
    dims = {c.dims for c in codes if len(c)}
    if len(dims) > 1:
        raise AuditInputError(f"embedding parts of {folder} have vectors of different dimensions: {sorted(dims)}")
    kept = [_kept_rows(c, f, ok, shard_of_key) for c, f in zip(codes, files)]
    n = sum(len(rows) for rows, _ in kept)

    def column(name: str, dtype) -> np.ndarray:
        return _joined([getattr(c, name)[rows] for c, (rows, _) in zip(codes, kept)], dtype)

    return AuditPairs(
        shard=_joined([shards[rows] for rows, shards in kept], object),
        key=column("key", object), caption_hash=column("caption_hash", np.uint64),
        image_hash=column("image_hash", np.uint64), caption_class=column("caption_class", np.int64),
        similarity=column("similarity", np.float32),
        part=_joined([np.full(len(rows), i, np.int32) for i, (rows, _) in enumerate(kept)], np.int32),
        row=_joined([rows for rows, _ in kept], np.int64),
        parts=files, scored=len(table), without_embeddings=max(0, len(ok) - n),
        dims=dims.pop() if dims else 0,
        patches=_joined_patches([c.patches for c in codes], [rows for rows, _ in kept])
        if any(c.patches is not None for c in codes) else None,
    )


def _kept_rows(codes: PartCodes, files: PartFiles, ok: set, shard_of_key: dict) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the part whose pair was scored ok, and every row's shard (from the scores by key
    where the metadata has no shard column, as LAION's has not)."""
    shards = codes.shard
    if len(codes) and shards[0] is None:
        ambiguous = next((k for k in codes.key if k in shard_of_key and shard_of_key[k] is None), None)
        if ambiguous is not None:
            raise AuditInputError(f"{files.metadata} has no shard column and key {ambiguous!r} is in several scored "
                                  "shards; add a shard column to the metadata")
        shards = np.asarray([shard_of_key.get(k) for k in codes.key], dtype=object)
    keep = np.fromiter(((s, k) in ok for s, k in zip(shards, codes.key)), bool, len(codes))
    return np.flatnonzero(keep), shards


def _joined(arrays: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)


def _joined_patches(matrices: list[np.ndarray | None], kept: list[np.ndarray]) -> np.ndarray:
    """The parts' signature matrices, rows kept, padded with 0 to the widest."""
    width = max((m.shape[1] for m in matrices if m is not None), default=0)
    out = np.zeros((sum(len(k) for k in kept), width), np.uint64)
    start = 0
    for matrix, rows in zip(matrices, kept):
        if matrix is not None and matrix.shape[1]:
            out[start:start + len(rows), : matrix.shape[1]] = matrix[rows]
        start += len(rows)
    return out


def _embedding_parts(folder: Path) -> dict[str, tuple[Path, Path, Path]]:
    """stem -> (image, text, metadata) files; a part missing one of its three files is an error."""
    parts = {}
    for img_path in sorted((folder / "img_emb").glob("img_emb_*.npy")):
        stem = img_path.stem[len("img_emb_"):]
        txt_path = folder / "text_emb" / f"text_emb_{stem}.npy"
        meta_path = folder / "metadata" / f"metadata_{stem}.parquet"
        for path in (txt_path, meta_path):
            if not path.is_file():
                raise AuditInputError(f"{img_path} has no {path} beside it")
        parts[stem] = (img_path, txt_path, meta_path)
    return parts
