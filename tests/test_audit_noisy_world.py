"""The audit on the real noisy web world (`WorldSpec(noise="web")`) under the bundled reference,
small enough for a test: the failures measured on the default world, one test each.

- stock photos on up to five pages (ten captions of their own class), whose neighbours misjudge
  them, raised image_fan_in findings on clean data (4-7 per clean seed at 4,000 pairs);
- a single-image attack must still stand out against that reuse;
- Attack II at a high rate (the demo's 5%): the poisons' captions outnumber the images' own,
  and the finding named the goal backwards (aeroplane:sheep, on the clean captions).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from clipguard import api
from clipguard.attacks import AttackConfig, AttackKind, Goal, run_attack
from clipguard.audit import AuditConfig, run_audit
from clipguard.labels import LabelSource
from clipguard.synth import WorldSpec, generate_world

WORLD = WorldSpec(seed=0, train_images=800, reference_images=10, test_images_per_class=1,
                  validation_images_per_class=1, shard_size=800, noise="web")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("noisy-audit")
    generate_world(folder, WORLD)
    return folder


def _audit(world: Path, shards: Path, work: Path):
    api.score(str(shards), work / "scores", model="clipguard-reference", save_embeddings=True)
    return run_audit(AuditConfig(scores=work / "scores", out=work / "audit", keywords=world / "keywords.json"))


def _attack(world: Path, work: Path, kind: AttackKind, goal: Goal, **size):
    config = AttackConfig(kind=kind, goals=(goal,), seed=0, label_source=LabelSource.keywords,
                          keywords=world / "keywords.json", overwrite=True, **size)
    result = run_attack(str(world / "train"), work / "poisoned", config)
    audit = _audit(world, work / "poisoned", work)
    poisons = {(Path(p.shard).name.removesuffix(".tar"), p.key) for p in result.manifest.poisons}
    truth = np.array([(Path(s).name.removesuffix(".tar"), str(k)) in poisons
                      for s, k in zip(audit.pairs.shard, audit.pairs.key)])
    return audit, truth


def test_clean_noisy_world_has_no_finding(world, tmp_path):
    audit = _audit(world, world / "train", tmp_path)
    reused = audit.signal_columns["image_fan_in"]
    assert reused.max() >= 6  # stock photos on several pages are there to be misread
    assert audit.findings == [], [f.description for f in audit.findings]


def test_single_image_attack_stands_out_against_stock_photos(world, tmp_path):
    audit, truth = _attack(world, tmp_path, AttackKind.single_image, Goal("sheep", "aeroplane"), count=20)
    top = audit.findings[0]
    assert top.kind == "image_fan_in" and top.goal.startswith("sheep:")
    assert truth[top.rows].all() and truth[top.rows].sum() >= 18


def test_attack_two_at_a_high_rate_names_the_goal_the_right_way_round(world, tmp_path):
    audit, truth = _attack(world, tmp_path, AttackKind.single_label, Goal("sheep", "aeroplane"), rate=0.05)
    top = audit.findings[0]
    assert top.kind == "relabelled_images" and top.goal == "sheep:aeroplane", [f.goal for f in audit.findings]
    assert truth[top.rows].mean() > 0.9 and truth[top.rows].sum() >= 0.5 * truth.sum()


@pytest.mark.parametrize("evade", [None, "clean-label"])
def test_a_backdoor_trigger_is_found_as_stamped_images(world, tmp_path, evade):
    """The stamped copies do not cluster under the bundled reference (most sit beside their own
    originals), but their trigger tile is one patch signature: every poison, and nothing else,
    is in the finding. The clean-label variant stamps images whose captions name the target."""
    audit, truth = _attack(world, tmp_path, AttackKind.backdoor, Goal("*", "sheep"), count=20,
                           **({"evade": evade} if evade else {}))
    stamped = [f for f in audit.findings if f.kind == "stamped_images"]
    assert stamped and stamped[0].goal == "sheep", [f.description for f in audit.findings]
    assert truth[stamped[0].rows].all() and truth[stamped[0].rows].sum() == truth.sum() == 20
    assert audit.findings[0].goal.split(":")[0] == "sheep"
