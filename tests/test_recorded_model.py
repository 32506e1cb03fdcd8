"""One model per run, recorded once: filter, gate and sample follow the model their scores or
calibration record (no --model needed, offline), refuse another one, and work from any folder;
gate's --format json prints an error object when it cannot decide."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clipguard.cli.main import app
from tests.conftest import simple_samples, write_shard

runner = CliRunner()
BUNDLED = "clipguard-reference"


def invoke(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two shards scored with the bundled reference model, a labelled sample, a calibration."""
    root = tmp_path_factory.mktemp("recorded")
    for s in range(2):
        write_shard(root / "shards" / f"{s:05d}.tar", simple_samples(s, 6, seed=3))
    # Scored from inside the root with a relative path, as a user would type it.
    cwd = os.getcwd()
    os.chdir(root)
    try:
        scored = invoke("score", "shards", "--out", "scores", "--model", BUNDLED, "--workers", 0)
    finally:
        os.chdir(cwd)
    assert scored.exit_code == 0, scored.output
    return root


def _manifest(world: Path) -> dict:
    from clipguard.scoring.run import load_manifest

    return load_manifest(world / "scores")


def test_score_folder_records_absolute_shard_urls_and_weights(world):
    manifest = _manifest(world)
    urls = [shard["url"] for shard in manifest["shards"]]
    assert urls and all(os.path.isabs(u) and Path(u).is_file() for u in urls)
    assert os.path.isabs(manifest["model"]["weights_path"])
    assert manifest["model"]["weights_source"] == "bundled"


@pytest.fixture(scope="module")
def labelled(world, tmp_path_factory):
    """`sample` run from a folder that holds neither shards nor scores, labelled, then calibrated."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    cwd = os.getcwd()
    os.chdir(elsewhere)
    try:
        sampled = invoke("sample", world / "scores", "-n", 12, "--out", elsewhere / "label")
        assert sampled.exit_code == 0, sampled.output
        with open(elsewhere / "label" / "sample.csv", newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(line for line in handle if not line.startswith("#")))
        for i, row in enumerate(sorted(rows, key=lambda r: r["key"])):
            row["label"] = "poison" if i % 3 == 0 else "clean"
        labels = elsewhere / "label" / "labelled.csv"
        with open(labels, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0].keys()))
            writer.writeheader()
            writer.writerows(rows)
        calibrated = invoke("calibrate", world / "scores", "--labels", labels, "--out", world / "calibration", "--max-f1")
        assert calibrated.exit_code == 0, calibrated.output
    finally:
        os.chdir(cwd)
    return sampled, rows, world / "calibration" / "calibration.json"


def test_sample_from_another_folder_shows_every_image(labelled):
    sampled, rows, _ = labelled
    shown = next(line for line in sampled.output.splitlines() if "images shown" in line)
    assert "12 of 12" in shown and "unavailable" not in shown, shown
    assert len(rows) == 12


def test_calibration_records_the_score_folders_model(world, labelled):
    payload = json.loads(labelled[2].read_text())
    assert payload["fingerprint"] == _manifest(world)["fingerprint"]
    assert payload["model"]["weights_source"] == "bundled"


def test_gate_with_scores_and_calibration_loads_the_recorded_model_offline(world, labelled, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    calibration = labelled[2]
    result = invoke("gate", world / "shards", "--scores", world / "scores", "--calibration", calibration,
                    "--max-flagged-rate", 1, "--workers", 0, "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["pairs"] == 12 and [s["scores"] for s in report["shards"]] == ["reused", "reused"]
    assert "clipguard-tiny-reference" in result.stderr


def test_gate_follows_the_calibration_alone_when_shards_are_scored_now(world, labelled):
    calibration = labelled[2]
    result = invoke("gate", world / "shards", "--calibration", calibration, "--max-flagged-rate", 1,
                    "--workers", 0, "--format", "json")
    assert result.exit_code == 0, result.output
    assert [s["scores"] for s in json.loads(result.stdout)["shards"]] == ["scored", "scored"]


def test_filter_follows_the_score_folder_and_refuses_another_model(world, tmp_path):
    ok = invoke("filter", world / "shards", "--scores", world / "scores", "--gamma", 0.9,
                "--out", tmp_path / "clean", "--quarantine", tmp_path / "q", "--workers", 0)
    assert ok.exit_code == 0, ok.output
    other = invoke("filter", world / "shards", "--scores", world / "scores", "--gamma", 0.9, "--model", "clipguard-victim",
                   "--out", tmp_path / "clean2", "--quarantine", tmp_path / "q2", "--workers", 0)
    assert other.exit_code == 2
    assert "different model" in " ".join(other.output.split()) or "other model" in " ".join(other.output.split())


def test_gate_json_errors_print_an_error_object_on_stdout(world, tmp_path):
    bad = tmp_path / "calibration.json"
    bad.write_text(json.dumps({"threshold": 0.8}))
    result = invoke("gate", world / "shards", "--calibration", bad, "--max-flagged-rate", 0.1, "--format", "json")
    assert result.exit_code == 2
    error = json.loads(result.stdout)
    assert error["exit_code"] == 2 and "no top-level \"gamma\"" in error["error"]
    missing = invoke("gate", world / "shards", "--calibration", tmp_path / "nowhere.json", "--max-flagged-rate", 0.1, "--format", "json")
    assert missing.exit_code == 2 and "cannot read calibration file" in json.loads(missing.stdout)["error"]
    # Text and markdown keep stdout empty on an error: only a report goes there.
    text = invoke("gate", world / "shards", "--calibration", bad, "--max-flagged-rate", 0.1)
    assert text.exit_code == 2 and text.stdout == ""


def test_a_recorded_weights_file_that_is_gone_is_a_clear_error(tmp_path):
    from clipguard.errors import ModelLoadError
    from clipguard.scoring.recorded import RecordedModel, spec_from_record

    record = {"architecture": "clipguard-tiny-reference", "weights_source": "file",
              "weights_path": str(tmp_path / "gone.safetensors"), "weights_sha256": "ab" * 32}
    with pytest.raises(ModelLoadError, match="not on this machine"):
        spec_from_record(RecordedModel(record, None, "score folder x"))
