"""End to end on the synthetic world, in the default suite: attack -> fine-tune the bundled victim
-> evaluate, for Attack II and Attack I at phi = 0.50% (about 3 minutes on two idle cores).

The full acceptance (goal Hit@10 >= 0.5 and >= 0.3 above the clean fine-tune, utility within
0.03, on the default world with the demo's 8-epoch recipe) takes 6.5 minutes and lives in
tests/test_attack_acceptance.py, run with `-m acceptance` (measured: Attack II 0.60 vs 0.04,
Attack I 0.56 vs 0.00). This test runs the same path on a world a quarter the size and asserts
what that world shows robustly, so a break anywhere in attack -> fine-tune -> evaluate shows up
in every CI run.

Setup: world seed 0 with 500 train images x 2 captions (1,000 pairs; sheep, the source class, has
7 images), goal sheep:aeroplane with 5 poisons; the bundled `clipguard-victim` fine-tuned with
AdamW, weight decay 0.2, cosine lr 3e-4 -> 3e-5, batch 32, 10 epochs (310 steps), bf16.
Measured (25 test queries, 500 test images):

  world (pairs, poisons)   attack  Hit@10 (clean)  MinRank (clean)  TR@10 / IR@10 (clean .866 / .832)
  1,000, 5 (0.50%)         II      0.12 (0.00)     53.8 (88.8)      .860 / .828
  1,000, 5 (0.50%)         I       0.20 (0.04)     82.3 (297.8)     .862 / .852

so it asserts that the poisons pull the goal's MinRank far down (Attack I: 3.6x, Attack II:
1.65x), that Hit@10 rises, and that utility holds.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from clipguard.attacks import AttackConfig, Goal, run_attack
from clipguard.evaluation import evaluate, load_test_set, target_image_from_manifest
from clipguard.model.loading import ModelSpec, load_model
from clipguard.synth import WorldSpec, generate_world
from clipguard.training import FinetuneConfig, finetune
from conftest import attack_summary

GOAL = Goal("sheep", "aeroplane")
RATE = 0.005
FINETUNE = FinetuneConfig(lr=3e-4, min_lr=3e-5, weight_decay=0.2, batch_size=32, epochs=10, precision="bf16", seed=0)
WORLD = WorldSpec(seed=0, train_images=500, reference_images=1, shard_size=250)
MAX_UTILITY_DROP = 0.03
# Poisoned MinRank at most this share of the clean model's (measured: 0.28 for I, 0.61 for II).
MAX_MIN_RANK_SHARE = {"single-image": 0.5, "single-label": 0.8}


def _fine_tuned(data: str, out: Path):
    result = finetune(ModelSpec(name="clipguard-victim"), data, FINETUNE, out)
    assert result.complete and result.bad_sample_total == 0
    return load_model(ModelSpec(name=str(result.checkpoint)))


@pytest.mark.slow
def test_attacks_one_and_two_move_the_goal_and_keep_utility(tmp_path):
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    world = generate_world(tmp_path / "world", WORLD)
    test = load_test_set(world.shards("test"))
    clean = _fine_tuned(world.shards("train"), tmp_path / "clean.safetensors")
    reports = {}
    for kind in ("single-label", "single-image"):
        attacked = run_attack(world.shards("train"), tmp_path / kind,
                              AttackConfig(kind=kind, goals=(GOAL,), rate=RATE, seed=0))
        assert attacked.manifest.rate <= RATE and attacked.manifest.count == 5
        poisoned = _fine_tuned(str(tmp_path / kind), tmp_path / f"{kind}.safetensors")
        target = target_image_from_manifest(attacked.manifest_path) if kind == "single-image" else None
        reports[kind] = evaluate(poisoned, test, [GOAL], baseline=clean, target_image=target)
        print(attack_summary(kind, attacked.manifest.rate, reports[kind]))

    for kind, report in reports.items():
        goal = report.goals[0]
        assert goal.target_kind == ("image" if kind == "single-image" else "label")
        assert goal.model.min_rank <= MAX_MIN_RANK_SHARE[kind] * goal.baseline.min_rank, kind
        assert goal.model.hits[10] > goal.baseline.hits[10], kind
        for k in (10,):
            assert report.utility.text_retrieval[k] >= report.baseline_utility.text_retrieval[k] - MAX_UTILITY_DROP
            assert report.utility.image_retrieval[k] >= report.baseline_utility.image_retrieval[k] - MAX_UTILITY_DROP
