"""`score --from-embeddings` on clip-retrieval folders written by `--save-embeddings` from real
tiny shards, and on a DataComp-layout folder written here; `--save-embeddings` read by faiss."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from clipguard.cli.main import app
from clipguard.data.shardspec import resolve_shards
from clipguard.errors import ClipguardError, MixedModelsError
from clipguard.scoring.from_embeddings import EmbeddingInputError, EmbeddingSource, score_from_embeddings
from clipguard.scoring.run import ScoreConfig, load_manifest, score_shards
from clipguard.scoring.scorefiles import SCORE_SCHEMA, read_scores
from conftest import simple_samples, write_shard

runner = CliRunner()


def rows_by_key(folder: Path) -> dict[tuple[str, str], dict]:
    table = pa.concat_tables([pq.read_table(p) for p in sorted(Path(folder).glob("*.parquet"))])
    return {(r["shard"], r["key"]): r for r in table.to_pylist()}


@pytest.fixture
def scored_with_embeddings(tmp_path, tiny_loaded) -> Path:
    """Two real shards, one with an undecodable image, scored with --save-embeddings."""
    first = simple_samples(0, 9)
    first.insert(4, {"__key__": "broken", "jpg": b"not a jpeg", "txt": "a broken image"})
    write_shard(tmp_path / "shards" / "00000.tar", first)
    write_shard(tmp_path / "shards" / "00001.tar", simple_samples(1, 7))
    out = tmp_path / "scores"
    score_shards(resolve_shards(str(tmp_path / "shards")), tiny_loaded, out, ScoreConfig(batch_size=4, save_embeddings=True))
    return out


def test_clip_retrieval_embeddings_give_the_shards_scores_within_fp16_error(tmp_path, scored_with_embeddings):
    summary = score_from_embeddings(EmbeddingSource(scored_with_embeddings, "clip-retrieval"), tmp_path / "again")
    from_shards, from_embeddings = rows_by_key(scored_with_embeddings), rows_by_key(tmp_path / "again")
    ok = {k for k, r in from_shards.items() if r["status"] == "ok"}
    assert len(from_shards) == 17 and len(ok) == 16
    # The error row has no vectors (it is listed in embeddings_left_out/), so only ok rows come back.
    assert set(from_embeddings) == ok and summary.pairs == 16 and summary.ok == 16
    worst = max(abs(from_shards[k]["cosine_similarity"] - from_embeddings[k]["cosine_similarity"]) for k in ok)
    assert worst < 2e-3  # fp16 storage: ~1e-3 relative per component
    assert all(from_embeddings[k]["image_sha256"] == from_shards[k]["image_sha256"] for k in ok)
    assert pq.read_schema(tmp_path / "again" / "00000.parquet").names == SCORE_SCHEMA.names

    manifest = load_manifest(tmp_path / "again")
    assert manifest["complete"] and manifest["shards_done"] == 2 and manifest["pairs"] == 16
    assert manifest["fingerprint"]["architecture"] == "precomputed:clip-retrieval:unknown"
    assert manifest["fingerprint"]["weights_sha256"] is None

    rerun = score_from_embeddings(EmbeddingSource(scored_with_embeddings, "clip-retrieval"), tmp_path / "again")
    assert [p.skipped_on_resume for p in rerun.parts] == [True, True] and rerun.pairs_scored_this_run == 0
    assert rows_by_key(tmp_path / "again") == from_embeddings


def test_precomputed_scores_never_share_a_folder_with_a_models(tmp_path, scored_with_embeddings):
    # Into the folder the model wrote: refused, naming the model already there.
    with pytest.raises(ClipguardError, match="new --out"):
        score_from_embeddings(EmbeddingSource(scored_with_embeddings, "clip-retrieval"), scored_with_embeddings)
    # Folders merged by copying: the one-model check names both.
    score_from_embeddings(EmbeddingSource(scored_with_embeddings, "clip-retrieval", "b32-laion"), tmp_path / "pre")
    merged = tmp_path / "merged"
    merged.mkdir()
    for name in ("00000.parquet", "00000_stats.json"):
        shutil.copy(tmp_path / "pre" / name, merged / name)
    for name in ("00001.parquet", "00001_stats.json"):
        shutil.copy(scored_with_embeddings / name, merged / name)
    with pytest.raises(MixedModelsError, match="precomputed:clip-retrieval:b32-laion"):
        load_manifest(merged)


def test_faiss_indexes_one_image_vector_per_scored_pair(scored_with_embeddings):
    faiss = pytest.importorskip("faiss")
    files = sorted((scored_with_embeddings / "img_emb").glob("img_emb_*.npy"))
    vectors = np.concatenate([np.load(f) for f in files]).astype(np.float32)
    metadata = pa.concat_tables(sorted_tables(scored_with_embeddings / "metadata"))
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    assert index.ntotal == 16 == metadata.num_rows  # 17 pairs, one undecodable: never a NaN vector
    assert len(list((scored_with_embeddings / "text_emb").glob("*.npy"))) == 2
    _, nearest = index.search(vectors[:5], 1)
    assert nearest[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert "broken" not in metadata.column("key").to_pylist()


def sorted_tables(folder: Path) -> list[pa.Table]:
    return [pq.read_table(p) for p in sorted(folder.glob("metadata_*.parquet"))]


def unit(rng, n: int, dim: int) -> np.ndarray:
    v = rng.normal(size=(n, dim))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def write_datacomp_shard(folder: Path, name: str, n: int, seed: int) -> dict[str, np.ndarray]:
    """A DataComp pool shard: the .npz of B/32 and L/14 features and the .parquet with uids."""
    rng = np.random.default_rng(seed)
    arrays = {"b32_img": unit(rng, n, 512), "b32_txt": unit(rng, n, 512), "l14_img": unit(rng, n, 768), "l14_txt": unit(rng, n, 768)}
    arrays["b32_txt"][:n // 2] = arrays["b32_img"][:n // 2] * 3.0 + 0.1 * arrays["b32_txt"][:n // 2]  # not unit length
    arrays["b32_img"][1] = 0.0
    arrays["b32_txt"][2, 7] = np.nan
    stored = {k: v.astype(np.float16) for k, v in arrays.items()}
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / f"{name}.npz", **stored)
    pq.write_table(pa.table({
        "uid": [f"{seed:08x}{i:024x}" for i in range(n)],
        "url": [f"http://example.com/{name}/{i}.jpg" for i in range(n)],
        "text": [f"caption {i}" for i in range(n)],
        "original_width": pa.array([256] * n, pa.int64()),
    }), folder / f"{name}.parquet")
    return stored


def expected_similarity(image: np.ndarray, text: np.ndarray) -> np.ndarray:
    a, b = image.astype(np.float64), text.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_datacomp_pool_scores_with_uids_urls_and_bad_vectors_as_error_rows(tmp_path):
    pool = tmp_path / "pool"
    shards = {name: write_datacomp_shard(pool, name, 40, seed) for seed, name in enumerate(("00000000", "00000001"))}
    summary = score_from_embeddings(EmbeddingSource(pool, "datacomp"), tmp_path / "b32")
    assert summary.pairs == 80 and summary.ok == 76 and summary.errors_by_reason == {"bad_embedding": 4}
    table = pq.read_table(tmp_path / "b32" / "00000000.parquet").to_pylist()
    expected = expected_similarity(shards["00000000"]["b32_img"], shards["00000000"]["b32_txt"])
    assert [r["uid"] for r in table] == [f"{0:08x}{i:024x}" for i in range(40)]
    assert [r["key"] for r in table] == [r["uid"] for r in table]  # no key column: the uid is the key
    assert table[3]["url"] == "http://example.com/00000000/3.jpg" and table[3]["shard"] == "00000000"
    assert table[1]["status"] == "error" and table[1]["error"] == "bad_embedding: image vector is zero"
    assert table[2]["error"] == "bad_embedding: text vector holds NaN or infinite values"
    assert table[1]["cosine_distance"] is None
    ok = [i for i in range(40) if i not in (1, 2)]
    assert max(abs(table[i]["cosine_similarity"] - expected[i]) for i in ok) < 1e-5  # renormalised
    assert all(abs(table[i]["cosine_distance"] - (1 - expected[i])) < 1e-5 for i in ok)
    scores = read_scores(tmp_path / "b32")
    assert len(scores) == 80 and int(scores.ok.sum()) == 76

    l14 = score_from_embeddings(EmbeddingSource(pool, "datacomp", "l14"), tmp_path / "l14")
    assert l14.ok == 80
    rows = pq.read_table(tmp_path / "l14" / "00000001.parquet").column("cosine_similarity").to_numpy()
    assert np.allclose(rows, expected_similarity(shards["00000001"]["l14_img"], shards["00000001"]["l14_txt"]), atol=1e-5)
    assert load_manifest(tmp_path / "l14")["fingerprint"]["architecture"] == "precomputed:datacomp:l14"


def test_a_rewritten_input_file_is_scored_again(tmp_path):
    pool = tmp_path / "pool"
    write_datacomp_shard(pool, "00000000", 10, 0)
    score_from_embeddings(EmbeddingSource(pool, "datacomp"), tmp_path / "out")
    write_datacomp_shard(pool, "00000000", 12, 5)
    seen = []
    again = score_from_embeddings(EmbeddingSource(pool, "datacomp"), tmp_path / "out", progress=seen.append)
    assert [p.skipped_on_resume for p in again.parts] == [False] and again.pairs == 12
    assert [(e.shards_done, e.shards_total, e.pairs_done) for e in seen] == [(1, 1, 12)]
    # Another pool's file of the same name is not taken for this one's.
    write_datacomp_shard(tmp_path / "other", "00000000", 12, 5)
    with pytest.raises(ClipguardError, match="a different 00000000"):
        score_from_embeddings(EmbeddingSource(tmp_path / "other", "datacomp"), tmp_path / "out")


def test_misaligned_and_missing_inputs_are_clear_errors(tmp_path, scored_with_embeddings):
    broken = tmp_path / "broken"
    shutil.copytree(scored_with_embeddings, broken, ignore=shutil.ignore_patterns("*.parquet", "*.json"))
    shutil.copytree(scored_with_embeddings / "metadata", broken / "metadata", dirs_exist_ok=True)
    meta = broken / "metadata" / "metadata_00001.parquet"
    pq.write_table(pq.read_table(meta).slice(1), meta)
    with pytest.raises(EmbeddingInputError, match=r"rows do not line up: 7 image vectors, 7 text vectors, 6 metadata rows"):
        score_from_embeddings(EmbeddingSource(broken, "clip-retrieval"), tmp_path / "out")

    (broken / "text_emb" / "text_emb_00001.npy").unlink()
    with pytest.raises(EmbeddingInputError, match=r"text_emb_00001.npy is missing"):
        score_from_embeddings(EmbeddingSource(broken, "clip-retrieval"), tmp_path / "out")

    pool = tmp_path / "pool"
    write_datacomp_shard(pool, "00000000", 4, 0)
    np.savez(pool / "00000000.npz", b32_img=np.ones((4, 8), np.float16), b32_txt=np.ones((4, 9), np.float16))
    with pytest.raises(EmbeddingInputError, match="8 dims, text vectors 9"):
        score_from_embeddings(EmbeddingSource(pool, "datacomp"), tmp_path / "out")
    with pytest.raises(EmbeddingInputError, match="has no l14_img, l14_txt"):
        score_from_embeddings(EmbeddingSource(pool, "datacomp", "l14"), tmp_path / "out")
    with pytest.raises(EmbeddingInputError, match="neither"):
        EmbeddingSource(pool, "datacomp", "h14")
    (pool / "00000000.parquet").unlink()
    with pytest.raises(EmbeddingInputError, match="00000000.parquet is missing"):
        score_from_embeddings(EmbeddingSource(pool, "datacomp"), tmp_path / "out")
    # A refused part is left pending, never complete; the parts before it are finished units.
    manifest = load_manifest(tmp_path / "out")
    assert manifest["pending_shards"] == ["00000000", "00001"] and manifest["shards_done"] == 1
    assert sorted(p.name for p in (tmp_path / "out").glob("*.parquet")) == ["00000.parquet"]


def test_cli_scores_embeddings_and_refuses_unclear_requests(tmp_path):
    pool = tmp_path / "pool"
    write_datacomp_shard(pool, "00000000", 6, 0)
    result = runner.invoke(app, ["score", "--from-embeddings", str(pool), "--layout", "datacomp", "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert "6 (4 ok)" in result.output and "bad_embedding: 2" in result.output
    both = runner.invoke(app, ["score", str(pool), "--from-embeddings", str(pool), "--out", str(tmp_path / "t")])
    assert both.exit_code == 2 and "not both" in both.output
    neither = runner.invoke(app, ["score", "--out", str(tmp_path / "t")])
    assert neither.exit_code == 2 and "give SHARDS" in neither.output
    empty = runner.invoke(app, ["score", "--from-embeddings", str(tmp_path), "--out", str(tmp_path / "t")])
    assert empty.exit_code == 2 and "holds no clip-retrieval embeddings" in empty.output


def test_scores_do_not_depend_on_the_block_size_and_bad_rows_are_found_in_any_block(monkeypatch):
    from clipguard.scoring import from_embeddings

    rng = np.random.default_rng(3)
    image, text = unit(rng, 1000, 32).astype(np.float16), unit(rng, 1000, 32).astype(np.float16)
    image[700] = 0.0
    text[65, 3] = np.inf
    one_block, one_block_errors = from_embeddings.pair_similarity(image, text)  # one block of 1000 rows
    monkeypatch.setattr(from_embeddings, "BLOCK_VALUES", 64 * 32)  # 64 rows of 32 dims: 16 blocks, the last one short
    blocks, block_errors = from_embeddings.pair_similarity(image, text, threads=2)
    assert np.array_equal(one_block, blocks, equal_nan=True) and one_block_errors == block_errors
    assert [i for i, e in enumerate(block_errors) if e] == [65, 700] and np.isnan(blocks[[65, 700]]).all()
    assert block_errors[65] == "bad_embedding: text vector holds NaN or infinite values"
    assert block_errors[700] == "bad_embedding: image vector is zero"
    ok = np.isfinite(blocks)
    assert np.allclose(blocks[ok], expected_similarity(image, text)[ok], atol=1e-6)
    one_thread, one_thread_errors = from_embeddings.pair_similarity(image, text, threads=1)
    assert np.array_equal(one_thread, blocks, equal_nan=True) and one_thread_errors == block_errors
    as_float32, _ = from_embeddings.pair_similarity(image.astype(np.float32), text.astype(np.float32))
    assert np.array_equal(as_float32, blocks, equal_nan=True)  # float16 is widened exactly


def test_vectors_that_are_not_floating_point_are_refused(tmp_path):
    pool = tmp_path / "pool"
    write_datacomp_shard(pool, "00000000", 5, 0)
    np.savez(pool / "00000000.npz", b32_img=np.ones((5, 8), np.float16), b32_txt=np.ones((5, 8), np.int16))
    with pytest.raises(EmbeddingInputError, match="text vectors are int16, not floating point"):
        score_from_embeddings(EmbeddingSource(pool, "datacomp"), tmp_path / "out")


def test_a_metadata_row_without_a_key_is_an_error_row_not_a_score(tmp_path):
    pool = tmp_path / "pool"
    write_datacomp_shard(pool, "00000000", 6, 0)
    meta = pq.read_table(pool / "00000000.parquet")
    uids = meta.column("uid").to_pylist()
    uids[4] = None
    pq.write_table(meta.set_column(0, "uid", pa.array(uids, pa.string())), pool / "00000000.parquet")
    summary = score_from_embeddings(EmbeddingSource(pool, "datacomp"), tmp_path / "out")
    table = pq.read_table(tmp_path / "out" / "00000000.parquet").to_pylist()
    assert len(table) == 6 and table[4]["status"] == "error" and table[4]["error"].startswith("no_key:")
    assert table[4]["cosine_distance"] is None and summary.errors_by_reason == {"bad_embedding": 2, "no_key": 1}
