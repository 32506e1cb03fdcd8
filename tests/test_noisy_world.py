"""The noisy web world (`WorldSpec(noise="web")`): determinism, the clean world untouched, every
noise kind at its rate, label noise spread thin, stock images and captions reused, the manifest
and the command."""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from collections import Counter, defaultdict
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import webdataset as wds
from typer.testing import CliRunner

from clipguard.cli.main import app
from clipguard.synth import (
    CLASSES,
    WebNoiseConfig,
    WorldSpec,
    WorldSpecError,
    generate_world,
    keyword_table,
    read_world_info,
)
from clipguard.synth.noise import (
    BOILERPLATE,
    CAPTION_KINDS,
    FILE_NAME_TEMPLATES,
    GALLERY_TEMPLATE,
    PARTIAL_TEMPLATES,
)
from clipguard.synth.vocabulary import ATTRIBUTE_NAMES, COUNT_WORDS, SIZE_WORDS

TINY = WorldSpec(seed=3, train_images=40, reference_images=10, test_images_per_class=1,
                 validation_images_per_class=1, shard_size=50)
# A digest of every non-image tar member of TINY's world, and of its world.json, as the clean
# world was written before the noise option existed (commit 8ff40c4). Images are compared
# between worlds below instead: their bytes depend on the JPEG library, not on this code.
TINY_MEMBERS_SHA256 = "771ffbabd9c93d577bccc516bb7f1ba79c8fe5d055ab3371045438de3b153a1c"
TINY_WORLD_JSON_SHA256 = "cc3a25b35e27201aaac4d271025a08d7c0c905ea9830559d4ce21785ba1390d1"

NOISY = WorldSpec(seed=5, train_images=300, reference_images=10, test_images_per_class=1,
                  validation_images_per_class=1, shard_size=200, noise="web")


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("noisy"), NOISY)


@pytest.fixture(scope="module")
def train(noisy) -> list[dict]:
    samples = wds.WebDataset(noisy.shards("train"), shardshuffle=False, empty_check=False)
    return [{**json.loads(s["json"]), "sha256": hashlib.sha256(s["jpg"]).hexdigest(), "txt": s["txt"].decode()}
            for s in samples]


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def members_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if not member.name.endswith(".jpg"):
                    digest.update(member.name.encode())
                    digest.update(tar.extractfile(member).read())
    return digest.hexdigest()


def caption_classes(text: str) -> set[str]:
    forms = {form: name for name, all_forms in keyword_table().items() for form in all_forms}
    return {forms[w] for w in re.findall(r"[a-z]+", text.lower()) if w in forms}


def test_same_spec_gives_the_same_bytes_and_another_seed_differs(noisy, tmp_path):
    again = generate_world(tmp_path / "again", NOISY)
    assert all_files(again.root) == all_files(noisy.root)
    other = generate_world(tmp_path / "other", replace(NOISY, seed=6))
    assert all_files(other.root)["train/000000.tar"] != all_files(noisy.root)["train/000000.tar"]


def test_noise_none_writes_the_world_it_always_wrote(tmp_path):
    clean = generate_world(tmp_path / "clean", TINY)
    assert members_digest(clean.root) == TINY_MEMBERS_SHA256
    assert hashlib.sha256(clean.world_json.read_bytes()).hexdigest() == TINY_WORLD_JSON_SHA256
    # Only train is noisy: the splits that measure goals and the reference split keep every byte.
    web = generate_world(tmp_path / "web", replace(TINY, noise="web"))
    clean_files, web_files = all_files(clean.root), all_files(web.root)
    for split in ("test", "validation", "reference"):
        assert web_files[f"{split}/000000.tar"] == clean_files[f"{split}/000000.tar"], split
    assert web_files["train/000000.tar"] != clean_files["train/000000.tar"]


def test_every_train_pair_records_its_noise_and_kinds_come_at_their_rates(train):
    assert len(train) == NOISY.pairs_in("train") == 600
    kinds = Counter(pair["noise"] for pair in train)
    assert set(kinds) == set(CAPTION_KINDS)
    rates = NOISY.web_noise.caption_rates()
    for kind, rate in rates.items():
        spread = 4 * (rate * (1 - rate) / len(train)) ** 0.5
        assert abs(kinds[kind] / len(train) - rate) < spread + 0.01, (kind, kinds[kind])
    assert abs(kinds["none"] / len(train) - (1 - sum(rates.values()))) < 0.08


def test_each_kind_of_caption_says_what_its_kind_says(train):
    gallery = re.compile(GALLERY_TEMPLATE.replace("{}", r"\d+") + "$")
    file_names = [re.compile(re.sub(r"\\\{[^}]*\\\}", r"\\d+", re.escape(t)) + "$") for t in FILE_NAME_TEMPLATES]
    for pair in train:
        text, kind, named = pair["txt"], pair["noise"], caption_classes(pair["txt"])
        if kind == "boilerplate":
            assert pair["caption_class"] is None and not named
            assert text in BOILERPLATE or gallery.match(text) or any(f.match(text) for f in file_names), text
        elif kind == "label_noise":
            assert pair["caption_class"] != pair["class"] and named == {pair["caption_class"]}, text
        else:
            assert pair["caption_class"] == pair["class"] and named == {pair["class"]}, text
        if kind == "wrong_attribute":
            assert pair["wrong_attributes"] and set(pair["wrong_attributes"]) <= set(ATTRIBUTE_NAMES)
            attributes = pair["attributes"]
            if "colour" in pair["wrong_attributes"]:
                assert attributes["colour"] not in text.split(), text
            if "count" in pair["wrong_attributes"] and attributes["count"] > 1:
                assert COUNT_WORDS[attributes["count"]] not in text.split(), text
        else:
            assert pair["wrong_attributes"] == []
        if kind == "partial":
            assert any(re.fullmatch(re.escape(t).replace(r"\{\}", ".+"), text) for t in PARTIAL_TEMPLATES), text
            assert len(pair["mentions"]) <= 1 and set(pair["mentions"]) <= {"colour", "size"}
            if pair["mentions"] == ["size"]:
                assert set(text.split()) & set(SIZE_WORDS[pair["attributes"]["size"]])


def test_label_noise_spreads_over_many_class_pairs(tmp_path):
    spec = replace(NOISY, web_noise=WebNoiseConfig(label_noise_rate=0.3, partial_rate=0.1, wrong_attribute_rate=0.1))
    cells = Counter()
    for sample in wds.WebDataset(generate_world(tmp_path, spec).shards("train"), shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        if meta["noise"] == "label_noise":
            cells[meta["caption_class"], meta["class"]] += 1
    total = sum(cells.values())
    assert total > 120
    # No cell stands out as an attack's would (Attack II puts all its pairs in one cell).
    assert len(cells) > 60
    assert max(cells.values()) <= 0.06 * total, cells.most_common(3)
    assert len({caption for caption, _ in cells}) == len({image for _, image in cells}) == len(CLASSES)


def test_stock_images_sit_behind_several_different_captions(train):
    captions_by_image, pages_by_image = defaultdict(set), defaultdict(set)
    for pair in train:
        captions_by_image[pair["sha256"]].add(pair["txt"])
        pages_by_image[pair["sha256"]].add(pair["page_id"])
        assert pair["image_id"] == pair["page_id"] or pair["stock_pages"] > 1
    stock = {sha for sha, pages in pages_by_image.items() if len(pages) > 1}
    assert stock, "no stock image in the noisy train split"
    for sha in stock:
        pairs = [p for p in train if p["sha256"] == sha]
        pages = len(pages_by_image[sha])
        assert 2 <= pages <= NOISY.web_noise.stock_max_pages
        assert {p["stock_pages"] for p in pairs} == {pages} and len({p["image_id"] for p in pairs}) == 1
        assert len({p["class"] for p in pairs}) == 1
    assert max(len(captions_by_image[sha]) for sha in stock) >= 4
    stock_pairs = sum(p["stock_pages"] > 1 for p in train)
    expected = NOISY.web_noise.stock_page_rate * NOISY.images_in("train") * NOISY.captions_per_image
    assert abs(stock_pairs - expected) <= 2 * NOISY.captions_per_image


def test_one_caption_is_reused_across_many_images_of_many_classes(train):
    images, classes = defaultdict(set), defaultdict(set)
    for pair in train:
        images[pair["txt"]].add(pair["sha256"])
        classes[pair["txt"]].add(pair["class"])
    most_reused = max(images, key=lambda text: len(images[text]))
    assert most_reused in BOILERPLATE and len(images[most_reused]) >= 10 and len(classes[most_reused]) >= 5


def test_the_manifest_records_the_noise_parameters_and_counts(noisy, train):
    manifest = json.loads(noisy.world_json.read_text())
    assert manifest["spec"]["noise"] == "web"
    assert manifest["spec"]["web_noise"] == asdict(NOISY.web_noise)
    assert manifest["noisy_splits"] == ["train"]
    counts = manifest["splits"]["train"]["noise_counts"]
    assert counts == {**Counter(p["noise"] for p in train), "stock_pairs": sum(p["stock_pages"] > 1 for p in train)}
    assert manifest["splits"]["train"]["image_count"] == len({p["sha256"] for p in train})
    assert manifest["splits"]["test"]["noise_counts"] is None
    assert read_world_info(noisy.root).spec == NOISY


def test_noise_words_hide_no_class_keyword():
    forms = [form for all_forms in keyword_table().values() for form in all_forms]
    texts = list(BOILERPLATE) + [t.replace("{}", " ") for t in PARTIAL_TEMPLATES]
    texts += [re.sub(r"\{[^}]*\}", " ", t) for t in FILE_NAME_TEMPLATES + (GALLERY_TEMPLATE,)]
    words = {w for text in texts for w in re.findall(r"[a-z]+", text.lower())}
    assert not [(form, word) for form in forms for word in words if form in word]


@pytest.mark.parametrize("change, message", [
    ({"noise": "loud"}, "noise must be one of"),
    ({"web_noise": WebNoiseConfig(partial_rate=0.6, wrong_attribute_rate=0.6)}, "sum to at most 1"),
    ({"web_noise": WebNoiseConfig(stock_page_rate=1.5)}, "stock_page_rate"),
    ({"web_noise": WebNoiseConfig(min_wrong_attributes=4, max_wrong_attributes=3)}, "min_wrong_attributes"),
    ({"web_noise": WebNoiseConfig(stock_max_pages=1)}, "stock_max_pages"),
])
def test_bad_noise_settings_are_clear_errors(tmp_path, change, message):
    with pytest.raises(WorldSpecError, match=message):
        generate_world(tmp_path, replace(TINY, **change))
    assert not any(tmp_path.iterdir())


def test_clipguard_synth_noise_web(tmp_path):
    runner = CliRunner()
    out = tmp_path / "world"
    args = ["synth", "--out", str(out), "--train", "30", "--reference", "5", "--test", "1", "--validation", "1",
            "--noise", "web", "--label-noise-rate", "0.1", "--stock-page-rate", "0.2"]
    done = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert done.exit_code == 0, done.output
    manifest = json.loads((out / "world.json").read_text())
    assert manifest["spec"]["noise"] == "web"
    assert manifest["spec"]["web_noise"]["label_noise_rate"] == 0.1
    assert manifest["spec"]["web_noise"]["stock_page_rate"] == 0.2
    assert manifest["splits"]["train"]["noise_counts"]["stock_pairs"] > 0
    assert "label_noise" in done.output
    bad = runner.invoke(app, [*args[:-4], "--partial-rate", "0.9", "--overwrite"], env={"COLUMNS": "200"})
    assert bad.exit_code != 0 and "sum to at most 1" in bad.output
