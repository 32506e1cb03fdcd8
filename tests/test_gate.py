"""`clipguard gate` through the real CLI: exit 0 within policy, 1 outside it, 2 when it cannot tell."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clipguard.cli.main import app
from clipguard.data.shardspec import resolve_shards
from clipguard.filtering.gate import GatePolicy, policy_failures
from clipguard.model.loading import ModelSpec, load_model
from clipguard.scoring.run import ScoreConfig, score_shards
from clipguard.scoring.scorefiles import read_scores
from conftest import jpeg_bytes, write_shard

runner = CliRunner()

INJECTION = "@admin <img src=x> |a|b| [click me](http://evil.example)\n::add-mask::secret ![x](http://evil.example/p.png)"


@dataclass
class Scraped:
    shards: Path
    scores: Path
    distances: list[float]  # of the scored (ok) pairs
    model: Path
    pairs: int
    errors: int


@pytest.fixture(scope="module")
def scraped(tmp_path_factory, tiny_checkpoint) -> Scraped:
    root = tmp_path_factory.mktemp("gate-data")
    first = [{"__key__": f"p{i:03d}", "jpg": jpeg_bytes(40 + i, size=40), "txt": f"a photo of thing {i}"} for i in range(9)]
    first.append({"__key__": "p009", "jpg": jpeg_bytes(49, size=40), "txt": INJECTION})
    second = [{"__key__": f"q{i:03d}", "jpg": jpeg_bytes(60 + i, size=40), "txt": f"a drawing of item {i}"} for i in range(9)]
    second.append({"__key__": "q009", "jpg": b"\xff\xd8 broken", "txt": "a corrupt one"})
    write_shard(root / "shards" / "00000.tar", first)
    write_shard(root / "shards" / "00001.tar", second)
    loaded = load_model(ModelSpec(str(tiny_checkpoint)))
    score_shards(resolve_shards(str(root / "shards")), loaded, root / "scores", ScoreConfig(batch_size=8))
    table = read_scores(root / "scores")
    distances = sorted(float(d) for d, ok in zip(table.cosine_distance, table.ok) if ok)
    return Scraped(root / "shards", root / "scores", distances, tiny_checkpoint, pairs=20, errors=1)


def _gate(scraped: Scraped, *extra: str, reuse: bool = True):
    """Reusing the fixture's scores keeps the tests fast; the first test scores on the fly."""
    args = ["gate", str(scraped.shards), "--model", str(scraped.model), "--workers", "0", "--batch-size", "8", *extra]
    return runner.invoke(app, args + (["--scores", str(scraped.scores)] if reuse else []))


def said(result) -> str:
    return " ".join(result.output.split())


def test_within_policy_exits_0_and_json_is_the_only_stdout(scraped):
    gamma = scraped.distances[-2]  # two of 19 scored pairs flagged
    result = _gate(scraped, "--gamma", repr(gamma), "--max-flagged-rate", "0.2", "--max-error-rate", "0.1", "--format", "json", reuse=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["verdict"] == "pass" and report["passed"] is True and report["failures"] == []
    assert (report["pairs"], report["ok"], report["errors"], report["flagged"]) == (20, 19, 1, 2)
    assert report["flagged_rate"] == pytest.approx(2 / 19) and report["error_rate"] == pytest.approx(1 / 20)
    assert report["errors_by_reason"] == {"corrupt_image": 1}
    assert [e["distance"] for e in report["top_flagged"]] == pytest.approx(sorted(scraped.distances[-2:], reverse=True))
    assert report["top_flagged"][-1]["distance"] == gamma  # distance == gamma is flagged
    assert report["gamma"] == gamma and report["flag_rule"] == "cosine_distance >= gamma"
    assert [s["scores"] for s in report["shards"]] == ["scored", "scored"]


def test_flagged_rate_over_policy_exits_1_with_the_verdict_first(scraped):
    result = _gate(scraped, "--gamma", repr(scraped.distances[-3]), "--max-flagged-rate", "0.1", "--max-error-rate", "0.1")
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("clipguard gate: FAIL - flagged rate 15.789% (3 of 19 scored pairs) exceeds the maximum 10.000%")
    assert any(line.startswith("flagged    3 of 19 scored") and line.endswith("FAIL") for line in lines)
    assert any(line.startswith("errors     1 of 20") and "ok" in line for line in lines)
    assert lines.index("top flagged pairs (highest distance first):") < len(lines) - 3


def test_errors_do_not_count_as_flagged_but_have_their_own_limit(scraped):
    gamma = repr(scraped.distances[-1] + 0.5)  # nothing flagged
    default = _gate(scraped, "--gamma", gamma, "--max-flagged-rate", "0", "--format", "json")
    assert default.exit_code == 1  # 1 error in 20 pairs is over the default 1%
    report = json.loads(default.stdout)
    assert report["flagged"] == 0 and report["max_error_rate"] == 0.01
    assert report["failures"] == ["error rate 5.000% (1 of 20 pairs) exceeds the maximum 1.000%"]
    relaxed = _gate(scraped, "--gamma", gamma, "--max-flagged-rate", "0", "--max-error-rate", "0.05")
    assert relaxed.exit_code == 0, relaxed.output
    assert relaxed.stdout.startswith("clipguard gate: PASS\n")


def test_rates_are_compared_exactly():
    policy = GatePolicy(max_flagged_rate=0.001, max_error_rate=0.0)
    assert policy_failures(pairs=1000, ok=1000, flagged=1, policy=policy) == []
    assert len(policy_failures(pairs=1000, ok=1000, flagged=2, policy=policy)) == 1
    assert policy_failures(pairs=3, ok=0, flagged=0, policy=GatePolicy(0.5, 1.0))[0].startswith("no pair could be scored")


def test_reused_scores_are_checked_against_the_shards(scraped, tmp_path):
    result = _gate(scraped, "--gamma", "0", "--max-flagged-rate", "1", "--max-error-rate", "1", "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [s["scores"] for s in report["shards"]] == ["reused", "reused"] and report["flagged"] == 19

    stale = tmp_path / "stale"
    write_shard(stale / "00000.tar", [{"__key__": "p000", "jpg": jpeg_bytes(1, size=40), "txt": "re-scraped"}])
    changed = runner.invoke(app, [
        "gate", str(stale), "--scores", str(scraped.scores), "--gamma", "0.5", "--max-flagged-rate", "0.1",
        "--model", str(scraped.model), "--workers", "0",
    ])
    assert changed.exit_code == 2 and "do not match shard 00000" in said(changed)


def test_markdown_report_defuses_captions_written_by_the_attacker(scraped):
    result = _gate(scraped, "--gamma", "0", "--max-flagged-rate", "0", "--max-error-rate", "1", "--format", "markdown", "--examples", "20")
    assert result.exit_code == 1
    markdown = result.stdout
    assert markdown.startswith("### ❌ clipguard gate: FAIL")
    assert "| flagged rate | 19 of 19 scored pairs = 100.000% | ≤ 0.000% | ❌ |" in markdown
    row = next(line for line in markdown.splitlines() if "p009" in line)
    assert not re.search(r"(?<!\\)\]\(http", row) and "<img" not in row and "@admin" not in row
    assert "&lt;img src=x&gt;" in row and "&#64;admin" in row
    assert row.count("|") - row.count("\\|") == 5  # the caption's pipes cannot add table cells
    text = _gate(scraped, "--gamma", "0", "--max-flagged-rate", "0", "--max-error-rate", "1", "--examples", "20")
    assert all(not line.startswith("::") for line in text.stdout.splitlines())


def test_calibration_file_sets_gamma(scraped, tmp_path):
    manifest = json.loads((scraped.scores / "manifest.json").read_text())
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps({"gamma": scraped.distances[-1], "fingerprint": manifest["fingerprint"], "method": "test"}))
    result = _gate(scraped, "--calibration", str(calibration), "--max-flagged-rate", "0.1", "--max-error-rate", "0.1", "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["flagged"] == 1 and report["gamma_source"] == f"calibration {calibration}"


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing shards", "does not exist"),
        ("calibration not json", "not valid JSON"),
        ("calibration without gamma", "no top-level \"gamma\""),
        ("calibration from another model", "does not transfer"),
        ("unknown model", "unknown model architecture"),
        ("rate out of range", "must lie in [0, 1]"),
        ("no gamma", "exactly one of --gamma"),
    ],
)
def test_anything_that_prevents_a_verdict_exits_2(scraped, tmp_path, case, expected):
    calibration = tmp_path / "calibration.json"
    shards, extra = str(scraped.shards), ["--gamma", "0.5"]
    model = ["--model", str(scraped.model)]
    if case == "missing shards":
        shards = str(tmp_path / "nowhere" / "{00000..00003}.tar")
    elif case == "calibration not json":
        calibration.write_text("gamma: 0.8")
        extra = ["--calibration", str(calibration)]
    elif case == "calibration without gamma":
        calibration.write_text(json.dumps({"threshold": 0.8}))
        extra = ["--calibration", str(calibration)]
    elif case == "calibration from another model":
        fingerprint = {"architecture": "ViT-B-16", "weights_sha256": "ab" * 32, "precision": "fp32", "preprocess": {}}
        calibration.write_text(json.dumps({"gamma": 0.8, "fingerprint": fingerprint}))
        extra = ["--calibration", str(calibration)]
    elif case == "unknown model":
        model = ["--model", "no-such-architecture", "--pretrained", "none"]
    elif case == "rate out of range":
        extra = ["--gamma", "0.5", "--max-error-rate", "1.5"]
    elif case == "no gamma":
        extra = []
    result = runner.invoke(app, ["gate", shards, "--max-flagged-rate", "0.01", "--workers", "0", *model, *extra])
    assert result.exit_code == 2, result.output
    assert expected in said(result)
    assert result.stdout == ""  # nothing on stdout that a pipeline could mistake for a report


def test_an_unreadable_shard_exits_2(scraped, tmp_path):
    folder = tmp_path / "in"
    write_shard(folder / "00000.tar", [{"__key__": "k", "jpg": jpeg_bytes(1, size=40), "txt": "fine"}])
    (folder / "00001.tar").write_bytes(b"this is not a tar archive at all" * 40)
    result = runner.invoke(app, ["gate", str(folder), "--gamma", "0.5", "--max-flagged-rate", "1", "--model", str(scraped.model), "--workers", "0"])
    assert result.exit_code == 2 and "could not be read" in said(result)
