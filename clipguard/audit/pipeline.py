"""`run_audit`: a score folder and its embeddings -> per-pair cross-pair signals and findings.

Each embedding part's pass (`partpass.code_part`) runs as a task on the executor given; its
fixed-width columns (~44 bytes a pair with its shard's number, and 8 per patch signature) go to files in
``OUT/.search-index/pairs`` as each part comes back, read memory-mapped, as are the per-pair
numbers the audit gives them (ids, groups, classes, votes: 64 bytes a pair; `pairfiles`). Vectors stay in their memory-mapped
files: neighbours are searched exactly up to `neighbours.EXACT_LIMIT` distinct vectors (those
read into memory), and above it through a faiss IVF index of 8-bit codes (512 bytes a vector at
512 dimensions; `index_codes="pq"`: 64) re-scored exactly from the files, filled into
``OUT/.search-index`` a block per task (`indexfill`) and searched memory-mapped, one side at a
time, its search cut into ranges that are tasks on the same executor (`searchtasks`). The ranges'
neighbours are written into ``OUT/.search-index/<side>-neighbours`` as they come and read back
memory-mapped, and density, the near-duplicate groups and the groups' class votes read them a
block of rows at a time, so the codes and the neighbours are file pages. What still grows with the
data in the driver's own memory (the keys are a mapped Arrow file too): per pair
the strong-mismatch flag and the tests' three scores (25 bytes) and a stage's transients; per
distinct image and caption a few numbers (its id, group, k-distance and outlier ratio: ~40
bytes), and per image group its class and its neighbours' labels (k bytes up to 128 classes). How it scales to 10^8 pairs in bounded memory, with the same
statistics (docs/architecture.md says the same):

1. Counting pass (built: the hashing per part, `partpass`; the rest in `counting`): the pairs'
   caption and image hashes are numbered, the distinct captions per image and images per caption
   counted, and the patch signatures (8 per image) grouped, each through partitions written to
   ``OUT/.search-index/counting`` a chunk of rows at a time (by a hash's top bits, or a range of
   group numbers) and worked one partition per task, so a process holds one partition's sort, not
   the whole data's; a patch partition hands back only the signatures shared by two or more image
   groups, the stamped-images test's input.
2. Index pass (built: the index trained on a sample, filled a block per task from the parts'
   files into an on-disk lists file, `indexfill`, its own rows searched a range per task,
   `searchtasks`, and their neighbours written to disk; k-distances and near-duplicate edges read
   from there a block at a time, the edges merged by a vectorised union-find over an int64 parent
   array, 800 MB at 10^8; and the larger groups' centroid searches, a block of groups per task):
   k-distances, near-duplicate groups, and each group's nearest outside neighbours for its
   data-driven class.
3. Table pass: the (caption class, image class) cell table is C x C counts, summed over ranges
   of image groups, each a task (built, as is each group's own captions' class: `classes`); the
   tests need only it, the group counts and the group sizes. Per-pair columns are then
   written shard by shard, joining each shard's rows to its groups' counts (built: `columns`
   keeps them as those tables, gathered for one shard's rows at a time).
Every pass is per shard or per range, so each can go through `executors.tasks.Tasks` as the
hashing pass and the search already do.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from clipguard.audit.classes import (NO_CLASS, cell_table, grouped_plurality, image_group_classes, own_classes,
                                     strong_mismatch, votes_for)
from clipguard.audit.columns import PairColumn, SignalColumns, class_names, per_group
from clipguard.audit.counting import PARTITION_ROWS, distinct_counts, distinct_ids, patch_units
from clipguard.audit.density import density
from clipguard.audit.detect import AuditTables, DetectConfig, Detection, Finding, detect
from clipguard.audit.grouping import components, normalise_caption
from clipguard.audit.inputs import AuditInputError, AuditPairs, load_pairs
from clipguard.audit.neighbours import CODES, EXACT_LIMIT, NeighbourIndex, Neighbours, VectorReader
from clipguard.audit.output import write_findings, write_signals
from clipguard.audit.pairfiles import PairArrays
from clipguard.audit.searchtasks import own_neighbours
from clipguard.audit.timing import StageClock
from clipguard.executors.tasks import Tasks
from clipguard.labels import KeywordLabeler, check_keywords, load_keywords

if TYPE_CHECKING:
    from clipguard.executors.spec import ExecutorSpec


DUPLICATE_SHARE = 0.25
# The audit's working files: the counting pass's partitions and the faiss indexes, written here
# while the audit runs and read memory-mapped (by the workers too, so on a cluster the output
# folder must be on storage they reach); removed at the end.
INDEX_DIR = ".search-index"
COUNTING_DIR = "counting"  # in INDEX_DIR
PAIRS_DIR = "pairs"  # in INDEX_DIR: the per-pair columns, memory-mapped (`pairfiles`)


@dataclass(frozen=True)
class AuditConfig:
    scores: Path
    out: Path
    embeddings: Path | None = None  # default: the score folder's own img_emb/, text_emb/, metadata/
    keywords: Path | dict | None = None  # class -> keywords; without it no class-based test runs
    alpha: float = 1e-6
    k: int = 10  # neighbours for density and for an image's data-driven class
    # Cosine similarity at which two images are near-duplicates (raised where the data's nearest
    # neighbours are all this close: `duplicate_similarity`), and two captions near-identical.
    image_duplicate: float = 0.95
    text_duplicate: float = 0.95
    exact_limit: int = EXACT_LIMIT  # more vectors than this go through faiss
    nprobe: int = 64
    index_codes: str = "sq8"  # what the faiss index stores (`neighbours.CODES`): pq for 10^8 vectors
    detect: DetectConfig = field(default_factory=DetectConfig)
    executor: "ExecutorSpec | None" = None  # where the per-part pass runs; None: in this process
    partition_rows: int = PARTITION_ROWS  # rows, about, in one partition of the counting pass (`counting`)


@dataclass(frozen=True)
class AuditResult:
    out: Path
    pairs: AuditPairs
    tables: AuditTables
    findings: list[Finding]
    signal_columns: SignalColumns  # name -> the whole per-pair column
    classes_known: bool
    exact_search: bool
    seconds: dict[str, float] = field(default_factory=dict)  # per stage (`StageClock`)


def run_audit(config: AuditConfig, on_part: Callable[[int, int], None] | None = None,
              on_search: Callable[[str, int, int], None] | None = None) -> AuditResult:
    """``on_part(done, total)`` reports the per-part pass's progress, ``on_search(side, searched,
    total)`` the neighbour search's ("image" or "text": distinct vectors searched of all)."""
    if not 0 < config.alpha < 1:
        raise AuditInputError(f"the significance level must be in (0, 1), got {config.alpha}")
    if not (0 < config.image_duplicate <= 1 and 0 < config.text_duplicate <= 1):
        raise AuditInputError("near-duplicate similarities must be in (0, 1]")
    if config.partition_rows < 1:
        raise AuditInputError(f"a counting partition needs at least one row, got partition_rows={config.partition_rows}")
    if config.index_codes not in CODES:
        raise AuditInputError(f"unknown index codes {config.index_codes!r}; choose one of {', '.join(CODES)}")
    clock = StageClock()
    keywords = config.keywords
    if keywords:
        keywords = load_keywords(keywords) if isinstance(keywords, (str, Path)) else check_keywords(keywords)
    labeler = KeywordLabeler(keywords) if keywords else None
    classes = labeler.classes if labeler else []
    try:
        with Tasks(config.executor) as tasks:  # one executor session for the part pass and the searches
            return _audit(config, keywords, classes, tasks, clock, on_part, on_search or (lambda side, done, total: None))
    except OSError as exc:
        # The inputs' own read errors are AuditInputErrors already, naming their file; what is
        # left is the working files (a full disk, a read-only or unreachable --out), which numpy
        # reports without a file name ("... requested and 0 written").
        raise AuditInputError(
            f"the audit could not write or read its working files under {Path(config.out) / INDEX_DIR} ({exc}): "
            "they hold the pairs' columns, the counting partitions and the search index while it runs (README, "
            "audit: about 24 bytes a pair for the counting, 116 a pair for the columns, and the index); free disk "
            "there or choose another --out") from exc
    finally:
        shutil.rmtree(Path(config.out) / INDEX_DIR, ignore_errors=True)


def _audit(config: AuditConfig, keywords: dict | None, classes: list[str], tasks: Tasks, clock: StageClock,
           on_part: Callable[[int, int], None] | None, on_search: Callable[[str, int, int], None]) -> AuditResult:
    with clock("read scores; per-part pass (hashes, keyword classes, pair similarity)"):
        pairs = load_pairs(config.scores, config.embeddings, keywords, tasks, on_part,
                           work=Path(config.out) / INDEX_DIR / PAIRS_DIR)
    if len(pairs) == 0:
        raise AuditInputError(f"no scored pairs with embeddings in {config.embeddings or config.scores}")
    caption_class = pairs.caption_class
    work = Path(config.out) / INDEX_DIR / COUNTING_DIR
    partition_rows = config.partition_rows
    arrays = PairArrays(Path(config.out) / INDEX_DIR / PAIRS_DIR)  # per-pair outputs, memory-mapped
    n = len(pairs)

    def distinct(group: np.ndarray, item: np.ndarray, groups: int) -> np.ndarray:
        return distinct_counts(group, item, groups, work, tasks, partition_rows)

    with clock("exact identities (caption text, image sha256)"):
        caption_id, n_captions = distinct_ids(pairs.caption_hash, work, tasks, partition_rows,
                                              out=arrays.new("caption_id", n, np.int64))
        image_id, n_images = distinct_ids(pairs.image_hash, work, tasks, partition_rows,
                                          out=arrays.new("image_id", n, np.int64))

    # Neighbours among distinct images and distinct captions: a reused image is not its own
    # neighbour. One side's index at a time: the image index serves the image classes, and is let
    # go before the text index is built (each is 512 bytes a vector with sq8 codes).
    with clock("image neighbours and near-duplicate groups"):
        image_index, image_nn, image_duplicate, image_group_of = _near_duplicates(
            pairs, "image", image_id, n_images, config.image_duplicate, config, tasks, on_search)
    with clock("image classes from neighbours"):
        image_group = arrays.gather("image_group", image_group_of, image_id)
        image_class, caption_votes, image_votes = _image_classes(
            image_index, image_nn, image_id, image_group, image_group_of, caption_class, len(classes), config.k, tasks,
            arrays)
        own_class = arrays.gather("own_class", own_classes(image_group, caption_id, caption_class, len(classes), work,
                                                           tasks, partition_rows), image_group)
        strong = strong_mismatch(caption_class, image_class, caption_votes, image_votes, len(classes), own_class)
        n_image_groups = int(image_group_of.max()) + 1 if n_images else 0
    exact_search = image_index.exact
    image_index.close()
    with clock("text neighbours and near-identical caption groups"):
        text_index, text_nn, text_duplicate, caption_group_of = _near_duplicates(
            pairs, "text", caption_id, n_captions, config.text_duplicate, config, tasks, on_search)
    exact_search = exact_search and text_index.exact
    text_index.close()

    with clock("shared patch signatures"):
        units = patch_units(pairs.patches, image_group, work, tasks, partition_rows)
    tables = AuditTables(
        classes=classes, caption_class=caption_class, image_class=image_class,
        caption_texts=lambda rows: [normalise_caption(c) for c in pairs.captions(rows)],
        caption_id=caption_id, image_id=image_id, image_group=image_group,
        caption_group=arrays.gather("caption_group", caption_group_of, caption_id), strong_mismatch=strong,
        cells=cell_table(caption_class, image_class, len(classes), image_group, strong, work, tasks, partition_rows),
        pair_similarity=pairs.similarity,
        patches=pairs.patches, patch_units=units,
    )
    if classes:
        detection = detect(tables, config.detect, clock)
    else:
        nothing = np.zeros(len(pairs))
        detection = Detection([], nothing, nothing, nothing)
    findings = detection.findings

    with clock("density (kNN distance, LOF)"):
        image_density, text_density = density(image_nn), density(text_nn)
    n_caption_groups = int(tables.caption_group.max()) + 1
    with clock("per-pair columns and writing"):
        columns = SignalColumns({
            "image_fan_in": per_group(distinct(image_id, caption_id, n_images), image_id),
            "image_fan_in_near": per_group(distinct(image_group, caption_id, n_image_groups), image_group),
            "image_group": PairColumn(image_group),
            "caption_fan_out": per_group(distinct(caption_id, image_id, n_captions), caption_id),
            "caption_fan_out_near": per_group(distinct(tables.caption_group, image_id, n_caption_groups),
                                              tables.caption_group),
            "caption_group": PairColumn(tables.caption_group),
            "class_cell_neglog10p": PairColumn(detection.cell_score),
            "relabel_neglog10p": PairColumn(detection.relabel_score),
            "stamped_neglog10p": PairColumn(detection.stamp_score),
            "caption_class": class_names(classes, caption_class),
            "image_class": class_names(classes, image_class),
            "image_cluster_size": per_group(np.bincount(image_group_of, minlength=n_image_groups), image_group),
            "image_knn_distance": per_group(image_density.knn_distance, image_id),
            "image_lof": per_group(image_density.outlier_ratio, image_id),
            "text_knn_distance": per_group(text_density.knn_distance, caption_id),
            "text_lof": per_group(text_density.outlier_ratio, caption_id),
        })
        out = Path(config.out)
        write_signals(out, pairs, columns)
    write_findings(out, pairs, findings, summary={
        "scores": str(config.scores), "embeddings": str(config.embeddings or config.scores),
        "pairs_scored": pairs.scored, "pairs_audited": len(pairs), "pairs_without_embeddings": pairs.without_embeddings,
        "alpha": config.alpha, "classes": classes, "exact_search": exact_search,
        "image_duplicate": image_duplicate, "text_duplicate": text_duplicate, "k": config.k,
        "seconds": clock.seconds, "seconds_per_10k_pairs": clock.per(len(pairs), 10_000),
    })
    return AuditResult(out=out, pairs=pairs, tables=tables, findings=findings, signal_columns=columns,
                       classes_known=bool(classes), exact_search=exact_search,
                       seconds=clock.seconds)


def _near_duplicates(pairs: AuditPairs, side: str, ids: np.ndarray, count: int, floor: float, config: AuditConfig,
                     tasks: Tasks, on_search: Callable[[str, int, int], None]):
    """Neighbours among the distinct items (first row of each id, the only vectors read), the
    near-duplicate similarity (`duplicate_similarity`) and each distinct item's near-duplicate group."""
    first = _first_rows(ids, count)
    reader = VectorReader(count, pairs.dims, pairs.vector_files(side).subset(first))
    index = NeighbourIndex(reader, config.exact_limit, config.nprobe, codes=config.index_codes, tasks=tasks,
                           index_dir=Path(config.out) / INDEX_DIR)
    neighbours = own_neighbours(index, config.k, tasks, lambda done, total: on_search(side, done, total),
                                into=Path(config.out) / INDEX_DIR / f"{side}-neighbours")
    threshold = duplicate_similarity(neighbours, floor)
    return index, neighbours, threshold, components(count, neighbours, threshold)


def _image_classes(index: NeighbourIndex, own_neighbours: Neighbours, image_id: np.ndarray, image_group: np.ndarray,
                   image_group_of: np.ndarray, caption_class: np.ndarray, classes: int, k: int, tasks: Tasks,
                   arrays: PairArrays) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pair: its image group's data-driven class, and the neighbours' votes for its caption's
    class and for that image class (what `strong_mismatch` weighs)."""
    n = len(image_id)
    if not classes:
        return np.full(n, NO_CLASS), np.zeros(n, np.int64), np.zeros(n, np.int64)
    groups = int(image_group_of.max()) + 1
    image_label = _image_labels(image_id, len(image_group_of), caption_class)
    group_class, voted = image_group_classes(index, image_group_of, groups, image_label, classes, k, own_neighbours,
                                             tasks)
    image_class = arrays.gather("image_class", group_class, image_group)
    return (image_class, votes_for(voted, image_group, caption_class, out=arrays.new("caption_votes", n, np.int64)),
            votes_for(voted, image_group, image_class, out=arrays.new("image_votes", n, np.int64)))


def duplicate_similarity(neighbours, floor: float) -> float:
    """The similarity at which two vectors count as near-duplicates: at least ``floor``, and at
    least as close as a quarter of the median distance between distinct nearest neighbours. A
    model that packs every image into a narrow cone (the bundled reference: median nearest-image
    similarity 0.955) would otherwise join unrelated images into one "duplicate" group."""
    first = neighbours.similarity[:, 0] if neighbours.similarity.shape[1] else np.array([])
    first = first[np.isfinite(first)]
    if not len(first):
        return floor
    return float(max(floor, 1.0 - DUPLICATE_SHARE * float(np.median(1.0 - first))))


def _first_rows(ids: np.ndarray, count: int) -> np.ndarray:
    first = np.full(count, -1, np.int64)
    rows = np.arange(len(ids))[::-1]
    first[ids[::-1]] = rows  # the last write for each id is its first row
    return first


def _image_labels(image_id: np.ndarray, n_images: int, caption_class: np.ndarray) -> np.ndarray:
    """Each distinct image's label as a neighbour: the plurality class of its own captions."""
    return grouped_plurality(image_id, caption_class, n_images)
