"""Throughput of `clipguard score` against open_clip's README loop and the matmul ceiling.

Everything is measured in one run on the same shards and the same ViT-B-32 (random weights:
speed does not depend on them):

- naive: the loop open_clip's README shows (PIL decode + preprocess per image, 77-token text,
  fp32, encode_image / encode_text under no_grad), same batch size;
- clipguard score at fp32 and at bf16 (the real pipeline: shard streaming, workers,
  trimmed text, content cache, Parquet output);
- the ceiling: pairs/s implied by the fp32 / bf16 matmul GFLOP/s measured in this run, at
  8.8 GFLOP (image) + 6.0 GFLOP (text, 77 tokens) per pair.

Usage: python benchmarks/bench_score.py [--pairs 384] [--batch-size 64] [--out bench-out]
Prints a table and writes bench-out/score_benchmark.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import tarfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image

from clipguard.data.shardspec import resolve_shards
from clipguard.model.checkpoint import save_checkpoint
from clipguard.model.loading import LoadedModel, ModelSpec, load_model
from clipguard.scoring.run import ScoreConfig, score_shards
from clipguard.scoring.scorefiles import read_scores
from clipguard.data.pairs import DecodeLimits

GFLOP_PER_PAIR = 8.8 + 6.0
WORDS = "a red small large dog sheep lamb plane jet on the left right grass field sky under over two three photo of".split()


def make_shards(folder: Path, pairs: int, per_shard: int, seed: int = 0) -> list[str]:
    """256 px JPEGs with smooth content (realistic JPEG sizes) and 8-20 word captions."""
    rng = np.random.default_rng(seed)
    words = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range((pairs + per_shard - 1) // per_shard):
        path = folder / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as archive:
            for i in range(min(per_shard, pairs - shard * per_shard)):
                key = f"{shard:05d}{i:04d}"
                base = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
                image = Image.fromarray(base).resize((256, 256), Image.BICUBIC)
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=90)
                caption = " ".join(words.choice(WORDS) for _ in range(words.randint(8, 20)))
                for ext, data in (("jpg", buffer.getvalue()), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def matmul_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 6) -> float:
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def naive_loop(loaded: LoadedModel, shard_paths: list[str], batch_size: int) -> tuple[float, dict]:
    """open_clip README style: decode every image, full 77-token text, fp32, one batch at a time."""
    model, preprocess, tokenizer = loaded.model, loaded.preprocess, loaded.tokenizer
    samples = []
    for path in shard_paths:
        with tarfile.open(path) as archive:
            members = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}
        for key in sorted({n.rsplit(".", 1)[0] for n in members}):
            samples.append((key, members[f"{key}.jpg"], members[f"{key}.txt"].decode()))
    started = time.perf_counter()
    similarities = {}
    for i in range(0, len(samples), batch_size):
        batch = samples[i : i + batch_size]
        images = torch.stack([preprocess(Image.open(io.BytesIO(jpg))) for _, jpg, _ in batch])
        text = tokenizer([caption for _, _, caption in batch])
        with torch.no_grad():
            image_features = model.encode_image(images)
            text_features = model.encode_text(text)
            image_features /= image_features.norm(dim=-1, keepdim=True)
            text_features /= text_features.norm(dim=-1, keepdim=True)
        for (key, _, _), value in zip(batch, (image_features * text_features).sum(-1).tolist()):
            similarities[key] = value
    return len(samples) / (time.perf_counter() - started), similarities


def clipguard_run(loaded: LoadedModel, shard_paths: list[str], out: Path, batch_size: int, workers: int) -> tuple[float, dict]:
    config = ScoreConfig(batch_size=batch_size, workers=workers, limits=DecodeLimits(draft_size=loaded.info.image_size))
    summary = score_shards(resolve_shards(shard_paths), loaded, out, config)
    table = read_scores(out)
    return summary.pairs_per_second, {k: 1 - d for k, d in zip(table.key, table.cosine_distance)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--per-shard", type=int, default=128)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args()

    shard_paths = make_shards(args.out / "shards", args.pairs, args.per_shard)
    torch.manual_seed(0)
    base = load_model(ModelSpec("ViT-B-32", pretrained=None))
    # Save once so that the fp32 and bf16 runs load bit-identical weights through the real path.
    checkpoint = save_checkpoint(base.model, args.out / "vit-b-32-random.safetensors", "ViT-B-32")
    fp32 = load_model(ModelSpec(str(checkpoint), precision="fp32"))
    bf16 = load_model(ModelSpec(str(checkpoint), precision="bf16"))

    results = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "pairs": args.pairs, "batch_size": args.batch_size, "workers": args.workers}
    results["matmul_gflops_fp32"] = matmul_gflops(torch.float32)
    results["matmul_gflops_bf16"] = matmul_gflops(torch.bfloat16)
    results["ceiling_pairs_per_s_fp32"] = results["matmul_gflops_fp32"] / GFLOP_PER_PAIR
    results["ceiling_pairs_per_s_bf16"] = results["matmul_gflops_bf16"] / GFLOP_PER_PAIR

    results["naive_fp32_pairs_per_s"], naive_sims = naive_loop(fp32, shard_paths, args.batch_size)
    for name, loaded in (("fp32", fp32), ("bf16", bf16)):
        out = args.out / f"scores-{name}"
        for stale in out.glob("*"):
            stale.unlink()
        rate, sims = clipguard_run(loaded, shard_paths, out, args.batch_size, args.workers)
        results[f"clipguard_{name}_pairs_per_s"] = rate
        results[f"clipguard_{name}_max_abs_delta_cos_vs_naive_fp32"] = max(abs(sims[k] - naive_sims[k]) for k in naive_sims)
    results["speedup_fp32_vs_naive"] = results["clipguard_fp32_pairs_per_s"] / results["naive_fp32_pairs_per_s"]
    results["speedup_bf16_vs_naive"] = results["clipguard_bf16_pairs_per_s"] / results["naive_fp32_pairs_per_s"]

    (args.out / "score_benchmark.json").write_text(json.dumps(results, indent=2) + "\n")
    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value:,.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
