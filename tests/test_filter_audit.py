"""`filter --audit`: a finding's pairs and cross-pair signals over their thresholds are quarantined
too, with the reason naming what flagged them; every pair still lands exactly once."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from clipguard.cli.main import app
from clipguard.data.shardspec import resolve_shards
from clipguard.filtering.auditflags import AuditFlags, AuditFlagsError, SignalRule
from clipguard.model.loading import ModelSpec, load_model
from clipguard.scoring.run import ScoreConfig, score_shards
from conftest import simple_samples, write_shard

runner = CliRunner()
FINDING = "class-pair concentration: sheep:aeroplane"


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny_checkpoint) -> Path:
    root = tmp_path_factory.mktemp("filter-audit")
    for s in range(2):
        write_shard(root / "shards" / f"{s:05d}.tar", simple_samples(s, 6))
    loaded = load_model(ModelSpec(str(tiny_checkpoint)))
    score_shards(resolve_shards(str(root / "shards")), loaded, root / "scores", ScoreConfig(batch_size=8))
    audit = root / "audit"
    (audit / "signals").mkdir(parents=True)
    (audit / "findings.json").write_text(json.dumps({"format": "clipguard-audit/1", "findings": [
        {"name": FINDING, "description": "2 pairs where 0.1 are expected", "p_value": 1e-12,
         "pairs": [{"shard": "00000", "key": "000000002"}, {"shard": "00001", "key": "000010003"}]},
    ]}))
    for s in range(2):
        keys = [f"{s:05d}{i:04d}" for i in range(6)]
        fan_in = [1, 1, 1, 1, 7, 1] if s == 0 else [1] * 6  # 000000004 sits behind 7 captions
        pq.write_table(pa.table({"key": keys, "shard": [f"{s:05d}"] * 6, "image_fan_in": pa.array(fan_in, pa.int64())}),
                       audit / "signals" / f"{s:05d}.parquet")
    return root


def run_filter(root: Path, out: Path, model: Path, *extra: str):
    return runner.invoke(app, [
        "filter", str(root / "shards"), "--out", str(out / "clean"), "--quarantine", str(out / "quarantine"),
        "--scores", str(root / "scores"), "--model", str(model), "--workers", "0", "--gamma", "2.0", *extra,
    ])


def quarantined(folder: Path) -> dict[str, str]:
    """key -> the reason in its sidecar, over every quarantine part."""
    reasons = {}
    for part in sorted(folder.glob("*.tar")):
        with tarfile.open(part) as archive:
            for member in archive.getmembers():
                if member.name.endswith(".clipguard.json"):
                    sidecar = json.loads(archive.extractfile(member).read())
                    reasons[sidecar["key"]] = sidecar["reason"]
    return reasons


def test_findings_and_signal_rules_quarantine_their_pairs_naming_what_flagged_them(tmp_path, scored, tiny_checkpoint):
    result = run_filter(scored, tmp_path, tiny_checkpoint, "--audit", str(scored / "audit"),
                        "--signal-threshold", "image_fan_in=5")
    assert result.exit_code == 0, result.output
    reasons = quarantined(tmp_path / "quarantine")
    assert sorted(reasons) == ["000000002", "000000004", "000010003"]
    assert reasons["000000002"] == f"flagged: audit: finding '{FINDING}'"
    assert reasons["000000004"] == "flagged: audit: image_fan_in 7 > 5"
    manifest = json.loads((tmp_path / "clean" / "filter_manifest.json").read_text())
    assert manifest["totals"] == {"read": 12, "kept": 9, "flagged": 3, "errored": 0, "quarantined": 3}
    assert manifest["audit"]["flagged_by"] == {"finding": 2, "image_fan_in": 1}
    assert manifest["audit"]["findings"] == 1 and manifest["audit"]["finding_pairs"] == 2
    assert "finding: 2" in result.output and "image_fan_in: 1" in result.output

    # The same filter without the audit keeps them all: the audit is what flagged them.
    plain = run_filter(scored, tmp_path / "plain", tiny_checkpoint)
    assert plain.exit_code == 0 and quarantined(tmp_path / "plain" / "quarantine") == {}
    # Only the rule, not the findings.
    rule_only = run_filter(scored, tmp_path / "rule", tiny_checkpoint, "--audit", str(scored / "audit"),
                           "--signal-threshold", "image_fan_in=5", "--no-findings")
    assert rule_only.exit_code == 0 and sorted(quarantined(tmp_path / "rule" / "quarantine")) == ["000000004"]


def test_a_changed_audit_is_not_taken_for_the_finished_run(tmp_path, scored, tiny_checkpoint):
    assert run_filter(scored, tmp_path, tiny_checkpoint, "--audit", str(scored / "audit")).exit_code == 0
    again = run_filter(scored, tmp_path, tiny_checkpoint, "--audit", str(scored / "audit"),
                       "--signal-threshold", "image_fan_in=5")
    assert again.exit_code == 2 and "different" in " ".join(again.output.split())


def test_bad_audit_requests_are_clear_errors(tmp_path, scored, tiny_checkpoint):
    no_audit = run_filter(scored, tmp_path, tiny_checkpoint, "--signal-threshold", "image_fan_in=5")
    assert no_audit.exit_code == 2 and "needs --audit" in no_audit.output
    per_pair = run_filter(scored, tmp_path, tiny_checkpoint, "--audit", str(scored / "audit"),
                          "--signal-threshold", "cosine_distance=0.5")
    assert per_pair.exit_code == 2 and "per-pair signal" in " ".join(per_pair.output.split())
    with pytest.raises(AuditFlagsError, match="NAME=VALUE"):
        SignalRule.parse("image_fan_in")
    with pytest.raises(Exception, match="unknown signal 'fan_in'"):
        SignalRule.parse("fan_in=3")
    with pytest.raises(AuditFlagsError, match="run `clipguard audit"):
        AuditFlags.load(tmp_path)
    flags = AuditFlags.load(scored / "audit", (SignalRule("image_lof", 2.0),))
    with pytest.raises(AuditFlagsError, match="no column image_lof"):
        flags.shard_reasons("00000")
    with pytest.raises(AuditFlagsError, match="no signals for shard 00009"):
        flags.shard_reasons("00009")


def run_gate(root: Path, model: Path, *extra: str):
    return runner.invoke(app, [
        "gate", str(root / "shards"), "--scores", str(root / "scores"), "--model", str(model), "--workers", "0",
        "--gamma", "2.0", "--max-flagged-rate", "0.5", *extra,
    ])


def test_gate_fails_on_a_finding_and_counts_audit_flags_as_flagged(scored, tiny_checkpoint):
    plain = run_gate(scored, tiny_checkpoint)
    assert plain.exit_code == 0, plain.output
    failed = run_gate(scored, tiny_checkpoint, "--audit", str(scored / "audit"), "--signal-threshold", "image_fan_in=5")
    assert failed.exit_code == 1, failed.output
    text = " ".join(failed.output.split())
    assert "the audit holds 1 finding(s) in these shards, more than the maximum 0" in text and FINDING in text
    assert "flagged 3 of 12" in text and "finding 2, image_fan_in 1" in text
    allowed = run_gate(scored, tiny_checkpoint, "--audit", str(scored / "audit"), "--max-findings", "1", "--format", "json")
    assert allowed.exit_code == 0, allowed.output
    report = json.loads(allowed.stdout)
    assert report["flagged"] == 2 and report["audit"]["findings"] == [FINDING] and report["max_findings"] == 1
    tight = run_gate(scored, tiny_checkpoint, "--audit", str(scored / "audit"), "--max-findings", "1",
                     "--max-flagged-rate", "0.1", "--format", "markdown")
    assert tight.exit_code == 1 and "| audit findings | 1 in these shards | ≤ 1 | ✅ |" in tight.output
    no_audit = run_gate(scored, tiny_checkpoint, "--max-findings", "1")
    assert no_audit.exit_code == 2 and "needs --audit" in no_audit.output
    # A policy per rule: the finding may flag 2 of the 12 pairs, the fan-in signal none.
    per_rule = ["--audit", str(scored / "audit"), "--max-findings", "1", "--max-flagged-rate", "1",
                "--signal-threshold", "image_fan_in=5", "--format", "json"]
    within = run_gate(scored, tiny_checkpoint, *per_rule, "--max-rate-by", "finding=0.2", "--max-rate-by", "image_fan_in=0.1")
    assert within.exit_code == 0, within.output
    assert json.loads(within.stdout)["max_rate_by"] == {"finding": 0.2, "image_fan_in": 0.1}
    over = run_gate(scored, tiny_checkpoint, *per_rule, "--max-rate-by", "image_fan_in=0")
    assert over.exit_code == 1
    assert "image_fan_in alone flagged 1 of 12 scored pairs (8.333%), more than its maximum 0.000%" in json.loads(over.stdout)["failures"]
    bad = run_gate(scored, tiny_checkpoint, *per_rule, "--max-rate-by", "finding")
    assert bad.exit_code == 2 and "RULE=RATE" in " ".join(bad.output.split())
    # A rule this gate does not flag by would never fail: an error, not a silent pass.
    unknown = run_gate(scored, tiny_checkpoint, *per_rule, "--max-rate-by", "image_lof=0")
    assert unknown.exit_code == 2 and "which this gate does not flag by" in " ".join(unknown.output.split())


def test_gate_holds_each_kind_of_finding_to_its_own_limit(scored, tiny_checkpoint, tmp_path):
    """--max-findings-of KIND=N: a stamped-images finding fails at 0 while two fan-in findings are
    allowed; --max-findings then counts only the kinds without a limit of their own."""
    audit = tmp_path / "audit"
    (audit / "signals").mkdir(parents=True)
    for part in (scored / "audit" / "signals").glob("*.parquet"):
        (audit / "signals" / part.name).write_bytes(part.read_bytes())
    stamped, fan_in_a, fan_in_b = ("stamped images (one patch on many images): banana", "image fan-in: sheep",
                                   "image fan-in: dog")
    (audit / "findings.json").write_text(json.dumps({"format": "clipguard-audit/1", "findings": [
        {"name": stamped, "kind": "stamped_images", "description": "3 images", "p_value": 1e-12,
         "pairs": [{"shard": "00000", "key": "000000001"}]},
        {"name": fan_in_a, "kind": "image_fan_in", "description": "7 captions", "p_value": 1e-10,
         "pairs": [{"shard": "00000", "key": "000000004"}]},
        {"name": fan_in_b, "kind": "image_fan_in", "description": "6 captions", "p_value": 1e-9,
         "pairs": [{"shard": "00001", "key": "000010002"}]},
    ]}))
    base = ["--audit", str(audit), "--max-flagged-rate", "1", "--format", "json"]
    fan_in_allowed = run_gate(scored, tiny_checkpoint, *base, "--max-findings-of", "image_fan_in=2")
    assert fan_in_allowed.exit_code == 1, fan_in_allowed.output
    report = json.loads(fan_in_allowed.stdout)
    # The stamped finding is the one "of other kinds", held to --max-findings' default 0.
    assert report["failures"] == [f"the audit holds 1 finding(s) of other kinds in these shards, more than the maximum 0: {stamped}"]
    assert report["audit"]["findings_by_kind"] == {"image_fan_in": 2, "stamped_images": 1}
    assert report["max_findings_of"] == {"image_fan_in": 2}
    both = run_gate(scored, tiny_checkpoint, *base, "--max-findings-of", "image_fan_in=2", "--max-findings-of", "stamped_images=1")
    assert both.exit_code == 0, both.output
    tight = run_gate(scored, tiny_checkpoint, *base, "--max-findings-of", "image_fan_in=1", "--max-findings", "5")
    assert tight.exit_code == 1
    assert json.loads(tight.stdout)["failures"] == [
        f"the audit holds 2 image_fan_in finding(s) in these shards, more than its maximum 1: {fan_in_a}; {fan_in_b}"]
    text = run_gate(scored, tiny_checkpoint, "--audit", str(audit), "--max-flagged-rate", "1",
                    "--max-findings-of", "image_fan_in=1", "--max-findings", "5")
    flat = " ".join(text.output.split())
    assert text.exit_code == 1 and "findings 3 (1 of other kinds) in these shards max 5 of other kinds" in flat
    assert "image_fan_in: 2 finding(s) max 1" in flat
    markdown = run_gate(scored, tiny_checkpoint, "--audit", str(audit), "--max-flagged-rate", "1",
                        "--max-findings-of", "image_fan_in=1", "--max-findings", "5", "--format", "markdown")
    assert "| image_fan_in findings | 2 | ≤ 1 | ❌ |" in markdown.output
    assert "| audit findings | 3 (1 of other kinds) in these shards | ≤ 5 of other kinds | ✅ |" in markdown.output
    for bad, says in (("fan_in=1", "not a kind of finding"), ("image_fan_in=1.5", "whole number"),
                      ("image_fan_in", "KIND=COUNT")):
        refused = run_gate(scored, tiny_checkpoint, *base, "--max-findings-of", bad)
        assert refused.exit_code == 2 and says in " ".join(refused.output.split()), refused.output
    no_audit = run_gate(scored, tiny_checkpoint, "--max-findings-of", "image_fan_in=1")
    assert no_audit.exit_code == 2 and "--max-findings-of needs --audit" in " ".join(no_audit.output.split())
