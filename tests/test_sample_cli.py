"""`clipguard sample`: the CSV, the design file and the HTML page a person labels from, drawn from
real score folders (tiny open_clip model, shards written with webdataset's TarWriter)."""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from clipguard.calibration.sampling import SampleDesign
from clipguard.cli.main import app
from clipguard.labelling import SAMPLE_COLUMNS
from clipguard.labelpage import THUMBNAIL_SIDE
from conftest import TINY_MODEL, jpeg_bytes, simple_samples, write_shard

runner = CliRunner()
HOSTILE_CAPTION = '<script>alert("x")</script> & <b>bold</b> "quoted"'


class PageParser(HTMLParser):
    """Counts the table body's rows and images; keeps every image source, zoom image and pair."""

    def __init__(self):
        super().__init__()
        self.in_body = False
        self.rows = 0
        self.images: list[str] = []
        self.full_images: list[str] = []
        self.pairs: list[tuple[str, str]] = []
        self.headers: list[str] = []
        self.scripts_in_body = 0
        self._in_th = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tbody":
            self.in_body = True
        elif tag == "tr" and self.in_body:
            self.rows += 1
            self.pairs.append((attrs["data-shard"], attrs["data-key"]))
        elif tag == "img" and self.in_body:
            self.images.append(attrs["src"])
            self.full_images.append(attrs.get("data-full") or attrs["src"])
        elif tag == "th":
            self._in_th = True
        elif tag == "script" and self.in_body:
            self.scripts_in_body += 1

    def handle_endtag(self, tag):
        if tag == "tbody":
            self.in_body = False
        elif tag == "th":
            self._in_th = False

    def handle_data(self, data):
        if self._in_th:
            self.headers.append(data.strip())


def decode_uri(src: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def parse_page(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sample") / "shards"
    for s in range(3):
        samples = simple_samples(s, 25)
        if s == 1:
            samples[3]["txt"] = HOSTILE_CAPTION
            samples[4]["jpg"] = jpeg_bytes(999, size=400)  # thumbnails must shrink large images
        write_shard(folder / f"{s:05d}.tar", samples)
    return folder


@pytest.fixture(scope="module")
def scores(shards, tiny_checkpoint) -> Path:
    out = shards.parent / "scores"
    result = runner.invoke(app, ["score", str(shards), "--out", str(out), "--model", str(tiny_checkpoint), "--workers", "0"])
    assert result.exit_code == 0, result.output
    return out


def test_sample_from_a_score_folder_writes_csv_design_and_page(tmp_path, scores):
    out = tmp_path / "label"
    result = runner.invoke(app, ["sample", str(scores), "-n", "30", "--seed", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output

    rows = read_csv(out / "sample.csv")
    assert tuple(rows[0].keys()) == SAMPLE_COLUMNS
    assert len(rows) == 30 and all(r["label"] == "" for r in rows)
    assert all(abs(float(r["inclusion_probability"]) - 30 / 75) < 1e-6 and abs(float(r["weight"]) - 2.5) < 1e-6 for r in rows)
    by_key = {(r["shard"], r["key"]): r for r in rows}
    assert len(by_key) == 30
    expected_captions = {("00000", f"00000{i:04d}"): f"a photo of item {i} in shard 0" for i in range(25)}
    for ident, caption in expected_captions.items():
        if ident in by_key:
            assert by_key[ident]["caption"] == caption

    payload = json.loads((out / "sample_design.json").read_text())
    manifest = json.loads((scores / "manifest.json").read_text())
    assert payload["format"] == "clipguard-sample-design/1"
    assert payload["fingerprint"] == manifest["fingerprint"]
    assert payload["population"]["pairs"] == 75
    design = SampleDesign.from_dict(payload["design"])
    assert design.n == 30 and not design.stratified
    assert [(p["shard"], p["key"]) for p in payload["pairs"]] == [(r["shard"], r["key"]) for r in rows]

    page = parse_page(out / "index.html")
    assert page.rows == 30 and len(page.images) == 30
    assert page.scripts_in_body == 0
    for src in page.images:
        assert src.startswith("data:image/jpeg;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert image.format == "JPEG" and max(image.size) <= THUMBNAIL_SIDE

    assert "0.1%" in result.output and "--stratify" in result.output and "--canaries" in result.output


def test_captions_are_escaped_and_large_images_become_small_thumbnails(tmp_path, scores):
    out = tmp_path / "label"
    # n = the whole population, so the hostile caption and the 400 px image are in the sample.
    result = runner.invoke(app, ["sample", str(scores), "-n", "75", "--out", str(out)])
    assert result.exit_code == 0, result.output
    html = (out / "index.html").read_text(encoding="utf-8")
    assert HOSTILE_CAPTION not in html and "<script>alert" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in html
    rows = read_csv(out / "sample.csv")
    assert HOSTILE_CAPTION in {r["caption"] for r in rows}
    page = parse_page(out / "index.html")
    assert page.rows == 75 and len(page.images) == 75
    assert all(max(decode_uri(s).size) <= THUMBNAIL_SIDE for s in page.images)
    # The 400 px image: a THUMBNAIL_SIDE thumbnail, and its zoom view is the stored JPEG itself.
    large = page.pairs.index(("00001", "000010004"))
    assert decode_uri(page.images[large]).size == (THUMBNAIL_SIDE, THUMBNAIL_SIDE)
    assert base64.b64decode(page.full_images[large].split(",", 1)[1]) == jpeg_bytes(999, size=400)


def test_stratified_sample_oversamples_the_tail_and_records_the_strata(tmp_path, scores):
    out = tmp_path / "label"
    result = runner.invoke(app, ["sample", str(scores), "-n", "20", "--stratify", "--out", str(out)])
    assert result.exit_code == 0, result.output
    payload = json.loads((out / "sample_design.json").read_text())
    design = SampleDesign.from_dict(payload["design"])
    assert design.stratified and len(design.strata) == 3
    rows = read_csv(out / "sample.csv")
    for row, pi, stratum in zip(rows, design.inclusion_probabilities, design.stratum_of_selected):
        assert abs(float(row["inclusion_probability"]) - pi) < 1e-5 and int(row["stratum"]) == stratum
    top = design.strata[-1]
    assert top.inclusion_probability > design.n / design.population_size
    assert "stratified" in result.output


def test_sample_from_shards_scores_them_first_and_draws_the_same_sample(tmp_path, shards, scores, tiny_checkpoint):
    out = tmp_path / "label"
    result = runner.invoke(app, [
        "sample", str(shards), "-n", "12", "--seed", "5", "--out", str(out),
        "--model", str(tiny_checkpoint), "--workers", "0",
    ])
    assert result.exit_code == 0, result.output
    assert (out / "scores" / "manifest.json").is_file()
    again = tmp_path / "again"
    assert runner.invoke(app, ["sample", str(scores), "-n", "12", "--seed", "5", "--out", str(again)]).exit_code == 0
    keys = [(r["shard"], r["key"]) for r in read_csv(out / "sample.csv")]
    assert keys == [(r["shard"], r["key"]) for r in read_csv(again / "sample.csv")]
    assert [r["distance"] for r in read_csv(out / "sample.csv")] == [r["distance"] for r in read_csv(again / "sample.csv")]


def test_pairs_whose_shard_moved_stay_in_the_sample_with_a_reason(tmp_path, shards, tiny_checkpoint):
    moved = tmp_path / "shards"
    shutil.copytree(shards, moved)
    scores = tmp_path / "scores"
    assert runner.invoke(app, ["score", str(moved), "--out", str(scores), "--model", str(tiny_checkpoint), "--workers", "0"]).exit_code == 0
    (moved / "00002.tar").unlink()
    out = tmp_path / "label"
    result = runner.invoke(app, ["sample", str(scores), "-n", "75", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = read_csv(out / "sample.csv")
    assert len(rows) == 75
    assert all(r["caption"] == "" for r in rows if r["shard"] == "00002")
    page = parse_page(out / "index.html")
    assert page.rows == 75 and len(page.images) == 50
    assert (out / "index.html").read_text().count("image unavailable: shard file") == 25
    assert "25 unavailable" in result.output


def test_sample_errors_are_clear(tmp_path, scores, shards):
    too_many = runner.invoke(app, ["sample", str(scores), "-n", "500", "--out", str(tmp_path / "a")])
    assert too_many.exit_code == 2 and "between 1 and the 75 scored pairs" in too_many.output
    both = runner.invoke(app, ["sample", str(scores), "-n", "5", "--scores", str(tmp_path / "s"), "--out", str(tmp_path / "b")])
    assert both.exit_code == 2 and "--scores is for SHARDS" in both.output
    missing = runner.invoke(app, ["sample", str(tmp_path / "nowhere"), "-n", "5", "--out", str(tmp_path / "c"),
                                  "--model", TINY_MODEL, "--pretrained", "none"])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    partial = tmp_path / "partial"
    shutil.copytree(scores, partial)
    # What a killed run leaves: a shard claimed (pending) but never finished.
    claimed = sorted(partial.glob("*_stats.json"))[-1]
    stats = json.loads(claimed.read_text())
    stats["status"] = "pending"
    claimed.write_text(json.dumps(stats))
    incomplete = runner.invoke(app, ["sample", str(partial), "-n", "5", "--out", str(tmp_path / "d")])
    assert incomplete.exit_code == 2 and "incomplete" in incomplete.output


def test_page_is_blind_and_shuffled_by_default_and_records_the_order(tmp_path, scores):
    out = tmp_path / "label"
    assert runner.invoke(app, ["sample", str(scores), "-n", "30", "--seed", "3", "--out", str(out)]).exit_code == 0
    payload = json.loads((out / "sample_design.json").read_text())
    page_record = payload["page"]
    assert page_record["blind"] is True and page_record["order_seed"] == 3
    assert sorted(page_record["order"]) == list(range(30)) and page_record["order"] != list(range(30))
    page = parse_page(out / "index.html")
    csv_pairs = [(r["shard"], r["key"]) for r in read_csv(out / "sample.csv")]
    assert page.pairs == [csv_pairs[i] for i in page_record["order"]]
    assert not {"cosine distance", "stratum", "weight"} & set(page.headers)
    html = (out / "index.html").read_text(encoding="utf-8")
    distances = [r["distance"][:6] for r in read_csv(out / "sample.csv")]
    assert not any(f">{d}" in html for d in distances)
    assert page_record["sample_id"] in html

    shown = tmp_path / "shown"
    assert runner.invoke(app, ["sample", str(scores), "-n", "30", "--seed", "3", "--out", str(shown),
                               "--show-scores"]).exit_code == 0
    shown_record = json.loads((shown / "sample_design.json").read_text())["page"]
    assert shown_record["blind"] is False and shown_record["sample_id"] == page_record["sample_id"]
    assert {"cosine distance", "stratum", "weight"} <= set(parse_page(shown / "index.html").headers)

    other = tmp_path / "other"
    assert runner.invoke(app, ["sample", str(scores), "-n", "30", "--seed", "4", "--out", str(other)]).exit_code == 0
    assert json.loads((other / "sample_design.json").read_text())["page"]["sample_id"] != page_record["sample_id"]
