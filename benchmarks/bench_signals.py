"""Pair distance alone against the combination (distance + audit findings), per attack, on the
noisy web world, with thresholds from a small labelled sample: the honest table's first columns.

For each attack (Yang I/II/III, Carlini-Terzis targeted and backdoor, and the --evade variants
asked for) on the default noisy world (`WorldSpec(noise="web")`, seed --world-seed) at phi
--rate: mount it on the train split, score with the bundled reference (`clipguard-reference`)
keeping embeddings, run `clipguard audit` with the world's keywords, and then:

- AUROC of every signal alone over all pairs (poison = positive; `clipguard.metrics.roc_auc`);
- a labelled sample of --labelled pairs drawn uniformly (the person's labels are the truth
  here), and from it two rules at one false-positive budget (--fpr):
  * distance alone: the smallest gamma whose FPR on the sample's clean pairs is within budget;
  * combination: a pair is flagged when it belongs to an audit finding or its distance >= gamma',
    gamma' the smallest whose union's FPR on the sample's clean pairs is within budget;
  "within budget" as `clipguard calibrate` means it by default (--criterion bound): the FPR's
  95% Clopper-Pearson upper bound <= budget (at ~495 labelled clean pairs and 1%: none of them
  flagged), or its point estimate (--criterion point);
  each rule's recall and FPR measured on the whole world (every pair's truth is known);
- goal discovery: the top-ranked finding, whether it names the injected goal, and the share of
  its pairs that are poisons.

- goal rank: the rank of the first finding that names the injected goal (None: not found);
- clean worlds: findings on the clean noisy world and the clean default world, --clean-seeds
  world seeds each (goal 1: none should pass the significance level).

--high-rate cells (Attack II at 5% by default, the demo's quick mode) are added beside --rate.
Each world, clean score folder and attacked score folder is kept under OUT with a `done` mark and
reused by a later run with the same OUT (attack and score are deterministic for a seed), so a
change to the audit is re-measured in minutes: the audit itself always runs again.

The fine-tune and Hit@10 after filtering are not run here (minutes per cell on 2 cores).

Usage: python benchmarks/bench_signals.py [--attacks I,II,III,targeted,backdoor] [--rate 0.005]
       [--high-rate II=0.05] [--labelled 500] [--fpr 0.01] [--seeds 10] [--clean-seeds 5]
       [--out bench-out/signals]
Prints a table and writes OUT/signals_benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pyarrow.parquet as pq

from clipguard import api
from clipguard.attacks import AttackConfig, AttackKind, Goal, run_attack
from clipguard.audit import AuditConfig, run_audit
from clipguard.calibration.estimates import clopper_pearson
from clipguard.labels import LabelSource
from clipguard.metrics import roc_auc
from clipguard.synth import WorldSpec, generate_world
from machine import run_header  # this folder is on the path

REFERENCE = "clipguard-reference"
# name -> (kind, goals, evade variant or None, the audit goals that name it: "caption class:image class",
# or a cluster's caption class)
ATTACKS = {
    "I": (AttackKind.single_image, (Goal("sheep", "aeroplane"),), None, {"sheep:aeroplane"}),
    "II": (AttackKind.single_label, (Goal("sheep", "aeroplane"),), None, {"sheep:aeroplane"}),
    "III": (AttackKind.multi_label, (Goal("sheep", "aeroplane"), Goal("dog", "train")), None,
            {"sheep:aeroplane", "dog:train"}),
    # Carlini-Terzis: images of the source class (any, for the backdoor) to be read as the target label
    "targeted": (AttackKind.targeted, (Goal("aeroplane", "sheep"),), None, {"sheep:aeroplane"}),
    "backdoor": (AttackKind.backdoor, (Goal("*", "sheep"),), None, {"sheep"}),
}


def stem(shard: str) -> str:
    name = Path(shard).name
    return name[: -len(".tar")] if name.endswith(".tar") else name


def attack_config(name: str, rate: float, seed: int, keywords: Path, evade: str | None) -> AttackConfig:
    kind, goals, default_evade, _ = ATTACKS[name]
    return AttackConfig(kind=kind, goals=goals, rate=rate, seed=seed, label_source=LabelSource.keywords,
                        keywords=keywords, overwrite=True, evade=evade or default_evade)


def recall_at_fpr(scores: np.ndarray, truth: np.ndarray, fpr: float) -> dict:
    """Recall of "score > t" with t the smallest cut that flags at most ``fpr`` of the clean pairs
    (ties at t stay unflagged, so a discrete signal may flag fewer), and the FPR it measures."""
    clean = np.sort(np.nan_to_num(scores[~truth], nan=-np.inf))[::-1]
    allowed = int(np.floor(fpr * len(clean)))
    cut = clean[allowed] if allowed < len(clean) else -np.inf
    flagged = np.nan_to_num(scores, nan=-np.inf) > cut
    return {"recall": round(float(flagged[truth].mean()), 4) if truth.any() else None,
            "fpr": round(float(flagged[~truth].mean()), 5)}


def allowed_false_positives(clean: int, budget: float, criterion: str) -> int:
    """How many of ``clean`` labelled clean pairs a rule may flag and keep its FPR within budget:
    criterion "bound" (calibrate's default) keeps the Clopper-Pearson upper bound (95%) <= budget,
    "point" the point estimate."""
    if criterion == "point":
        return int(np.floor(budget * clean))
    counts = np.arange(clean + 1)
    upper = clopper_pearson(counts, np.full(clean + 1, clean))[1]
    keeps = np.flatnonzero(upper <= budget)
    return int(keeps[-1]) if len(keeps) else -1


def smallest_gamma(distance: np.ndarray, clean: np.ndarray, also: np.ndarray, budget: float,
                   criterion: str = "bound") -> float:
    """The smallest gamma at which (distance >= gamma or also) keeps the FPR on ``clean`` within
    ``budget`` (`allowed_false_positives`)."""
    base = also[clean].sum()
    d = np.sort(distance[clean & ~also])[::-1]
    allowed = allowed_false_positives(int(clean.sum()), budget, criterion) - int(base)
    if allowed < 0:
        return np.inf  # the audit alone spends the budget: distance flags nothing more
    if allowed >= len(d):
        return -np.inf
    return float(np.nextafter(d[allowed], np.inf))  # strictly above the first clean pair not allowed


def prepared(folder: Path, make) -> Path:
    """``folder``, made by ``make(folder)`` unless a finished earlier run left it (its `done` mark)."""
    if not (folder / "done").exists():
        shutil.rmtree(folder, ignore_errors=True)
        make(folder)
        (folder / "done").write_text("1\n")
    return folder


def world_folder(out: Path, noise: str, seed: int) -> Path:
    return prepared(out / f"world-{noise}-{seed}", lambda f: generate_world(f, WorldSpec(seed=seed, noise=noise)))


def attacked_folder(world: Path, name: str, evade: str | None, rate: float, seed: int, work: Path) -> Path:
    def make(folder: Path) -> None:
        result = run_attack(str(world / "train"), folder / "poisoned", attack_config(name, rate, seed, world / "keywords.json", evade))
        api.score(str(folder / "poisoned"), folder / "scores", model=REFERENCE, save_embeddings=True)
        (folder / "poisons.json").write_text(json.dumps([[stem(p.shard), p.key] for p in result.manifest.poisons]))
    return prepared(work, make)


@dataclass
class AuditedCell:
    """An attacked, scored cell audited afresh, every pair's truth known from the manifest."""

    audit: Any
    seconds: float  # the audit's
    truth: np.ndarray  # per audited pair: a poison
    distance: np.ndarray  # its cosine distance
    member: np.ndarray  # in some finding
    clean_sample: np.ndarray  # a clean pair of the labelled sample (uniform, seeded by the attack seed)


def audited_cell(world: Path, work: Path, labelled: int, seed: int) -> AuditedCell:
    started = time.perf_counter()
    audit = run_audit(AuditConfig(scores=work / "scores", out=work / "audit", keywords=world / "keywords.json"))
    seconds = time.perf_counter() - started
    ids = [(stem(s), str(k)) for s, k in zip(audit.pairs.shard, audit.pairs.key)]
    poisons = {tuple(p) for p in json.loads((work / "poisons.json").read_text())}
    truth = np.array([i in poisons for i in ids])
    distance = {}
    for path in sorted((work / "scores").glob("*.parquet")):
        for row in pq.read_table(path, columns=["shard", "key", "cosine_distance"]).to_pylist():
            distance[stem(row["shard"]), row["key"]] = row["cosine_distance"]
    d = np.array([distance.get(i, np.nan) for i in ids], dtype=np.float64)
    member = np.zeros(len(ids), dtype=bool)
    for finding in audit.findings:
        member[finding.rows] = True
    rng = np.random.default_rng(1000 + seed)
    in_sample = np.zeros(len(ids), dtype=bool)
    in_sample[rng.choice(len(ids), size=min(labelled, len(ids)), replace=False)] = True
    return AuditedCell(audit, seconds, truth, d, member, in_sample & ~truth)


def one_cell(world: Path, name: str, evade: str | None, rate: float, seed: int, args, work: Path) -> dict:
    started = time.perf_counter()
    attacked_folder(world, name, evade, rate, seed, work)
    score_s = time.perf_counter() - started
    cell = audited_cell(world, work, args.labelled, seed)
    audit, audit_s, truth, d, member, clean_sample = (cell.audit, cell.seconds, cell.truth, cell.distance,
                                                      cell.member, cell.clean_sample)
    ids = audit.pairs.key

    aurocs = {"cosine_distance": roc_auc(d, truth)}
    at_fpr = {"cosine_distance": recall_at_fpr(d, truth, args.fpr)}
    for column, values in audit.signal_columns.items():
        values = np.asarray(values)
        if values.dtype.kind in "fiu" and not column.endswith("_group"):
            scores = np.nan_to_num(values.astype(np.float64), nan=-np.inf)
            aurocs[column] = roc_auc(scores, truth)
            at_fpr[column] = recall_at_fpr(scores, truth, args.fpr)

    nothing = np.zeros(len(ids), dtype=bool)
    gamma_alone = smallest_gamma(d, clean_sample, nothing, args.fpr, args.criterion)
    gamma_combined = smallest_gamma(d, clean_sample, member, args.fpr, args.criterion)

    def measured(flags: np.ndarray) -> dict:
        return {"recall": round(float(flags[truth].mean()), 4) if truth.any() else None,
                "fpr": round(float(flags[~truth].mean()), 5),
                "fpr_on_labelled_sample": round(float(flags[clean_sample].mean()), 5)}

    alone = measured(d >= gamma_alone)
    combined = measured((d >= gamma_combined) | member)
    top = audit.findings[0] if audit.findings else None
    goals = ATTACKS[name][3]

    def names_goal(f) -> bool:
        if f.goal in goals or (name == "backdoor" and f.goal.split(":")[0] in goals):
            return True
        # A fan-in finding points at one image: its caption class is the goal's, its image class
        # only what the reference's neighbours make of that image (rarely "aeroplane" under the
        # bundled reference), so the caption class is what it can name.
        return f.kind == "image_fan_in" and f.goal.split(":")[0] in {g.split(":")[0] for g in goals}

    rank = next((i + 1 for i, f in enumerate(audit.findings) if names_goal(f)), None)
    return {
        "attack": name, "evade": evade, "rate": rate, "seed": seed, "pairs": len(ids), "poisons": int(truth.sum()),
        "goal_rank": rank,
        "auroc": {k: round(v, 4) for k, v in aurocs.items()},
        # Each signal alone, cut where it flags at most --fpr of the clean pairs (an oracle cut:
        # every pair's truth known), as "recall at a measured FPR".
        "recall_at_fpr": at_fpr,
        "distance_alone": {"gamma": gamma_alone, **alone},
        "combination": {"gamma": gamma_combined, **combined},
        "findings": len(audit.findings),
        "top_finding": None if top is None else {
            "kind": top.kind, "goal": top.goal,
            "names_goal": names_goal(top), "poisons_in_it": int(truth[top.rows].sum()),
            "pairs": int(len(top.rows)), "poison_share": round(float(truth[top.rows].mean()), 3),
            "neglog10_p": round(top.neglog10_p, 1)},
        "finding_pairs_poison_share": round(float(truth[member].mean()), 3) if member.any() else None,
        "attack_and_score_seconds": round(score_s, 1), "audit_seconds": round(audit_s, 1),
        "audit_seconds_per_10k_pairs": round(audit_s / len(ids) * 10_000, 2),
        "audit_stage_seconds_per_10k_pairs": {k: round(v / len(ids) * 10_000, 3) for k, v in audit.seconds.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", default="I,II,III,targeted,backdoor")
    parser.add_argument("--evade", default="", help="comma-separated attack=variant cells to add, e.g. II=blend,II=nearest")
    parser.add_argument("--rate", type=float, default=0.005)
    parser.add_argument("--high-rate", default="II=0.05", help="comma-separated attack=rate cells run beside --rate")
    parser.add_argument("--high-rate-seeds", type=int, default=2)
    parser.add_argument("--labelled", type=int, default=500)
    parser.add_argument("--fpr", type=float, default=0.01)
    parser.add_argument("--criterion", choices=("bound", "point"), default="bound",
                        help="FPR within budget by its 95%% upper bound (calibrate's default) or its point estimate")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--clean-seeds", type=int, default=5)
    parser.add_argument("--clean-first-seed", type=int, default=0, help="world seed of the first clean world")
    parser.add_argument("--clean-noise", default="web,none", help="which clean worlds: web, none or both")
    parser.add_argument("--world-seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench-out/signals"))
    args = parser.parse_args()
    world = world_folder(args.out, "web", args.world_seed)
    cells = [(a, None, args.rate) for a in args.attacks.split(",") if a]
    cells += [(*c.split("=", 1), args.rate) for c in args.evade.split(",") if c]
    high = [(c.split("=", 1)[0], None, float(c.split("=", 1)[1])) for c in args.high_rate.split(",") if c]
    rows = []
    for (name, evade, rate), seeds in [(c, args.seeds) for c in cells] + [(c, args.high_rate_seeds) for c in high]:
        for seed in range(seeds):
            work = args.out / f"atk-web-{args.world_seed}-{name}{'-' + evade if evade else ''}-{rate}-{seed}"
            row = one_cell(world, name, evade, rate, seed, args, work)
            rows.append(row)
            a, c = row["distance_alone"], row["combination"]
            top = row["top_finding"]
            print(f"{name:9}{(evade or ''):6}phi {rate:<6}seed {seed}  poisons {row['poisons']:3}  AUROC(d) {row['auroc']['cosine_distance']:.3f}"
                  f"  alone: recall {a['recall']:.3f} fpr {a['fpr']:.4f}  combined: recall {c['recall']:.3f} fpr {c['fpr']:.4f}"
                  f"  goal rank {row['goal_rank']}  top: {top and (top['kind'] + ' ' + top['goal'] + ' ' + str(top['poisons_in_it']) + '/' + str(top['pairs']))}"
                  f"  audit {row['audit_seconds_per_10k_pairs']} s/10k", flush=True)
    clean = []
    for noise in [n for n in args.clean_noise.split(",") if n]:
        for seed in range(args.clean_first_seed, args.clean_first_seed + args.clean_seeds):
            clean.append(one_clean(args.out, noise, seed))
            print(f"clean {noise} world seed {seed}: {clean[-1]['findings']} finding(s) on {clean[-1]['pairs']} pairs "
                  f"(largest -log10 p {clean[-1]['largest_neglog10_p']})", flush=True)
    result = {**run_header(Path(__file__).resolve().parents[1]),  # platform.processor() is often empty on Linux
              "rate": args.rate, "labelled": args.labelled, "fpr_budget": args.fpr, "criterion": args.criterion, "world_seed": args.world_seed,
              "cells": rows, "clean_worlds": clean}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "signals_benchmark.json").write_text(json.dumps(result, indent=2, default=float) + "\n")


def one_clean(out: Path, noise: str, seed: int) -> dict:
    """No attack: how many findings the audit raises on a clean world, and the nearest miss."""
    world = world_folder(out, noise, seed)
    work = prepared(out / f"clean-{noise}-{seed}",
                    lambda f: api.score(str(world / "train"), f / "scores", model=REFERENCE, save_embeddings=True))
    audit = run_audit(AuditConfig(scores=work / "scores", out=work / "audit", keywords=world / "keywords.json"))
    from clipguard.audit.detect import DetectConfig, detect  # every test's score, not only the findings
    tested = detect(audit.tables, replace(DetectConfig(), alpha=1.0 - 1e-12)).findings
    return {"noise": noise, "world_seed": seed, "pairs": len(audit.pairs), "findings": len(audit.findings),
            "names": [f"{f.kind} {f.goal}" for f in audit.findings],
            "largest_neglog10_p": round(max((f.neglog10_p for f in tested), default=0.0), 2)}


if __name__ == "__main__":
    main()
