"""How close each `--evade` variant brings its poisons to clean pairs under the defender's reference.

Generates the default synthetic world (seed 0), mounts each attack plain and with each variant
that applies at phi = 0.5%, and scores the poisons with the bundled reference
(`clipguard-reference`, not the surrogate the `nearest` attacker uses). Prints and writes, per
attack: the poisons' mean pair cosine distance, and the share of them above the clean pairs'
99th percentile (what a pair filter at a 1% false-positive rate would catch).

    python benchmarks/bench_evade_distances.py [--world DIR] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from clipguard import score_pairs
from clipguard.attacks import AttackConfig, AttackKind, EvadeVariant, parse_goal, read_manifest, run_attack
from clipguard.data.shardspec import resolve_shards
from clipguard.data.tarstream import ShardReport, iter_samples
from clipguard.synth import WorldSpec, generate_world

REFERENCE = "clipguard-reference"
RATE = 0.005
CLEAN_SAMPLE = 1000
RUNS = [  # (kind, goal, variants); None is the plain attack
    ("single-label", "sheep:aeroplane", [None, "blend", "nearest"]),
    ("single-image", "sheep:aeroplane", [None, "blend", "nearest"]),
    ("multi-label", ("sheep:aeroplane", "cow:bus"), [None, "blend", "nearest"]),
    ("targeted", "sheep:aeroplane", [None, "blend", "many-captions"]),
    ("backdoor", "*:aeroplane", [None, "blend", "clean-label"]),
]


def samples(folder: Path) -> dict[str, dict[str, bytes]]:
    found = {}
    for shard in resolve_shards(str(folder)):
        for raw in iter_samples(shard, ShardReport(shard.name, shard.url)):
            found[raw.key] = dict(raw.fields)
    return found


def distances(images: list[bytes], captions: list[str]) -> np.ndarray:
    scores = score_pairs(images, captions, model=REFERENCE)
    assert all(e is None for e in scores.errors), scores.errors
    return scores.distance.astype(float)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("evade_distances.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="evade-"))
    world = args.world or generate_world(work / "world", WorldSpec()).root
    keywords = world / "keywords.json"

    clean = samples(world / "train")
    rng = np.random.default_rng(0)
    keys = rng.choice(sorted(clean), size=min(CLEAN_SAMPLE, len(clean)), replace=False)
    clean_d = distances([clean[k]["jpg"] for k in keys], [clean[k]["txt"].decode() for k in keys])
    cut = float(np.quantile(clean_d, 0.99))
    print(f"clean pairs ({len(keys)}): mean distance {clean_d.mean():.3f}, 99th percentile {cut:.3f}")

    rows = []
    for kind, goal, variants in RUNS:
        goals = goal if isinstance(goal, tuple) else (goal,)
        for variant in variants:
            started = time.perf_counter()
            config = AttackConfig(kind=AttackKind(kind), goals=tuple(parse_goal(g) for g in goals), rate=RATE,
                                  keywords=keywords, evade=EvadeVariant(variant) if variant else None)
            out = work / f"{kind}-{variant or 'plain'}"
            result = run_attack(str(world / "train"), out, config)
            poisoned = samples(out)
            manifest = read_manifest(result.manifest_path)
            d = distances([poisoned[k]["jpg"] for k in manifest.poison_keys],
                          [poisoned[k]["txt"].decode() for k in manifest.poison_keys])
            row = {"attack": kind, "goal": ",".join(goals), "evade": variant or "plain", "poisons": manifest.count,
                   "mean_distance": round(float(d.mean()), 4), "std_distance": round(float(d.std()), 4),
                   "caught_at_clean_p99": round(float((d > cut).mean()), 4),
                   "seconds": round(time.perf_counter() - started, 1)}
            rows.append(row)
            print(f"{kind:13s} {variant or 'plain':14s} n={row['poisons']:3d} mean {row['mean_distance']:.3f} "
                  f"± {row['std_distance']:.3f}  above clean p99: {row['caught_at_clean_p99']:.2f}")
    args.out.write_text(json.dumps({
        "reference": REFERENCE, "rate": RATE, "world": "WorldSpec() seed 0",
        "clean": {"pairs": int(len(keys)), "mean_distance": round(float(clean_d.mean()), 4), "p99": round(cut, 4)},
        "runs": rows,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
