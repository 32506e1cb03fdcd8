"""Fine-tune speed with PyTorch's default attention kernel against clipguard's "auto" choice (the
plain matmul-softmax kernel under bf16 autocast on CPU), both through `clipguard.training.finetune`.

For each model and precision it runs the same fine-tune twice, `attention="default"` (the
baseline) then `attention="auto"`, and reports seconds per step after a warm-up. The tiny model
is the bundled `clipguard-victim` at the demo's batch (32); ViT-B-32 (random weights: speed does
not depend on them) runs at a small batch, since one of its steps costs seconds on 2 cores.

Usage: python benchmarks/bench_train_attention.py [--steps 40] [--vit-steps 3] [--out bench-out]
Prints a line per run and writes bench-out/train_attention_benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from clipguard.model.loading import ModelSpec, load_model
from clipguard.synth import WorldSpec, generate_world
from clipguard.training import FinetuneConfig, finetune


@dataclass
class Case:
    model: str
    batch_size: int
    steps: int
    warmup: int


def seconds_per_step(loaded_or_spec, shards: str, config: FinetuneConfig, out: Path, warmup: int) -> float:
    """Mean wall time of the steps after ``warmup`` (model loading and first steps excluded)."""
    stamps: list[float] = []
    finetune(loaded_or_spec, shards, config, out, progress_callback=lambda _: stamps.append(time.perf_counter()))
    timed = stamps[warmup:]
    return (timed[-1] - timed[0]) / (len(timed) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="steps per tiny-model run")
    parser.add_argument("--vit-steps", type=int, default=3, help="steps per ViT-B-32 run (0: skip it)")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    world = generate_world(args.out / "world", WorldSpec(reference_images=1, validation_images_per_class=1), overwrite=True)
    cases = [Case("clipguard-victim", 32, args.steps, 5)]
    if args.vit_steps:
        cases.append(Case("ViT-B-32", 16, args.vit_steps + 1, 1))

    rows = []
    for case in cases:
        for precision in ("bf16", "fp32"):
            timings = {}
            for attention in ("default", "auto"):
                torch.manual_seed(0)
                model = load_model(ModelSpec(case.model, pretrained=None)) if case.model.startswith("ViT") else ModelSpec(case.model)
                config = FinetuneConfig(lr=1e-4, batch_size=case.batch_size, max_steps=case.steps, warmup_steps=1,
                                        precision=precision, attention=attention, shuffle_buffer=0)
                timings[attention] = seconds_per_step(model, world.shards("train"), config, args.out / "bench.safetensors", case.warmup)
                print(f"{case.model:17s} batch {case.batch_size:3d} {precision} attention={attention:7s}: "
                      f"{timings[attention] * 1000:8.1f} ms/step", flush=True)
            speedup = timings["default"] / timings["auto"]
            print(f"{'':17s} {precision}: auto is {speedup:.2f}x the default")
            rows.append({"model": case.model, "batch_size": case.batch_size, "precision": precision,
                         "default_ms_per_step": round(timings["default"] * 1000, 1),
                         "auto_ms_per_step": round(timings["auto"] * 1000, 1), "speedup": round(speedup, 3)})
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"processor": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "rows": rows,
    }
    path = args.out / "train_attention_benchmark.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {path}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
