"""The Ray executor with N workers against the local executor, same machine, shards and model.

Both run in this one process, one after the other, on the same shards and the same weights file
(ViT-B-32 at bf16 by default, random weights saved once: speed does not depend on them):

- local: `score_shards` with the default local executor (--local-workers DataLoader processes
  decode while this process embeds with all of torch's threads);
- ray: `--executor ray` with --ray-workers actors on a local Ray instance (one CPU and one
  inference thread each), Ray's start-up and each actor's model load counted in its time.

Pairs/s is pairs / wall seconds of the whole `score_shards` call. The two score folders are then
compared (max |difference| of cosine similarity; byte-equal only at equal thread counts).

Usage: python benchmarks/bench_executors.py [--model ViT-B-32] [--pairs 256] [--ray-workers 2]
Prints a table and writes bench-out/executor_benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from bench_score import make_shards
from clipguard.data.pairs import DecodeLimits
from clipguard.data.shardspec import resolve_shards
from clipguard.model.checkpoint import save_checkpoint
from clipguard.model.loading import ModelSpec, load_model
from clipguard.scoring.run import ExecutorSpec, ScoreConfig, score_shards
from clipguard.scoring.scorefiles import read_scores
from machine import cpu_name  # benchmarks/machine.py: run as a script, this folder is on the path


def timed_run(shards, loaded, out: Path, config: ScoreConfig) -> tuple[float, dict]:
    for stale in out.glob("*") if out.exists() else []:
        stale.unlink()
    started = time.perf_counter()
    summary = score_shards(shards, loaded, out, config)
    wall = time.perf_counter() - started
    table = read_scores(out)
    return summary.pairs / wall, dict(zip(table.key, 1 - table.cosine_distance))




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--per-shard", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--local-workers", type=int, default=1)
    parser.add_argument("--ray-workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--prestart-ray", action="store_true",
                        help="Start Ray before timing, as on a cluster that is already up (actor start and model load still count).")
    args = parser.parse_args()

    shards = resolve_shards(make_shards(args.out / "exec-shards", args.pairs, args.per_shard))
    torch.manual_seed(0)
    weights = save_checkpoint(load_model(ModelSpec(args.model, pretrained=None)).model,
                              args.out / f"{args.model}-random.safetensors", args.model)
    loaded = load_model(ModelSpec(str(weights), precision=args.precision))
    limits = DecodeLimits(draft_size=loaded.info.image_size)

    local = ScoreConfig(batch_size=args.batch_size, workers=args.local_workers, limits=limits)
    ray = ScoreConfig(batch_size=args.batch_size, limits=limits,
                      executor=ExecutorSpec(kind="ray", workers=args.ray_workers))
    local_rate, local_sims = timed_run(shards, loaded, args.out / "exec-local", local)
    if args.prestart_ray:
        import ray as ray_module

        ray_module.init(num_cpus=args.ray_workers, include_dashboard=False, log_to_driver=False)
    ray_rate, ray_sims = timed_run(shards, loaded, args.out / "exec-ray", ray)
    diff = max(abs(local_sims[k] - ray_sims[k]) for k in local_sims)

    results = {
        "cpu": cpu_name(), "cores": os.cpu_count(), "model": args.model, "precision": args.precision,
        "pairs": args.pairs, "shards": len(shards), "batch_size": args.batch_size,
        "local_workers": args.local_workers, "local_threads": torch.get_num_threads(),
        "ray_workers": args.ray_workers, "ray_prestarted": args.prestart_ray, "local_pairs_per_s": local_rate, "ray_pairs_per_s": ray_rate,
        "ray_over_local": ray_rate / local_rate, "max_abs_similarity_difference": float(np.float64(diff)),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"{args.model} {args.precision}, {args.pairs} pairs in {len(shards)} shards on {results['cpu']} ({os.cpu_count()} cores)")
    print(f"  local executor ({args.local_workers} decode worker, {torch.get_num_threads()} threads): {local_rate:8.1f} pairs/s")
    started = "Ray already up" if args.prestart_ray else "Ray's start counted"
    print(f"  ray executor   ({args.ray_workers} actors, 1 thread each, {started}): {ray_rate:8.1f} pairs/s  ({ray_rate / local_rate:.2f}x)")
    print(f"  max |similarity difference|: {diff:.2e}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "executor_benchmark.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
