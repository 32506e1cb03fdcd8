"""The audit's counting pass through partitions on disk (`clipguard.audit.counting`): the numbers,
counts and patch groups of the in-memory definitions, on hand-made data where the answer is known
and on random data at many partition sizes, and the whole audit unchanged by it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from audit_worlds import KEYWORDS, World
from clipguard.audit import AuditConfig, AuditInputError, run_audit
from clipguard.audit import counting
from clipguard.audit.counting import distinct_counts, distinct_ids, patch_units, prefix_bits
from clipguard.audit.grouping import distinct_per_group, factorize_codes

SIZES = [1, 3, 64, 1_000, 10**9]  # rows a partition: one a row, a few, ..., one partition (in memory)


def _spread(rng, n: int, distinct: int) -> np.ndarray:
    """n uint64 hashes over the whole range, ``distinct`` of them, reused unevenly (a web scrape's stock images)."""
    values = rng.integers(0, 2**64, size=distinct, dtype=np.uint64)
    return values[np.minimum(rng.zipf(1.5, size=n) - 1, distinct - 1)]


def _no_runs_left(work: Path) -> None:
    assert not work.exists() or not any(work.iterdir()), sorted(p.name for p in work.iterdir())


def test_hand_made_numbers_and_counts(tmp_path):
    codes = np.array([5, 3, 5, 9, 3], np.uint64) << np.uint64(60)  # top bits differ: three partitions
    ids, count = distinct_ids(codes, tmp_path, partition_rows=1)
    assert ids.tolist() == [0, 1, 0, 2, 1] and count == 3
    # Image 0 behind captions 4, 5, 4 and 6: three distinct; image 1 behind one; image 2 behind none.
    image = np.array([0, 0, 1, 0, 0])
    caption = np.array([4, 5, 4, 4, 6])
    assert distinct_counts(image, caption, 3, tmp_path, partition_rows=1).tolist() == [3, 1, 0]
    _no_runs_left(tmp_path)


@pytest.mark.parametrize("partition_rows", SIZES)
def test_distinct_ids_through_partitions_are_the_in_memory_numbers(tmp_path, partition_rows):
    rng = np.random.default_rng(partition_rows)
    for codes in (_spread(rng, 5_000, 800),
                  rng.integers(0, 50, size=3_000).astype(np.uint64),  # small integers: every hash in one partition
                  np.zeros(0, np.uint64), np.full(7, 2**64 - 1, np.uint64)):
        ids, count = distinct_ids(codes, tmp_path / "work", partition_rows=partition_rows)
        expected, expected_count = factorize_codes(codes)
        np.testing.assert_array_equal(ids, expected)
        assert count == expected_count and ids.dtype == np.int64
    _no_runs_left(tmp_path / "work")


@pytest.mark.parametrize("partition_rows", SIZES)
def test_distinct_counts_through_partitions_are_the_in_memory_counts(tmp_path, partition_rows):
    rng = np.random.default_rng(partition_rows + 1)
    groups = 700
    group = np.minimum(rng.zipf(1.3, size=6_000) - 1, groups - 1)
    item = rng.integers(0, 300, size=len(group))
    counts = distinct_counts(group, item, groups, tmp_path, partition_rows=partition_rows)
    np.testing.assert_array_equal(counts, distinct_per_group(group, item, groups))
    assert (counts == 0).any()  # groups without rows are counted as 0, not dropped
    _no_runs_left(tmp_path)


def _units(found):
    return [[rows.tolist() for rows in unit] for unit in found]


def test_hand_made_shared_patches(tmp_path):
    s, t, u = (np.uint64(v) << np.uint64(62) | np.uint64(1) for v in (1, 2, 3))
    # s: row 0 (group 0), rows 2 and 3 (group 1); t: rows 1 and 4, both group 2 (reuse: dropped);
    # u: rows 1 (group 2) and 3 (group 1), on the second tile.
    patches = np.array([[s, 0], [t, u], [s, 0], [s, u], [t, 0]], np.uint64)
    image_group = np.array([0, 2, 1, 1, 2])
    expected = [[[0], [2, 3]], [[3], [1]]]  # in signature order: s, then u; groups ascending
    assert _units(patch_units(patches, image_group)) == expected
    assert _units(patch_units(patches, image_group, tmp_path, partition_rows=1)) == expected
    assert patch_units(None, image_group) == [] and patch_units(np.zeros((5, 2), np.uint64), image_group, tmp_path, partition_rows=1) == []
    _no_runs_left(tmp_path)


@pytest.mark.parametrize("partition_rows", SIZES)
def test_patch_groups_through_partitions_are_the_in_memory_groups(tmp_path, partition_rows):
    rng = np.random.default_rng(partition_rows + 2)
    n, width = 2_000, 4
    patches = rng.integers(1, 2**64, size=(n, width), dtype=np.uint64)
    patches[rng.random((n, width)) < 0.3] = 0
    shared = rng.integers(1, 2**64, size=40, dtype=np.uint64)  # triggers and watermarks on many images
    carriers = rng.random(n) < 0.4
    patches[carriers, 0] = shared[rng.integers(0, len(shared), size=carriers.sum())]
    image_group = np.minimum(rng.zipf(1.6, size=n) - 1, 900)
    found = patch_units(patches, image_group, tmp_path, partition_rows=partition_rows)
    assert _units(found) == _units(patch_units(patches, image_group))
    assert len(found) >= 30
    _no_runs_left(tmp_path)


def test_prefix_bits_split_rows_into_partitions_of_about_the_size_asked():
    assert prefix_bits(0, 100) == prefix_bits(100, 100) == 0
    assert prefix_bits(101, 100) == 1 and prefix_bits(10**8, counting.PARTITION_ROWS) == 5
    with pytest.raises(ValueError):
        prefix_bits(10, 0)


def test_the_audit_counted_through_partitions_equals_the_audit_counted_in_memory(tmp_path):
    world = (World(7).clean().with_patches().stamp("sheep", images=9, echo=7)
             .fan_in("horse", "aeroplane").fan_out("horse", "dog").cluster("banana", images=20))
    scores = world.write(tmp_path / "w", shards=3)
    whole = run_audit(AuditConfig(scores=scores, out=tmp_path / "a1", keywords=KEYWORDS))
    parted = run_audit(AuditConfig(scores=scores, out=tmp_path / "a2", keywords=KEYWORDS, partition_rows=64))
    assert {"stamped_images", "image_fan_in", "caption_fan_out", "image_cluster"} <= {f.kind for f in whole.findings}
    assert [(f.kind, f.goal, f.observed, f.rows.tolist()) for f in parted.findings] == \
        [(f.kind, f.goal, f.observed, f.rows.tolist()) for f in whole.findings]
    for name, values in whole.signal_columns.items():
        np.testing.assert_array_equal(parted.signal_columns[name], values, err_msg=name)
    assert not (tmp_path / "a2" / ".search-index").exists()  # the partitions went with the index
    with pytest.raises(AuditInputError, match="partition"):
        run_audit(AuditConfig(scores=scores, out=tmp_path / "a3", keywords=KEYWORDS, partition_rows=0))


def _random_tables(seed: int, n: int = 3_000, classes: int = 5):
    """Per pair: image groups over images, captions (reused, some unlabelled), classes."""
    from types import SimpleNamespace

    rng = np.random.default_rng(seed)
    image_id = np.minimum(rng.zipf(1.4, size=n) - 1, 1_500)
    image_group = image_id // 3  # near-duplicates: three images a group
    caption_id = np.minimum(rng.zipf(1.3, size=n) - 1, 2_000)
    caption_class = np.where(rng.random(n) < 0.2, -1, rng.integers(0, classes, size=n))
    image_class = np.where(rng.random(image_group.max() + 1) < 0.1, -1, rng.integers(0, classes, size=image_group.max() + 1))
    return SimpleNamespace(classes=[f"c{i}" for i in range(classes)], image_id=image_id, image_group=image_group,
                           caption_id=caption_id, caption_class=caption_class, image_class=image_class[image_group],
                           caption_group=caption_id // 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_group_table_as_arrays_is_each_groups_own_numbers(seed):
    """The detect tests' per-group figures, computed for all groups at once, against the
    definition one group at a time (what the code did before: a Python object a group)."""
    from clipguard.audit import detect
    from clipguard.audit.classes import plurality

    t = _random_tables(seed)
    groups = detect._image_group_table(t)
    noise_off = noise_total = 0
    numbers = np.unique(t.image_group)
    assert len(groups) == len(numbers)
    multi = []
    for i, number in enumerate(numbers):
        rows = np.flatnonzero(t.image_group == number)
        g = groups[i]
        assert g.rows.tolist() == rows.tolist()
        assert (g.images, g.captions) == (len(np.unique(t.image_id[rows])), len(np.unique(t.caption_id[rows])))
        assert (g.image_class, g.label) == (int(t.image_class[rows[0]]), plurality(t.caption_class[rows], 5))
        labelled = rows[t.caption_class[rows] >= 0]
        _, first = np.unique(t.caption_id[labelled], return_index=True)
        counts = np.bincount(t.caption_class[labelled[first]], minlength=5)
        if len(first) >= 3:
            noise_off, noise_total = noise_off + len(first) - counts.max(), noise_total + len(first)
        if (counts > 0).sum() >= 2:
            multi.append((labelled.tolist(), counts.tolist()))
    assert detect._caption_noise(t) == pytest.approx((noise_off + 1) / (noise_total + 1) / 4, rel=1e-12)
    assert [(rows.tolist(), counts.tolist()) for rows, counts in detect._group_class_counts(t)] == multi and multi
    mislabel = np.zeros((5, 5))
    for i in range(len(groups)):
        if groups[i].label >= 0 and groups[i].image_class >= 0:
            mislabel[groups[i].label, groups[i].image_class] += 1
    np.testing.assert_array_equal(detect._group_mislabel(groups, 5), mislabel)


def test_group_rows_hold_every_groups_rows_in_order():
    from clipguard.audit.detect import group_rows

    slices = group_rows(np.array([4, 1, 4, 4, 9, 1]))
    assert slices.number.tolist() == [1, 4, 9] and slices.sizes.tolist() == [2, 3, 1]
    assert [slices.rows(i).tolist() for i in range(3)] == [[1, 5], [0, 2, 3], [4]]
    assert slices.distinct(np.array([7, 7, 8, 7, 7, 7])).tolist() == [1, 2, 1]
    assert len(group_rows(np.zeros(0, np.int64))) == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_caption_groups_chosen_at_once_are_those_chosen_one_by_one(seed):
    from clipguard.audit.detect import DetectConfig, _fan_out_groups

    t = _random_tables(seed)
    config = DetectConfig(min_fan_out=3)
    expected = []
    for number in np.unique(t.caption_group):
        rows = np.flatnonzero(t.caption_group == number)
        labelled = t.caption_class[rows][t.caption_class[rows] >= 0]
        if len(labelled) * 2 > len(rows) and len(np.unique(t.image_id[rows])) >= config.min_fan_out:
            expected.append((int(np.bincount(labelled, minlength=5).argmax()), rows.tolist()))
    assert [(a, rows.tolist()) for a, rows in _fan_out_groups(t, config)] == expected and expected


def test_combined_codes_sort_as_the_rows_and_refuse_what_does_not_fit():
    from clipguard.audit.grouping import combined_codes

    rng = np.random.default_rng(3)
    a, b, c = rng.integers(0, 7, 500), rng.integers(0, 1_000, 500), rng.integers(0, 40, 500)
    codes = combined_codes(a, b, c)
    rows = np.stack([a, b, c], axis=1)
    # Equal codes are equal rows, and their order is the rows' lexicographic order.
    np.testing.assert_array_equal(np.unique(rows, axis=0), rows[np.unique(codes, return_index=True)[1]])
    np.testing.assert_array_equal(np.unique(rows, axis=0, return_index=True)[1], np.unique(codes, return_index=True)[1])
    assert combined_codes(np.array([2**40]), np.array([2**30])) is None  # 71 bits


def test_cell_table_counts_each_image_group_once_per_cell(tmp_path):
    from clipguard.audit.classes import cell_table

    # Group 0: two A captions on a B image (one observation of A:B); group 1: one A on B; group 2: B on B.
    caption_class = np.array([0, 0, 0, 1, 1])
    image_class = np.array([1, 1, 1, 1, 1])
    image_group = np.array([0, 0, 1, 2, 2])
    table = cell_table(caption_class, image_class, 2, image_group, np.ones(5, bool))
    assert table.observed.tolist() == [[0, 2], [0, 1]]
    rng = np.random.default_rng(4)
    caption_class, image_class = rng.integers(-1, 4, 2_000), rng.integers(-1, 4, 2_000)
    image_group, strong = rng.integers(0, 300, 2_000), rng.random(2_000) < 0.5
    both = (caption_class >= 0) & (image_class >= 0) & ((caption_class == image_class) | strong)
    expected = np.zeros((4, 4), np.int64)
    for a, b, _ in {(a, b, g) for a, b, g in zip(caption_class[both], image_class[both], image_group[both])}:
        expected[a, b] += 1
    np.testing.assert_array_equal(cell_table(caption_class, image_class, 4, image_group, strong).observed, expected)
    for partition_rows in SIZES:  # a range of image groups at a time: the same table
        parted = cell_table(caption_class, image_class, 4, image_group, strong, tmp_path, partition_rows=partition_rows)
        np.testing.assert_array_equal(parted.observed, expected)
    _no_runs_left(tmp_path)


def _own_by_definition(image_group, caption_id, caption_class, classes: int) -> np.ndarray:
    """Per pair, one group at a time: the plurality of the group's distinct labelled captions'
    classes, with two votes or more and no tie."""
    own = np.full(len(image_group), -1, np.int64)
    for number in np.unique(image_group):
        rows = np.flatnonzero(image_group == number)
        labelled = rows[caption_class[rows] >= 0]
        _, first = np.unique(caption_id[labelled], return_index=True)
        counts = np.bincount(caption_class[labelled[first]], minlength=classes)
        if counts.max() >= 2 and (counts == counts.max()).sum() == 1:
            own[rows] = counts.argmax()
    return own


@pytest.mark.parametrize("seed", [0, 1])
def test_own_classes_through_partitions_are_each_groups_plurality_of_distinct_captions(tmp_path, seed):
    from clipguard.audit.classes import own_classes

    t = _random_tables(seed)
    expected = _own_by_definition(t.image_group, t.caption_id, t.caption_class, 5)
    assert (expected >= 0).sum() > 100 and (expected < 0).sum() > 100  # both outcomes are tested
    for partition_rows in SIZES:
        own = own_classes(t.image_group, t.caption_id, t.caption_class, 5, tmp_path, partition_rows=partition_rows)
        np.testing.assert_array_equal(own[t.image_group], expected, err_msg=str(partition_rows))
    np.testing.assert_array_equal(own_classes(t.image_group, t.caption_id, t.caption_class, 5)[t.image_group], expected)
    # A caption copied onto the same image is one witness, not two; a group without rows has none.
    assert own_classes(np.array([0, 0, 0, 2]), np.array([7, 7, 8, 9]), np.array([2, 2, 1, 1]), 3, tmp_path,
                       partition_rows=1).tolist() == [-1, -1, -1]
    assert own_classes(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), 3).tolist() == []
    _no_runs_left(tmp_path)
