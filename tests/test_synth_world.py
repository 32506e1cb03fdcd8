"""The synthetic world: determinism, splits, labels, captions, shards and rendering."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import braceexpand
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from clipguard.synth import (
    BACKGROUNDS,
    CLASS_KEYWORDS,
    CLASSES,
    COLOURS,
    Attributes,
    WorldSpec,
    WorldSpecError,
    class_prompts,
    generate_world,
    iter_split_samples,
    keyword_forms,
    keyword_table,
    make_caption,
    make_short_caption,
    read_world_info,
    render_image,
)
from clipguard.synth.render import ICON_DRAWERS
from clipguard.synth.vocabulary import (
    ATTRIBUTE_NAMES,
    CAPTION_TEMPLATES,
    CLASS_NOUNS,
    COUNT_WORDS,
    POSITION_PHRASES,
    PROMPT_TEMPLATES,
    SIZE_WORDS,
)

SMALL = WorldSpec(
    seed=7,
    train_images=60,
    reference_images=40,
    test_images_per_class=2,
    validation_images_per_class=3,
    captions_per_image=2,
    test_captions_per_image=1,
    shard_size=50,
)
SPLIT_NAMES = ("train", "test", "reference", "validation")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("world"), SMALL)


def read_split(info, split: str) -> list[dict]:
    dataset = wds.WebDataset(info.shards(split), shardshuffle=False, empty_check=False)
    return list(dataset)


def all_files(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def classes_by_whole_word(text: str) -> list[str]:
    forms = {form: name for name, all_forms in keyword_table().items() for form in all_forms}
    return [forms[w] for w in words(text) if w in forms]


def classes_by_substring(text: str) -> set[str]:
    return {name for name, forms in keyword_table().items() if any(f in text for f in forms)}


def test_same_seed_gives_identical_bytes_and_other_seed_differs(world, tmp_path):
    again = generate_world(tmp_path / "again", SMALL)
    other = generate_world(tmp_path / "other", WorldSpec(**{**SMALL.__dict__, "seed": 8}))
    first_files, again_files = all_files(world.root), all_files(again.root)
    assert first_files == again_files
    other_files = all_files(other.root)
    assert other_files.keys() == first_files.keys()
    for name in first_files:
        if name.endswith(".tar"):
            assert other_files[name] != first_files[name], name


def test_tar_members_carry_no_clock_or_user(world):
    import tarfile

    with tarfile.open(world.root / "train" / "000000.tar") as tar:
        members = tar.getmembers()
    assert {(m.mtime, m.uname, m.gname, m.uid, m.gid, m.mode) for m in members} == {
        (0, "clipguard", "clipguard", 0, 0, 0o444)
    }


def test_world_json_patterns_resolve_to_the_files_written(world):
    manifest = json.loads(world.world_json.read_text())
    assert manifest["spec"]["seed"] == SMALL.seed
    assert manifest["spec"]["image_size"] == 64
    assert manifest["classes"] == {name: list(CLASS_KEYWORDS[name]) for name in CLASSES}
    for split in SPLIT_NAMES:
        entry = manifest["splits"][split]
        expanded = sorted(braceexpand.braceexpand(str(world.root / entry["pattern"])))
        written = sorted(str(p) for p in (world.root / split).glob("*.tar"))
        assert expanded == written
        assert len(written) == entry["shard_count"]
        assert entry["pair_count"] == SMALL.pairs_in(split)
        assert sum(entry["pairs_per_class"].values()) == entry["pair_count"]
    assert manifest["splits"]["train"]["pattern"] == "train/{000000..000002}.tar"
    assert manifest["splits"]["test"]["pattern"] == "test/000000.tar"
    assert json.loads(world.keywords_json.read_text()) == keyword_table()
    assert read_world_info(world.root) == world


def test_shards_hold_every_member_with_consistent_metadata(world):
    for split in SPLIT_NAMES:
        samples = read_split(world, split)
        assert len(samples) == SMALL.pairs_in(split)
        keys = [s["__key__"] for s in samples]
        assert len(set(keys)) == len(keys)
        for position, sample in enumerate(samples):
            assert {"__key__", "jpg", "txt", "json"} <= sample.keys()
            shard, index = divmod(position, SMALL.shard_size)
            assert sample["__key__"] == f"{shard:05d}{index:04d}"
            meta = json.loads(sample["json"])
            assert set(meta) >= {"caption", "class", "image_id", "split", "attributes", "key"}
            assert meta["caption_style"] in {"full", "short"}
            assert meta["key"] == sample["__key__"]
            assert meta["split"] == split
            assert meta["caption"] == sample["txt"].decode("utf-8")
            assert meta["class"] in CLASSES
            assert set(meta["attributes"]) == {"colour", "size", "count", "position", "background"}
            image = Image.open(io.BytesIO(sample["jpg"]))
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (64, 64))


def test_splits_share_no_image(world):
    ids_by_split, hashes_by_split = {}, {}
    for split in SPLIT_NAMES:
        samples = read_split(world, split)
        ids_by_split[split] = {json.loads(s["json"])["image_id"] for s in samples}
        hashes_by_split[split] = {hashlib.sha256(s["jpg"]).hexdigest() for s in samples}
        assert len(ids_by_split[split]) == SMALL.images_in(split)
        assert len(hashes_by_split[split]) == SMALL.images_in(split)
    for a, b in itertools.combinations(SPLIT_NAMES, 2):
        assert not ids_by_split[a] & ids_by_split[b]
        assert not hashes_by_split[a] & hashes_by_split[b]


def test_captions_of_one_image_share_its_id_and_bytes_but_differ_in_text(world):
    by_image = defaultdict(list)
    for sample in read_split(world, "train"):
        by_image[json.loads(sample["json"])["image_id"]].append(sample)
    assert all(len(group) == SMALL.captions_per_image for group in by_image.values())
    for group in by_image.values():
        assert len({s["jpg"] for s in group}) == 1
        assert len({s["txt"] for s in group}) == len(group)
        assert len({json.loads(s["json"])["class"] for s in group}) == 1


@pytest.mark.parametrize("split, images_per_class", [("test", SMALL.test_images_per_class),
                                                     ("validation", SMALL.validation_images_per_class)])
def test_test_and_validation_splits_are_balanced_per_class(world, split, images_per_class):
    counts = Counter(json.loads(s["json"])["class"] for s in read_split(world, split))
    per_class = images_per_class * SMALL.test_captions_per_image
    assert counts == {name: per_class for name in CLASSES}
    assert world.splits[split].pairs_per_class == {name: per_class for name in CLASSES}


def test_every_caption_names_its_class_by_exactly_one_keyword(world):
    for split in SPLIT_NAMES:
        for sample in read_split(world, split):
            meta = json.loads(sample["json"])
            assert classes_by_whole_word(meta["caption"]) == [meta["class"]], meta["caption"]
            assert classes_by_substring(meta["caption"]) == {meta["class"]}, meta["caption"]
            assert meta["keyword"] in keyword_forms(meta["class"])


def assert_caption_names(caption: str, attributes: dict, mentions: list[str]) -> None:
    count_words = {1: {"a", "an", "one"}, **{n: {w} for n, w in COUNT_WORDS.items()}}
    tokens = set(words(caption))
    named = {
        "colour": attributes["colour"] in tokens,
        "size": bool(tokens & set(SIZE_WORDS[attributes["size"]])),
        "count": bool(tokens & count_words[attributes["count"]]),
        "position": any(p in caption for p in POSITION_PHRASES[attributes["position"]]),
        "background": f"{attributes['background']} " in caption,
    }
    assert {name for name, present in named.items() if present} == set(mentions), caption


def test_captions_name_the_attributes_they_claim(world):
    styles = Counter()
    for split in SPLIT_NAMES:
        for sample in read_split(world, split):
            meta = json.loads(sample["json"])
            styles[split, meta["caption_style"]] += 1
            if meta["caption_style"] == "full":
                assert meta["mentions"] == list(ATTRIBUTE_NAMES)
            assert_caption_names(meta["caption"], meta["attributes"], meta["mentions"])
            plural_forms = {n.plural for n in CLASS_NOUNS[meta["class"]]}
            singular_forms = {n.singular for n in CLASS_NOUNS[meta["class"]]}
            plural = meta["attributes"]["count"] > 1
            assert meta["keyword"] in (plural_forms if plural else singular_forms)
            if split in ("test", "validation"):
                # Test queries are short-style but name every attribute: exact retrieval needs them.
                assert meta["mentions"] == list(ATTRIBUTE_NAMES)
    assert styles["test", "full"] == styles["validation", "full"] == 0
    # Most train captions are web-style and class-first, as in the paper's data.
    assert styles["train", "full"] < styles["train", "short"]


def test_short_captions_without_attributes_are_the_class_prompts():
    rng = np.random.default_rng(1)
    one = Attributes("red", "small", 1, "left", "plain")
    seen = set()
    for _ in range(300):
        caption = make_short_caption("sheep", one, rng, mention_rate=0.0)
        assert caption.mentions == ("count",)
        seen.add(caption.text)
    prompts = set(class_prompts("sheep"))
    assert prompts <= seen
    assert all(text in prompts or " of one " in text for text in seen)


def test_keyword_sets_are_disjoint_and_no_word_hides_a_keyword():
    assert tuple(CLASS_KEYWORDS) == tuple(ICON_DRAWERS) == CLASSES and len(CLASSES) == 20
    assert CLASS_KEYWORDS["sheep"][:3] == ("sheep", "lamb", "goat")
    assert {"plane", "jet", "airplane"} <= set(CLASS_KEYWORDS["aeroplane"])
    table = keyword_table()
    for name, forms in table.items():
        for other, other_forms in table.items():
            if other != name:
                assert not [(f, g) for f in forms for g in other_forms if f in g], (name, other)
    non_keyword_words = set()
    for template in CAPTION_TEMPLATES + PROMPT_TEMPLATES:
        non_keyword_words |= set(words(re.sub(r"\{\w*\}", " ", template)))
    for options in list(SIZE_WORDS.values()) + list(POSITION_PHRASES.values()):
        non_keyword_words |= {w for option in options for w in words(option)}
    non_keyword_words |= set(COLOURS) | set(BACKGROUNDS) | set(COUNT_WORDS.values()) | {"one"}
    all_forms = [f for forms in table.values() for f in forms]
    assert not [(f, w) for f in all_forms for w in non_keyword_words if f in w]


def test_make_caption_uses_correct_article_and_plural():
    rng = np.random.default_rng(0)
    one_orange = Attributes("orange", "small", 1, "left", "plain")
    three_red = Attributes("red", "large", 3, "top", "dotted")
    for _ in range(50):
        text = make_caption("sheep", one_orange, rng, template=3).text  # count before colour
        assert text.startswith("plain background with ") and " a " not in f" {text} "
        assert re.search(r"\b(an|one) orange (small|little|tiny) (sheep|lamb|goat)\b", text)
        text = make_caption("cat", three_red, rng).text
        assert "three" in text and re.search(r"\b(cats|kittens|kitties)\b", text)


def test_class_prompts_name_every_keyword_with_its_article():
    prompts = class_prompts("aeroplane")
    assert "a photo of a plane" in prompts and "a photo of an airplane" in prompts
    assert len(prompts) == len(CLASS_KEYWORDS["aeroplane"]) * len(PROMPT_TEMPLATES)
    for name in CLASSES:
        assert {classes_by_whole_word(p)[0] for p in class_prompts(name)} == {name}
    with pytest.raises(ValueError, match="unknown class"):
        class_prompts("zebra")


def colour_mask(image: Image.Image, colour: str, tolerance: int = 60) -> np.ndarray:
    pixels = np.asarray(image).astype(int)
    return np.abs(pixels - np.array(COLOURS[colour])).max(axis=2) < tolerance


def icon_extent(image: Image.Image) -> int:
    """Largest side of the bounding box of what differs from a plain background."""
    pixels = np.asarray(image).astype(int)
    rows, cols = np.nonzero(np.abs(pixels - pixels[0, 0]).max(axis=2) > 30)
    return max(rows.max() - rows.min(), cols.max() - cols.min()) + 1


@pytest.mark.parametrize("class_name", CLASSES)
def test_rendered_colour_position_and_size_are_visible(class_name):
    rng = np.random.default_rng(3)
    left = render_image(class_name, Attributes("blue", "large", 1, "left", "striped"), rng)
    right = render_image(class_name, Attributes("blue", "small", 1, "right", "dotted"), rng)
    assert left.size == (64, 64) and left.mode == "RGB"
    left_mask, right_mask = colour_mask(left, "blue"), colour_mask(right, "blue")
    assert left_mask.sum() >= 25 and right_mask.sum() >= 10
    assert np.nonzero(left_mask)[1].mean() < 26 and np.nonzero(right_mask)[1].mean() > 38
    assert colour_mask(left, "red").sum() == 0
    large = render_image(class_name, Attributes("red", "large", 1, "top", "plain"), rng)
    small = render_image(class_name, Attributes("red", "small", 1, "top", "plain"), rng)
    assert icon_extent(large) > 1.25 * icon_extent(small)


@pytest.mark.parametrize("class_name", CLASSES)
def test_rendered_count_is_visible(class_name):
    def ink(count: int) -> float:
        # Same seed: same background, colour and icon size; only the count changes.
        attributes = Attributes("purple", "small", count, "centre", "plain")
        pixels = np.asarray(render_image(class_name, attributes, np.random.default_rng(5)))
        return np.abs(pixels.astype(float) - pixels[0, 0]).sum()

    one, two, three = ink(1), ink(2), ink(3)
    assert 1.8 * one < two < 2.2 * one and 2.7 * one < three < 3.3 * one


def test_rendered_classes_differ_under_identical_attributes():
    attributes = Attributes("green", "large", 1, "centre", "plain")
    masks = {}
    for name in CLASSES:
        image = render_image(name, attributes, np.random.default_rng(0))
        masks[name] = np.asarray(image.convert("L")).astype(float)
    names = list(masks)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(masks[a] - masks[b]).mean() > 3, (a, b)


def test_existing_world_is_kept_unless_overwrite_and_stale_shards_go(tmp_path):
    big = WorldSpec(**{**SMALL.__dict__, "train_images": 80})
    generate_world(tmp_path, big)
    assert len(list((tmp_path / "train").glob("*.tar"))) == 4
    with pytest.raises(WorldSpecError, match="overwrite"):
        generate_world(tmp_path, SMALL)
    info = generate_world(tmp_path, SMALL, overwrite=True)
    assert len(list((tmp_path / "train").glob("*.tar"))) == info.splits["train"].shard_count == 3


@pytest.mark.parametrize(
    "change, message",
    [
        ({"shard_size": 10_001}, "shard_size"),
        ({"image_size": 16}, "image_size"),
        ({"captions_per_image": 0}, "captions_per_image"),
        ({"test_images_per_class": 0}, "test_images_per_class"),
        ({"validation_images_per_class": 0}, "validation_images_per_class"),
        ({"short_caption_rate": 1.5}, "short_caption_rate"),
    ],
)
def test_invalid_spec_is_a_clear_error(tmp_path, change, message):
    with pytest.raises(WorldSpecError, match=message):
        generate_world(tmp_path, WorldSpec(**{**SMALL.__dict__, **change}))
    assert not any(tmp_path.iterdir())


def test_unreadable_world_is_a_clear_error(tmp_path):
    with pytest.raises(WorldSpecError, match="readable synthetic world"):
        read_world_info(tmp_path)


@pytest.mark.parametrize("change", [{"train_images": 90}, {"validation_images_per_class": 5}])
def test_split_stream_does_not_depend_on_other_splits_sizes(change):
    # The validation split came after the others: it must not have moved a byte of test.
    other = WorldSpec(**{**SMALL.__dict__, **change})
    first = [(s.key, s.caption.text, s.jpeg) for s in iter_split_samples(SMALL, "test")]
    second = [(s.key, s.caption.text, s.jpeg) for s in iter_split_samples(other, "test")]
    assert first == second
