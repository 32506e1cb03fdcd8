"""An audit's input: the scored pairs with their identities, caption classes and a way back to
their captions and vectors.

Embeddings are in clip-retrieval's layout (``img_emb/img_emb_<n>.npy``, ``text_emb/text_emb_<n>.npy``,
``metadata/metadata_<n>.parquet``, rows aligned): the score folder's own (``score
--save-embeddings``) or another folder (LAION's). Metadata rows need ``key`` and ``caption``;
``shard``, ``image_sha256`` and ``image_patches`` (`clipguard.signals.patches`) are used where
present. Each part goes through `partpass.code_part` as one task on the executor given; the
driver keeps its fixed-width columns (in files, memory-mapped, for the audit: `pairfiles`) and
reads vectors and captions back by (part, row) when a stage needs them. Pairs are those of the score folder with status ok that have vectors; the
others are counted, never silently lost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipguard.audit.errors import AuditInputError, MissingEmbeddingsError
from clipguard.audit.pairfiles import ColumnFiles, StringFile
from clipguard.audit.partpass import PartCodes, PartFiles, code_part, shared_strings
from clipguard.audit.vectorfiles import VectorFiles, by_part
from clipguard.executors.tasks import Tasks, in_order
from clipguard.scoring.scorefiles import existing_score_files, read_score_columns

__all__ = ["AuditInputError", "AuditPairs", "Keys", "MissingEmbeddingsError", "Shards", "load_pairs"]


class Keys:
    """The pairs' keys in arrow buffers (~8 bytes a key besides its text, against ~60 for a
    Python str each: 6 GB at 10^8 pairs; for the audit a memory-mapped file, `pairfiles.StringFile`);
    a key, or an array of them, as str where asked for."""

    def __init__(self, array: pa.Array | pa.ChunkedArray):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, rows):
        if isinstance(rows, (int, np.integer)):
            return self.array[int(rows)].as_py()
        return np.asarray(self.take(rows).to_pylist(), dtype=object)

    def take(self, rows) -> pa.Array:
        return self.array.take(pa.array(np.asarray(rows, dtype=np.int64)))

    def __iter__(self):
        return iter(self.array.to_pylist())


class Shards:
    """Each pair's shard as a number into the shards' names (4 bytes a pair, a memory-mapped file
    for the audit) rather than an object pointer a pair (8, and the driver's own); its rows by
    shard come from one integer sort, not a sort of 10^8 Python strings. Reads like the object
    array it replaces: a name for a row, an object array of names for rows, names when iterated."""

    def __init__(self, names: np.ndarray, codes: np.ndarray):
        self.names, self.codes = np.asarray(names, dtype=object), codes

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, rows):
        if isinstance(rows, (int, np.integer)):
            return str(self.names[self.codes[int(rows)]])
        return self.names[np.asarray(self.codes[rows])]

    def __iter__(self):
        for start in range(0, len(self.codes), 1 << 16):
            yield from self.names[np.asarray(self.codes[start:start + (1 << 16)])].tolist()

    def rows(self):
        """Each shard (in name order) and its rows, ascending."""
        of_shard = dict(by_part(self.codes))  # by number, in number order: first appearance, not the names'
        for number in np.argsort(self.names.astype(str), kind="stable"):
            if int(number) in of_shard:
                yield str(self.names[number]), of_shard[int(number)]


@dataclass
class AuditPairs:
    """The pairs audited, rows aligned: per pair about 44 bytes of codes with its shard's number
    (and 8 per patch signature), memory-mapped files where `load_pairs` was given a work folder,
    besides its key; captions and vectors stay in their files."""

    shard: "Shards"
    key: "Keys"
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


PAIR_COLUMNS = {"shard": np.int32, "caption_hash": np.uint64, "image_hash": np.uint64, "caption_class": np.int64,
                "similarity": np.float32, "part": np.int32, "row": np.int64, "patches": np.uint64}


def load_pairs(scores: Path, embeddings: Path | None = None, keywords: dict[str, list[str]] | None = None,
               tasks: Tasks | None = None, on_part: Callable[[int, int], None] | None = None,
               work: Path | None = None) -> AuditPairs:
    """Read the score folder, run each embedding part's pass as one of ``tasks`` (default: here),
    and keep the rows of pairs scored ok. ``on_part(done, total)`` reports parts finished. With
    ``work`` the fixed-width columns go to files there as each part's pass comes back and are
    read memory-mapped (`pairfiles`): the driver holds one part's codes, not every pair's."""
    scores = Path(scores)
    if not scores.is_dir():
        raise AuditInputError(f"score folder {scores} does not exist (run `clipguard score` first)")
    ok, scored = _scored_ok(scores)
    folder = Path(embeddings) if embeddings is not None else scores
    parts = _embedding_parts(folder)
    if not parts:
        hint = ("run `clipguard score SHARDS --out SCORES --save-embeddings` to write them beside the scores, "
                "or pass --embeddings DIR for a clip-retrieval folder")
        raise MissingEmbeddingsError(f"no embeddings in {folder} (img_emb/img_emb_*.npy with text_emb/ and metadata/): {hint}")
    files = [PartFiles(stem, str(img), str(txt), str(meta)) for stem, (img, txt, meta) in parts.items()]
    columns = ColumnFiles(work, PAIR_COLUMNS)
    keys, dims, with_patches = StringFile(work, "key"), set(), False
    shard_number: dict[str, int] = {}  # shard name -> its number, in order of first appearance
    by_key = None  # for metadata without a shard column (LAION's): each scored key's shard, if it is unique
    finished = (tasks or Tasks()).imap(code_part, [(f, keywords) for f in files], on_done=on_part)
    for i, codes in enumerate(in_order(finished)):
        if len(codes):
            dims.add(codes.dims)
        if len(dims) > 1:
            raise AuditInputError(f"embedding parts of {folder} have vectors of different dimensions: {sorted(dims)}")
        if by_key is None and len(codes) and codes.shard[0] is None:
            by_key = ok.group_by("key").aggregate([("shard", "count_distinct"), ("shard", "min")])
        rows, part_shards = _kept_rows(codes, files[i], ok, by_key)
        keys.add(codes.key.take(pa.array(rows)))
        # The part's shard names numbered by arrow's hashing (a sort of the row's str objects is
        # Python comparisons), then renumbered into the run's numbering.
        encoded = pa.array(part_shards, pa.string()).dictionary_encode()
        numbers = np.array([shard_number.setdefault(name, len(shard_number)) for name in encoded.dictionary.to_pylist()],
                           np.int32)
        with_patches |= codes.patches is not None
        columns.add(shard=numbers[encoded.indices.to_numpy(zero_copy_only=False)],
                    caption_hash=codes.caption_hash[rows], image_hash=codes.image_hash[rows],
                    caption_class=codes.caption_class[rows], similarity=codes.similarity[rows],
                    part=np.full(len(rows), i, np.int32), row=rows,
                    patches=codes.patches[rows] if codes.patches is not None else None)
        del codes
    n = columns.rows
    mapped = columns.open()
    patches = mapped.pop("patches")
    pairs = AuditPairs(
        shard=Shards(np.array(list(shard_number), dtype=object), mapped.pop("shard")), key=Keys(keys.open()),
        **mapped, parts=files, scored=scored, without_embeddings=max(0, ok.num_rows - n),
        dims=dims.pop() if dims else 0, patches=patches if with_patches else None,
    )
    # Arrow's allocator (mimalloc) keeps what the reads and joins freed (~110 MB at 200,000
    # pairs) for arrow alone; handed back, numpy and faiss can use it (benchmarks/README.md).
    del keys, ok
    pa.default_memory_pool().release_unused()
    return pairs


def _scored_ok(scores: Path) -> tuple[pa.Table, int]:
    """Every pair scored ok, once, as an arrow table of (shard, key), and how many rows were scored.
    Arrow's columns and hash joins keep the driver off a Python object per pair (~200 bytes)."""
    table = read_score_columns(existing_score_files(scores), ["shard", "key", "status"])
    ok = table.filter(pc.equal(table.column("status"), "ok"))
    ok = pa.table({"shard": ok.column("shard").cast(pa.string()), "key": ok.column("key").cast(pa.string())})
    return ok.group_by(["shard", "key"]).aggregate([]), table.num_rows


def _kept_rows(codes: PartCodes, files: PartFiles, ok: pa.Table, by_key: pa.Table | None) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the part whose pair was scored ok, ascending, and their shards (from the scores by
    key where the metadata has no shard column, as LAION's has not)."""
    part = pa.table({"key": codes.key, "row": pa.array(np.arange(len(codes), dtype=np.int64))})
    if len(codes) and codes.shard[0] is None:
        found = part.join(by_key, keys="key", join_type="inner").sort_by("row")
        several = found.filter(pc.greater(found.column("shard_count_distinct"), 1))
        if several.num_rows:
            raise AuditInputError(f"{files.metadata} has no shard column and key {several.column('key')[0].as_py()!r} is "
                                  "in several scored shards; add a shard column to the metadata")
        return found.column("row").to_numpy(), shared_strings(found.column("shard_min"))
    part = part.append_column("shard", pa.array(codes.shard, pa.string()))
    rows = np.sort(part.join(ok, keys=["shard", "key"], join_type="inner").column("row").to_numpy())
    return rows, codes.shard[rows]


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
