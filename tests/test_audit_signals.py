"""Cross-pair signals and goal findings on tiny hand-made score folders where the answer is known
(tests/audit_worlds.py: synthetic vectors, natural noise, planted attacks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from audit_worlds import CLASSES, KEYWORDS, World
from clipguard.audit import AuditConfig, MissingEmbeddingsError, run_audit
from clipguard.audit.inputs import AuditInputError
from clipguard.audit.density import density
from clipguard.audit.neighbours import NeighbourIndex, VectorReader
from clipguard.signals import Scope, SignalError, get_signal, read_signal, signal_names


def _audit(world: World, tmp_path: Path, name: str = "w", **options):
    scores = world.write(tmp_path / name)
    result = run_audit(AuditConfig(scores=scores, out=tmp_path / f"{name}-audit", keywords=KEYWORDS, **options))
    tags = world.tags_by_key(scores)
    tag = np.array([tags[(s, k)] for s, k in zip(result.pairs.shard, result.pairs.key)])
    return result, tag


def _only(findings, kind):
    found = [f for f in findings if f.kind == kind]
    assert len(found) == 1, [(f.kind, f.goal) for f in findings]
    return found[0]


def test_one_image_behind_exactly_seven_captions(tmp_path):
    result, tag = _audit(World(3).clean().fan_in("sheep", "aeroplane", captions=7), tmp_path)
    planted = tag == "fan_in"
    assert planted.sum() == 7
    assert set(result.signal_columns["image_fan_in"][planted]) == {7}
    assert set(result.signal_columns["image_fan_in_near"][planted]) == {7}
    # Stock images carry 2-5 captions; every other image one.
    stock = result.signal_columns["image_fan_in"][(tag == "clean")]
    assert stock.max() <= 5 and np.median(stock) == 1
    finding = _only(result.findings, "image_fan_in")
    assert finding.goal == "sheep:aeroplane" and finding.observed == 7
    assert set(finding.rows) == set(np.flatnonzero(planted))
    assert "behind 7 different sheep captions" in finding.description
    assert result.findings[0].goal == "sheep:aeroplane"


def test_one_caption_behind_many_images_of_another_class(tmp_path):
    result, tag = _audit(World(4).clean().fan_out("sheep", "dog", images=15), tmp_path)
    planted = tag == "fan_out"
    assert set(result.signal_columns["caption_fan_out"][planted]) == {15}
    finding = _only(result.findings, "caption_fan_out")
    assert finding.goal == "sheep:dog" and finding.observed >= 8
    assert set(finding.rows) <= set(np.flatnonzero(planted))
    # The boilerplate alt-text is behind more images than the planted caption, but names no class.
    boilerplate = tag == "boilerplate"
    assert set(result.signal_columns["caption_fan_out"][boilerplate]) == {25}
    assert not any(set(f.rows) & set(np.flatnonzero(boilerplate)) for f in result.findings)


def test_planted_class_cell_stands_out_of_natural_mismatches(tmp_path):
    result, tag = _audit(World(5).clean(mislabel=0.05).cell("cat", "car", pairs=20), tmp_path)
    planted = tag == "cell"
    cells = [f for f in result.findings if f.kind == "class_pair"]
    assert [f.goal for f in cells] == ["cat:car"]
    finding = cells[0]
    assert finding.observed >= 15 and finding.expected < 2
    assert len(set(finding.rows) & set(np.flatnonzero(planted))) >= 15
    assert f"{finding.observed} pairs where" in finding.description and "p < 1e-" in finding.description
    # The per-pair column: the planted pairs score high, natural mismatches low.
    score = result.signal_columns["class_cell_neglog10p"]
    assert np.median(score[planted]) > 6
    natural = (tag == "clean") & (result.tables.caption_class >= 0) & (result.tables.caption_class != result.tables.image_class) \
        & (result.tables.image_class >= 0)
    assert natural.sum() >= 10 and score[natural].max() < 6


def test_tight_cluster_of_near_identical_images_with_one_label(tmp_path):
    result, tag = _audit(World(6).clean().cluster("banana", images=30), tmp_path)
    planted = tag == "cluster"
    assert set(result.signal_columns["image_cluster_size"][planted]) == {30}
    assert result.signal_columns["image_cluster_size"][tag == "clean"].max() < 5
    finding = _only(result.findings, "image_cluster")
    assert finding.goal == "banana" and finding.observed == 30
    assert "a cluster of 30 near-identical images" in finding.description
    # Near-identical images are each other's nearest neighbours: the densest spot in image space.
    assert np.nanmax(result.signal_columns["image_knn_distance"][planted]) < np.nanmin(
        result.signal_columns["image_knn_distance"][tag == "clean"])


def test_one_patch_stamped_on_nine_images_all_captioned_sheep(tmp_path):
    # Seven of the nine also share the tile next to the trigger: still one finding, of all nine.
    result, tag = _audit(World(8).clean().with_patches().stamp("sheep", images=9, echo=7), tmp_path)
    planted = tag == "stamped"
    finding = _only(result.findings, "stamped_images")
    assert finding.goal == "sheep" and finding.observed == 9 and finding.expected < 1
    assert set(finding.rows) == set(np.flatnonzero(planted))
    assert "one patch stamped on 9 otherwise different images" in finding.description
    score = result.signal_columns["stamped_neglog10p"]
    assert score[planted].min() > 6 and score[~planted].max() < 1
    # The stamped copies are ordinary images of their classes: no other signal sees them.
    assert [f.kind for f in result.findings] == ["stamped_images"]


def test_shared_patches_that_their_images_explain_are_no_finding(tmp_path):
    """A class's own texture (15 car images, captioned car) and a watermark on 30 images of every
    class (captions of every class) recur as often as a trigger, and are the background."""
    world = World(9).clean().with_patches(texture=15, watermark=30)
    result, _ = _audit(world, tmp_path)
    assert result.findings == []
    from clipguard.audit.detect import DetectConfig, _stamped_images
    tested = _stamped_images(result.tables, DetectConfig(alpha=1.0 - 1e-12))
    assert [f.goal for f in tested] == ["car"] and tested[0].neglog10_p < 1  # tested, and ordinary


@pytest.mark.parametrize("seed", [10, 11, 12])
def test_clean_data_with_natural_noise_has_no_finding(tmp_path, seed):
    result, tag = _audit(World(seed).clean(), tmp_path)
    assert {"clean", "boilerplate"} == set(tag)
    assert result.findings == []
    assert result.tables.cells.observed.sum() > 400  # the class tests did run


def test_all_planted_goals_are_found_and_ranked_above_the_rest(tmp_path):
    world = World(7).clean().fan_in("sheep", "aeroplane").fan_out("horse", "dog").cell("cat", "car").cluster("banana")
    result, _ = _audit(world, tmp_path)
    kinds = {(f.kind, f.goal) for f in result.findings}
    assert {("image_fan_in", "sheep:aeroplane"), ("caption_fan_out", "horse:dog"), ("class_pair", "cat:car"),
            ("image_cluster", "banana")} <= kinds
    p = [f.neglog10_p for f in result.findings]
    assert p == sorted(p, reverse=True) and min(p) > 6


def test_faiss_path_equals_exact_path(tmp_path):
    pytest.importorskip("faiss")
    vectors = np.random.default_rng(0).normal(size=(400, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    exact = NeighbourIndex(vectors).self_neighbours(8)
    approximate = NeighbourIndex(vectors, exact_limit=10, nprobe=10_000).self_neighbours(8)
    assert approximate.index.shape == exact.index.shape
    assert (approximate.index == exact.index).mean() > 0.99  # float ties may swap a neighbour
    np.testing.assert_allclose(approximate.similarity, exact.similarity, atol=1e-5)
    # The whole audit through faiss: the same columns and findings.
    world = World(8).clean(n=320).fan_in("sheep", "aeroplane").cluster("banana", images=20)
    scores = world.write(tmp_path / "w")
    slow = run_audit(AuditConfig(scores=scores, out=tmp_path / "a1", keywords=KEYWORDS))
    fast = run_audit(AuditConfig(scores=scores, out=tmp_path / "a2", keywords=KEYWORDS, exact_limit=10, nprobe=10_000))
    assert slow.exact_search and not fast.exact_search
    assert [(f.kind, f.goal, f.observed) for f in fast.findings] == [(f.kind, f.goal, f.observed) for f in slow.findings]
    for name in ("image_fan_in_near", "caption_fan_out_near", "image_cluster_size"):
        np.testing.assert_array_equal(fast.signal_columns[name], slow.signal_columns[name])
    np.testing.assert_allclose(fast.signal_columns["image_knn_distance"], slow.signal_columns["image_knn_distance"], atol=1e-4)


def test_compressed_faiss_path_reads_vectors_on_demand_and_returns_exact_similarities():
    pytest.importorskip("faiss")
    from clipguard.audit.neighbours import PQ_MIN_VECTORS, VectorReader

    n = PQ_MIN_VECTORS + 2_000
    vectors = np.random.default_rng(1).normal(size=(n, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    reads = []

    def read(rows):
        reads.append(len(rows))
        return vectors[rows]

    exact = NeighbourIndex(vectors).self_neighbours(8)
    index = NeighbourIndex(VectorReader(n, 16, read), exact_limit=100, nprobe=10_000, codes="pq")
    assert index.codes == "pq" and not index.exact
    assert max(reads) <= 65_536  # trained and filled in blocks, never the whole set at once
    found = index.self_neighbours(8)
    assert (found.index == exact.index).mean() > 0.97  # codes choose the candidates; a few true ones are missed
    same = found.index == exact.index
    np.testing.assert_allclose(found.similarity[same], exact.similarity[same], atol=1e-5)  # re-scored exactly
    hit = found.index >= 0
    np.testing.assert_allclose(found.similarity[hit], np.einsum("ij,ij->i", vectors[np.nonzero(hit)[0]],
                                                                 vectors[found.index[hit]]), atol=1e-5)
    assert (found.index != np.arange(n)[:, None]).all()


def test_the_search_in_ranges_from_a_pickled_index_over_its_files_equals_the_whole(tmp_path, monkeypatch, capfd):
    """What a search task gets (the index pickled, its vectors as file paths and rows) searches
    as the index does in this process, and the ranges put back together are the whole search."""
    pytest.importorskip("faiss")
    import pickle

    from clipguard.audit import searchtasks
    from clipguard.audit.neighbours import VectorReader
    from clipguard.audit.vectorfiles import VectorFiles
    from clipguard.executors.tasks import Tasks

    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(3_000, 16)).astype(np.float16)
    halves = [tmp_path / "a.npy", tmp_path / "b.npy"]
    np.save(halves[0], vectors[:1_000]), np.save(halves[1], vectors[1_000:])
    # Items in an order of their own across the two files, as an audit's distinct images are.
    items = rng.permutation(3_000)
    files = VectorFiles(tuple(map(str, halves)), (items >= 1_000).astype(np.int32),
                        np.where(items >= 1_000, items - 1_000, items), dims=16)
    unit = vectors[items].astype(np.float32)
    np.testing.assert_allclose(files(np.arange(3_000)), unit / np.linalg.norm(unit, axis=1, keepdims=True), atol=1e-6)
    index = NeighbourIndex(VectorReader(3_000, 16, files), exact_limit=100, nprobe=10_000)
    whole = index.self_neighbours(6)
    sent = pickle.loads(pickle.dumps(index))
    assert sent.reader._read._mapped == {} and sent.codes == "sq8"  # files are mapped again where it lands
    import faiss

    from clipguard.audit.neighbours import faiss_threads

    threads = faiss.omp_get_max_threads()
    with faiss_threads(1):
        assert faiss.omp_get_max_threads() == 1
    for start, stop in [(0, 700), (700, 2_999), (2_999, 3_000)]:
        part = searchtasks.search_range(sent, start, stop, 6, threads=1)  # as a Ray task runs it: one CPU, one thread
        assert faiss.omp_get_max_threads() == threads  # and this process's threads as they were
        np.testing.assert_array_equal(part.index, whole.index[start:stop])
        np.testing.assert_array_equal(part.similarity, whole.similarity[start:stop])
    # Filled into a folder a block at a time (five blocks here), merged into one lists file and
    # searched memory-mapped: the same search; what a task is sent is the file's path, not the
    # codes; and a worker that cannot reach the file says what to do.
    from clipguard.audit import indexfill
    from clipguard.audit import neighbours as neighbours_module

    monkeypatch.setattr(indexfill, "ADD_BLOCK", 700)
    capfd.readouterr()
    mapped = NeighbourIndex(VectorReader(3_000, 16, files), exact_limit=100, nprobe=10_000, index_dir=tmp_path / "ix")
    assert "resizing" not in capfd.readouterr().out  # faiss's own printf kept off the CLI's output
    assert Path(mapped.path).parent == tmp_path / "ix"
    assert sorted(p.name for p in (tmp_path / "ix").iterdir()) == sorted([Path(mapped.path).name, Path(mapped.path).name + ".ivfdata"])
    assert mapped._faiss.ntotal == 3_000 and mapped._faiss.invlists.compute_ntotal() == 3_000
    lists = faiss.downcast_InvertedLists(mapped._faiss.invlists)
    assert type(lists).__name__ == "OnDiskInvertedLists" and lists.prefetch_nthread == 0  # no threads beside the search's
    np.testing.assert_array_equal(mapped.self_neighbours(6).index, whole.index)
    np.testing.assert_array_equal(mapped.self_neighbours(6).similarity, whole.similarity)
    message = pickle.dumps(mapped)
    assert len(message) < len(pickle.dumps(index)) / 2 and mapped.path.encode() in message
    np.testing.assert_array_equal(pickle.loads(message).self_neighbours(6).similarity, whole.similarity)
    mapped.close()
    assert not any((tmp_path / "ix").iterdir())  # the index and its lists file
    monkeypatch.setattr(neighbours_module, "_OPENED", {})  # a process that has not opened it yet
    with pytest.raises(neighbours_module.SearchIndexUnreachable, match="storage every worker reaches"):
        pickle.loads(message)
    # Ranges sized for the workers: four per task that runs at once, so that none waits on one long range.
    assert Tasks().slots() == 1
    assert searchtasks.range_rows(100_000, slots=2) == 12_500
    assert searchtasks.range_rows(5_000, slots=2) == searchtasks.MIN_TASK_ROWS
    assert searchtasks.range_rows(10**8, slots=64) == searchtasks.SEARCH_TASK_ROWS
    monkeypatch.setattr(searchtasks, "SEARCH_TASK_ROWS", 512)
    progress = []
    joined = searchtasks.own_neighbours(index, 6, Tasks(), lambda done, total: progress.append((done, total)))
    np.testing.assert_array_equal(joined.index, whole.index)
    np.testing.assert_array_equal(joined.similarity, whole.similarity)
    assert progress == [(min(3_000, 512 * i), 3_000) for i in range(7)]
    # Into a folder, as the audit searches: the same neighbours, read back memory-mapped from files.
    on_disk = searchtasks.own_neighbours(index, 6, Tasks(), into=tmp_path / "nn")
    assert isinstance(on_disk.index, np.memmap) and not on_disk.index.flags.writeable
    assert sorted(p.name for p in (tmp_path / "nn").iterdir()) == ["index.npy", "similarity.npy"]
    np.testing.assert_array_equal(on_disk.index, whole.index)
    np.testing.assert_array_equal(on_disk.similarity, whole.similarity)


def test_the_driver_keeps_one_string_per_shard_not_one_per_pair(tmp_path):
    result, _ = _audit(World(4).clean(n=200), tmp_path)
    shards = result.pairs.shard
    assert sorted(set(shards)) == ["00000", "00001"]
    assert len(shards.names) == 2 and shards.codes.dtype == np.int32  # a number a pair into two names


def test_unknown_index_codes_are_a_clear_error(tmp_path):
    scores = World(9).clean(n=40).write(tmp_path / "w")
    with pytest.raises(AuditInputError, match="unknown index codes 'pq8'; choose one of sq8, pq, flat"):
        run_audit(AuditConfig(scores=scores, out=tmp_path / "a", index_codes="pq8"))


def test_missing_embeddings_name_the_command_that_writes_them(tmp_path):
    scores = World(9).clean(n=40).write(tmp_path / "w", embeddings=False)
    with pytest.raises(MissingEmbeddingsError, match="score .*--save-embeddings"):
        run_audit(AuditConfig(scores=scores, out=tmp_path / "a"))


def test_without_keywords_no_class_test_runs(tmp_path):
    scores = World(9).clean(n=80).fan_in("sheep", "aeroplane").write(tmp_path / "w")
    result = run_audit(AuditConfig(scores=scores, out=tmp_path / "a"))
    assert result.findings == [] and not result.classes_known
    assert result.signal_columns["image_fan_in"].max() == 7


def _padded_neighbours(rng, n: int, k: int):
    """Neighbours as a search returns them: some rows short of k (-1, -inf at the end), one empty."""
    from clipguard.audit.neighbours import Neighbours

    index = rng.integers(0, n, size=(n, k))
    similarity = np.sort(rng.uniform(0.5, 1.0, size=(n, k)).astype(np.float32), axis=1)[:, ::-1].copy()
    found = np.minimum(k, rng.integers(1, k + 3, size=n))
    found[7] = 0
    missing = np.arange(k)[None, :] >= found[:, None]
    index[missing], similarity[missing] = -1, -np.inf
    return Neighbours(index, similarity)


def test_density_in_blocks_is_the_row_by_row_definition():
    rng = np.random.default_rng(4)
    nn = _padded_neighbours(rng, 500, 6)
    distance = np.where(nn.index >= 0, 1.0 - nn.similarity.astype(np.float64), np.nan)
    kth = np.array([row[row == row][-1] if (row == row).any() else np.nan for row in distance])
    # The mean over the neighbours that have a k-distance (a neighbour without one is left out).
    around = [kth[ix[ix >= 0]] for ix in nn.index]
    around = np.array([np.mean(a[a == a]) if (a == a).any() else np.nan for a in around])
    for block in (1, 37, 500, 10_000):
        d = density(nn, block=block)
        np.testing.assert_array_equal(d.knn_distance, kth)
        np.testing.assert_allclose(d.outlier_ratio, (kth + 1e-6) / (around + 1e-6), rtol=1e-12)
        assert np.isnan(d.knn_distance[7]) and np.isnan(d.outlier_ratio[7])


def test_near_duplicate_groups_in_blocks_are_the_connected_components():
    from clipguard.audit.grouping import components
    from clipguard.audit.neighbours import Neighbours

    # Hand-made: 0-5-9 by a chain that crosses blocks, 3-8 and 8-1 (one root hooked twice in a
    # round), 4 alone although its edge to 2 is under the similarity, 6 and 7 alone.
    index = np.full((10, 2), -1)
    similarity = np.full((10, 2), -np.inf, np.float32)
    for row, col, other, sim in [(9, 0, 5, 0.99), (5, 0, 0, 0.97), (3, 0, 8, 0.98), (8, 0, 1, 0.96), (8, 1, 3, 0.98),
                                 (4, 0, 2, 0.5)]:
        index[row, col], similarity[row, col] = other, sim
    for block in (1, 3, 10):
        groups = components(10, Neighbours(index, similarity), 0.9, block=block)
        # numbered in order of first appearance: row 0's group is 0, row 1's is 1, ...
        assert groups.tolist() == [0, 1, 2, 1, 3, 0, 4, 5, 1, 0]
    # Random edges: the same as a plain union-find over every edge.
    rng = np.random.default_rng(5)
    nn = _padded_neighbours(rng, 2_000, 3)
    parent = list(range(2_000))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for r, c in zip(*np.nonzero((nn.similarity >= 0.9) & (nn.index >= 0))):
        a, b = root(r), root(int(nn.index[r, c]))
        parent[max(a, b)] = min(a, b)
    roots = [root(i) for i in range(2_000)]
    expected = np.unique(roots, return_inverse=True)[1]  # roots are each group's smallest row,
    for block in (64, 2_000):  # so numbering by root is numbering by first appearance
        np.testing.assert_array_equal(components(2_000, nn, 0.9, block=block), expected)
    assert 50 < len(np.unique(expected)) < 1_900  # groups of many sizes, not all one or all alone


def test_density_ranks_an_isolated_point_highest():
    rng = np.random.default_rng(1)
    crowd = rng.normal(size=(50, 8)) * 0.05 + np.eye(8)[0]
    loner = np.eye(8)[1][None]
    vectors = np.concatenate([crowd, loner]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    d = density(NeighbourIndex(vectors).self_neighbours(5))
    assert np.argmax(d.knn_distance) == 50 and np.argmax(d.outlier_ratio) == 50
    assert d.outlier_ratio[50] > 5 * np.median(d.outlier_ratio[:50])


def test_signals_registry_reads_any_signal_for_a_set_of_pairs(tmp_path):
    world = World(3).clean(n=80).fan_in("sheep", "aeroplane")
    result, tag = _audit(world, tmp_path)
    assert signal_names(Scope.pair) == ["cosine_distance"]
    assert {"image_fan_in", "caption_fan_out", "class_cell", "image_cluster", "image_lof", "text_lof"} <= set(signal_names())
    wanted = [(result.pairs.shard[i], result.pairs.key[i]) for i in np.flatnonzero(tag == "fan_in")] + [("00000", "nope")]
    fan_in = read_signal("image_fan_in", result.out, wanted)
    assert list(fan_in.values[:-1]) == [7.0] * 7 and np.isnan(fan_in.values[-1])
    assert fan_in.flags(5).tolist() == [True] * 7 + [False]
    distance = read_signal("cosine_distance", tmp_path / "w")
    assert len(distance) == len(result.pairs) and np.all((distance.values >= 0) & (distance.values <= 2))
    with pytest.raises(SignalError, match="unknown signal"):
        get_signal("nope")
    with pytest.raises(SignalError, match="clipguard audit"):
        read_signal("image_lof", tmp_path / "w")
    assert get_signal("class_cell").column == "class_cell_neglog10p"


def test_a_separate_clip_retrieval_folder_without_shard_or_sha_columns(tmp_path):
    """LAION's embedding folders: metadata with key and caption only, files numbered on their own."""
    import pyarrow.parquet as pq

    from clipguard.scoring.scorefiles import write_parquet

    world = World(3).clean(n=80).fan_in("sheep", "aeroplane")
    scores = world.write(tmp_path / "w")
    laion = tmp_path / "laion"
    for i, part in enumerate(sorted((scores / "metadata").glob("*.parquet"))):
        shard = part.stem.split("_", 1)[1]
        for kind in ("img_emb", "text_emb"):
            (laion / kind).mkdir(parents=True, exist_ok=True)
            (laion / kind / f"{kind}_{i:04d}.npy").write_bytes((scores / kind / f"{kind}_{shard}.npy").read_bytes())
        write_parquet(laion / "metadata" / f"metadata_{i:04d}.parquet", pq.read_table(part, columns=["key", "caption"]))
    result = run_audit(AuditConfig(scores=scores, out=tmp_path / "a", embeddings=laion, keywords=KEYWORDS))
    own = run_audit(AuditConfig(scores=scores, out=tmp_path / "b", keywords=KEYWORDS))
    assert sorted(zip(result.pairs.shard, result.pairs.key)) == sorted(zip(own.pairs.shard, own.pairs.key))
    # Without sha256 the exact image is the vector itself: the same fan-in of 7.
    assert result.signal_columns["image_fan_in"].max() == 7
    assert [(f.kind, f.goal) for f in result.findings] == [(f.kind, f.goal) for f in own.findings]
    assert isinstance(result.pairs.key[0], str) and result.pairs.key.array.type == pa.large_string()
    # A key scored in two shards cannot be placed by key alone: a clear error, naming it.
    score_files = sorted(p for p in scores.glob("*.parquet"))
    first, second = pq.read_table(score_files[0]), pq.read_table(score_files[1])
    twice = first.column("key")[0].as_py()
    keys = second.column("key").to_pylist()
    second = second.set_column(second.schema.get_field_index("key"), "key", pa.array([twice] + keys[1:], second.schema.field("key").type))
    pq.write_table(second, score_files[1])
    with pytest.raises(AuditInputError, match=f"key '{twice}' is in several scored shards"):
        run_audit(AuditConfig(scores=scores, out=tmp_path / "c", embeddings=laion, keywords=KEYWORDS))


def test_patch_signatures_that_are_not_integer_lists_are_a_clear_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    scores = World(14).clean(n=64, stock=0, boilerplate=0).write(tmp_path / "w")
    meta_path = sorted((scores / "metadata").glob("*.parquet"))[0]
    meta = pq.read_table(meta_path)
    bad = meta.set_column(meta.column_names.index("image_patches"), "image_patches",
                          pa.array(["checkerboard"] * meta.num_rows))
    pq.write_table(bad, meta_path)
    with pytest.raises(AuditInputError, match="image_patches holds string, not a list of integer signatures"):
        run_audit(AuditConfig(scores=scores, out=tmp_path / "a", keywords=KEYWORDS))


def test_faiss_missing_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    from clipguard.audit import MissingFaissError

    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    vectors = np.eye(20, dtype=np.float32)
    with pytest.raises(MissingFaissError, match=r"clipguard\[audit\]"):
        NeighbourIndex(vectors, exact_limit=10)
    assert NeighbourIndex(vectors).exact  # small data never needs it


@pytest.mark.parametrize("image_class, goal", [("aeroplane", "sheep:aeroplane"), (None, "sheep:*")])
def test_captions_added_to_images_their_other_captions_contradict(tmp_path, image_class, goal):
    result, tag = _audit(World(13).clean().relabel("sheep", image_class, images=12), tmp_path)
    planted = set(np.flatnonzero(tag == "relabel"))
    relabelled = [f for f in result.findings if f.kind == "relabelled_images"]
    assert relabelled and relabelled[0].goal == goal, [(f.kind, f.goal) for f in result.findings]
    assert relabelled[0].observed == 12 and set(relabelled[0].rows) == planted
    assert "captions of sheep added to 12 images" in relabelled[0].description


def test_a_relabelled_cell_takes_in_the_images_without_a_majority(tmp_path):
    # Six more aeroplane images carry an aeroplane, a third class's and a sheep caption: the cell
    # cannot count them (no majority says which was added), but once "sheep added to aeroplane
    # images" is established their sheep captions are explained by it; the third class's are not.
    result, tag = _audit(World(13).clean().relabel("sheep", "aeroplane", images=12, undecided=6), tmp_path)
    finding = next(f for f in result.findings if f.kind == "relabelled_images")
    assert finding.goal == "sheep:aeroplane" and finding.observed == 12
    assert set(finding.rows) == set(np.flatnonzero(np.isin(tag, ["relabel", "relabel_undecided"])))
    assert "6 more sheep caption(s) on images that also carry a aeroplane caption" in finding.description


def test_two_classes_on_the_same_images_without_a_majority(tmp_path):
    """Twelve aeroplane images whose two pages disagree (one aeroplane and one other caption each)
    get a sheep caption, far from the image as added captions are: no image has a majority, so no
    cell counts them, but sheep and aeroplane meet on twelve images where under one is expected."""
    world = World(13).clean()
    sheep, aeroplane = CLASSES.index("sheep"), CLASSES.index("aeroplane")
    for i in range(12):
        image = world.image(aeroplane)
        third = [c for c in range(len(CLASSES)) if c not in (sheep, aeroplane)][i % (len(CLASSES) - 2)]
        world.add(world.caption(aeroplane), image, world.text(aeroplane))
        world.add(world.caption(third), image, world.text(third))
        far = world._unit(world.text_centres[sheep] - image[0])
        world.add(world.caption(sheep), image, far, "added")
    result, tag = _audit(world, tmp_path)
    planted = tag == "added"
    found = [f for f in result.findings if f.kind == "relabelled_images"]
    assert [f.goal for f in found] == ["sheep:aeroplane"], [f.description for f in result.findings]
    assert "on 12 images that also carry captions of aeroplane" in found[0].description and found[0].expected < 1
    assert set(found[0].rows) == set(np.flatnonzero(planted))


def test_a_cell_under_a_significant_row_is_corrected_for_its_row_only():
    from clipguard.audit.detect import Finding, _test_children

    rows = np.arange(3)
    parent = Finding("relabelled_images", "sheep:*", "", 10, 0.1, 9.0, 8, rows)
    child = Finding("relabelled_images", "sheep:aeroplane", "", 7, 0.1, 5.5, 56, rows)  # raw 10^-7.25
    orphan = Finding("relabelled_images", "dog:cat", "", 7, 0.1, 5.0, 56, rows)
    found = [parent, child, orphan]
    _test_children(found, threshold=6.0, classes=8)
    assert found[1].tests == 7 and found[1].neglog10_p == pytest.approx(5.5 + np.log10(56) - np.log10(7))
    assert found[1].neglog10_p > 6.0  # a finding now
    assert found[2] is orphan  # no significant parent: the table-wide correction stands
    found = [Finding("relabelled_images", "sheep:*", "", 4, 0.1, 3.0, 8, rows), child]
    _test_children(found, threshold=6.0, classes=8)
    assert found[1] is child  # a parent that is not itself a finding opens nothing


def test_the_audit_states_what_each_stage_cost(tmp_path):
    import json

    result, _ = _audit(World(3).clean().fan_in("sheep", "aeroplane", captions=7), tmp_path)
    summary = json.loads((result.out / "findings.json").read_text())
    stages = summary["seconds"]
    for name in ("image neighbours and near-duplicate groups", "text neighbours and near-identical caption groups",
                 "test: class-pair cells", "test: image fan-in and clusters", "test: relabelled images",
                 "test: caption fan-out", "density (kNN distance, LOF)"):
        assert stages[name] >= 0, name
    assert stages == result.seconds and 0 < sum(stages.values()) < 60
    per = summary["seconds_per_10k_pairs"]
    assert per["test: class-pair cells"] == pytest.approx(stages["test: class-pair cells"] / len(result.pairs) * 1e4, abs=1e-3)
    assert "## Cost" in (result.out / "findings.md").read_text()


def test_relabel_column_marks_the_added_captions(tmp_path):
    result, tag = _audit(World(13).clean().relabel("sheep", "aeroplane", images=12), tmp_path)
    score = read_signal("relabelled_image", result.out, zip(result.pairs.shard, result.pairs.key)).values
    assert np.all(score[tag == "relabel"] > 6) and score[tag != "relabel"].max() < 6


def test_the_part_pass_and_the_neighbour_search_run_as_ray_tasks_with_the_same_result(tmp_path, monkeypatch):
    """`audit --executor ray`: each embedding part's pass and, above the exact limit, each range
    of the neighbour search is a task on a real local Ray; the findings and every signal column
    equal the in-process run's."""
    pytest.importorskip("ray")
    pytest.importorskip("faiss")
    from clipguard.audit import searchtasks
    from clipguard.scoring.run import ExecutorSpec

    world = World(9).clean(n=240).fan_in("sheep", "aeroplane", captions=7).cluster("banana", images=20)
    scores = world.write(tmp_path / "w", shards=3)
    # The counting pass in partitions of about 64 rows, each a task.
    faiss_path = dict(keywords=KEYWORDS, exact_limit=10, nprobe=10_000, partition_rows=64)
    here = run_audit(AuditConfig(scores=scores, out=tmp_path / "a1", **faiss_path))
    # Several ranges a side; and this process cannot search any of them, so the Ray run's
    # neighbours can only come from its workers (which import the real method).
    # The index is filled the same way: blocks of 64 rows, none read in this process.
    from clipguard.audit import indexfill

    monkeypatch.setattr(searchtasks, "SEARCH_TASK_ROWS", 64)
    monkeypatch.setattr(indexfill, "ADD_BLOCK", 64)
    monkeypatch.setattr(NeighbourIndex, "self_neighbours", lambda *a, **k: pytest.fail("searched in the driver"))
    monkeypatch.setattr(VectorReader, "block", lambda *a, **k: pytest.fail("filled or searched in the driver"))
    # Trained in a task too, with as many CPUs as the (one, local) node has, not the 16 it would like.
    from clipguard.audit import neighbours as neighbours_module
    from clipguard.executors.tasks import Tasks

    monkeypatch.setattr(neighbours_module, "_trained_faiss", lambda *a, **k: pytest.fail("trained in the driver"))
    monkeypatch.setattr(NeighbourIndex, "search", lambda *a, **k: pytest.fail("a group's centroid searched in the driver"))
    from clipguard.audit import counting

    monkeypatch.setattr(counting, "read_run", lambda *a, **k: pytest.fail("a counting partition worked in the driver"))
    asked, node_cpus = [], Tasks.node_cpus
    monkeypatch.setattr(Tasks, "node_cpus", lambda self, wanted: asked.append((wanted, node_cpus(self, wanted))) or asked[-1][1])
    parts, searched = [], {}
    on_ray = run_audit(AuditConfig(scores=scores, out=tmp_path / "a2", executor=ExecutorSpec(kind="ray", workers=2), **faiss_path),
                       on_part=lambda d, n: parts.append((d, n)),
                       on_search=lambda side, d, n: searched.setdefault(side, []).append((d, n)))
    assert parts[-1] == (3, 3) and not on_ray.exact_search
    assert asked == [(neighbours_module.TRAIN_CPUS, 2)] * 2  # one training task a side
    assert not (tmp_path / "a2" / ".search-index").exists()  # the index files the workers mapped are gone
    for side, count in (("image", len(np.unique(here.tables.image_id))), ("text", len(np.unique(here.tables.caption_id)))):
        assert len(searched[side]) == 1 - (-count // 64) and searched[side][-1] == (count, count)
    assert [(f.kind, f.goal, f.observed, list(f.rows)) for f in on_ray.findings] == \
        [(f.kind, f.goal, f.observed, list(f.rows)) for f in here.findings] and here.findings
    for name, values in here.signal_columns.items():
        np.testing.assert_array_equal(on_ray.signal_columns[name], values, err_msg=name)


def test_an_unreadable_embedding_part_is_a_clear_error_naming_its_file(tmp_path):
    """Each file of a part that cannot be read (or does not line up) stops the audit with the
    file's name, on Ray as here: the task's own error, not Ray's wrapper."""
    def fresh(name: str) -> Path:
        return World(15).clean(n=64, stock=0, boilerplate=0).write(tmp_path / name)

    scores = fresh("meta")
    meta_path = sorted((scores / "metadata").glob("*.parquet"))[0]
    meta_path.write_bytes(b"not parquet at all")
    with pytest.raises(AuditInputError, match=f"{meta_path.name} is not a readable Parquet file"):
        run_audit(AuditConfig(scores=scores, out=tmp_path / "a1", keywords=KEYWORDS))
    scores = fresh("vectors")
    image_path = sorted((scores / "img_emb").glob("*.npy"))[0]
    image_path.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(AuditInputError, match=f"{image_path.name} is not a readable .npy array"):
        run_audit(AuditConfig(scores=scores, out=tmp_path / "a2", keywords=KEYWORDS))
    scores = fresh("short")
    text_path = sorted((scores / "text_emb").glob("*.npy"))[0]
    np.save(text_path, np.load(text_path)[:-1])
    with pytest.raises(AuditInputError, match="are not aligned"):
        run_audit(AuditConfig(scores=scores, out=tmp_path / "a3", keywords=KEYWORDS))
    pytest.importorskip("ray")
    from clipguard.scoring.run import ExecutorSpec

    with pytest.raises(AuditInputError, match="are not aligned"):
        run_audit(AuditConfig(scores=scores, out=tmp_path / "a4", keywords=KEYWORDS, executor=ExecutorSpec(kind="ray", workers=1)))


def test_plurality_of_every_group_at_once_is_each_groups_plurality():
    from clipguard.audit.classes import NO_CLASS, grouped_plurality, plurality, votes_for

    rng = np.random.default_rng(6)
    group = rng.integers(0, 300, size=2_000)
    label = rng.integers(-1, 4, size=2_000)  # few classes: ties are common
    for min_votes in (1, 2, 4):
        whole = grouped_plurality(group, label, 310, min_votes)
        each = [plurality(label[group == g], 4, min_votes) for g in range(310)]
        assert whole.tolist() == each
    assert set(whole.tolist()) >= {NO_CLASS, 0, 1, 2, 3}
    assert grouped_plurality(np.zeros(0, np.int64), np.zeros(0, np.int64), 3).tolist() == [NO_CLASS] * 3
    # Votes kept as labels (a group's row of them) count as the dense tally did.
    voted = rng.integers(-1, 4, size=(300, 5)).astype(np.int8)
    tally = np.stack([(voted == c).sum(axis=1) for c in range(4)], axis=1)
    ask = rng.integers(-1, 4, size=2_000)
    expected = np.where(ask >= 0, tally[group, np.maximum(ask, 0)], 0)
    np.testing.assert_array_equal(votes_for(voted, group, ask, block=77), expected)


def test_the_index_trains_on_enough_vectors_for_its_lists(monkeypatch, capfd):
    from clipguard.audit import neighbours as neighbours_module
    from clipguard.audit.neighbours import TRAIN_PER_LIST, list_count, train_size

    assert (list_count(200_000), train_size(200_000)) == (1_788, 100_000)  # the benchmarks' size: the fixed sample
    assert (list_count(10**8), train_size(10**8)) == (40_000, 1_560_000)
    for n in (60_000, 410_000, 10**6, 10**7, 10**9):
        assert train_size(n) >= TRAIN_PER_LIST * list_count(n)
    assert train_size(1_000) == 1_000
    # faiss itself warns when a list has too few: with a fixed sample of 500, 3,000 vectors' 76 lists would.
    pytest.importorskip("faiss")
    monkeypatch.setattr(neighbours_module, "TRAIN_SAMPLE", 500)
    vectors = np.random.default_rng(7).normal(size=(3_000, 16)).astype(np.float32)
    capfd.readouterr()
    NeighbourIndex(vectors / np.linalg.norm(vectors, axis=1, keepdims=True), exact_limit=100)
    assert "please provide at least" not in capfd.readouterr().err


def test_signal_columns_are_gathered_a_shard_at_a_time_from_their_tables(tmp_path):
    import pyarrow.parquet as pq

    from clipguard.audit.columns import PairColumn, SignalColumns, class_names, per_group
    from clipguard.audit.inputs import Shards
    from clipguard.audit.output import write_signals

    shards = Shards(np.array(["shard-a", "shard-b"], dtype=object), np.array([1, 0, 1, 0, 0], np.int32))
    assert [(name, rows.tolist()) for name, rows in shards.rows()] == [("shard-a", [1, 3, 4]), ("shard-b", [0, 2])]
    # Numbered in another order than the names': the rows still come by name.
    renumbered = Shards(np.array(["shard-b", "shard-a"], dtype=object), np.array([0, 1, 0, 1, 1], np.int32))
    assert [(name, rows.tolist()) for name, rows in renumbered.rows()] == [("shard-a", [1, 3, 4]), ("shard-b", [0, 2])]
    assert renumbered[2] == "shard-b" and renumbered[[1, 0]].tolist() == ["shard-a", "shard-b"] and len(renumbered) == 5
    assert list(renumbered) == ["shard-b", "shard-a", "shard-b", "shard-a", "shard-a"]
    group = np.array([2, 0, 2, 1, 0])
    columns = SignalColumns({
        "fan_in": per_group(np.array([10, 20, 30]), group),
        "score": PairColumn(np.array([0.5, 1.5, 2.5, 3.5, 4.5])),
        "caption_class": class_names(["cat", "dog"], np.array([1, -1, 0, 0, -1])),
    })
    assert columns["fan_in"].tolist() == [30, 10, 30, 20, 10] and list(columns) == ["fan_in", "score", "caption_class"]
    assert columns["caption_class"].tolist() == ["dog", None, "cat", "cat", None]
    assert columns.rows("fan_in", np.array([3])).tolist() == [20]

    from clipguard.audit.inputs import Keys

    class Pairs:
        shard, key = shards, Keys(pa.array([f"k{i}" for i in range(5)], pa.large_string()))

    written = write_signals(tmp_path, Pairs(), columns)
    for path, rows in zip(written, ([1, 3, 4], [0, 2])):
        table = pq.read_table(path).to_pydict()
        assert table["key"] == [f"k{i}" for i in rows]
        assert table["fan_in"] == columns["fan_in"][rows].tolist()
        assert table["caption_class"] == columns["caption_class"][rows].tolist()
        np.testing.assert_allclose(table["score"], columns["score"][rows])
