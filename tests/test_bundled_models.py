"""The bundled tiny models: present, small, loadable by name, and as good as their sidecars say."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from clipguard.data.shardspec import resolve_shards
from clipguard.model import bundled
from clipguard.model.checkpoint import read_sidecar
from clipguard.model.loading import ModelSpec, load_model, sha256_file
from clipguard.synth.train_bundled import REQUIRED_AUC, REQUIRED_HIT_AT_10, embed_split, model_quality
from clipguard.synth.world import WorldSpec, generate_world

NAMES = ["clipguard-victim", "clipguard-reference"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared busy cores: spinning OpenMP threads cost far more than they give
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def test_shards(tmp_path_factory) -> str:
    """The default world's test split; each image depends only on (seed, split, index), so tiny
    train and reference splits leave it unchanged (checked against the sidecars' hashes)."""
    world = generate_world(tmp_path_factory.mktemp("world"), WorldSpec(train_images=1, reference_images=1))
    return world.shards("test")


@pytest.mark.parametrize("name", NAMES)
def test_bundled_model_separates_pairs_and_retrieves_images(name, test_shards):
    loaded = load_model(ModelSpec(name=name))
    assert loaded.info.weights_source == "bundled"
    assert loaded.info.architecture == bundled.resolve(name).architecture
    recorded = read_sidecar(bundled.resolve(name).weights)["bundled"]
    assert [sha256_file(Path(s.url)) for s in resolve_shards(test_shards)] == recorded["evaluated_on_shards_sha256"]

    quality = model_quality(embed_split(loaded, test_shards))
    assert quality.matched_auc >= REQUIRED_AUC >= 0.98
    assert quality.hit_at_10 >= REQUIRED_HIT_AT_10 >= 0.9
    assert quality.matched_auc == pytest.approx(recorded["evaluation"]["matched_auc"], abs=2e-3)
    assert quality.hit_at_10 == pytest.approx(recorded["evaluation"]["image_retrieval_hit"]["10"], abs=4e-3)


def test_bundled_weights_are_fp16_small_and_documented():
    total = 0
    for name in NAMES:
        path = bundled.resolve(name).weights
        total += path.stat().st_size
        with safe_open(str(path), framework="pt") as weights:
            dtypes = {weights.get_slice(k).get_dtype() for k in weights.keys()}
        assert dtypes == {"F16"}
        sidecar = read_sidecar(path)
        assert sidecar["bundled"]["trained_on_split"] == "reference"
        assert sidecar["bundled"]["train_seconds"] > 0
        assert sidecar["training"]["start_model"]["weights_source"] == "random"
        assert sidecar["training"]["complete"] is True
    assert total <= 21e6
