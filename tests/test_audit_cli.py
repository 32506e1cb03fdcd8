"""`clipguard audit` at the command line: a summary, findings.json that `report` reads,
findings.md, per-shard signal files, exit codes; and once end to end on the synthetic world."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from audit_worlds import KEYWORDS, World
from clipguard.cli.main import app
from clipguard.reporting.findings import read_findings

ENV = {"CLIPGUARD_CONSOLE_WIDTH": "200", "HF_HUB_OFFLINE": "1"}


def _run(*args: str):
    return CliRunner().invoke(app, list(args), env=ENV, catch_exceptions=False)


def test_audit_writes_ranked_findings_with_their_pairs(tmp_path):
    scores = World(7).clean().fan_in("sheep", "aeroplane", captions=7).cluster("banana").write(tmp_path / "scores")
    (tmp_path / "kw.json").write_text(json.dumps(KEYWORDS))
    result = _run("audit", str(scores), "--out", str(tmp_path / "audit"), "--keywords", str(tmp_path / "kw.json"))
    assert result.exit_code == 0, result.output
    assert "finding(s) at significance 1e-06" in result.output
    assert "[image_cluster banana] a cluster of 30 near-identical images" in result.output
    assert "behind 7 different sheep captions" in result.output
    # The file `clipguard report --audit` reads, with every pair and its caption.
    content = json.loads((tmp_path / "audit" / "findings.json").read_text())
    assert content["format"] == "clipguard-audit/1" and content["pairs_audited"] == content["pairs_scored"]
    kinds = [f["kind"] for f in content["findings"]]
    assert {"image_fan_in", "image_cluster"} <= set(kinds)
    fan_in = content["findings"][kinds.index("image_fan_in")]
    assert len(fan_in["pairs"]) == 7 and all("sheep" in p["caption"] for p in fan_in["pairs"])
    read_back = read_findings(tmp_path / "audit")
    assert [f.name for f in read_back.findings] == [f["name"] for f in content["findings"]]
    markdown = (tmp_path / "audit" / "findings.md").read_text()
    assert "## 1. " in markdown and fan_in["pairs"][0]["key"] in markdown
    # One signal file per shard, one row per audited pair.
    files = sorted((tmp_path / "audit" / "signals").glob("*.parquet"))
    assert [f.stem for f in files] == ["00000", "00001"]
    table = pq.read_table(files[0])
    assert {"key", "shard", "image_fan_in", "class_cell_neglog10p", "image_lof", "text_knn_distance"} <= set(table.column_names)
    assert sum(pq.read_metadata(f).num_rows for f in files) == content["pairs_audited"]


def test_audit_of_clean_data_exits_0_with_no_finding(tmp_path):
    scores = World(10).clean().write(tmp_path / "scores")
    (tmp_path / "kw.json").write_text(json.dumps(KEYWORDS))
    result = _run("audit", str(scores), "--out", str(tmp_path / "audit"), "--keywords", str(tmp_path / "kw.json"))
    assert result.exit_code == 0, result.output
    assert "0 finding(s)" in result.output
    assert json.loads((tmp_path / "audit" / "findings.json").read_text())["findings"] == []


def test_partition_rows_reach_the_counting_pass(tmp_path, monkeypatch):
    """--partition-rows splits the counting pass (spied on: the real partitions are written and
    worked), and the findings are those of the default, one partition in memory."""
    from clipguard.audit import counting

    scores = World(7).clean().fan_in("sheep", "aeroplane", captions=7).write(tmp_path / "scores")
    (tmp_path / "kw.json").write_text(json.dumps(KEYWORDS))
    spilled, real_init = [], counting.Runs.__init__
    monkeypatch.setattr(counting.Runs, "__init__", lambda self, folder, name, partitions, dtypes: (
        spilled.append((name, partitions)), real_init(self, folder, name, partitions, dtypes))[-1])
    whole = _run("audit", str(scores), "--out", str(tmp_path / "a1"), "--keywords", str(tmp_path / "kw.json"))
    assert whole.exit_code == 0 and spilled == []
    parted = _run("audit", str(scores), "--out", str(tmp_path / "a2"), "--keywords", str(tmp_path / "kw.json"),
                  "--partition-rows", "16")
    assert parted.exit_code == 0, parted.output
    assert {"ids", "counts", "cells", "own"} <= {name for name, _ in spilled} and min(p for _, p in spilled) > 1
    findings = [json.loads((tmp_path / a / "findings.json").read_text())["findings"] for a in ("a1", "a2")]
    assert findings[0] == findings[1] and findings[0]
    assert _run("audit", str(scores), "--out", str(tmp_path / "a3"), "--partition-rows", "0").exit_code == 2


def test_audit_without_embeddings_or_scores_exits_2(tmp_path):
    scores = World(1).clean(n=30).write(tmp_path / "scores", embeddings=False)
    result = _run("audit", str(scores), "--out", str(tmp_path / "audit"))
    assert result.exit_code == 2
    assert "score SHARDS --out SCORES --save-embeddings" in " ".join(result.output.split())
    result = _run("audit", str(tmp_path / "nowhere"), "--out", str(tmp_path / "audit"))
    assert result.exit_code == 2 and "does not exist" in result.output
    result = _run("audit", str(scores), "--out", str(tmp_path / "audit"), "--embeddings", str(tmp_path / "none"))
    assert result.exit_code == 2 and "no embeddings in" in result.output


@pytest.mark.parametrize("attack, train, count, kind, goal", [
    ("single-image", "350", "8", "image_fan_in", "sheep:"),  # one image behind many sheep captions
    ("single-label", "700", "15", "relabelled_images", "sheep:"),  # images of aeroplane copied with sheep captions
])
def test_synthetic_world_attack_is_the_first_finding(tmp_path, attack, train, count, kind, goal):
    """synth -> attack -> score --save-embeddings -> audit, a few hundred pairs."""
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    world, poisoned, scores, audit = (tmp_path / n for n in ("world", "poisoned", "scores", "audit"))
    steps = [
        ("synth", "--out", str(world), "--train", train, "--test", "1", "--validation", "1", "--reference", "1",
         "--shard-size", train),
        ("attack", attack, str(world / "train"), "--goal", "sheep:aeroplane", "--count", count, "--out", str(poisoned)),
        ("score", str(poisoned), "--out", str(scores), "--model", "clipguard-reference", "--save-embeddings"),
        ("audit", str(scores), "--out", str(audit), "--keywords", str(world / "keywords.json")),
    ]
    for step in steps:
        result = _run(*step)
        assert result.exit_code == 0, (step[0], result.output)
    manifest = json.loads((poisoned / "poison_manifest.json").read_text())
    poisons = {(p["shard"], p["key"]) for p in manifest["poisons"]}
    findings = json.loads((audit / "findings.json").read_text())["findings"]
    ranked = [(f["kind"], f["goal"], f["neglog10_p"], len(f["pairs"])) for f in findings]
    assert findings and findings[0]["kind"] == kind and findings[0]["goal"].startswith(goal), ranked
    named = {(p["shard"], p["key"]) for p in findings[0]["pairs"]}
    assert named <= poisons and len(named) >= len(poisons) // 2, ranked


# A fresh interpreter: this test process has torch loaded by its neighbours already.
_AUDIT_PROBE = """
import json, resource, sys
from clipguard.cli.main import app
try:
    app(sys.argv[1:], prog_name="clipguard")
except SystemExit as exit:
    assert exit.code in (0, None), exit.code
print("PROBE" + json.dumps([m for m in ("torch", "open_clip", "matplotlib") if m in sys.modules]))
"""


def test_the_audit_runs_without_importing_torch(tmp_path):
    # torch alone is ~700 MB resident: the audit, a numpy/faiss job, must not pay it for nothing.
    scores = World(3).clean(n=60).fan_in("sheep", "aeroplane", captions=7).write(tmp_path / "scores")
    (tmp_path / "kw.json").write_text(json.dumps(KEYWORDS))
    env = {**os.environ, **ENV}
    done = subprocess.run([sys.executable, "-c", _AUDIT_PROBE, "audit", str(scores), "--out", str(tmp_path / "audit"),
                           "--keywords", str(tmp_path / "kw.json")], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "audit" / "findings.json").is_file()
    assert json.loads(done.stdout.rsplit("PROBE", 1)[1]) == []
