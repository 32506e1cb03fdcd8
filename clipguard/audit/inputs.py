"""An audit's input: the scored pairs with their captions, image hashes and embeddings.

Embeddings are in clip-retrieval's layout (``img_emb/img_emb_<n>.npy``, ``text_emb/text_emb_<n>.npy``,
``metadata/metadata_<n>.parquet``, rows aligned): the score folder's own (``score
--save-embeddings``) or another folder (LAION's). Metadata rows need ``key`` and ``caption``;
``shard``, ``image_sha256`` and ``image_patches`` (`clipguard.signals.patches`) are used where present. Pairs are those of the score folder with
status ok that have vectors; the others are counted, never silently lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipguard.errors import ClipguardError
from clipguard.scoring.scorefiles import read_scores


class AuditInputError(ClipguardError):
    """A score folder or embedding folder an audit cannot use."""


class MissingEmbeddingsError(AuditInputError):
    """No embeddings beside the scores (or in the folder given)."""


@dataclass
class AuditPairs:
    """The pairs audited, rows aligned. Vectors are float32 and unit length."""

    shard: np.ndarray  # object arrays of str
    key: np.ndarray
    caption: np.ndarray
    image_sha256: np.ndarray  # None where unknown
    image: np.ndarray  # (n, d) float32
    text: np.ndarray  # (n, d) float32
    scored: int  # pairs in the score folder
    without_embeddings: int  # scored pairs (status ok) with no vectors
    # (n, KEEP) uint64 patch signatures, 0 where an image has fewer; None where no metadata had them.
    patches: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.key)


def load_pairs(scores: Path, embeddings: Path | None = None) -> AuditPairs:
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
    columns: dict[str, list] = {"shard": [], "key": [], "caption": [], "sha": [], "patches": []}
    any_patches = False
    images, texts = [], []
    for stem, (img_path, txt_path, meta_path) in parts.items():
        meta = pq.read_table(meta_path)
        names = set(meta.column_names)
        if not {"key", "caption"} <= names:
            raise AuditInputError(f"{meta_path} needs columns key and caption (it has {sorted(names)})")
        image = _load_vectors(img_path)
        text = _load_vectors(txt_path)
        if not (len(image) == len(text) == meta.num_rows):
            raise AuditInputError(f"embedding files of {stem} are not aligned: {len(image)} image and {len(text)} text "
                                  f"vectors, {meta.num_rows} metadata rows")
        keys = [str(k) for k in meta.column("key").to_pylist()]
        if "shard" in names:
            shards = [str(s) for s in meta.column("shard").to_pylist()]
        else:
            shards = [shard_of_key.get(k) for k in keys]
            ambiguous = next((k for k in keys if k in shard_of_key and shard_of_key[k] is None), None)
            if ambiguous is not None:
                raise AuditInputError(f"{meta_path} has no shard column and key {ambiguous!r} is in several scored "
                                      "shards; add a shard column to the metadata")
        shas = meta.column("image_sha256").to_pylist() if "image_sha256" in names else [None] * len(keys)
        captions = meta.column("caption").to_pylist()
        patches = _patch_lists(meta, meta_path) if "image_patches" in names else [None] * len(keys)
        any_patches = any_patches or "image_patches" in names
        keep = np.array([(s, k) in ok for s, k in zip(shards, keys)], dtype=bool)
        for i in np.flatnonzero(keep):
            columns["shard"].append(shards[i])
            columns["key"].append(keys[i])
            columns["caption"].append(captions[i] if captions[i] is not None else "")
            columns["sha"].append(shas[i])
            columns["patches"].append(patches[i] or ())
        images.append(image[keep])
        texts.append(text[keep])
    if images and images[0].shape[1] != texts[0].shape[1]:
        raise AuditInputError(f"image vectors have {images[0].shape[1]} dimensions and text vectors {texts[0].shape[1]}")
    image = np.concatenate(images) if images else np.zeros((0, 0), np.float32)
    return AuditPairs(
        shard=np.asarray(columns["shard"], dtype=object), key=np.asarray(columns["key"], dtype=object),
        caption=np.asarray(columns["caption"], dtype=object), image_sha256=np.asarray(columns["sha"], dtype=object),
        image=_unit(image), text=_unit(np.concatenate(texts)),
        scored=len(table), without_embeddings=max(0, len(ok) - len(columns["key"])),
        patches=_patch_matrix(columns["patches"]) if any_patches else None,
    )


def _patch_lists(meta: pa.Table, path: Path) -> list:
    column = meta.column("image_patches")
    if not (pa.types.is_list(column.type) and pa.types.is_integer(column.type.value_type)):
        raise AuditInputError(f"{path}: image_patches holds {column.type}, not a list of integer signatures per row "
                              "(`clipguard score --save-embeddings` writes it); drop the column or score again")
    return column.to_pylist()


def _patch_matrix(rows: list) -> np.ndarray:
    width = max((len(r) for r in rows), default=0)
    matrix = np.zeros((len(rows), width), np.uint64)
    for i, r in enumerate(rows):
        matrix[i, : len(r)] = r
    return matrix


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


def _load_vectors(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise AuditInputError(f"{path} is not a readable .npy array: {exc}") from None
    if array.ndim != 2:
        raise AuditInputError(f"{path} holds an array of shape {array.shape}, not (rows, dims)")
    return array.astype(np.float32)


def _unit(vectors: np.ndarray) -> np.ndarray:
    # fp16 storage loses a little length; neighbours are found by inner product, so renormalise.
    norms = np.linalg.norm(vectors, axis=1, keepdims=True) if vectors.size else np.ones((len(vectors), 1), np.float32)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)
