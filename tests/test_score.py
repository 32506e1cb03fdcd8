"""The score pipeline end to end on real tar shards and a real (tiny) open_clip model."""

from __future__ import annotations

import functools
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from clipguard.cli.main import app
from clipguard.data.shardspec import resolve_shards
from clipguard.model.encoding import encode_texts, tokenize
from clipguard.scoring.chunks import ShardChunks
from clipguard.scoring.embedder import EmbeddingCache, ShardEmbedder
from clipguard.scoring.run import load_manifest, ScoreConfig, score_shards
from clipguard.scoring.scorefiles import read_scores
from conftest import jpeg_bytes, simple_samples, write_shard

runner = CliRunner()


def distances(folder: Path) -> dict[tuple[str, str], float]:
    table = read_scores(folder)
    return {(s, k): d for s, k, d in zip(table.shard, table.key, table.cosine_distance)}


def test_score_writes_one_parquet_per_shard_and_a_manifest(tmp_path, three_shards, tiny_loaded):
    summary = score_shards(resolve_shards(str(three_shards)), tiny_loaded, tmp_path / "out", ScoreConfig(batch_size=8))
    assert summary.pairs == 60 and summary.ok == 60
    files = sorted(p.name for p in (tmp_path / "out").glob("*.parquet"))
    assert files == ["00000.parquet", "00001.parquet", "00002.parquet"]
    table = pq.read_table(tmp_path / "out" / "00001.parquet")
    assert table.column_names == [
        "key", "shard", "cosine_similarity", "cosine_distance", "status", "error", "caption_tokens",
        "caption_truncated", "caption_invalid_utf8", "caption_clipped", "image_sha256",
        "uid", "url", "source_status", "source_error",
    ]
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == [f"00001{i:04d}" for i in range(20)]
    assert all(abs(r["cosine_distance"] - (1 - r["cosine_similarity"])) < 1e-6 for r in rows)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["pairs"] == 60
    assert manifest["model"]["architecture"] == "clipguard-tiny-victim"
    assert manifest["model"]["preprocess"]["size"] == [64, 64]
    assert manifest["batch_size"] == 8 and manifest["truncated_shards"] == []
    assert [s["samples"] for s in manifest["shards"]] == [20, 20, 20]


def test_scores_match_a_plain_open_clip_loop(tmp_path, three_shards, tiny_loaded):
    """The optimised pipeline computes exactly what open_clip's README loop computes."""
    from PIL import Image
    import io
    import tarfile

    score_shards(resolve_shards(str(three_shards)), tiny_loaded, tmp_path / "out", ScoreConfig(batch_size=7))
    got = distances(tmp_path / "out")
    model, preprocess, tokenizer = tiny_loaded.model, tiny_loaded.preprocess, tiny_loaded.tokenizer
    with tarfile.open(three_shards / "00002.tar") as archive:
        members = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}
    keys = sorted({name.split(".")[0] for name in members})
    images = torch.stack([preprocess(Image.open(io.BytesIO(members[f"{k}.jpg"]))) for k in keys])
    texts = tokenizer([members[f"{k}.txt"].decode() for k in keys])
    with torch.no_grad():
        image_features = model.encode_image(images, normalize=True)
        text_features = model.encode_text(texts, normalize=True)
    expected = 1 - (image_features * text_features).sum(-1)
    for key, value in zip(keys, expected.tolist()):
        assert abs(got[("00002", key)] - value) < 1e-5


def test_trimmed_text_forward_equals_full_context(tiny_loaded):
    captions = ["a dog", "two small red lambs on the left over a striped background", "x " * 40]
    tokens = tokenize(tiny_loaded.tokenizer, captions).tokens
    trimmed = encode_texts(tiny_loaded, tokens, trim=True)
    full = encode_texts(tiny_loaded, tokens, trim=False)
    assert torch.max(torch.abs(trimmed - full)) < 1e-5


def test_trimmed_text_forward_on_vit_b_32():
    from clipguard.model.loading import ModelSpec, load_model

    torch.manual_seed(0)
    loaded = load_model(ModelSpec("ViT-B-32", pretrained=None))
    tokens = tokenize(loaded.tokenizer, ["a photo of a sheep", "an aeroplane on the runway at night"]).tokens
    assert torch.max(torch.abs(encode_texts(loaded, tokens, trim=True) - encode_texts(loaded, tokens, trim=False))) < 1e-5


@pytest.mark.parametrize("precision", ["bf16"])
def test_reduced_precision_stays_close_to_fp32(tmp_path, three_shards, tiny_loaded, tiny_checkpoint, precision):
    from clipguard.model.loading import ModelSpec, load_model

    reduced = load_model(ModelSpec(str(tiny_checkpoint), precision=precision))
    assert next(reduced.model.parameters()).dtype == getattr(torch, {"bf16": "bfloat16"}[precision])
    score_shards(resolve_shards(str(three_shards)), tiny_loaded, tmp_path / "fp32", ScoreConfig(batch_size=16))
    score_shards(resolve_shards(str(three_shards)), reduced, tmp_path / precision, ScoreConfig(batch_size=16))
    a, b = distances(tmp_path / "fp32"), distances(tmp_path / precision)
    assert max(abs(a[k] - b[k]) for k in a) <= 0.01
    assert any(a[k] != b[k] for k in a), "reduced precision must actually be used"


def test_identical_images_are_embedded_once(tmp_path, tiny_loaded):
    shared = jpeg_bytes(7)
    samples = [{"__key__": f"{i:09d}", "jpg": shared, "txt": f"caption {i}"} for i in range(12)]
    samples += [{"__key__": f"{100 + i:09d}", "jpg": jpeg_bytes(100 + i), "txt": "caption 0"} for i in range(4)]
    shard = write_shard(tmp_path / "dup.tar", samples)
    dataset = ShardChunks(resolve_shards(str(shard)), tiny_loaded.preprocess, tiny_loaded.tokenizer, 8, ScoreConfig().limits)
    embedder, cache = ShardEmbedder(tiny_loaded, batch_size=8), EmbeddingCache()
    runs = [embedder.embed(chunk, cache) for chunk in dataset if chunk.ok_index]
    assert sum(r.images_embedded for r in runs) == 1 + 4
    assert sum(r.texts_embedded for r in runs) == 12  # "caption 0" repeats
    # Cached rows get the same embedding as a fresh computation would.
    fresh = score_shards(resolve_shards(str(shard)), tiny_loaded, tmp_path / "out", ScoreConfig(batch_size=1))
    cached = score_shards(resolve_shards(str(shard)), tiny_loaded, tmp_path / "out2", ScoreConfig(batch_size=16))
    a, b = distances(tmp_path / "out"), distances(tmp_path / "out2")
    assert fresh.pairs == cached.pairs == 16
    assert max(abs(a[k] - b[k]) for k in a) < 1e-5


def test_workers_give_the_same_scores_as_in_process(tmp_path, three_shards, tiny_loaded):
    spec = resolve_shards(str(three_shards))
    score_shards(spec, tiny_loaded, tmp_path / "w0", ScoreConfig(batch_size=8, workers=0))
    score_shards(spec, tiny_loaded, tmp_path / "w2", ScoreConfig(batch_size=8, workers=2))
    assert distances(tmp_path / "w0") == distances(tmp_path / "w2")


class Interrupt(Exception):
    pass


def test_a_killed_run_resumes_to_the_same_scores(tmp_path, three_shards, tiny_loaded):
    spec = resolve_shards(str(three_shards))
    config = ScoreConfig(batch_size=8, save_embeddings=True)
    score_shards(spec, tiny_loaded, tmp_path / "clean", config)

    def die_in_second_shard(event):
        if event.shards_done == 1 and event.pairs_done > 28:
            raise Interrupt

    with pytest.raises(Interrupt):
        score_shards(spec, tiny_loaded, tmp_path / "killed", config, progress=die_in_second_shard)
    assert sorted(p.name for p in (tmp_path / "killed").glob("*.parquet")) == ["00000.parquet"]
    assert not list((tmp_path / "killed").glob("*.tmp"))
    # The folder says what is done from its per-shard files, whatever the run got to write last.
    manifest = load_manifest(tmp_path / "killed")
    assert manifest["complete"] is False and manifest["shards_done"] == 1
    assert manifest["pending_shards"] == ["00001", "00002"]

    resumed = score_shards(spec, tiny_loaded, tmp_path / "killed", config)
    assert [r.skipped_on_resume for r in resumed.shards] == [True, False, False]
    assert resumed.pairs == 60 and resumed.pairs_scored_this_run == 40
    assert distances(tmp_path / "clean") == distances(tmp_path / "killed")
    for name in ("00000", "00001", "00002"):
        for kind in ("img_emb", "text_emb"):
            a = np.load(tmp_path / "clean" / kind / f"{kind}_{name}.npy")
            b = np.load(tmp_path / "killed" / kind / f"{kind}_{name}.npy")
            assert a.dtype == np.float16 and np.array_equal(a, b)


def test_saved_embeddings_follow_row_order(tmp_path, tiny_loaded):
    samples = simple_samples(0, 5)
    samples.insert(2, {"__key__": "broken", "jpg": b"nope", "txt": "bad image"})
    shard = write_shard(tmp_path / "s.tar", samples)
    score_shards(resolve_shards(str(shard)), tiny_loaded, tmp_path / "out", ScoreConfig(batch_size=4, save_embeddings=True))
    out = tmp_path / "out"
    rows = pq.read_table(out / "s.parquet").to_pylist()
    image = np.load(out / "img_emb" / "img_emb_s.npy").astype(np.float32)
    text = np.load(out / "text_emb" / "text_emb_s.npy").astype(np.float32)
    metadata = pq.read_table(out / "metadata" / "metadata_s.parquet").to_pylist()
    left_out = pq.read_table(out / "embeddings_left_out" / "left_out_s.parquet").to_pylist()
    # clip-retrieval's layout: the error row is left out of the vectors and listed beside them.
    assert rows[2]["status"] == "error" and len(rows) == 6
    assert len(image) == len(text) == len(metadata) == 5 and np.isfinite(image).all()
    assert [m["key"] for m in metadata] == [r["key"] for r in rows if r["status"] == "ok"]
    assert [(o["key"], o["error"]) for o in left_out] == [("broken", rows[2]["error"])]
    by_key = {r["key"]: r for r in rows}
    for i, meta in enumerate(metadata):
        assert abs(float(image[i] @ text[i]) - by_key[meta["key"]]["cosine_similarity"]) < 5e-3


def test_jpeg_draft_mode_keeps_scores_close(tmp_path, tiny_loaded):
    from clipguard.data.pairs import DecodeLimits

    samples = [{"__key__": f"{i:09d}", "jpg": jpeg_bytes(i, size=512), "txt": f"large image {i}"} for i in range(6)]
    shard = resolve_shards(str(write_shard(tmp_path / "big.tar", samples)))
    score_shards(shard, tiny_loaded, tmp_path / "full", ScoreConfig())
    score_shards(shard, tiny_loaded, tmp_path / "draft", ScoreConfig(limits=DecodeLimits(draft_size=64)))
    a, b = distances(tmp_path / "full"), distances(tmp_path / "draft")
    assert max(abs(a[k] - b[k]) for k in a) < 0.02
    assert a != b  # draft decoding really happened


@pytest.fixture
def http_server(three_shards):
    handler = functools.partial(QuietHandler, directory=str(three_shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_http_shards_score_like_local_ones(tmp_path, three_shards, http_server, tiny_loaded):
    remote = resolve_shards([f"{http_server}/{{00000..00002}}.tar"])
    score_shards(remote, tiny_loaded, tmp_path / "remote", ScoreConfig(batch_size=8))
    score_shards(resolve_shards(str(three_shards)), tiny_loaded, tmp_path / "local", ScoreConfig(batch_size=8))
    assert distances(tmp_path / "remote") == distances(tmp_path / "local")


def test_http_404_is_recorded_not_fatal(tmp_path, http_server, tiny_loaded):
    summary = score_shards(resolve_shards([f"{http_server}/missing.tar"]), tiny_loaded, tmp_path / "o", ScoreConfig())
    assert summary.pairs == 0 and "404" in summary.shards[0].read_error


def test_cli_score_runs_and_resumes(tmp_path, three_shards, tiny_checkpoint):
    args = ["score", str(three_shards), "--out", str(tmp_path / "out"), "--model", str(tiny_checkpoint), "--workers", "0"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "60 (60 ok)" in first.output and "pairs/s" in first.output
    second = runner.invoke(app, args)
    assert second.exit_code == 0 and "3 already complete" in second.output


def test_cli_nonexistent_path_exits_2(tmp_path, tiny_checkpoint):
    result = runner.invoke(app, ["score", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--model", str(tiny_checkpoint)])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_cli_refuses_to_mix_models_in_one_folder(tmp_path, three_shards, tiny_checkpoint):
    out = str(tmp_path / "out")
    assert runner.invoke(app, ["score", str(three_shards), "--out", out, "--model", str(tiny_checkpoint)]).exit_code == 0
    other = runner.invoke(app, ["score", str(three_shards), "--out", out, "--model", str(tiny_checkpoint), "--precision", "bf16"])
    assert other.exit_code == 2 and "different model" in other.output
