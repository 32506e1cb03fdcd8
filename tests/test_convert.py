"""`clipguard convert`: COCO, Flickr30k, Visual Genome and folders in their official formats ->
shards, convert_manifest.json and a registered name; then `sterilize --clean vg` on the result."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipguard.cli.main import app
from clipguard.convert import CaptionChoice, ConvertConfig, ConvertError, DatasetKind, convert_dataset
from clipguard.convert.jsonstream import iter_json_array
from clipguard.data.pairs import DecodeLimits, decode_pair
from clipguard.data.shardspec import resolve_shards
from clipguard.data.tarstream import ShardReport, iter_samples
from clipguard.datasets import load_dataset_names, register_dataset, resolve_dataset

runner = CliRunner()


def image_bytes(seed: int, fmt: str = "JPEG", size: int = 40) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def put(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


CORRUPT = image_bytes(99)[:200]  # a JPEG cut short: the header reads, the pixels do not


def read_converted(out: Path) -> dict[str, dict]:
    """Every sample of the converted shards, read back through clipguard's own reader."""
    samples = {}
    for shard in resolve_shards([str(out)]):
        for raw in iter_samples(shard, ShardReport(shard.name, shard.url)):
            pair = decode_pair(raw, DecodeLimits())
            assert pair.ok, (raw.key, pair.error)
            samples[raw.key] = {"caption": pair.caption, "fields": sorted(raw.fields),
                                "meta": json.loads(raw.fields["json"]), "bytes": raw.fields}
    return samples


def manifest(out: Path) -> dict:
    return json.loads((out / "convert_manifest.json").read_text())


@pytest.fixture
def registry(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "config" / "datasets.toml"
    monkeypatch.setenv("CLIPGUARD_DATASETS", str(path))
    return path


# ---------------------------------------------------------------- COCO

def make_coco(root: Path) -> dict[int, bytes]:
    images = {1: image_bytes(1), 2: image_bytes(2), 5: image_bytes(5, "PNG")}
    for image_id, data in images.items():
        put(root / "val2017" / f"{image_id:012d}.jpg", data)  # image 5 is a PNG named .jpg
    put(root / "val2017" / f"{3:012d}.jpg", CORRUPT)
    entries = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 40, "height": 40} for i in (5, 1, 2, 3, 4)]
    annotations = [
        {"image_id": 1, "id": 11, "caption": "A lamb standing in a field."},
        {"image_id": 1, "id": 10, "caption": "Two sheep on the grass."},
        {"image_id": 2, "id": 20, "caption": "A jet on the runway"},
        {"image_id": 3, "id": 30, "caption": "A cat on a sofa"},
        {"image_id": 4, "id": 40, "caption": "A bus in the rain"},
        {"image_id": 5, "id": 50, "caption": "A red kite in the sky"},
    ]
    put(root / "annotations" / "captions_val2017.json", json.dumps({"images": entries, "annotations": annotations}))
    return images


def test_coco_first_caption_per_image_with_labels_failures_and_registration(tmp_path, registry):
    originals = make_coco(tmp_path / "coco")
    out = tmp_path / "shards"
    result = convert_dataset(ConvertConfig(DatasetKind.coco, tmp_path / "coco", out, split="val2017", shard_size=2))
    samples = read_converted(out)
    assert sorted(samples) == ["000000000001", "000000000002", "000000000005"]
    first = samples["000000000001"]
    assert first["caption"] == "Two sheep on the grass."  # lowest annotation id
    assert first["meta"]["class"] == "sheep" and first["meta"]["annotation_id"] == 10
    assert first["meta"]["captions"] == ["Two sheep on the grass.", "A lamb standing in a field."]
    assert samples["000000000002"]["meta"]["class"] == "aeroplane"
    assert "class" not in samples["000000000005"]["meta"]  # a kite is none of the 20 classes
    # Bytes kept as they were; the PNG named .jpg is stored as what it is.
    assert samples["000000000001"]["bytes"]["jpg"] == originals[1]
    assert samples["000000000005"]["fields"] == ["json", "png", "txt"]
    assert samples["000000000005"]["bytes"]["png"] == originals[5]

    written = manifest(out)
    assert written["counts"] == {"read": 5, "written": 3, "failed": 2, "outside_split": 0}
    assert written["by_reason"] == {"corrupt_image": 1, "missing_image": 1}
    failures = {f["key"]: f for f in written["failures"]}
    assert failures["000000000003"]["reason"].startswith("corrupt_image")
    assert failures["000000000004"]["source"]["image_id"] == 4
    assert written["labels"]["per_class"] == {"aeroplane": 1, "sheep": 1}
    assert [s["samples"] for s in written["shards"]] == [2, 1]
    assert result.written + len(result.failures) == result.read

    # Registered under "coco": `evaluate --test coco` resolves it.
    assert resolve_dataset(["coco"]) == [f"{out.resolve()}/coco-{{000000..000001}}.tar"]
    assert len(resolve_shards(resolve_dataset(["coco"]))) == 2


def test_coco_one_pair_per_caption(tmp_path, registry):
    make_coco(tmp_path / "coco")
    out = tmp_path / "all"
    convert_dataset(ConvertConfig(DatasetKind.coco, tmp_path / "coco", out, split="val2017",
                                  captions=CaptionChoice.all, name="coco-all"))
    samples = read_converted(out)
    assert sorted(samples) == ["000000000001_0", "000000000001_1", "000000000002_0", "000000000005_0"]
    assert samples["000000000001_1"]["caption"] == "A lamb standing in a field."
    assert manifest(out)["counts"]["failed"] == 2
    assert set(load_dataset_names(registry)) == {"coco-all"}


def test_coco_missing_or_wrong_annotation_files_are_clear_errors(tmp_path, registry):
    root = tmp_path / "coco"
    (root / "train2017").mkdir(parents=True)
    with pytest.raises(ConvertError, match=r"annotations/captions_train2017.json"):
        convert_dataset(ConvertConfig(DatasetKind.coco, root, tmp_path / "out"))
    put(root / "annotations" / "captions_train2017.json", json.dumps([{"id": 1}]))
    with pytest.raises(ConvertError, match="is not a COCO captions file"):
        convert_dataset(ConvertConfig(DatasetKind.coco, root, tmp_path / "out"))
    assert not list((tmp_path / "out").glob("*.tar")) and not registry.exists()


# ---------------------------------------------------------------- Flickr30k

def make_flickr(root: Path) -> None:
    for stem, seed in (("1000092795", 1), ("10002456", 2), ("1000268201", 3)):
        put(root / "flickr30k-images" / f"{stem}.jpg", image_bytes(seed))
    put(root / "flickr30k-images" / "2000.jpg", CORRUPT)
    put(root / "results_20130124.token", "\n".join([
        "1000092795.jpg#1\tA goat climbs a rock .",
        "1000092795.jpg#0\tA goat on a rocky hill .",
        "10002456.jpg#0\tA man rides a bicycle down the street .",
        "1000268201.jpg#0\tA dog and a cat play together .",
        "2000.jpg#0\tA boat on a lake .",
        "3000.jpg#0\tA horse in a field .",
    ]) + "\n")
    karpathy = {"dataset": "flickr30k", "images": [
        {"filename": "1000092795.jpg", "imgid": 0, "split": "test",
         "sentences": [{"raw": "A goat on a rocky hill.", "sentid": 0}, {"raw": "A goat climbs.", "sentid": 1}]},
        {"filename": "10002456.jpg", "imgid": 1, "split": "train", "sentences": [{"raw": "A bike.", "sentid": 2}]},
        {"filename": "2000.jpg", "imgid": 2, "split": "test", "sentences": [{"raw": "A boat.", "sentid": 3}]},
    ]}
    put(root / "dataset_flickr30k.json", json.dumps(karpathy))


def test_flickr30k_token_file(tmp_path, registry):
    make_flickr(tmp_path / "f30k")
    out = tmp_path / "shards"
    convert_dataset(ConvertConfig(DatasetKind.flickr30k, tmp_path / "f30k", out))
    samples = read_converted(out)
    assert set(samples) == {"1000092795", "1000268201", "10002456"}
    assert samples["1000092795"]["caption"] == "A goat on a rocky hill ."  # caption #0
    assert samples["1000092795"]["meta"]["class"] == "sheep"  # goat is a sheep keyword
    # "man" (person) and "bicycle": two classes, so no label rather than a guess.
    assert "class" not in samples["10002456"]["meta"]
    assert samples["10002456"]["meta"]["keyword_classes"] == ["bicycle", "person"]
    written = manifest(out)
    assert written["by_reason"] == {"corrupt_image": 1, "missing_image": 1}
    assert written["labels"]["unlabelled"] == {"several_classes": 2}
    assert "flickr30k" in load_dataset_names(registry)


def test_flickr30k_karpathy_json_with_a_split(tmp_path, registry):
    make_flickr(tmp_path / "f30k")
    out = tmp_path / "test-split"
    convert_dataset(ConvertConfig(DatasetKind.flickr30k, tmp_path / "f30k", out, name="f30k-test",
                                  captions_file=tmp_path / "f30k" / "dataset_flickr30k.json", split="test"))
    samples = read_converted(out)
    assert list(samples) == ["1000092795"]
    assert samples["1000092795"]["meta"]["split"] == "test"
    assert manifest(out)["counts"] == {"read": 2, "written": 1, "failed": 1, "outside_split": 1}
    with pytest.raises(ConvertError, match="has no splits"):
        convert_dataset(ConvertConfig(DatasetKind.flickr30k, tmp_path / "f30k", tmp_path / "x", split="test"))


def test_flickr30k_bad_token_line_names_the_file_and_line(tmp_path, registry):
    root = tmp_path / "f30k"
    (root / "flickr30k-images").mkdir(parents=True)
    put(root / "results_20130124.token", "1.jpg#0\tfine\nthis line has no tab\n")
    with pytest.raises(ConvertError, match=r"results_20130124.token:2 is not a Flickr30k token line"):
        convert_dataset(ConvertConfig(DatasetKind.flickr30k, root, tmp_path / "out"))


# ---------------------------------------------------------------- Visual Genome

VG_PHRASES = ["a white sheep", "a lamb on grass", "a jet in the sky", "a small plane", "green grass"]


def make_vg(root: Path, images: int = 12) -> None:
    regions, image_data = [], []
    for image_id in range(1, images + 1):
        folder = "VG_100K" if image_id % 2 else "VG_100K_2"
        if image_id == 3:
            put(root / folder / "3.jpg", CORRUPT)
        elif image_id != 4:  # image 4 is missing
            put(root / folder / f"{image_id}.jpg", image_bytes(image_id, size=48))
        subject = VG_PHRASES[image_id % 4]
        regions.append({"id": image_id, "regions": [
            {"region_id": image_id * 10, "image_id": image_id, "phrase": "green grass", "x": 0, "y": 0, "width": 10, "height": 10},
            {"region_id": image_id * 10 + 1, "image_id": image_id, "phrase": subject, "x": 0, "y": 0, "width": 40, "height": 40},
            {"region_id": image_id * 10 + 2, "image_id": image_id, "phrase": "Green grass.", "x": 5, "y": 5, "width": 5, "height": 5},
        ]})
        image_data.append({"image_id": image_id, "width": 48, "height": 48, "coco_id": None, "flickr_id": None,
                           "url": f"https://cs.stanford.edu/people/rak248/{folder}/{image_id}.jpg"})
    put(root / "region_descriptions.json", json.dumps(regions, indent=1))
    put(root / "image_data.json", json.dumps(image_data))


def test_vg_one_pair_per_image_from_its_region_phrases(tmp_path, registry):
    make_vg(tmp_path / "vg")
    out = tmp_path / "vg-shards"
    result = convert_dataset(ConvertConfig(DatasetKind.vg, tmp_path / "vg", out, shard_size=5))
    samples = read_converted(out)
    assert sorted(samples, key=int) == [str(i) for i in range(1, 13) if i not in (3, 4)]
    # Largest region first, repeats (case and trailing dot aside) dropped.
    assert samples["1"]["caption"] == "a lamb on grass, green grass"
    assert samples["1"]["meta"]["region_ids"] == [11, 10]
    assert samples["1"]["meta"]["class"] == "sheep"
    assert samples["2"]["caption"] == "a jet in the sky, green grass" and samples["2"]["meta"]["class"] == "aeroplane"
    assert samples["2"]["meta"]["file_name"] == "VG_100K_2/2.jpg"
    written = manifest(out)
    assert written["counts"] == {"read": 12, "written": 10, "failed": 2, "outside_split": 0}
    assert {f["key"]: f["reason"].split(":")[0] for f in written["failures"]} == {"3": "corrupt_image", "4": "missing_image"}
    assert [s["samples"] for s in written["shards"]] == [5, 5]
    assert result.registration.specs == [f"{out.resolve()}/vg-{{000000..000001}}.tar"]
    # Same input, same bytes: the shards are reproducible.
    again = convert_dataset(ConvertConfig(DatasetKind.vg, tmp_path / "vg", tmp_path / "again", shard_size=5, register=False))
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in result.shards]


def test_vg_without_image_data_looks_in_both_image_folders(tmp_path, registry):
    make_vg(tmp_path / "vg", images=4)
    (tmp_path / "vg" / "image_data.json").unlink()
    result = convert_dataset(ConvertConfig(DatasetKind.vg, tmp_path / "vg", tmp_path / "out", register=False))
    samples = read_converted(tmp_path / "out")
    assert sorted(samples) == ["1", "2"] and samples["2"]["meta"]["file_name"] == "VG_100K_2/2.jpg"
    assert {f.key: f.code for f in result.failures} == {"3": "corrupt_image", "4": "missing_image"}
    with pytest.raises(ConvertError, match="coco and flickr30k only"):
        convert_dataset(ConvertConfig(DatasetKind.vg, tmp_path / "vg", tmp_path / "x", captions=CaptionChoice.all))


def test_vg_json_is_streamed_and_a_truncated_file_is_a_clear_error(tmp_path):
    items = [{"id": i, "regions": [{"phrase": "é" * (i % 7)}]} for i in range(300)]
    path = put(tmp_path / "region_descriptions.json", json.dumps(items))
    # Chunks of 17 characters cut items, strings and multi-byte characters everywhere.
    assert list(iter_json_array(path, "images", chunk_chars=17)) == items
    put(path, json.dumps(items)[:-40])
    with pytest.raises(ConvertError, match="truncated download"):
        list(iter_json_array(path, "images", chunk_chars=17))
    put(path, json.dumps({"not": "a list"}))
    with pytest.raises(ConvertError, match="should be a JSON array of images"):
        list(iter_json_array(path, "images"))


def test_vg_without_its_files_says_what_was_expected(tmp_path):
    root = tmp_path / "vg"
    root.mkdir()
    with pytest.raises(ConvertError, match=r"region_descriptions.json"):
        convert_dataset(ConvertConfig(DatasetKind.vg, root, tmp_path / "out"))
    put(root / "region_descriptions.json", "[]")
    with pytest.raises(ConvertError, match=r"VG_100K"):
        convert_dataset(ConvertConfig(DatasetKind.vg, root, tmp_path / "out"))


# ---------------------------------------------------------------- folder

def test_folder_of_images_and_same_stem_captions(tmp_path, registry):
    root = tmp_path / "pics"
    put(root / "a.jpg", image_bytes(1))
    put(root / "a.txt", "a puppy on a couch\n")  # dog and sofa: no single class
    put(root / "nested" / "deep" / "b.v2.png", image_bytes(2, "PNG"))
    put(root / "nested" / "deep" / "b.v2.txt", "a kitten")
    put(root / "nested" / "c.bmp", image_bytes(3, "BMP"))
    put(root / "nested" / "c.txt", "a parrot")
    put(root / "no-caption.jpg", image_bytes(4))
    put(root / "no-image.txt", "a cow")
    put(root / "broken.jpg", CORRUPT)
    put(root / "broken.txt", "a horse")
    out = tmp_path / "out"
    result = convert_dataset(ConvertConfig(DatasetKind.folder, root, out, name="pics"))
    samples = read_converted(out)
    assert sorted(samples) == ["a", "nested/c", "nested/deep/b_v2"]
    assert samples["nested/deep/b_v2"]["meta"]["class"] == "cat"
    assert samples["nested/c"]["fields"] == ["json", "png", "txt"]  # BMP re-encoded losslessly
    assert samples["nested/c"]["meta"]["class"] == "bird"
    assert samples["a"]["meta"]["keyword_classes"] == ["dog", "sofa"]
    reasons = {f.key: f.code for f in result.failures}
    assert reasons == {"broken": "corrupt_image", "no-caption": "missing_caption", "no-image": "missing_image"}
    assert manifest(out)["notes"] == {"reencoded_png": 1}


def test_rerunning_into_the_same_folder_needs_overwrite(tmp_path, registry):
    root = tmp_path / "pics"
    for i in range(3):
        put(root / f"{i}.jpg", image_bytes(i))
        put(root / f"{i}.txt", f"a train number {i}")
    out = tmp_path / "out"
    convert_dataset(ConvertConfig(DatasetKind.folder, root, out, shard_size=1))
    with pytest.raises(ConvertError, match="--overwrite"):
        convert_dataset(ConvertConfig(DatasetKind.folder, root, out))
    (root / "2.jpg").unlink()
    convert_dataset(ConvertConfig(DatasetKind.folder, root, out, overwrite=True))
    assert sorted(p.name for p in out.glob("*.tar")) == ["folder-000000.tar"]  # the old parts are gone
    assert resolve_dataset(["folder"]) == [str(out.resolve() / "folder-000000.tar")]


def test_registering_keeps_the_users_comments_and_other_names(tmp_path):
    path = put(tmp_path / "datasets.toml", '# my datasets\n[datasets]\ncc = "/data/cc/{0..9}.tar"  # web\n'
                                           'vg = [\n  "/old/a.tar",\n  "/old/b.tar",\n]\n\n[other]\nx = 1\n')
    register_dataset("vg", ["/new/vg-{000000..000003}.tar"], path)
    register_dataset("coco", ["/new/coco-000000.tar"], path)
    text = path.read_text()
    assert text.startswith("# my datasets\n") and "# web" in text and "[other]" in text and "/old/" not in text
    assert load_dataset_names(path) == {"cc": ["/data/cc/{0..9}.tar"], "vg": ["/new/vg-{000000..000003}.tar"],
                                        "coco": ["/new/coco-000000.tar"]}


# ---------------------------------------------------------------- CLI and sterilize

def test_cli_convert_vg_then_sterilize_with_clean_vg(tmp_path, registry):
    make_vg(tmp_path / "vg", images=14)
    out = tmp_path / "vg-shards"
    converted = runner.invoke(app, ["convert", "vg", str(tmp_path / "vg"), "--out", str(out)])
    assert converted.exit_code == 0, converted.output
    assert "12 of 14 pairs written" in converted.output and "registered vg" in " ".join(converted.output.split())
    repaired = tmp_path / "repaired.safetensors"
    result = runner.invoke(app, ["sterilize", "clipguard-victim", "--clean", "vg", "--out", str(repaired),
                                 "--max-steps", "2", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert "2 steps, 8 samples" in result.output and repaired.exists()


def test_cli_evaluate_finds_converted_coco_by_name(tmp_path, registry):
    make_coco(tmp_path / "coco")
    converted = runner.invoke(app, ["convert", "coco", str(tmp_path / "coco"), "--split", "val2017",
                                    "--out", str(tmp_path / "shards")])
    assert converted.exit_code == 0, converted.output
    report = tmp_path / "report.json"
    result = runner.invoke(app, ["evaluate", "clipguard-victim", "--test", "coco", "--goal", "sheep:aeroplane",
                                 "--json", str(report)])
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["goals"][0]["goal"] == "sheep:aeroplane"


def test_cli_errors_are_exit_code_2(tmp_path, registry):
    result = runner.invoke(app, ["convert", "coco", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "COCO captions file not found" in result.output
    result = runner.invoke(app, ["convert", "folder", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "image folder not found" in result.output
