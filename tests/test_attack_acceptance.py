"""Issue 4's acceptance on the default synthetic world, run on demand (about 6 minutes on 2 cores):

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -m acceptance -s tests/test_attack_acceptance.py

Fine-tuning the bundled victim on Attack II and on Attack I poisoned `train` data at phi <= 0.5%
raises the goal's Hit@10 to at least 0.5 and at least 0.3 above the clean fine-tune, while utility
(TR and IR Hit@10 on the test pairs) drops by at most 0.03.

The victim's fine-tune is the paper's recipe (AdamW, weight decay 0.2, cosine decay) with a
learning rate, batch and epoch count for a 5 M-parameter model that starts from 8,000 synthetic
pairs rather than a ViT-B/32 from 400 M: lr 1e-3 -> 1e-4 (paper 1e-5 -> 1e-6), batch 32 (128),
8 epochs (10) - the demo's victim recipe, `DemoConfig().victim_config()`. Under the paper's own numbers, or at lr 1e-4, the 20 poisons
do not move this model (docs/results.md has every setting tried and what it gave).

Not in the default suite: three 8-epoch fine-tunes cost about 6 minutes of both cores, more than
the whole rest of the suite; `tests/test_attack_end_to_end.py` checks the same path in 3.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from clipguard.attacks import AttackConfig, Goal, run_attack
from clipguard.demo import DemoConfig
from clipguard.evaluation import evaluate, load_test_set, target_image_from_manifest
from clipguard.model.loading import ModelSpec, load_model
from clipguard.synth import WorldSpec, generate_world
from clipguard.training import FinetuneJob, finetune_side_by_side
from conftest import attack_summary

GOAL = Goal("sheep", "aeroplane")
RATE = 0.005
VICTIM_RECIPE = DemoConfig().victim_config()  # lr 1e-3 -> 1e-4, wd 0.2, batch 32, 8 epochs, bf16
MIN_HIT_AT_10, MIN_GAIN, MAX_UTILITY_DROP = 0.5, 0.3, 0.03
ATTACKS = ("single-label", "single-image")  # Attack II, Attack I


@pytest.mark.acceptance
def test_attacks_one_and_two_reach_the_papers_effect_at_half_a_percent(tmp_path: Path):
    world = generate_world(tmp_path / "world", WorldSpec(reference_images=1))  # the default train and test splits
    attacked = {kind: run_attack(world.shards("train"), tmp_path / kind, AttackConfig(kind=kind, goals=(GOAL,), rate=RATE, seed=0))
                for kind in ATTACKS}
    victim = ModelSpec(name="clipguard-victim")
    jobs = [FinetuneJob(victim, world.shards("train"), VICTIM_RECIPE, tmp_path / "clean.safetensors")]
    jobs += [FinetuneJob(victim, str(tmp_path / kind), VICTIM_RECIPE, tmp_path / f"{kind}.safetensors") for kind in ATTACKS]
    clean_run, *attack_runs = finetune_side_by_side(jobs, workers=len(jobs))

    test = load_test_set(world.shards("test"))
    clean = load_model(ModelSpec(name=str(clean_run.checkpoint)))
    failures = []
    for kind, run in zip(ATTACKS, attack_runs):
        result = attacked[kind]
        assert result.manifest.rate <= RATE and run.complete and run.bad_sample_total == 0
        target = target_image_from_manifest(result.manifest_path) if kind == "single-image" else None
        report = evaluate(load_model(ModelSpec(name=str(run.checkpoint))), test, [GOAL], baseline=clean, target_image=target)
        print(attack_summary(kind, result.manifest.rate, report))
        goal, utility, clean_utility = report.goals[0], report.utility, report.baseline_utility
        if goal.model.hits[10] < MIN_HIT_AT_10:
            failures.append(f"{kind}: Hit@10 {goal.model.hits[10]:.3f} < {MIN_HIT_AT_10}")
        if goal.model.hits[10] - goal.baseline.hits[10] < MIN_GAIN:
            failures.append(f"{kind}: Hit@10 gain {goal.model.hits[10] - goal.baseline.hits[10]:.3f} < {MIN_GAIN}")
        for name, ours, theirs in (("TR", utility.text_retrieval[10], clean_utility.text_retrieval[10]),
                                   ("IR", utility.image_retrieval[10], clean_utility.image_retrieval[10])):
            if theirs - ours > MAX_UTILITY_DROP:
                failures.append(f"{kind}: {name} Hit@10 dropped {theirs - ours:.3f} > {MAX_UTILITY_DROP}")
    assert not failures, failures
