"""Three victim fine-tunes one after the other (all cores each) against side by side (one process
and an equal share of the cores each), as the demo runs its clean, poisoned and filtered victims.

Each job is the demo's victim recipe (lr 1e-3, batch 32, bf16) on the synthetic world's train
split for --steps steps, from the bundled `clipguard-victim`. Wall time covers everything a
caller waits for: process start-up, model loading, data, training, the checkpoint.

Usage: python benchmarks/bench_side_by_side.py [--steps 150] [--out bench-out]
Prints a line per way and writes bench-out/side_by_side_benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from clipguard.demo import DemoConfig
from clipguard.model.loading import ModelSpec
from clipguard.synth import WorldSpec, generate_world
from clipguard.training import FinetuneJob, finetune_side_by_side

JOBS = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    world = generate_world(args.out / "world", WorldSpec(reference_images=1), overwrite=True)
    config = replace(DemoConfig().victim_config(), max_steps=args.steps)
    cores = os.cpu_count() or 1

    def jobs(tag: str) -> list[FinetuneJob]:
        return [FinetuneJob(ModelSpec("clipguard-victim"), world.shards("train"), replace(config, seed=i),
                            args.out / f"{tag}_{i}.safetensors") for i in range(JOBS)]

    rows = {}
    for way, workers in (("one after the other", 1), ("side by side", JOBS)):
        torch.set_num_threads(cores)
        started = time.perf_counter()
        results = finetune_side_by_side(jobs(way.replace(" ", "_")), workers=workers)
        seconds = time.perf_counter() - started
        pairs = sum(r.samples_seen for r in results)
        rows[way] = {"workers": workers, "seconds": round(seconds, 1), "pairs": pairs, "pairs_per_second": round(pairs / seconds, 1)}
        print(f"{way:20s} {workers} worker(s): {seconds:6.1f} s, {pairs} pairs, {pairs / seconds:6.1f} pairs/s", flush=True)
    speedup = rows["one after the other"]["seconds"] / rows["side by side"]["seconds"]
    print(f"side by side is {speedup:.2f}x faster")
    report = {
        "jobs": JOBS, "steps_per_job": args.steps, "batch_size": config.batch_size, "precision": config.precision,
        "cores": cores, "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "ways": rows, "speedup": round(speedup, 2),
    }
    (args.out / "side_by_side_benchmark.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
