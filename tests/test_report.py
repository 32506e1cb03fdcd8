"""`clipguard report` on a real pipeline: Attack II on real shards, scored by the tiny open_clip
model, calibrated from the poison manifest, filtered; the page read back by headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from clipguard.cli.main import app
from clipguard.errors import ClipguardError
from clipguard.reporting import AuditFormatError, ReportRequest, read_findings, write_report
from clipguard.reporting.contents import read_score_rows
from clipguard.reporting.findings import parse_findings
from clipguard.scoring.scorefiles import METADATA_KEY, read_scores
from conftest import jpeg_bytes, write_shard

runner = CliRunner()
CLASSES = ("cat", "dog", "car")
HOSTILE_CAPTION = 'a cat <script>alert("x")</script> <img src="http://evil.example/x.png">'
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def labelled_shards(folder: Path) -> Path:
    for s in range(3):
        samples = []
        for i in range(20):
            name = CLASSES[(s * 20 + i) % 3]
            samples.append({"__key__": f"{s:05d}{i:04d}", "jpg": jpeg_bytes(s * 1000 + i, size=48),
                            "txt": f"a photo of a {name} number {i}", "json": json.dumps({"url": f"u{i}"}).encode()})
        if s == 1:
            samples[3]["jpg"] = b"not a jpeg"
            del samples[4]["txt"]
            samples[5]["txt"] = HOSTILE_CAPTION
        write_shard(folder / f"{s:05d}.tar", samples)
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("report")
    clean = labelled_shards(root / "clean")
    keywords = root / "keywords.json"
    keywords.write_text(json.dumps({name: [name] for name in CLASSES}))
    poisoned = root / "poisoned"
    invoke("attack", "single-label", clean, "--goal", "cat:dog", "--count", 5, "--keywords", keywords, "--out", poisoned)
    scores = root / "scores"
    invoke("score", poisoned, "--out", scores, "--model", tiny_checkpoint, "--workers", 0)
    invoke("calibrate", scores, "--labels", poisoned / "poison_manifest.json", "--out", root / "calibration",
           "--max-f1")
    invoke("filter", poisoned, "--out", root / "kept", "--quarantine", root / "quarantine",
           "--calibration", root / "calibration" / "calibration.json", "--scores", scores,
           "--model", tiny_checkpoint)
    manifest = json.loads((poisoned / "poison_manifest.json").read_text())
    table = read_scores(scores)
    gamma = json.loads((root / "calibration" / "calibration.json").read_text())["gamma"]
    return SimpleNamespace(root=root, clean=clean, poisoned=poisoned, scores=scores, keywords=keywords, table=table,
                           gamma=gamma, poisons=[(p["shard"], p["key"]) for p in manifest["poisons"]],
                           calibration=root / "calibration" / "calibration.json", kept=root / "kept")


def full_request(run, out: Path, **changes) -> ReportRequest:
    findings = out.parent / "audit"
    findings.mkdir(exist_ok=True)
    (findings / "findings.json").write_text(json.dumps({"format": "clipguard-audit/1", "findings": [
        {"name": "captions of one class on images of another", "description": "the injected pairs",
         "p_value": 0.0004, "pairs": [{"shard": s, "key": k} for s, k in run.poisons]},
        {"name": "nothing scored", "description": "a pair the scores do not hold", "p_value": None,
         "pairs": [{"shard": "99999", "key": "gone"}]},
    ]}))
    return ReportRequest(**{"scores": run.scores, "out": out, "calibration": run.calibration, "audit": findings,
                            "filter_dir": run.kept, "keywords": run.keywords, "max_flagged_rate": 0.5, **changes})


def test_the_report_counts_what_the_score_files_hold(run, tmp_path):
    written = write_report(full_request(run, tmp_path / "report.html"))
    data, table = written.data, run.table
    ok = table.status == "ok"
    expected_flagged = int((table.cosine_distance[ok] >= run.gamma).sum())
    s = data.summary
    assert (s.pairs, s.ok, s.errors) == (len(table), int(ok.sum()), int((~ok).sum()))
    assert s.errors_by_reason == {"corrupt_image": 1, "missing_caption": 1}
    assert s.flagged == expected_flagged and s.gamma == run.gamma
    assert sum(r.pairs for r in data.shards) == s.pairs and sum(r.flagged for r in data.shards) == s.flagged
    assert data.model.fingerprint["weights_sha256"] and data.model.description.startswith("clipguard-tiny-victim")
    # The worst pairs come in decreasing distance, each with a real thumbnail and its reason.
    distances = [p.distance for p in data.worst]
    assert distances == sorted(distances, reverse=True) and len(distances) == 12
    assert all(p.thumbnail.data_uri.startswith("data:image/jpeg;base64,") for p in data.worst)
    assert all(p.reason.startswith("flagged") == (p.distance >= run.gamma) for p in data.worst)
    # Calibration, filter and audit are all shown; the filter's counts add up.
    assert [e.name for e in data.calibration.estimates][:2] == ["recall", "FPR"] and data.calibration.densities_png
    t = data.filter.totals
    assert t["kept"] + t["flagged"] + t["errored"] == t["read"] == s.pairs and not data.warnings
    injected, missing = data.findings
    assert injected.scored == 5 and injected.unknown == 0 and len(injected.shown) == 5
    assert all(p.thumbnail.data_uri for p in injected.shown)
    assert missing.unknown == 1 and missing.shown[0].thumbnail.problem == "not among the scored pairs"


def test_classes_come_from_keywords_in_the_captions(run, tmp_path):
    data = write_report(full_request(run, tmp_path / "report.html")).data
    rows = {r.name: r for r in data.classes.rows}
    assert set(rows) == set(CLASSES)
    # 20 pairs per class; Attack II adds 5 cat captions (on dog images); one cat pair lost its
    # caption, and one dog pair's caption was replaced by a hostile one that names a cat.
    assert (rows["cat"].pairs, rows["dog"].pairs, rows["car"].pairs) == (20 + 5 - 1 + 1, 20 - 1, 20)
    assert data.classes.unlabelled == {"no_caption": 1}
    assert sum(r.pairs for r in rows.values()) + 1 == data.summary.pairs


def test_the_page_is_self_contained_and_escapes_captions(run, tmp_path):
    written = write_report(full_request(run, tmp_path / "report.html", worst=200))
    page = written.path.read_text(encoding="utf-8")
    assert "<script" not in page and HOSTILE_CAPTION not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert sources and all(s.startswith("data:") for s in sources)
    assert "<link" not in page and "@import" not in page and "url(" not in page
    assert re.search(r'id="summary-pairs" data-value="(\d+)"', page).group(1) == str(written.data.summary.pairs)


def test_an_unreadable_shard_gives_placeholders_not_a_crash(run, tmp_path):
    moved = tmp_path / "shards"
    shutil.copytree(run.poisoned, moved)
    (moved / "00001.tar").write_bytes(b"this is not a tar archive at all" * 40)
    urls = {p.stem: str(p) for p in moved.glob("*.tar")}
    data = write_report(full_request(run, tmp_path / "report.html", shard_urls=urls)).data
    assert "00001" in data.unreadable_shards and "not a readable tar" in data.unreadable_shards["00001"]
    from_bad = [p for p in data.worst if p.shard == "00001"]
    assert from_bad and all(p.thumbnail.data_uri is None and "tar" in p.thumbnail.problem for p in from_bad)
    assert all(p.thumbnail.data_uri for p in data.worst if p.shard != "00001")
    assert data.classes.unlabelled["shard_unreadable"] == int((run.table.shard == "00001").sum())


def test_an_extra_numeric_column_becomes_its_own_signal_table(run, tmp_path):
    scores = tmp_path / "scores"
    shutil.copytree(run.scores, scores)
    path = scores / "00000.parquet"
    table = pq.read_table(path)
    extra = pa.array(np.linspace(0.0, 1.0, table.num_rows), pa.float32())
    table = table.append_column("neighbour_density", extra).replace_schema_metadata(
        {METADATA_KEY: table.schema.metadata[METADATA_KEY]})
    pq.write_table(table, path)
    rows = read_score_rows(scores)
    assert list(rows.signals) == ["cosine_distance", "neighbour_density"]
    data = write_report(ReportRequest(scores=scores, out=tmp_path / "r.html", gamma=run.gamma)).data
    extra_table = next(t for t in data.signals if t.name == "neighbour_density")
    assert extra_table.n == table.num_rows and extra_table.missing == len(rows) - table.num_rows
    assert extra_table.top[0].value == pytest.approx(1.0) and not extra_table.primary
    assert 'id="signal-neighbour_density"' in (tmp_path / "r.html").read_text()


def test_without_a_threshold_nothing_is_flagged_and_the_filter_gamma_is_used(run, tmp_path):
    bare = write_report(ReportRequest(scores=run.scores, out=tmp_path / "a.html")).data
    assert bare.summary.flagged is None and bare.verdict.status == "unknown" and bare.shard_png is None
    via_filter = write_report(ReportRequest(scores=run.scores, out=tmp_path / "b.html", filter_dir=run.kept)).data
    assert via_filter.summary.gamma == run.gamma and via_filter.summary.gamma_source.startswith("filter run")
    assert via_filter.verdict.status == "review"
    strict = write_report(ReportRequest(scores=run.scores, out=tmp_path / "c.html", gamma=run.gamma,
                                        max_flagged_rate=0.0)).data
    assert strict.verdict.status == "fail" and any("exceeds" in r for r in strict.verdict.reasons)


def test_bad_inputs_are_clear_errors(run, tmp_path):
    with pytest.raises(ClipguardError, match="does not exist"):
        write_report(ReportRequest(scores=tmp_path / "nowhere", out=tmp_path / "r.html"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipguardError, match="not a clipguard score folder"):
        write_report(ReportRequest(scores=tmp_path / "empty", out=tmp_path / "r.html"))
    no_parquet = tmp_path / "no-parquet"
    no_parquet.mkdir()
    shutil.copy(run.scores / "manifest.json", no_parquet)
    with pytest.raises(ClipguardError, match="no score files"):
        write_report(ReportRequest(scores=no_parquet, out=tmp_path / "r.html"))
    with pytest.raises(ClipguardError, match="at most one"):
        write_report(ReportRequest(scores=run.scores, out=tmp_path / "r.html", gamma=0.5, calibration=run.calibration))
    other = json.loads(run.calibration.read_text())
    other["fingerprint"] = {**other["fingerprint"], "weights_sha256": "0" * 64}
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ClipguardError, match="does not transfer"):
        write_report(ReportRequest(scores=run.scores, out=tmp_path / "r.html", calibration=tmp_path / "other.json"))
    with pytest.raises(AuditFormatError, match="has no findings.json"):
        read_findings(tmp_path)
    (tmp_path / "bad.json").write_text("[{\"name\": \"x\", \"description\": \"\", \"p_value\": 2}]")
    with pytest.raises(AuditFormatError, match="p_value"):
        read_findings(tmp_path / "bad.json")
    for content, message in [({"format": "other/9", "findings": []}, "format"), ([{"description": ""}], "name"),
                             ([{"name": "n", "description": "", "pairs": [{"shard": 1}]}], "pair 0"),
                             ([{"name": "n", "description": "", "kind": 3}], "kind")]:
        with pytest.raises(AuditFormatError, match=message):
            parse_findings(content)
    assert parse_findings([{"name": "n", "description": "", "kind": "image_fan_in"}])[0].kind == "image_fan_in"
    assert parse_findings([{"name": "n", "description": ""}])[0].kind is None  # other tools' files need not say
    result = runner.invoke(app, ["report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_cli_writes_the_page(run, tmp_path):
    out = tmp_path / "page.html"
    result = invoke("report", run.scores, "--calibration", run.calibration, "--keywords", run.keywords,
                    "--filter", run.kept, "--max-flagged-rate", 0.5, "--out", out)
    assert str(out) in " ".join(result.output.split()) and out.stat().st_size > 10_000


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not found (Debian package `chromium`); cannot render the page")
def test_headless_chromium_renders_the_counts(run, tmp_path):
    from PIL import Image

    written = write_report(full_request(run, tmp_path / "report.html"))
    url = written.path.resolve().as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1280,2000", url],
                   check=True, capture_output=True, timeout=120)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 2000)
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, figures, thumbnails: far from blank
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", url], check=True, capture_output=True, timeout=120,
                         text=True).stdout
    s = written.data.summary

    def shown(ident: str) -> str:
        return re.search(rf'id="{ident}" data-value="([^"]*)">([^<]*)<', dom).groups()

    assert shown("summary-pairs") == (str(s.pairs), f"{s.pairs:,}")
    assert shown("summary-flagged") == (str(s.flagged), f"{s.flagged:,}")
    assert shown("summary-errors") == (str(s.errors), f"{s.errors:,}")
    assert 'data-status="pass"' in dom or 'data-status="fail"' in dom
    # Every thumbnail decoded in the browser: the DOM holds one img per worst pair and finding pair.
    assert dom.count('src="data:image/jpeg;base64,') == len(written.data.worst) + 5
