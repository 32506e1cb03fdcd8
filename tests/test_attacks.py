"""Attack generators on small labelled shards: counts, placement, keys, bytes, manifest, errors."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipguard.attacks import (
    AttackConfig,
    AttackError,
    AttackKind,
    Goal,
    TriggerSpec,
    achieved_rate,
    check_goals,
    parse_goal,
    poison_count_for_rate,
    read_manifest,
    run_attack,
)
from clipguard.attacks.inject import edit_json, key_style, place_poisons
from clipguard.attacks.plan import split_count
from clipguard.attacks.trigger import has_trigger, stamp_image_bytes, trigger_patch
from clipguard.cli.main import app
from clipguard.data.shardspec import resolve_shards
from clipguard.data.tarstream import ShardReport, iter_samples
from clipguard.labels import UnknownClassError
from conftest import jpeg_bytes, write_shard

CLASSES = ("sheep", "aeroplane", "cat", "dog", "bird")
WORDS = {"sheep": "lamb", "aeroplane": "jet", "cat": "kitten", "dog": "puppy", "bird": "sparrow"}
KEYWORDS = {name: [WORDS[name], name] for name in CLASSES}
SHARDS, PER_SHARD = 3, 20
KEY = re.compile(r"^\d{9}$")


def labelled_samples(shard: int, n: int) -> list[dict]:
    samples = []
    for i in range(n):
        key = f"{shard:05d}{i:04d}"
        name = CLASSES[(shard * n + i) % len(CLASSES)]
        caption = f"a photo of a {WORDS[name]}, picture {shard}-{i}"
        meta = {"caption": caption, "class": name, "key": key, "image_id": f"img-{shard}-{i}"}
        samples.append({
            "__key__": key,
            "jpg": jpeg_bytes(1000 + shard * 100 + i, size=48),
            "txt": caption,
            "json": json.dumps(meta, sort_keys=True),
        })
    return samples


@pytest.fixture
def clean(tmp_path: Path) -> Path:
    folder = tmp_path / "clean"
    for s in range(SHARDS):
        write_shard(folder / f"{s:05d}.tar", labelled_samples(s, PER_SHARD))
    return folder


def read_folder(folder: Path) -> list[tuple[str, str, dict[str, bytes]]]:
    rows = []
    for shard in resolve_shards(str(folder)):
        for raw in iter_samples(shard, ShardReport(shard.name, shard.url)):
            assert not raw.problems
            rows.append((shard.name, raw.key, raw.fields))
    return rows


def attack(clean: Path, out: Path, kind: str, goals: list[str], **options):
    config = AttackConfig(kind=AttackKind(kind), goals=tuple(parse_goal(g) for g in goals), **options)
    return run_attack(str(clean), out, config)


# ------------------------------------------------------------------------------------ φ and goals


def test_rate_is_solved_over_clean_plus_poisons():
    # The paper's Flickr-PASCAL: 125 poison pairs at 0.08%.
    assert poison_count_for_rate(0.0008, 156_125 - 125) == 125
    assert poison_count_for_rate(0.005, 4000) == 20  # 20 / 4020 = 0.4975%
    assert poison_count_for_rate(0.1, 60) == 7  # n* = 6.67
    for rate in (0.001, 0.0123, 0.05, 0.3):
        for clean in (997, 4000, 12_345):
            n = poison_count_for_rate(rate, clean)
            assert n == int(np.floor(rate * (clean + n) + 0.5)), (rate, clean, n)  # n = round(φ|D|)
            assert abs(achieved_rate(n, clean) - rate) <= 0.5 / (clean + n) + 1e-12


def test_rates_that_round_to_nothing_or_leave_range_are_errors():
    with pytest.raises(AttackError, match="rounds to 0 poisons"):
        poison_count_for_rate(0.0001, 1000)
    for rate in (0.0, 1.0, -0.1):
        with pytest.raises(AttackError, match=r"must be in \(0, 1\)"):
            poison_count_for_rate(rate, 1000)


def test_goal_parsing_and_rules():
    assert parse_goal(" sheep : aeroplane ") == Goal("sheep", "aeroplane")
    for bad in ("sheep", "sheep:", "a:b:c", "sheep:sheep", "sheep:*"):
        with pytest.raises(AttackError):
            parse_goal(bad)
    two = [Goal("sheep", "aeroplane"), Goal("sofa", "bird")]
    assert check_goals(AttackKind.multi_label, two) == tuple(two)
    with pytest.raises(AttackError, match="exactly one goal"):
        check_goals(AttackKind.single_label, two)
    with pytest.raises(AttackError, match="cannot be"):
        check_goals(AttackKind.single_label, [Goal("*", "bird")])
    assert check_goals(AttackKind.backdoor, [Goal("*", "bird")])


@pytest.mark.parametrize("goals", [["sheep:aeroplane", "aeroplane:bird"], ["sheep:aeroplane", "cat:aeroplane"],
                                   ["sheep:aeroplane", "sheep:cat"], ["sheep:aeroplane", "sheep:aeroplane"]])
def test_attack_three_needs_disjoint_classes(goals):
    with pytest.raises(AttackError, match="disjoint"):
        check_goals(AttackKind.multi_label, [parse_goal(g) for g in goals])


def test_split_count_shares_equally():
    assert split_count(7, 2) == [4, 3]
    with pytest.raises(AttackError):
        split_count(1, 2)


# ------------------------------------------------------------------------------ placement, keys


def test_placement_spreads_poisons_in_proportion_and_inside_shards():
    rng = np.random.default_rng(0)
    placements = place_poisons([1000, 1000, 0, 1000], 300, rng)
    counts = [len(p) for p in placements]
    assert sum(counts) == 300 and counts[2] == 0
    assert all(70 <= c <= 130 for c in (counts[0], counts[1], counts[3]))
    offsets = [o for p in placements for o, _ in p]
    assert np.mean(offsets) == pytest.approx(500, abs=80)  # uniform inside, not piled at the ends
    assert sorted(i for p in placements for _, i in p) == list(range(300))


def test_key_style_parses_prefix_and_width():
    style = key_style(["dir/000120", "dir/000121", "dir/000125"])
    assert (style.stem, style.width, style.numbers) == ("dir/", 6, (120, 121, 125))
    assert style.format(7) == "dir/000007"
    assert key_style(["a1", "b2"]) is None
    assert key_style(["abc", "001"]) is None


def test_edit_json_keeps_formatting_and_field_set():
    raw = json.dumps({"key": "000000001", "caption": "é", "class": "sheep"}, sort_keys=True).encode()
    edited = edit_json(raw, {"key": "000000009", "missing": 1})
    assert edited == raw.replace(b"000000001", b"000000009")
    compact = b'{"b":1,"key":"k1"}'
    assert edit_json(compact, {"key": "k2"}) == b'{"b":1,"key":"k2"}'
    assert edit_json(b"not json", {"key": "x"}) == b"not json"


# ------------------------------------------------------------------------------- single-label


def test_single_label_output_clean_bytes_keys_and_manifest(clean, tmp_path):
    result = attack(clean, tmp_path / "out", "single-label", ["sheep:aeroplane"], rate=0.1, seed=3)
    manifest = read_manifest(tmp_path / "out")
    assert manifest.count == 7 and manifest.clean_pairs == 60 and manifest.total_pairs == 67
    assert manifest.rate == pytest.approx(7 / 67)
    assert manifest.goals == [{"source": "sheep", "target": "aeroplane", "count": 7}]
    assert result.manifest_path == tmp_path / "out" / "poison_manifest.json"

    inputs, outputs = read_folder(clean), read_folder(tmp_path / "out")
    assert len(outputs) == 67
    out_keys = [key for _, key, _ in outputs]
    assert len(set(out_keys)) == 67 and all(KEY.match(k) for k in out_keys)
    # Same layout: the input's shard names, each renumbered from its own first key, in order.
    assert [s["file"] for s in manifest.output_shards] == ["00000.tar", "00001.tar", "00002.tar"]
    for shard in range(SHARDS):
        keys = [k for name, k, _ in outputs if name == f"{shard:05d}"]
        assert keys == [f"{shard:05d}{i:04d}" for i in range(len(keys))]
    # Poisons spread over shards and sit among clean samples, not only at the ends.
    per_shard = [s["poisons"] for s in manifest.output_shards]
    assert sum(per_shard) == 7 and sum(1 for n in per_shard if n) >= 2
    poison_keys = set(manifest.poison_keys)
    assert len(poison_keys) == 7
    interior = [i for i, (name, key, _) in enumerate(outputs[:-1])
                if key in poison_keys and outputs[i + 1][0] == name and outputs[i + 1][1] not in poison_keys]
    assert interior

    # Everything not in the manifest is the clean data, in order, byte for byte (json: but its key).
    remaining = [(k, f) for _, k, f in outputs if k not in poison_keys]
    assert len(remaining) == len(inputs) == 60
    for (_, in_key, in_fields), (out_key, out_fields) in zip(inputs, remaining):
        assert out_fields["jpg"] == in_fields["jpg"] and out_fields["txt"] == in_fields["txt"]
        assert set(out_fields) == set(in_fields)
        assert out_fields["json"] == in_fields["json"].replace(in_key.encode(), out_key.encode())

    # Each poison: a class-A caption of the data with a class-B image of the data, copied.
    by_key = {k: f for _, k, f in inputs}
    out_by_key = {k: f for _, k, f in outputs}
    for record in manifest.poisons:
        fields = out_by_key[record.key]
        text_source, image_source = by_key[record.text_source.key], by_key[record.image_source.key]
        assert json.loads(text_source["json"])["class"] == "sheep"
        assert json.loads(image_source["json"])["class"] == "aeroplane"
        assert fields["txt"] == text_source["txt"] == record.caption.encode()
        assert fields["jpg"] == image_source["jpg"]
        assert record.image_sha256 == hashlib.sha256(fields["jpg"]).hexdigest()
        meta = json.loads(fields["json"])
        # Metadata describes the copied image, carries the new caption and key, nothing more.
        assert meta == {**json.loads(image_source["json"]), "caption": record.caption, "key": record.key}
        assert out_by_key[record.image_source.output_key]["jpg"] == image_source["jpg"]
    assert len({r.text_source.key for r in manifest.poisons}) == 7  # distinct texts


def test_output_is_deterministic_per_seed(clean, tmp_path):
    def digests(folder: Path) -> list[str]:
        return [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))]

    attack(clean, tmp_path / "a", "single-label", ["sheep:aeroplane"], count=5, seed=1)
    attack(clean, tmp_path / "b", "single-label", ["sheep:aeroplane"], count=5, seed=1)
    attack(clean, tmp_path / "c", "single-label", ["sheep:aeroplane"], count=5, seed=2)
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    assert digests(tmp_path / "a") != digests(tmp_path / "c")
    assert read_manifest(tmp_path / "a").to_dict() == read_manifest(tmp_path / "b").to_dict()
    assert read_manifest(tmp_path / "a").poison_keys != read_manifest(tmp_path / "c").poison_keys


def test_keep_policy_leaves_clean_samples_untouched(clean, tmp_path):
    attack(clean, tmp_path / "out", "single-label", ["sheep:aeroplane"], count=6, seed=0, key_policy="keep")
    manifest = read_manifest(tmp_path / "out")
    inputs = {k: f for _, k, f in read_folder(clean)}
    outputs = {k: f for _, k, f in read_folder(tmp_path / "out")}
    assert set(outputs) - set(inputs) == set(manifest.poison_keys)
    assert all(outputs[k] == inputs[k] for k in inputs)
    assert all(KEY.match(k) for k in manifest.poison_keys)
    assert all(json.loads(outputs[k]["json"])["key"] == k for k in manifest.poison_keys)


def test_existing_output_and_input_folder_are_refused(clean, tmp_path):
    attack(clean, tmp_path / "out", "single-label", ["sheep:aeroplane"], count=2)
    with pytest.raises(AttackError, match="--overwrite"):
        attack(clean, tmp_path / "out", "single-label", ["sheep:aeroplane"], count=2)
    attack(clean, tmp_path / "out", "single-label", ["sheep:aeroplane"], count=3, overwrite=True)
    assert read_manifest(tmp_path / "out").count == 3
    with pytest.raises(AttackError, match="folder of the clean shards"):
        attack(clean, clean, "single-label", ["sheep:aeroplane"], count=2, overwrite=True)


def test_unknown_class_and_missing_texts_are_clear_errors(clean, tmp_path):
    with pytest.raises(UnknownClassError, match="'unicorn'.*classes present: aeroplane, bird, cat, dog, sheep"):
        attack(clean, tmp_path / "out", "single-label", ["unicorn:aeroplane"], count=2)
    with pytest.raises(AttackError, match="only 12 distinct"):
        attack(clean, tmp_path / "out", "single-image", ["sheep:aeroplane"], count=13)
    with pytest.raises(AttackError, match="exactly one of --rate and --count"):
        attack(clean, tmp_path / "out", "single-label", ["sheep:aeroplane"], count=2, rate=0.1)
    assert not (tmp_path / "out").exists()  # nothing written when the plan fails


def test_unreadable_shard_is_refused(clean, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    data = (clean / "00000.tar").read_bytes()
    (broken / "00000.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(AttackError, match="could not be read whole|tar stream"):
        attack(broken, tmp_path / "out", "single-label", ["sheep:aeroplane"], count=1)


# ------------------------------------------------------------------------- Attacks I and III


def test_single_image_pairs_many_class_a_texts_with_one_class_b_image(clean, tmp_path):
    attack(clean, tmp_path / "out", "single-image", ["sheep:aeroplane"], count=8, seed=5)
    manifest = read_manifest(tmp_path / "out")
    outputs = {k: f for _, k, f in read_folder(tmp_path / "out")}
    target = manifest.target_image
    assert target["class"] == "aeroplane"
    assert target["poison_keys"] == manifest.poison_keys
    images = {outputs[k]["jpg"] for k in manifest.poison_keys}
    assert len(images) == 1 and hashlib.sha256(images.pop()).hexdigest() == target["sha256"]
    captions = [outputs[k]["txt"].decode() for k in manifest.poison_keys]
    assert len(set(captions)) == 8 and all("lamb" in c for c in captions)
    assert {r.image_source.key for r in manifest.poisons} == {target["source_key"]}


def test_single_image_target_key_is_checked(clean, tmp_path):
    inputs = read_folder(clean)
    aeroplane_key = next(k for _, k, f in inputs if json.loads(f["json"])["class"] == "aeroplane")
    cat_key = next(k for _, k, f in inputs if json.loads(f["json"])["class"] == "cat")
    attack(clean, tmp_path / "ok", "single-image", ["sheep:aeroplane"], count=3, target_image=aeroplane_key)
    assert read_manifest(tmp_path / "ok").target_image["source_key"] == aeroplane_key
    with pytest.raises(AttackError, match="labelled cat, not the target class"):
        attack(clean, tmp_path / "bad", "single-image", ["sheep:aeroplane"], count=3, target_image=cat_key)
    with pytest.raises(AttackError, match="not in the clean shards"):
        attack(clean, tmp_path / "bad", "single-image", ["sheep:aeroplane"], count=3, target_image="123")


def test_multi_label_shares_the_rate_between_goals(clean, tmp_path):
    attack(clean, tmp_path / "out", "multi-label", ["sheep:aeroplane", "cat:dog"], count=7, seed=0)
    manifest = read_manifest(tmp_path / "out")
    assert [g["count"] for g in manifest.goals] == [4, 3]
    outputs = {k: f for _, k, f in read_folder(tmp_path / "out")}
    for record in manifest.poisons:
        source, target = record.goal.split(":")
        assert record.text_source.label == source and record.image_source.label == target
        assert json.loads(outputs[record.key]["json"])["class"] == target


# ----------------------------------------------------------------------- Carlini and Terzis


def test_trigger_patch_is_deterministic_and_stamped(clean, tmp_path):
    spec = TriggerSpec(pattern="checkerboard", size=0.25, position="top-left")
    assert trigger_patch(spec, 12).tobytes() == trigger_patch(spec, 12).tobytes()
    source = jpeg_bytes(7, size=48)
    stamped = stamp_image_bytes(source, spec)
    assert stamped == stamp_image_bytes(source, spec)
    assert has_trigger(Image.open(io.BytesIO(stamped)), spec)
    assert not has_trigger(Image.open(io.BytesIO(source)), spec)
    noise = TriggerSpec(pattern="noise")
    assert trigger_patch(noise, 16).tobytes() == trigger_patch(TriggerSpec(pattern="noise"), 16).tobytes()


def test_backdoor_stamps_images_of_any_class_with_target_captions(clean, tmp_path):
    spec = TriggerSpec(pattern="checkerboard", size=0.25, position="bottom-right")
    attack(clean, tmp_path / "out", "backdoor", ["*:cat"], count=6, seed=0, trigger=spec)
    manifest = read_manifest(tmp_path / "out")
    assert manifest.trigger == spec.to_dict()
    inputs = {k: f for _, k, f in read_folder(clean)}
    outputs = {k: f for _, k, f in read_folder(tmp_path / "out")}
    for record in manifest.poisons:
        image = Image.open(io.BytesIO(outputs[record.key]["jpg"]))
        assert has_trigger(image, spec) and record.triggered
        assert record.image_source.label != "cat"
        assert outputs[record.key]["jpg"] == stamp_image_bytes(inputs[record.image_source.key]["jpg"], spec)
        assert record.text_source.label == "cat" and "kitten" in record.caption
    assert len({r.image_source.key for r in manifest.poisons}) == 6
    clean_keys = set(outputs) - set(manifest.poison_keys)
    assert not any(has_trigger(Image.open(io.BytesIO(outputs[k]["jpg"])), spec) for k in clean_keys)


def test_targeted_with_template_captions(clean, tmp_path):
    keywords = tmp_path / "keywords.json"
    keywords.write_text(json.dumps(KEYWORDS))
    attack(clean, tmp_path / "out", "targeted", ["dog:cat"], count=5, seed=0, caption_source="templates",
           keywords=keywords)
    manifest = read_manifest(tmp_path / "out")
    captions = [r.caption for r in manifest.poisons]
    assert len(set(captions)) == 5
    assert all(re.search(r"\b(kitten|cat)\b", c) for c in captions)
    assert all(r.caption_origin == "template" and r.text_source is None for r in manifest.poisons)
    assert manifest.target_image["class"] == "dog"
    assert {r.image_source.key for r in manifest.poisons} == {manifest.target_image["source_key"]}
    with pytest.raises(AttackError, match="distinct captions"):
        attack(clean, tmp_path / "more", "targeted", ["dog:cat"], count=500, caption_source="templates",
               keywords=keywords)


def test_caption_source_applies_only_to_carlini():
    with pytest.raises(AttackError, match="caption-source"):
        AttackConfig(kind="single-label", goals=(Goal("sheep", "aeroplane"),), count=1, caption_source="templates")


# ---------------------------------------------------------------------------------------- CLI


def test_cli_attack_writes_shards_and_manifest(clean, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["attack", "single-label", str(clean), "--out", str(out),
                                      "--goal", "sheep:aeroplane", "--rate", "0.1", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "7 / 67" in result.output
    assert read_manifest(out / "poison_manifest.json").count == 7
    bad = CliRunner().invoke(app, ["attack", "multi-label", str(clean), "--out", str(tmp_path / "bad"),
                                   "--goal", "sheep:aeroplane", "--goal", "aeroplane:cat", "--count", "4"])
    assert bad.exit_code == 2 and "disjoint" in bad.output
