"""The goal after filtering: the victim fine-tuned on the poisoned data, on what pair distance
alone keeps, and on what the combination (distance or an audit finding) keeps, per attack.

Reuses the folders `bench_signals.py --out DIR` leaves (DIR/world-web-0 and
DIR/atk-web-0-NAME-RATE-SEED: poisoned shards, scores with embeddings; made here when missing).
For each attack: a fresh audit; gamma for each rule from 500 labelled pairs drawn uniformly at a
1% FPR budget (the FPR's Clopper-Pearson upper bound, as `calibrate` keeps it: bench_signals'
`smallest_gamma`); `filter_shards` with that gamma (and the audit, for the combination) writes the
kept shards; the demo's victim recipe fine-tunes the clean train split, the poisoned one and each
kept one side by side (the demo's web-world recipe, `DemoConfig.web()`: lr 5e-4, 4 epochs);
`evaluate` on the test split reads the attack's effect:

- I, II, III: the goal's Hit@10 (III: the mean of its two goals), as in the paper's table;
- targeted: whether zero-shot reads the target image as the target label (1/0), and its rank;
- backdoor: the zero-shot attack success rate of stamped test images.

About 2 minutes of one core per fine-tune, two at a time (16 fine-tunes for the five attacks at one seed).

    python benchmarks/bench_filtered_effect.py --cache DIR [--attacks I,II,III,targeted,backdoor] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import bench_signals as signals  # noqa: E402  (a sibling script, not a package)
from machine import cpu_name  # noqa: E402

from clipguard.audit import AuditConfig, run_audit  # noqa: E402
from clipguard.data.shardspec import resolve_shards  # noqa: E402
from clipguard.demo import DemoConfig  # noqa: E402
from clipguard.evaluation import evaluate, load_test_set, targets_from_manifest  # noqa: E402
from clipguard.filtering.auditflags import AuditFlags  # noqa: E402
from clipguard.filtering.run import FilterConfig, filter_shards  # noqa: E402
from clipguard.filtering.threshold import MAX_DISTANCE, Threshold  # noqa: E402
from clipguard.model.loading import ModelSpec, load_model  # noqa: E402
from clipguard.training import FinetuneJob, finetune_side_by_side  # noqa: E402

REFERENCE = "clipguard-reference"


def gammas(work: Path, world: Path, labelled: int, fpr: float, seed: int) -> dict[str, dict]:
    """gamma of each rule, as bench_signals measures them, and what it quarantines (known from the manifest)."""
    cell = signals.audited_cell(world, work, labelled, seed)
    out = {}
    for rule, also in (("distance alone", np.zeros_like(cell.member)), ("combination", cell.member)):
        gamma = signals.smallest_gamma(cell.distance, cell.clean_sample, also, fpr)
        flagged = (cell.distance >= gamma) | also
        out[rule] = {"gamma": gamma, "poisons_quarantined": int(flagged[cell.truth].sum()),
                     "poisons": int(cell.truth.sum()), "clean_quarantined": int(flagged[~cell.truth].sum())}
    return out


def kept_shards(work: Path, name: str, measured: dict, with_audit: bool, loaded) -> tuple[Path, dict]:
    gamma = measured["gamma"]
    out = work / f"kept-{name.replace(' ', '-')}"
    threshold = Threshold(gamma=float(min(max(gamma, 0.0), MAX_DISTANCE)), source=f"bench gamma ({name})")
    summary = filter_shards(
        resolve_shards(str(work / "poisoned")), loaded, threshold,
        FilterConfig(clean_dir=out, quarantine_dir=work / f"quarantine-{name.replace(' ', '-')}",
                     reuse_scores=work / "scores", audit=AuditFlags.load(work / "audit") if with_audit else None))
    return out, {**measured, "gamma": float(threshold.gamma), "kept": summary.kept, "read": summary.read}


def effect(report, kind: str) -> dict:
    if report.backdoor is not None:
        return {"measure": "attack success rate", "value": report.backdoor.success_rate}
    if report.targeted is not None:
        return {"measure": "target image read as the label (1/0)", "value": float(report.targeted.success),
                "label_rank": report.targeted.label_rank}
    hits = [g.model.hits[10] for g in report.goals]
    return {"measure": "Hit@10" + (" (mean of the goals)" if len(hits) > 1 else ""), "value": float(np.mean(hits)),
            "min_rank": float(np.mean([g.model.min_rank for g in report.goals]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("bench-out/signals"))
    parser.add_argument("--attacks", default="I,II,III,targeted,backdoor")
    parser.add_argument("--rate", type=float, default=0.005)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--labelled", type=int, default=500)
    parser.add_argument("--fpr", type=float, default=0.01)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("filtered_effect.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    world = signals.world_folder(args.cache, "web", 0)
    loaded = load_model(ModelSpec(REFERENCE))
    recipe = DemoConfig.web().victim_config()  # the web world's victim recipe (lr 5e-4, 4 epochs)
    victim = ModelSpec(name="clipguard-victim")
    jobs = [FinetuneJob(victim, str(world / "train"), recipe, args.cache / "effect-clean.safetensors")]
    plans = []
    for name in [a for a in args.attacks.split(",") if a]:
        work = args.cache / f"atk-web-0-{name}-{args.rate}-{args.seed}"
        signals.attacked_folder(world, name, None, args.rate, args.seed, work)
        gamma = gammas(work, world, args.labelled, args.fpr, args.seed)
        runs = {"poisoned": (work / "poisoned", None)}
        for rule, g in gamma.items():
            runs[rule] = kept_shards(work, rule, g, rule == "combination", loaded)
        for run, (shards, counts) in runs.items():
            checkpoint = args.cache / f"effect-{name}-{run.replace(' ', '-')}.safetensors"
            jobs.append(FinetuneJob(victim, str(shards), recipe, checkpoint))
            plans.append((name, run, counts, work))
        print(f"{name}: " + "; ".join(f"{r}: gamma {m['gamma']:.4f}, {m['poisons_quarantined']}/{m['poisons']} poisons and "
                                       f"{m['clean_quarantined']} clean quarantined" for r, m in gamma.items()), flush=True)
    results = finetune_side_by_side(jobs, workers=args.workers)
    test = load_test_set(str(world / "test"))
    clean_model = load_model(ModelSpec(name=str(results[0].checkpoint)))
    rows = []
    for (name, run, counts, work), result in zip(plans, results[1:]):
        targets = targets_from_manifest(work / "poisoned" / "poison_manifest.json")
        model = load_model(ModelSpec(name=str(result.checkpoint)))
        kwargs = dict(target_image=targets.target_image, trigger=targets.trigger, target_label=targets.target_label)
        report = evaluate(model, test, targets.goals, baseline=clean_model, **kwargs)
        clean = evaluate(clean_model, test, targets.goals, **kwargs)
        row = {"attack": name, "data": run, "filter": counts, "effect": effect(report, name),
               "clean_effect": effect(clean, name),
               "tr_at_10": report.utility.text_retrieval[10], "ir_at_10": report.utility.image_retrieval[10]}
        rows.append(row)
        print(f"{name:9} {run:15} {row['effect']['measure']}: {row['effect']['value']:.3f} (clean fine-tune "
              f"{row['clean_effect']['value']:.3f})  kept {counts}  TR@10 {row['tr_at_10']:.3f} IR@10 {row['ir_at_10']:.3f}",
              flush=True)
    seconds = round(time.perf_counter() - started, 1)
    args.out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)),
        "rate": args.rate, "seed": args.seed, "labelled": args.labelled, "fpr_budget": args.fpr, "seconds": seconds,
        "rows": rows}, indent=2, default=float) + "\n")
    print(f"{seconds} s; wrote {args.out}")


if __name__ == "__main__":
    main()
