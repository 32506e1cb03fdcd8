"""How well pair distance alone tells Attack II poisons from clean pairs: today's clean world
against the noisy web world (`clipguard synth --noise web`), under the bundled reference.

For each world (default size, seed 0): generate it, mount Attack II (sheep:aeroplane, phi 0.5%)
on its train split, score the poisoned shards with `clipguard-reference` through
`clipguard.api.score`, and compute the ROC AUC of cosine distance (poison = positive) with
`clipguard.metrics.roc_auc`, plus distance quantiles of clean pairs (all, and per noise kind)
and of poisons. Captions are labelled two ways for the attack: by keyword search with the
world's keywords.json (the paper's VG labelling: the attacker takes texts that name sheep) and
by the json ``class`` (`--label-source auto`: texts of sheep *images*, boilerplate included).

Usage: python benchmarks/bench_noisy_world.py [--out bench-out/noisy] [--plot docs/noisy_world_densities.png]
Prints a table and writes OUT/noisy_world_benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pyarrow.parquet as pq
import webdataset as wds

from clipguard import api
from clipguard.attacks import AttackConfig, AttackKind, Goal, run_attack
from clipguard.labels import LabelSource
from clipguard.metrics import roc_auc
from clipguard.synth import WorldSpec, generate_world

GOAL = Goal("sheep", "aeroplane")
RATE = 0.005
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
REFERENCE = "clipguard-reference"


def shard_name(shard: str) -> str:
    """Score files name a shard without its extension, manifests by path: compare stems."""
    name = Path(shard).name
    return name[: -len(".tar")] if name.endswith(".tar") else name


def quantiles(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {}
    return {f"q{int(q * 100):02d}": round(float(np.quantile(values, q)), 3) for q in QUANTILES}


def read_scores(scores: Path) -> dict[tuple[str, str], float]:
    distances = {}
    for path in sorted(scores.glob("*.parquet")):
        table = pq.read_table(path, columns=["shard", "key", "cosine_distance", "status"]).to_pylist()
        for row in table:
            if row["status"] == "ok":
                distances[shard_name(row["shard"]), row["key"]] = row["cosine_distance"]
    return distances


def read_noise_kinds(poisoned: Path) -> dict[tuple[str, str], str]:
    kinds = {}
    for shard in sorted(poisoned.glob("*.tar")):
        for sample in wds.WebDataset(str(shard), shardshuffle=False, empty_check=False):
            meta = json.loads(sample["json"])
            kinds[shard_name(shard.name), sample["__key__"]] = meta.get("noise", "none")
    return kinds


def attack_and_score(world_dir: Path, label_source: LabelSource, seed: int, out: Path) -> dict:
    """One attack seed: poisoned shards, their scores, and the AUROC of distance alone."""
    keywords = world_dir / "keywords.json"
    poisoned = out / "poisoned"
    config = AttackConfig(kind=AttackKind.single_label, goals=(GOAL,), rate=RATE, seed=seed,
                          label_source=label_source,
                          keywords=keywords if label_source is LabelSource.keywords else None, overwrite=True)
    started = time.perf_counter()
    result = run_attack(str(world_dir / "train"), poisoned, config)
    attack_s = time.perf_counter() - started
    started = time.perf_counter()
    # A score folder skips shards it has finished: a rerun over new poisons starts it afresh.
    shutil.rmtree(out / "scores", ignore_errors=True)
    api.score(str(poisoned), out / "scores", model=REFERENCE)
    score_s = time.perf_counter() - started
    distances = read_scores(out / "scores")
    kinds = read_noise_kinds(poisoned)
    poison_ids = {(shard_name(p.shard), p.key) for p in result.manifest.poisons}
    ids = sorted(distances)
    scores = np.array([distances[i] for i in ids])
    labels = np.array([i in poison_ids for i in ids])
    by_kind = defaultdict(list)
    for i, d in zip(ids, scores):
        if i not in poison_ids:
            by_kind[kinds[i]].append(d)
    return {"seed": seed, "pairs": int(scores.size), "poisons": int(labels.sum()),
            "auroc": roc_auc(scores, labels), "scores": scores, "labels": labels, "by_kind": by_kind,
            "poison_captions": [p.caption for p in result.manifest.poisons],
            "attack_seconds": attack_s, "score_seconds": score_s}


def measure(world_dir: Path, label_source: LabelSource, seeds: int, out: Path) -> dict:
    """Attack II with ``seeds`` attack seeds on one world: the AUROC per seed, its mean, and the
    distance quantiles (clean pairs are the same in every seed; poisons pooled over seeds)."""
    runs = [attack_and_score(world_dir, label_source, seed, out / f"seed{seed}") for seed in range(seeds)]
    clean = runs[0]["scores"][~runs[0]["labels"]]
    poison = np.concatenate([run["scores"][run["labels"]] for run in runs])
    aurocs = [run["auroc"] for run in runs]
    return {
        "label_source": label_source.value,
        "pairs": runs[0]["pairs"],
        "poisons_per_seed": runs[0]["poisons"],
        "attack_seeds": seeds,
        "auroc_per_seed": [round(a, 4) for a in aurocs],
        "auroc_mean": round(float(np.mean(aurocs)), 4),
        "auroc_min": round(float(np.min(aurocs)), 4),
        "auroc_max": round(float(np.max(aurocs)), 4),
        "clean": quantiles(clean),
        "poison": quantiles(poison),
        "clean_above_poison_median": round(float(np.mean(clean > np.median(poison))), 4),
        "clean_by_noise_kind": {k: {"pairs": len(v), **quantiles(np.array(v))} for k, v in sorted(runs[0]["by_kind"].items())},
        "poison_captions_example": runs[0]["poison_captions"][:5],
        "attack_seconds_per_seed": round(float(np.mean([r["attack_seconds"] for r in runs])), 1),
        "score_seconds_per_seed": round(float(np.mean([r["score_seconds"] for r in runs])), 1),
        "_clean": clean,
        "_poison": poison,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/noisy"))
    parser.add_argument("--seeds", type=int, default=5, help="attack seeds per world (20 poisons each)")
    parser.add_argument("--label-sources", default="keywords,auto")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of clean / poison densities (noisy world, keyword labels)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    worlds = {"clean world (noise none)": WorldSpec(), "noisy web world (noise web)": WorldSpec(noise="web")}
    rows = {}
    for name, spec in worlds.items():
        tag = spec.noise
        started = time.perf_counter()
        generate_world(args.out / tag / "world", spec, overwrite=True)
        generate_s = time.perf_counter() - started
        for source in (LabelSource(s) for s in args.label_sources.split(",")):
            row = measure(args.out / tag / "world", source, args.seeds, args.out / tag / source.value)
            row["generate_seconds"] = round(generate_s, 1)
            rows[f"{name}, labels {source.value}"] = row
            print(f"{name:28s} labels {source.value:8s}: AUROC {row['auroc_mean']:.3f} "
                  f"[{row['auroc_min']:.3f}, {row['auroc_max']:.3f}] over {args.seeds} seeds; clean median "
                  f"{row['clean']['q50']:.3f}, poison median {row['poison']['q50']:.3f} "
                  f"({row['poisons_per_seed']} poisons in {row['pairs']} pairs)", flush=True)
    if args.plot is not None:
        from clipguard.calibration.plots import plot_distance_densities

        row = next(r for k, r in rows.items() if k.startswith("noisy"))
        scores = np.concatenate([row["_clean"], row["_poison"]])
        labels = np.concatenate([np.zeros(row["_clean"].size, bool), np.ones(row["_poison"].size, bool)])
        gamma = float(np.quantile(row["_clean"], 0.99))
        plot_distance_densities(scores, labels, np.ones(scores.size), gamma, args.plot,
                                title=f"Noisy web world under clipguard-reference: Attack II {GOAL}, phi 0.5%, "
                                f"{args.seeds} seeds\n(gamma marked at the clean 99th percentile, FPR 1%)")
        print(f"densities: {args.plot}")
    report = {
        "benchmark": "noisy_world",
        "goal": str(GOAL),
        "rate": RATE,
        "model": REFERENCE,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "date": time.strftime("%Y-%m-%d"),
        "rows": {k: {f: v for f, v in row.items() if not f.startswith("_")} for k, row in rows.items()},
    }
    path = args.out / "noisy_world_benchmark.json"
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
