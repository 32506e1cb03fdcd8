"""Acceptance: the labelling workflow finds a gamma that works on real Attack II data.

The synthetic world's train split is poisoned with `clipguard attack single-label` (sheep texts
paired with aeroplane images, φ = 0.5%), scored by the bundled reference model, and a stratified
sample of 500 pairs is drawn with `clipguard sample`. A person would label those 500 pairs; here
each takes its label from the poison manifest, and nothing else of the manifest is used. Gamma is
then calibrated for FPR <= 1% (upper confidence bound), with canaries for a second view of recall.

Measured against the full poison manifest, that gamma must catch at least 95% of the poisons at a
false-positive rate of at most 1%, and every interval `calibrate` reports must contain the
full-data value it estimates.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from clipguard.calibration.run import RECALL_CANARIES
from clipguard.cli.main import app
from clipguard.scoring.scorefiles import read_scores
from clipguard.synth import WorldSpec, generate_world

runner = CliRunner()
POISON_RATE = 0.005
LABELS = 500
CANARIES = 200
TARGET_FPR = 0.01


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def label_from_manifest(sample_csv: Path, poisons: set[tuple[str, str]]) -> int:
    """Fill the label column the way a person would: one label per listed pair. Returns the poisons seen."""
    with open(sample_csv, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["label"] = "poison" if (row["shard"], row["key"]) in poisons else "clean"
    with open(sample_csv, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    return sum(row["label"] == "poison" for row in rows)


def full_data_truth(scores: Path, poisons: set[tuple[str, str]], gamma: float) -> dict[str, float]:
    table = read_scores(scores)
    ok = table.status == "ok"
    distance = table.cosine_distance[ok]
    truth = np.array([(s, k) in poisons for s, k in zip(table.shard[ok], table.key[ok])])
    flagged = distance >= gamma
    # The best any gamma could do: flag every poison above the clean pairs' (1 - FPR) quantile.
    clean_sorted = np.sort(distance[~truth])[::-1]
    allowed_false_positives = int(np.floor(TARGET_FPR * clean_sorted.size))
    best_gamma = np.nextafter(clean_sorted[allowed_false_positives], np.inf)
    return {
        "best_recall_at_target_fpr": float(np.mean(distance[truth] >= best_gamma)),
        "n_poisons": float(truth.sum()),
        "precision": (flagged & truth).sum() / flagged.sum(),
        "recall": (flagged & truth).sum() / truth.sum(),
        "false_positive_rate": (flagged & ~truth).sum() / (~truth).sum(),
        "flagged_fraction": flagged.mean(),
        "pairs": float(ok.sum()),
    }


@dataclass(frozen=True)
class Outcome:
    calibration: dict
    truth: dict[str, float]
    summary: dict
    output: str


@pytest.fixture(scope="module")
def outcome(tmp_path_factory) -> Outcome:
    """The whole workflow once: world -> attack -> score -> sample -> label -> calibrate."""
    root = tmp_path_factory.mktemp("acceptance")
    world = generate_world(root / "world", WorldSpec(train_images=1500, reference_images=1, test_images_per_class=1))
    poisoned = root / "poisoned"
    invoke("attack", "single-label", world.shards("train"), "--goal", "sheep:aeroplane",
           "--rate", POISON_RATE, "--out", poisoned)
    manifest = json.loads((poisoned / "poison_manifest.json").read_text())
    poisons = {(p["shard"], p["key"]) for p in manifest["poisons"]}
    assert 0.001 <= manifest["rate"] <= 0.01

    scores = root / "scores"
    invoke("score", poisoned, "--out", scores, "--model", "clipguard-reference", "--workers", 1)
    label = root / "label"
    invoke("sample", scores, "-n", LABELS, "--stratify", "--out", label)
    poisons_labelled = label_from_manifest(label / "sample.csv", poisons)

    out = root / "calibration"
    report = invoke("calibrate", scores, "--labels", label / "sample.csv", "--target-fpr", TARGET_FPR,
                    "--canaries", CANARIES, "--out", out)
    calibration = json.loads((out / "calibration.json").read_text())
    truth = full_data_truth(scores, poisons, calibration["gamma"])
    summary = {
        "phi": manifest["rate"], "pairs": truth["pairs"], "poisons": truth["n_poisons"],
        "labels": calibration["n_labelled"], "poisons_labelled": poisons_labelled,
        "gamma": calibration["gamma"], "true": truth,
        "estimated": {k: calibration["estimates"][k] for k in ("n_poisons", "precision", "recall", "false_positive_rate")},
        "canary_recall": calibration["estimates"]["canary_recall"],
    }
    (root / "acceptance.json").write_text(json.dumps(summary, indent=2, default=float))
    return Outcome(calibration, truth, summary, " ".join(report.output.split()))


@pytest.mark.slow
def test_calibrated_gamma_keeps_its_fpr_promise_and_its_intervals_cover_the_full_data(outcome):
    calibration, truth = outcome.calibration, outcome.truth
    assert calibration["n_labelled"] <= LABELS and calibration["labels"]["kind"] == "label-file"
    assert truth["false_positive_rate"] <= TARGET_FPR, outcome.summary
    for name in ("n_poisons", "precision", "recall", "false_positive_rate"):
        estimate = calibration["estimates"][name]
        assert estimate["lower"] <= truth[name] <= estimate["upper"], (name, outcome.summary)
    assert calibration["flagged_fraction"] == pytest.approx(truth["flagged_fraction"])
    assert calibration["estimates"]["canary_recall"]["source"] == "canaries"
    assert RECALL_CANARIES in outcome.output


@pytest.mark.slow
def test_calibrated_gamma_catches_95_percent_of_attack_ii_at_1_percent_fpr(outcome):
    assert outcome.truth["recall"] >= 0.95, outcome.summary
