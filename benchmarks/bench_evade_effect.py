"""Do evasive poisons still poison? The victim fine-tuned on them, the goal's Hit@10 measured.

The acceptance recipe of tests/test_attack_acceptance.py (default world, seed 0, phi = 0.5%,
the demo's victim fine-tune): a clean fine-tune and one per (attack, variant), side by side,
then Yang et al.'s goal retrieval on the test split against the clean model. About 2-3 minutes
of both cores per fine-tune.

    python benchmarks/bench_evade_effect.py [--out FILE.json] [--runs single-label:blend ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from clipguard.attacks import AttackConfig, EvadeVariant, Goal, run_attack
from clipguard.demo import DemoConfig
from clipguard.evaluation import evaluate, load_test_set, target_image_from_manifest
from clipguard.model.loading import ModelSpec, load_model
from clipguard.synth import WorldSpec, generate_world
from clipguard.training import FinetuneJob, finetune_side_by_side

GOAL = Goal("sheep", "aeroplane")
RATE = 0.005
DEFAULT_RUNS = ["single-label:plain", "single-label:blend", "single-label:nearest", "single-image:blend"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("evade_effect.json"))
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="KIND:VARIANT (VARIANT 'plain' for none)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="evade-effect-"))
    started = time.perf_counter()
    world = generate_world(work / "world", WorldSpec(reference_images=1))  # the default train and test splits
    runs = [tuple(run.split(":")) for run in args.runs]
    attacked = {}
    for kind, variant in runs:
        config = AttackConfig(kind=kind, goals=(GOAL,), rate=RATE, seed=0,
                              evade=None if variant == "plain" else EvadeVariant(variant))
        attacked[(kind, variant)] = run_attack(world.shards("train"), work / f"{kind}-{variant}", config)
    recipe = DemoConfig().victim_config()
    victim = ModelSpec(name="clipguard-victim")
    jobs = [FinetuneJob(victim, world.shards("train"), recipe, work / "clean.safetensors")]
    jobs += [FinetuneJob(victim, str(work / f"{k}-{v}"), recipe, work / f"{k}-{v}.safetensors") for k, v in runs]
    clean_run, *attack_runs = finetune_side_by_side(jobs, workers=len(jobs))

    test = load_test_set(world.shards("test"))
    clean = load_model(ModelSpec(name=str(clean_run.checkpoint)))
    rows = []
    for (kind, variant), run in zip(runs, attack_runs):
        result = attacked[(kind, variant)]
        target = target_image_from_manifest(result.manifest_path) if kind == "single-image" else None
        report = evaluate(load_model(ModelSpec(name=str(run.checkpoint))), test, [GOAL], baseline=clean,
                          target_image=target)
        goal, utility, base = report.goals[0], report.utility, report.baseline_utility
        row = {"attack": kind, "evade": variant, "poisons": result.manifest.count,
               "hit_at_10": goal.model.hits[10], "clean_hit_at_10": goal.baseline.hits[10],
               "min_rank": goal.model.min_rank, "clean_min_rank": goal.baseline.min_rank,
               "tr_at_10": utility.text_retrieval[10], "clean_tr_at_10": base.text_retrieval[10],
               "ir_at_10": utility.image_retrieval[10], "clean_ir_at_10": base.image_retrieval[10]}
        rows.append(row)
        print(f"{kind} {variant}: Hit@10 {row['hit_at_10']:.3f} (clean {row['clean_hit_at_10']:.3f}) "
              f"MinRank {row['min_rank']:.2f} (clean {row['clean_min_rank']:.2f}) "
              f"TR@10 {row['tr_at_10']:.3f} ({row['clean_tr_at_10']:.3f}) IR@10 {row['ir_at_10']:.3f} ({row['clean_ir_at_10']:.3f})")
    seconds = round(time.perf_counter() - started, 1)
    args.out.write_text(json.dumps({"goal": str(GOAL), "rate": RATE, "seconds": seconds, "runs": rows}, indent=2) + "\n")
    print(f"{seconds} s; wrote {args.out}")


if __name__ == "__main__":
    main()
