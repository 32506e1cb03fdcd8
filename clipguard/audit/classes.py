"""Classes on both sides of a pair, and the background of natural mismatches between them.

Caption class: keyword search (`clipguard.labels`). Image class: data-driven, because the
bundled reference's zero-shot accuracy is weak: the plurality caption class among an image
group's nearest other images (the group itself, its exact and near duplicates, left out, so a
poisoned image cannot vote for its own captions).

Background: off the diagonal, cell (caption A, image B) is expected to hold
(row_A - n_AB)(col_B - n_AB) / (off - n_AB) pairs (independence of the mismatches' two classes,
the cell left out of its own estimate so that a planted cell does not raise its own expectation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipguard.audit import counting  # its read_run looked up when a task runs, so a test can tell where
from clipguard.audit.counting import PARTITION_ROWS, group_runs, work_runs
from clipguard.audit.grouping import combined_codes, run_starts
from clipguard.audit.neighbours import NeighbourIndex, Neighbours, faiss_threads
from clipguard.executors.tasks import Tasks
from clipguard.labels import KeywordLabeler

NO_CLASS = -1
MIN_EXPECTED = 0.1  # a floor: an empty background is not evidence that a cell can never occur
GROUP_BLOCK_VECTORS = 16_384  # member vectors read at a time for the groups' centroids


def caption_classes(captions, labeler: KeywordLabeler) -> np.ndarray:
    """Class number per caption (order of ``labeler.classes``), NO_CLASS for none or several."""
    number = {name: i for i, name in enumerate(labeler.classes)}
    return np.array([number.get(labeler.label(c).name, NO_CLASS) for c in captions], dtype=np.int64)


def plurality(labels: np.ndarray, classes: int, min_votes: int = 1) -> int:
    """The one most frequent label, with at least ``min_votes`` votes; NO_CLASS on a tie."""
    labels = labels[labels >= 0]
    if len(labels) == 0:
        return NO_CLASS
    counts = np.bincount(labels, minlength=classes)
    top = np.flatnonzero(counts == counts.max())
    return int(top[0]) if len(top) == 1 and counts.max() >= min_votes else NO_CLASS


def grouped_plurality(group: np.ndarray, label: np.ndarray, groups: int, min_votes: int = 1) -> np.ndarray:
    """`plurality` of each group's labels at once (``group`` and ``label`` per item; NO_CLASS
    labels do not vote): a sort and run lengths instead of a Python call per group."""
    out = np.full(groups, NO_CLASS, np.int64)
    voting = label >= 0
    group, label = np.asarray(group)[voting], np.asarray(label)[voting].astype(np.int64)
    if not len(group):
        return out
    run_group, run_label, counts = label_runs(group, label)
    top = np.zeros(groups, np.int64)
    np.maximum.at(top, run_group, counts)
    at_top = counts == top[run_group]
    alone = np.bincount(run_group[at_top], minlength=groups) == 1
    out[run_group[at_top]] = run_label[at_top]
    return np.where(alone & (top >= min_votes), out, NO_CLASS)


def label_runs(group: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each distinct (group, label) once, by group then label, with how many items have it."""
    order = np.lexsort((label, group))
    group, label = group[order], label[order]
    starts = np.flatnonzero(run_starts(group, label)) if len(group) else np.zeros(0, np.int64)
    return group[starts], label[starts], np.diff(np.r_[starts, len(group)])


def distinct_caption_rows(group: np.ndarray, caption_id: np.ndarray, caption_class: np.ndarray) -> np.ndarray:
    """The first labelled pair of each distinct (group, caption), by group then caption: one vote
    per distinct caption, since the same caption copied twice is not two witnesses."""
    labelled = np.flatnonzero(caption_class >= 0)
    ordered = labelled[np.lexsort((caption_id[labelled], group[labelled]))]  # stable: a run starts at its first row
    if not len(ordered):
        return ordered
    return ordered[run_starts(group[ordered], caption_id[ordered])]


def image_group_classes(index: NeighbourIndex, image_group: np.ndarray, groups: int, image_label: np.ndarray,
                        classes: int, votes: int, own_neighbours: Neighbours,
                        tasks: "Tasks | None" = None) -> tuple[np.ndarray, np.ndarray]:
    """Class per image group: the plurality label (at least a quarter of the votes, no tie) of the
    ``votes`` nearest unique images outside the group, searched from the group's centroid; and the
    votes, as the labels of those images, (groups, votes), NO_CLASS where a neighbour has none
    (`votes_for` counts them): ``votes`` small integers a group, whatever the number of classes.
    (Weighting votes by the inverse of a class's share did worse on the synthetic world under the
    bundled reference: 31% agreement with captions against 37%.)

    ``image_group`` and ``image_label`` are per unique image (the plurality caption class of its pairs).
    ``own_neighbours`` (`NeighbourIndex.self_neighbours` with k = ``votes``) spares the search for
    groups of one image (most of them): from its centroid, which is the image itself, the nearest
    outside the group are its own neighbours. The centroid searches of larger groups are tasks of
    ``tasks`` above the exact limit (`centroid_search`: a block of groups each), as the index's own
    search is.
    """
    out = np.full(groups, NO_CLASS, np.int64)
    voted = np.full((groups, votes), NO_CLASS, np.min_scalar_type(-max(classes, 1)))
    sizes = np.bincount(image_group, minlength=groups)
    order = np.argsort(image_group, kind="stable")  # each group's images, ascending, from its start
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    min_votes = max(2, votes // 4)

    def tally(which: np.ndarray, found: np.ndarray, outside: np.ndarray) -> None:
        labels = np.where(outside, image_label[np.maximum(found, 0)], NO_CLASS)
        # Each group's counted labels, moved to the front of its row of ``votes``.
        counted = labels[np.arange(len(which))[:, None], np.argsort(labels < 0, axis=1, kind="stable")][:, :votes]
        voted[which, :counted.shape[1]] = counted
        out[which] = grouped_plurality(np.repeat(np.arange(len(which)), labels.shape[1]), labels.ravel(),
                                       len(which), min_votes)

    # Groups of one size share one search (most are single images; large groups are few), a block
    # of groups at a time so that their members' vectors are read and summed in bounded memory.
    larger = []  # (groups, their member rows) of two or more images, a block each
    for size in np.unique(sizes):
        size = int(size)
        of_size = np.flatnonzero(sizes == size)
        step = max(1, GROUP_BLOCK_VECTORS // size)
        for first in range(0, len(of_size), step):
            which = of_size[first:first + step]
            member_rows = order[starts[which][:, None] + np.arange(size)]  # (groups in block, size)
            if size == 1:
                found = np.asarray(own_neighbours.index[member_rows[:, 0], :votes])
                tally(which, found, found >= 0)
            else:
                larger.append((which, member_rows))
    tasks = tasks if tasks is not None and not index.exact else Tasks()  # exact: vectors already here
    threads = tasks.task_threads
    searches = [(rows, rows.shape[1] + votes, threads) for _, rows in larger]
    for i, found in tasks.imap(centroid_search, searches, shared=(index,)):
        which, member_rows = larger[i]
        outside = (found >= 0) & ~(found[:, :, None] == member_rows[:, None, :]).any(axis=2)
        outside &= np.cumsum(outside, axis=1) <= votes  # the first `votes` outside the group
        tally(which, found, outside)
    return out, voted


def centroid_search(index: NeighbourIndex, member_rows: np.ndarray, wanted: int, threads: int | None = None) -> np.ndarray:
    """One task: the ``wanted`` nearest rows of each group's centroid (``member_rows``: a group's
    rows of the index per row), on ``threads`` threads."""
    size = member_rows.shape[1]
    with faiss_threads(threads):
        centroids = index.reader.rows(member_rows.ravel()).reshape(len(member_rows), size, -1).sum(axis=1)
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
        return index.search(centroids, wanted).index


def votes_for(voted: np.ndarray, group: np.ndarray, label: np.ndarray, block: int = 65_536,
              out: np.ndarray | None = None) -> np.ndarray:
    """Per item, how many of its group's votes (`image_group_classes`) are for its ``label``
    (0 for NO_CLASS), a block of items at a time (into ``out`` where given: int64, one per item)."""
    out = np.zeros(len(group), np.int64) if out is None else out
    for start in range(0, len(group), block):
        mine, wanted = voted[group[start:start + block]], label[start:start + block]
        out[start:start + block] = np.where(wanted >= 0, (mine == wanted[:, None]).sum(axis=1), 0)
    return out


STRONG_RATIO = 3  # an image's class must have this many times the votes of its caption's class


def strong_mismatch(caption_class: np.ndarray, image_class: np.ndarray, caption_votes: np.ndarray,
                    image_votes: np.ndarray, classes: int, own_class: np.ndarray) -> np.ndarray:
    """Pairs whose image's neighbourhood is clearly of its class and not of its caption's class.

    A reference confuses classes systematically (to the bundled one, cars look like people): an
    image of class A judged B still has many A images among its neighbours, while an image of
    class B captioned A by a poisoner (or by natural label noise) has few: only the other poisons,
    a small share of B's images at any poisoning rate a defender worries about. Votes are
    weighed by each class's share of the captions, so a common class (a quarter of the synthetic
    world is people) does not win every neighbourhood. Counting only these pairs keeps
    confusions out of the cells without modelling them."""
    known = caption_class[caption_class >= 0]
    share = (np.bincount(known, minlength=max(classes, 1)) + 1.0) / (len(known) + max(classes, 1))
    lift_caption = caption_votes / share[np.maximum(caption_class, 0)]
    lift_image = image_votes / share[np.maximum(image_class, 0)]
    return (caption_class >= 0) & (lift_caption * STRONG_RATIO <= lift_image) & (own_class != caption_class)


@dataclass(frozen=True)
class CellTable:
    """Distinct image groups per (caption class, image class) among pairs with both, and each
    off-diagonal cell's expected count under the background."""

    observed: np.ndarray  # (C, C) int
    expected: np.ndarray  # (C, C) float; NaN on the diagonal

    @property
    def cells_tested(self) -> int:
        c = len(self.observed)
        return c * (c - 1)

    def per_pair_rate(self, caption_class: int, image_class: int, given: str) -> float:
        """Background probability that a pair with one side known has the other: given="caption"
        is P(image class | caption class), given="image" is P(caption class | image class)."""
        total = self.observed[caption_class].sum() if given == "caption" else self.observed[:, image_class].sum()
        return float(min(1.0, self.expected[caption_class, image_class] / max(total, 1)))


def cell_table(caption_class: np.ndarray, image_class: np.ndarray, classes: int, image_group: np.ndarray,
               strong: np.ndarray, work: Path | None = None, tasks: Tasks | None = None,
               partition_rows: int = PARTITION_ROWS) -> CellTable:
    """Counts are of distinct image groups per cell, not pairs: the captions of one reused image
    share its class, so they are one observation of a mismatch, not several. Off the diagonal only
    strong mismatches count (`strong_mismatch`). With ``work`` the pairs are counted a range of
    image groups at a time (`counting.group_runs`): a group's distinct cells are its own, so the
    partitions' tables add up to the whole's."""
    both = (caption_class >= 0) & (image_class >= 0) & ((caption_class == image_class) | strong)
    groups = int(image_group.max()) + 1 if len(image_group) else 0
    runs = None if work is None else group_runs(Path(work), "cells", image_group, groups, (caption_class, image_class),
                                                (np.int64, np.int64), partition_rows, keep=both)
    if runs is None:
        observed = distinct_cells(image_group[both], caption_class[both], image_class[both], classes)
    else:
        observed = sum(work_runs(runs, cells_run, tasks, classes), np.zeros((classes, classes), np.int64))
    off = observed.copy()
    np.fill_diagonal(off, 0)
    row, col, total = off.sum(axis=1, keepdims=True), off.sum(axis=0, keepdims=True), off.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = (row - off) * (col - off) / np.maximum(total - off, 1)
    expected = np.maximum(expected.astype(np.float64), MIN_EXPECTED)
    np.fill_diagonal(expected, np.nan)
    return CellTable(observed=observed, expected=expected)


def distinct_cells(group: np.ndarray, a: np.ndarray, b: np.ndarray, classes: int) -> np.ndarray:
    """(classes, classes) counts of distinct (group, a, b) rows by (a, b)."""
    observed = np.zeros((classes, classes), np.int64)
    if not len(group):
        return observed
    codes = combined_codes(a, b, group)
    if codes is None:
        units = np.unique(np.stack([a, b, group], axis=1), axis=0)
        np.add.at(observed, (units[:, 0], units[:, 1]), 1)
    else:
        _, first = np.unique(codes, return_index=True)  # one row of each distinct (A, B, group)
        np.add.at(observed, (a[first], b[first]), 1)
    return observed


def cells_run(paths: tuple[str, str, str], classes: int) -> np.ndarray:
    """A task: one partition of (image group, caption class, image class) rows; its cell counts."""
    return distinct_cells(*counting.read_run(paths, (np.int64, np.int64, np.int64)), classes)


def own_classes(image_group: np.ndarray, caption_id: np.ndarray, caption_class: np.ndarray, classes: int,
                work: Path | None = None, tasks: Tasks | None = None,
                partition_rows: int = PARTITION_ROWS) -> np.ndarray:
    """Per image group: the plurality class of its distinct labelled captions, with at least two
    votes and one class ahead, NO_CLASS otherwise. With ``work``, a range of image groups at a time
    (`counting.group_runs`; only the labelled pairs are spilled)."""
    groups = int(image_group.max()) + 1 if len(image_group) else 0
    if not classes:
        return np.full(groups, NO_CLASS, np.int64)
    runs = None if work is None else group_runs(Path(work), "own", image_group, groups, (caption_id, caption_class),
                                                (np.int64, np.int64), partition_rows, keep=caption_class >= 0)
    if runs is None:
        return group_own_classes(image_group, caption_id, caption_class, groups)
    own = np.full(groups, NO_CLASS, np.int64)
    for numbers, found in work_runs(runs, own_run, tasks):
        own[numbers] = found
    return own


def group_own_classes(group: np.ndarray, caption_id: np.ndarray, caption_class: np.ndarray, groups: int) -> np.ndarray:
    """Per group: `own_classes`'s class. (At least two votes for the winner implies at least two
    distinct labelled captions.)"""
    distinct = distinct_caption_rows(group, caption_id, caption_class)
    return grouped_plurality(group[distinct], caption_class[distinct], groups, min_votes=2)


def own_run(paths: tuple[str, str, str]) -> tuple[np.ndarray, np.ndarray]:
    """A task: one partition of labelled (image group, caption id, caption class) rows in row
    order; its groups and their own classes."""
    group, caption_id, caption_class = counting.read_run(paths, (np.int64, np.int64, np.int64))
    numbers, local = np.unique(group, return_inverse=True)
    return numbers, group_own_classes(local.ravel(), caption_id, caption_class, len(numbers))
