"""Shared fixtures: offline by default, tiny real open_clip models, real tar shards."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("CLIPGUARD_CONSOLE_WIDTH", "200")
# Misbehaving test servers are retried at once, not after seconds of back-off.
os.environ.setdefault("CLIPGUARD_HTTP_BACKOFF", "0.01")

TINY_MODEL = "clipguard-tiny-victim"


def attack_summary(kind: str, rate: float, report) -> str:
    """One line per attacked model: the goal against the clean baseline, and utility against it."""
    goal, utility, clean = report.goals[0], report.utility, report.baseline_utility
    return (f"{kind}: phi={rate:.4f} Hit@10 {goal.model.hits[10]:.3f} (clean {goal.baseline.hits[10]:.3f}) "
            f"MinRank {goal.model.min_rank:.2f} (clean {goal.baseline.min_rank:.2f}) "
            f"TR@10 {utility.text_retrieval[10]:.3f} (clean {clean.text_retrieval[10]:.3f}) "
            f"IR@10 {utility.image_retrieval[10]:.3f} (clean {clean.image_retrieval[10]:.3f})")


def jpeg_bytes(seed: int, size: int = 72, quality: int = 90) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_shard(path: Path, samples: list[dict]) -> Path:
    """Write samples ({"__key__", ext: bytes|str}) with webdataset's own writer."""
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return path


def simple_samples(shard_index: int, n: int, seed: int = 0) -> list[dict]:
    return [
        {
            "__key__": f"{shard_index:05d}{i:04d}",
            "jpg": jpeg_bytes(seed * 100_000 + shard_index * 1000 + i),
            "txt": f"a photo of item {i} in shard {shard_index}",
        }
        for i in range(n)
    ]


@pytest.fixture(scope="session")
def tiny_loaded():
    from clipguard.model.loading import ModelSpec, load_model

    return load_model(ModelSpec(name=TINY_MODEL, pretrained=None))


@pytest.fixture
def three_shards(tmp_path: Path) -> Path:
    folder = tmp_path / "shards"
    for s in range(3):
        write_shard(folder / f"{s:05d}.tar", simple_samples(s, 20))
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_loaded) -> Path:
    """The tiny model saved as a clipguard checkpoint, so CLI runs load identical weights."""
    from clipguard.model.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    return save_checkpoint(tiny_loaded.model, path, TINY_MODEL, {"note": "random weights for tests"})
