"""`clipguard calibrate` end to end on real shards: a real Attack II (`clipguard attack`), scores from
a real tiny open_clip model, a sample drawn by `clipguard sample`, labels as a person would write
them, canaries scored by the score folder's model, and every named bad input."""

from __future__ import annotations

import csv
import io
import json
import shutil
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from clipguard.calibration.run import RECALL_CANARIES, RECALL_LABELS
from clipguard.cli.main import app
from clipguard.filtering.threshold import load_calibration
from clipguard.model.checkpoint import save_checkpoint
from clipguard.model.loading import ModelSpec, load_model
from clipguard.scoring.scorefiles import read_scores
from conftest import TINY_MODEL, jpeg_bytes, write_shard

runner = CliRunner()
CLASSES = ("cat", "dog", "car")


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def said(result) -> str:
    """The command's output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def labelled_shards(folder: Path) -> Path:
    for s in range(3):
        samples = []
        for i in range(30):
            name = CLASSES[(s * 30 + i) % 3]
            samples.append({
                "__key__": f"{s:05d}{i:04d}", "jpg": jpeg_bytes(s * 1000 + i),
                "txt": f"a photo of a {name} number {i}", "json": json.dumps({"class": name}).encode(),
            })
        if s == 2:
            samples[2]["jpg"] = b"not a jpeg"  # a car: an error row when scored, never a poison source
        write_shard(folder / f"{s:05d}.tar", samples)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_checkpoint):
    """Attack II (6 poisons in 96 pairs, one of which cannot be scored), scored, and a stratified
    sample of 40 to label."""
    root = tmp_path_factory.mktemp("calibrate")
    clean = labelled_shards(root / "clean")
    poisoned = root / "poisoned"
    attacked = invoke("attack", "single-label", clean, "--goal", "cat:dog", "--count", 6, "--out", poisoned)
    assert attacked.exit_code == 0, attacked.output
    scores = root / "scores"
    scored = invoke("score", poisoned, "--out", scores, "--model", tiny_checkpoint, "--workers", 0)
    assert scored.exit_code == 0, scored.output
    label = root / "label"
    sampled = invoke("sample", scores, "-n", 40, "--stratify", "--out", label)
    assert sampled.exit_code == 0, sampled.output
    manifest = json.loads((poisoned / "poison_manifest.json").read_text())
    return SimpleNamespace(
        root=root, poisoned=poisoned, scores=scores, label=label, checkpoint=tiny_checkpoint,
        poisons={(p["shard"], p["key"]) for p in manifest["poisons"]},
    )


def sample_rows(world) -> list[dict[str, str]]:
    with open(world.label / "sample.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_labels(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    return path


def labels_by_distance(world, name: str = "labelled.csv") -> Path:
    """Labels with a gap (the top quarter of the sample by distance is poison), so targets are reachable."""
    rows = sample_rows(world)
    cut = np.quantile([float(r["distance"]) for r in rows], 0.75)
    for row, value in zip(rows, ("poison" if float(r["distance"]) >= cut else "clean" for r in rows)):
        row["label"] = value
    return write_labels(world.label / name, rows)


def population(world):
    table = read_scores(world.scores)
    ok = table.status == "ok"
    truth = np.array([(s, k) in world.poisons for s, k in zip(table.shard[ok], table.key[ok])])
    return table.cosine_distance[ok], truth


def test_calibration_json_has_gamma_intervals_and_the_model_and_filter_accepts_it(tmp_path, world):
    labels = labels_by_distance(world)
    result = invoke("calibrate", world.scores, "--labels", labels, "--out", tmp_path, "--target-fpr", 0.2)
    assert result.exit_code == 0, result.output
    payload = json.loads((tmp_path / "calibration.json").read_text())
    manifest = json.loads((world.scores / "manifest.json").read_text())
    assert payload["format"] == "clipguard-calibration/1"
    assert payload["fingerprint"] == manifest["fingerprint"]
    assert payload["labels"]["kind"] == "label-file" and payload["labels"]["n_labelled"] == 40
    assert payload["design"] == "stratified" and payload["method"] == "target_fpr"
    distances, _ = population(world)
    assert payload["flagged_fraction"] == pytest.approx(np.mean(distances >= payload["gamma"]))
    for name in ("precision", "recall", "false_positive_rate"):
        estimate = payload["estimates"][name]
        assert estimate["lower"] <= estimate["point"] <= estimate["upper"]
    assert payload["estimates"]["false_positive_rate"]["upper"] <= 0.2
    assert payload["recall_estimates"][RECALL_LABELS] == payload["estimates"]["recall"]
    assert payload["recall_estimates"][RECALL_CANARIES] is None
    assert payload["labels_needed"]["target_width"] == 0.1
    assert (tmp_path / "densities.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for text in ("gamma", RECALL_LABELS, "false-positive rate", "ROC AUC", "more labels"):
        assert text in said(result)
    threshold = load_calibration(tmp_path / "calibration.json")
    assert threshold.gamma == payload["gamma"] and threshold.fingerprint == manifest["fingerprint"]


def test_page_labels_csv_with_only_key_shard_label_is_accepted(tmp_path, world):
    rows = [{"key": r["key"], "shard": r["shard"], "label": ("1" if i % 4 == 0 else "0")} for i, r in enumerate(sample_rows(world))]
    rows[1]["label"] = ""  # left unlabelled on the page
    labels = write_labels(world.label / "labels.csv", rows)
    result = invoke("calibrate", world.scores, "--labels", labels, "--out", tmp_path, "--max-f1")
    assert result.exit_code == 0, result.output
    payload = json.loads((tmp_path / "calibration.json").read_text())
    assert payload["n_labelled"] == 39 and payload["n_unlabelled"] == 1 and payload["method"] == "max_f1"
    assert "1 sampled pair(s) left unlabelled" in said(result)


def test_canaries_are_mismatched_pairs_scored_by_the_score_folders_model(tmp_path, world, tiny_loaded):
    labels = labels_by_distance(world)
    result = invoke("calibrate", world.scores, "--labels", labels, "--out", tmp_path, "--canaries", 8,
                    "--target-fpr", 0.2)
    assert result.exit_code == 0, result.output
    assert RECALL_LABELS in said(result) and RECALL_CANARIES in said(result)
    payload = json.loads((tmp_path / "calibration.json").read_text())
    assert payload["canaries"]["scored"] == 8 and payload["n_canaries"] == 8
    assert payload["recall_estimates"][RECALL_CANARIES]["source"] == "canaries"
    with open(tmp_path / "canaries.csv", newline="", encoding="utf-8") as handle:
        canaries = list(csv.DictReader(handle))
    assert len(canaries) == 8
    members = {}
    for tar in sorted(world.poisoned.glob("*.tar")):
        with tarfile.open(tar) as archive:
            members.update({(tar.stem, m.name): archive.extractfile(m).read() for m in archive.getmembers()})
    captions, images = [], []
    for canary in canaries:
        assert (canary["caption_shard"], canary["caption_key"]) != (canary["image_shard"], canary["image_key"])
        caption = members[(canary["caption_shard"], canary["caption_key"] + ".txt")].decode()
        image_caption = members[(canary["image_shard"], canary["image_key"] + ".txt")].decode()
        assert caption == canary["caption"] and image_caption != caption
        captions.append(caption)
        images.append(Image.open(io.BytesIO(members[(canary["image_shard"], canary["image_key"] + ".jpg")])))
    # The checkpoint the folder was scored with holds tiny_loaded's weights: a plain open_clip loop.
    model, preprocess, tokenizer = tiny_loaded.model, tiny_loaded.preprocess, tiny_loaded.tokenizer
    with torch.no_grad():
        image_features = model.encode_image(torch.stack([preprocess(i) for i in images]), normalize=True)
        text_features = model.encode_text(tokenizer(captions), normalize=True)
    expected = 1 - (image_features * text_features).sum(-1)
    assert [float(c["distance"]) for c in canaries] == pytest.approx(expected.tolist(), abs=1e-5)


def test_poison_manifest_census_gives_the_exact_full_data_values(tmp_path, world):
    result = invoke("calibrate", world.scores, "--labels", world.poisoned / "poison_manifest.json",
                    "--out", tmp_path, "--target-fpr", 0.1, "--criterion", "point")
    assert result.exit_code == 0, result.output
    payload = json.loads((tmp_path / "calibration.json").read_text())
    assert payload["labels"]["mode"] == "census" and payload["n_labelled"] == 95 and payload["n_positive_labels"] == 6
    assert payload["population"] == {"pairs": 95, "error_pairs_excluded": 1}
    distances, truth = population(world)
    flagged = distances >= payload["gamma"]
    exact = {
        "recall": (flagged & truth).sum() / truth.sum(),
        "false_positive_rate": (flagged & ~truth).sum() / (~truth).sum(),
        "precision": (flagged & truth).sum() / max(flagged.sum(), 1),
    }
    for name, value in exact.items():
        estimate = payload["estimates"][name]
        assert estimate["point"] == pytest.approx(value)
        assert estimate["lower"] == pytest.approx(value) and estimate["upper"] == pytest.approx(value)
    assert "census" in said(result)


def test_labels_sample_draws_from_the_manifest_as_a_person_would_label(tmp_path, world):
    result = invoke("calibrate", world.scores, "--labels", world.poisoned, "--labels-sample", 92,
                    "--out", tmp_path, "--max-f1")
    assert result.exit_code == 0, result.output
    payload = json.loads((tmp_path / "calibration.json").read_text())
    assert payload["labels"]["mode"] == "sample" and payload["n_labelled"] == 92
    assert payload["labels"]["kind"] == "poison-manifest" and payload["n_positive_labels"] >= 3


def test_label_file_errors_are_clear(tmp_path, world):
    rows = sample_rows(world)

    def run_with(rows, name):
        path = write_labels(world.label / name, rows)
        return invoke("calibrate", world.scores, "--labels", path, "--out", tmp_path)

    labelled = [{**r, "label": "clean"} for r in rows]
    one_class = run_with(labelled, "one_class.csv")
    assert one_class.exit_code == 2
    assert "all 40 labelled pairs are clean" in said(one_class) and "--canaries" in said(one_class)

    unknown = labelled + [{**rows[0], "key": f"nope{i}", "label": "poison"} for i in range(3)]
    result = run_with(unknown, "unknown.csv")
    assert result.exit_code == 2 and "3 labelled key(s)" in said(result) and "nope0" in said(result)

    table = read_scores(world.scores)
    failed = next((s, k) for s, k, status in zip(table.shard, table.key, table.status) if status == "error")
    unscored = labelled + [{**rows[0], "shard": failed[0], "key": failed[1], "label": "clean"}]
    result = run_with(unscored, "unscored.csv")
    assert result.exit_code == 2 and "1 of them could not be scored" in said(result)

    empty = run_with([{**r, "label": ""} for r in rows], "empty.csv")
    assert empty.exit_code == 2 and "no label" in said(empty)

    odd = [dict(r) for r in labelled]
    odd[2]["label"], odd[5]["label"] = "maybe", "poisson"
    result = run_with(odd, "odd.csv")
    assert result.exit_code == 2 and "2 label(s)" in said(result) and "line 4: 'maybe'" in said(result)

    sampled = {(r["shard"], r["key"]) for r in rows}
    outside = next((s, k) for s, k, status in zip(table.shard, table.key, table.status)
                   if (s, k) not in sampled and status == "ok")
    extra = labelled + [{**rows[0], "shard": outside[0], "key": outside[1], "label": "poison"}]
    result = run_with(extra, "outside.csv")
    assert result.exit_code == 2 and "not in the drawn sample" in said(result)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved = shutil.copy(labels_by_distance(world), elsewhere / "labels.csv")
    result = invoke("calibrate", world.scores, "--labels", moved, "--out", tmp_path)
    assert result.exit_code == 2 and "sample_design.json" in said(result)

    not_labels = invoke("calibrate", world.scores, "--labels", world.scores / "manifest.json", "--out", tmp_path)
    assert not_labels.exit_code == 2 and "not a clipguard poison manifest" in said(not_labels)


def test_scores_from_another_model_and_missing_weights_are_refused(tmp_path, world, tiny_loaded):
    # A second random tiny model: the same shards give different distances, so the sample's rows
    # and gamma mean nothing under it.
    other = load_model(ModelSpec(name=TINY_MODEL, pretrained=None))
    weights = save_checkpoint(other.model, tmp_path / "other" / "other.safetensors", TINY_MODEL)
    other_scores = tmp_path / "other-scores"
    scored = invoke("score", world.poisoned, "--out", other_scores, "--model", weights, "--workers", 0)
    assert scored.exit_code == 0, scored.output
    labels = labels_by_distance(world)
    result = invoke("calibrate", other_scores, "--labels", labels, "--out", tmp_path)
    assert result.exit_code == 2 and "do not transfer between models" in said(result)

    weights.unlink()
    missing = invoke("calibrate", other_scores, "--labels", world.poisoned, "--out", tmp_path, "--canaries", 4)
    assert missing.exit_code == 2 and "is not available here" in said(missing)


def test_poison_manifest_naming_pairs_that_were_not_scored_is_refused(tmp_path, world):
    manifest = json.loads((world.poisoned / "poison_manifest.json").read_text())
    manifest["poisons"][0]["key"] = "not-a-key"
    manifest["poisons"][1]["key"] = "neither"
    path = tmp_path / "poison_manifest.json"
    path.write_text(json.dumps(manifest))
    result = invoke("calibrate", world.scores, "--labels", path, "--out", tmp_path)
    assert result.exit_code == 2 and "2 of the 6 poison keys" in said(result) and "not-a-key" in said(result)


@pytest.mark.parametrize("seed, target", [(13, 0.01), (28, 0.05), (30, 0.05)])
def test_the_reported_fpr_bound_keeps_the_target(seed, target):
    """Regression (clipguard/calibration/threshold.py): gamma was picked with the scan's simulated
    bounds (1,000 draws) but reported with fresh ones (4,000 draws), which differ by Monte Carlo
    noise, so `calibrate --target-fpr F` could print an FPR upper bound above F (these seeds did)."""
    from clipguard.calibration import choose_threshold, draw_sample, label_sample

    rng = np.random.default_rng(seed)
    poison = rng.random(2000) < 0.01
    distances = np.where(poison, rng.normal(0.85, 0.02, 2000), rng.normal(0.75, 0.03, 2000))
    design = draw_sample(distances, 100, seed, stratify=True)
    sample = label_sample(design, distances, design.indices, poison[design.indices])
    calibration = choose_threshold(sample, distances, target_fpr=target)
    assert calibration.estimates.false_positive_rate.upper <= target


def write_audit(folder: Path, pairs: list[tuple[str, str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "findings.json").write_text(json.dumps({"format": "clipguard-audit/1", "findings": [
        {"name": "class-pair concentration: cat:dog", "description": "", "p_value": 1e-9,
         "pairs": [{"shard": s, "key": k} for s, k in pairs]},
    ]}))
    return folder


def test_with_an_audit_gamma_is_chosen_for_distance_or_finding_and_filter_needs_that_audit(tmp_path, world):
    distances, truth = population(world)
    table = read_scores(world.scores)
    ok = table.status == "ok"
    ids = list(zip(table.shard[ok], table.key[ok]))
    # The finding holds the three poisons of lowest distance (those a pair filter misses first) and one clean pair.
    poison_rows = sorted(np.flatnonzero(truth), key=lambda i: distances[i])[:3]
    clean_row = int(np.flatnonzero(~truth)[0])
    members = np.zeros(len(ids), dtype=bool)
    members[[*poison_rows, clean_row]] = True
    audit = write_audit(tmp_path / "audit", [ids[i] for i in np.flatnonzero(members)])

    result = invoke("calibrate", world.scores, "--labels", world.poisoned / "poison_manifest.json", "--out", tmp_path / "cal",
                    "--target-fpr", 0.1, "--criterion", "point", "--audit", audit)
    assert result.exit_code == 0, result.output
    payload = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert payload["audit"]["finding_pairs_in_population"] == 4 and payload["audit"]["finding_pairs_labelled_clean"] == 1
    assert payload["flag_rule"].endswith("or in a finding of the audit") and "d >= gamma or in a finding" in said(result)
    flagged = (distances >= payload["gamma"]) | members
    exact = {"recall": (flagged & truth).sum() / truth.sum(),
             "false_positive_rate": (flagged & ~truth).sum() / (~truth).sum()}
    for name, value in exact.items():
        assert payload["estimates"][name]["point"] == pytest.approx(value)
    assert exact["false_positive_rate"] <= 0.1
    # Distance alone at the same target, for comparison: the union never recalls less.
    alone = invoke("calibrate", world.scores, "--labels", world.poisoned / "poison_manifest.json", "--out", tmp_path / "alone",
                   "--target-fpr", 0.1, "--criterion", "point")
    assert alone.exit_code == 0
    alone_recall = json.loads((tmp_path / "alone" / "calibration.json").read_text())["estimates"]["recall"]["point"]
    assert exact["recall"] >= alone_recall

    # That gamma is only the calibrated rule with that audit's findings.
    args = ["filter", world.poisoned, "--out", tmp_path / "clean", "--quarantine", tmp_path / "q", "--scores", world.scores,
            "--model", world.checkpoint, "--workers", 0, "--calibration", tmp_path / "cal" / "calibration.json"]
    without = invoke(*args)
    assert without.exit_code == 2 and "pass that audit with --audit" in said(without)
    other = write_audit(tmp_path / "other", [ids[0]])
    mismatched = invoke(*args, "--audit", other)
    assert mismatched.exit_code == 2 and "another audit's findings" in said(mismatched)
    matched = invoke(*args, "--audit", audit)
    assert matched.exit_code == 0, matched.output
    manifest = json.loads((tmp_path / "clean" / "filter_manifest.json").read_text())
    assert manifest["totals"]["flagged"] == int(flagged.sum())


def test_an_audit_works_with_a_stratified_sample_of_labels(tmp_path, world):
    table = read_scores(world.scores)
    audit = write_audit(tmp_path / "audit", [(table.shard[0], table.key[0])])
    result = invoke("calibrate", world.scores, "--labels", labels_by_distance(world, "strat.csv"), "--out", tmp_path,
                    "--target-fpr", 0.2, "--criterion", "point", "--audit", audit)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "calibration.json").read_text())["audit"]["finding_pairs_in_population"] == 1


def write_signal(audit: Path, ids: list[tuple[str, str]], column: str, values: np.ndarray) -> None:
    """A cross-pair signal column as `clipguard audit` writes it: AUDIT/signals/<shard>.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (audit / "signals").mkdir(parents=True, exist_ok=True)
    shards = sorted({s for s, _ in ids})
    for shard in shards:
        rows = [i for i, (s, _) in enumerate(ids) if s == shard]
        pq.write_table(pa.table({"shard": [shard] * len(rows), "key": [ids[i][1] for i in rows],
                                 column: values[rows]}), audit / "signals" / f"{shard}.parquet")


def test_a_signal_gets_its_threshold_under_the_same_budget_and_filter_applies_it(tmp_path, world):
    distances, truth = population(world)
    table = read_scores(world.scores)
    ok = table.status == "ok"
    ids = list(zip(table.shard[ok], table.key[ok]))
    audit = write_audit(tmp_path / "audit", [ids[int(np.flatnonzero(truth)[0])]])
    # A local-outlier score: poisons highest; one pair not measured (NaN) is never flagged.
    lof = np.where(truth, 3.0 + np.arange(len(truth)) * 0.001, np.linspace(0.5, 1.5, len(truth)))
    lof[int(np.flatnonzero(~truth)[-1])] = np.nan
    write_signal(audit, ids, "image_lof", lof)

    result = invoke("calibrate", world.scores, "--labels", world.poisoned / "poison_manifest.json", "--out", tmp_path / "cal",
                    "--target-fpr", 0.2, "--criterion", "point", "--audit", audit, "--signal", "image_lof")
    assert result.exit_code == 0, result.output
    payload = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    [rule] = payload["signal_rules"]
    n = len(truth)
    phi = rule["poisoned_share_upper"]
    assert truth.mean() < phi < 1
    # Half of the 20% target, over the whole population, divided by the clean share's lower bound.
    assert rule["flagged_pairs"] == int(np.floor(0.1 * (1 - phi) * n)) == int((np.nan_to_num(lof, nan=-1) > rule["threshold"]).sum())
    assert rule["fpr_upper"] == pytest.approx(rule["flagged_pairs"] / n / (1 - phi))
    assert payload["targets"]["fpr"] == pytest.approx(0.2 - rule["fpr_upper"])  # gamma got the rest
    assert payload["flag_rule"].endswith(f"or image_lof > {rule['threshold']:g}") and "image_lof >" in said(result)

    args = ["filter", world.poisoned, "--out", tmp_path / "clean", "--quarantine", tmp_path / "q", "--scores", world.scores,
            "--model", world.checkpoint, "--workers", 0, "--calibration", tmp_path / "cal" / "calibration.json"]
    without = invoke(*args)
    assert without.exit_code == 2 and "pass that audit with --audit" in said(without)
    matched = invoke(*args, "--audit", audit)
    assert matched.exit_code == 0, matched.output
    flagged = (distances >= payload["gamma"]) | (np.nan_to_num(lof, nan=-1) > rule["threshold"])
    flagged[int(np.flatnonzero(truth)[0])] = True
    manifest = json.loads((tmp_path / "clean" / "filter_manifest.json").read_text())
    assert manifest["totals"]["flagged"] == int(flagged.sum())
    reasons = [json.loads(m) for m in _quarantine_reasons(tmp_path / "q")]
    assert any("image_lof" in r["reason"] for r in reasons)


def _quarantine_reasons(folder: Path) -> list[bytes]:
    out = []
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as archive:
            out += [archive.extractfile(m).read() for m in archive.getmembers() if m.name.endswith(".clipguard.json")]
    return out


def test_malformed_signal_rules_in_a_calibration_file_are_a_clear_error(tmp_path):
    from clipguard.errors import ClipguardError

    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"gamma": 0.8, "signal_rules": [{"signal": "image_lof"}]}))
    with pytest.raises(ClipguardError, match="signal_rules.* must be a list of"):
        load_calibration(path)
    path.write_text(json.dumps({"gamma": 0.8, "signal_rules": [{"signal": "image_lof", "threshold": 1.5}]}))
    assert load_calibration(path).signal_rules == (("image_lof", 1.5),)
