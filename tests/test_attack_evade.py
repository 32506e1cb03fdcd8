"""`clipguard attack ... --evade`: variants built to pass a pair filter, on a tiny synthetic world."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipguard.attacks import AttackConfig, AttackError, AttackKind, EvadeVariant, parse_goal, read_manifest, run_attack
from clipguard.attacks.blend import swapped_caption
from clipguard.attacks.surrogate import Surrogate
from clipguard.attacks.trigger import TriggerSpec, has_trigger
from clipguard.cli.main import app
from clipguard.data.shardspec import resolve_shards
from clipguard.data.tarstream import ShardReport, iter_samples
from clipguard.labels import KeywordLabeler
from clipguard.synth import WorldSpec, generate_world
from clipguard.synth.vocabulary import keyword_table
from conftest import jpeg_bytes, write_shard

GOAL = "sheep:aeroplane"
LABELS = KeywordLabeler(keyword_table())


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    # 20 classes x 10 images x 2 captions, balanced: 20 captions of each class, 10 images.
    spec = WorldSpec(train_images=200, reference_images=20, test_images_per_class=1,
                     validation_images_per_class=1, train_class_skew=0.0, shard_size=100)
    return generate_world(tmp_path_factory.mktemp("world"), spec).root


def attack(world: Path, out: Path, kind: str, goal: str = GOAL, **options):
    config = AttackConfig(kind=AttackKind(kind), goals=(parse_goal(goal),), **options)
    return run_attack(str(world / "train"), out, config)


def output_samples(folder: Path) -> dict[str, dict[str, bytes]]:
    samples = {}
    for shard in resolve_shards(str(folder)):
        for raw in iter_samples(shard, ShardReport(shard.name, shard.url)):
            samples[raw.key] = dict(raw.fields)
    return samples


def poisons_of(result) -> list[tuple[object, dict[str, bytes]]]:
    """(manifest record, the sample's fields in the output) for each poison; checks the keys."""
    samples = output_samples(result.out_dir)
    manifest = read_manifest(result.manifest_path)
    assert len(manifest.poison_keys) == len(set(manifest.poison_keys)) == manifest.count
    return [(record, samples[record.key]) for record in manifest.poisons]


def test_blend_captions_name_class_a_and_the_b_images_attributes(world, tmp_path):
    result = attack(world, tmp_path / "blend", "single-label", count=8, evade=EvadeVariant.blend)
    manifest = read_manifest(result.manifest_path)
    assert manifest.evade == {"variant": "blend"} and manifest.caption_source == "blend"
    poisons = poisons_of(result)
    assert len(poisons) == 8
    captions = [record.caption for record, _ in poisons]
    assert len(set(captions)) == 8
    for record, fields in poisons:
        meta = json.loads(fields["json"])
        assert record.caption_origin == "blend" and record.text_source is None
        assert record.image_source.label == "aeroplane" and meta["class"] == "aeroplane"
        assert fields["txt"].decode() == record.caption == meta["caption"]
        assert LABELS.label(record.caption).name == "sheep"  # the class-A noun, and no other class
        assert meta["keyword"] in LABELS.keywords["sheep"]
        attributes = meta["attributes"]  # the image source's own: the poison copies its image
        assert attributes["colour"] in record.caption and attributes["background"] in record.caption


def test_blend_applies_to_carlini_attacks_with_the_label_as_noun(world, tmp_path):
    result = attack(world, tmp_path / "targeted", "targeted", count=6, evade=EvadeVariant.blend)
    poisons = poisons_of(result)
    assert len({record.image_sha256 for record, _ in poisons}) == 1
    assert len({record.caption for record, _ in poisons}) == 6
    for record, fields in poisons:
        assert LABELS.label(record.caption).name == "aeroplane"
        assert json.loads(fields["json"])["attributes"]["colour"] in record.caption


def test_blend_without_attributes_swaps_the_class_word_of_the_image_caption(tmp_path):
    rng = np.random.default_rng(0)
    keywords = {"sheep": ["lamb", "lambs"], "aeroplane": ["jet", "jets", "plane"]}
    text, word = swapped_caption("two red jets over a hill", "aeroplane", "sheep", keywords, rng)
    assert text == "two red lamb over a hill" and word == "lamb"
    text, word = swapped_caption("a sunset by the sea", "aeroplane", "sheep", keywords, rng)
    assert text == "a lamb: a sunset by the sea"
    # End to end on data with no json at all: captions are labelled by the keyword file.
    for shard in range(2):
        samples = []
        for i in range(10):
            name = ("sheep", "aeroplane")[i % 2]
            caption = f"a photo of a {('lamb', 'jet')[i % 2]} number {shard}-{i}"
            samples.append({"__key__": f"{shard:05d}{i:04d}", "jpg": jpeg_bytes(shard * 50 + i, size=32),
                            "txt": caption})
        write_shard(tmp_path / "clean" / f"{shard:05d}.tar", samples)
    (tmp_path / "kw.json").write_text(json.dumps(keywords))
    config = AttackConfig(kind=AttackKind.single_label, goals=(parse_goal(GOAL),), count=4,
                          keywords=tmp_path / "kw.json", evade=EvadeVariant.blend)
    result = run_attack(str(tmp_path / "clean"), tmp_path / "out", config)
    assert len(result.manifest.poisons) == 4
    for record in result.manifest.poisons:
        key = record.image_source.key
        # The aeroplane image's own caption, its class word swapped for a sheep word.
        assert record.caption == f"a photo of a lamb number {int(key[:5])}-{int(key[5:])}"


def surrogate_pair_distances(result, surrogate: Surrogate) -> np.ndarray:
    poisons = poisons_of(result)
    images = surrogate.embed_images([fields["jpg"] for _, fields in poisons])
    texts = surrogate.embed_texts([record.caption for record, _ in poisons])
    return 1.0 - (images * texts).sum(axis=1)


def test_nearest_picks_images_closer_to_class_a_captions_than_random_ones(world, tmp_path):
    surrogate = Surrogate("clipguard-victim")
    chosen = attack(world, tmp_path / "nearest", "single-label", count=6, evade=EvadeVariant.nearest)
    assert read_manifest(chosen.manifest_path).evade == {"variant": "nearest", "surrogate": "clipguard-victim"}
    chosen_distance = surrogate_pair_distances(chosen, surrogate)
    # The plain attack's poisons are random class-B images behind random class-A captions.
    random_distance = np.concatenate([
        surrogate_pair_distances(attack(world, tmp_path / f"plain{seed}", "single-label", count=6, seed=seed), surrogate)
        for seed in range(3)
    ])
    print(f"surrogate pair distance: nearest {chosen_distance.mean():.3f}, random {random_distance.mean():.3f}")
    assert chosen_distance.mean() < random_distance.mean()
    # And the chosen images themselves lie nearer the class-A captions than the class-B images do on average.
    samples = output_samples(chosen.out_dir)
    all_b = {json.loads(f["json"])["image_id"]: f["jpg"] for f in samples.values()
             if json.loads(f["json"])["class"] == "aeroplane"}
    a_texts = surrogate.embed_texts([f["txt"].decode() for f in samples.values()
                                     if json.loads(f["json"])["class"] == "sheep" and LABELS.label(f["txt"].decode()).name == "sheep"])
    centre = a_texts.mean(axis=0) / np.linalg.norm(a_texts.mean(axis=0))
    picked = surrogate.embed_images([f["jpg"] for _, f in poisons_of(chosen)])
    everyone = surrogate.embed_images(list(all_b.values()))
    assert (1 - picked @ centre).mean() < (1 - everyone @ centre).mean()


def test_nearest_single_image_uses_distinct_captions_behind_one_image(world, tmp_path):
    result = attack(world, tmp_path / "nearest1", "single-image", count=5, evade=EvadeVariant.nearest)
    poisons = poisons_of(result)
    assert len({record.image_sha256 for record, _ in poisons}) == 1
    assert len({record.caption for record, _ in poisons}) == 5
    assert all(LABELS.label(record.caption).name == "sheep" for record, _ in poisons)


def test_clean_label_backdoor_stamps_images_whose_captions_are_the_target(world, tmp_path):
    result = attack(world, tmp_path / "clean-label", "backdoor", goal="*:aeroplane", count=7,
                    evade=EvadeVariant.clean_label)
    manifest = read_manifest(result.manifest_path)
    assert manifest.evade == {"variant": "clean-label"} and manifest.trigger is not None
    spec = TriggerSpec.from_dict(manifest.trigger)
    samples = output_samples(result.out_dir)
    poisons = poisons_of(result)
    assert len(poisons) == 7
    for record, fields in poisons:
        assert record.triggered and record.image_source.label == "aeroplane"
        assert LABELS.label(record.caption).name == "aeroplane"  # the caption's keyword class is the target
        assert record.text_source.key == record.image_source.key  # its own caption
        assert has_trigger(Image.open(io.BytesIO(fields["jpg"])), spec)
        clean_copy = samples[record.image_source.output_key]["jpg"]
        assert not has_trigger(Image.open(io.BytesIO(clean_copy)), spec)


def test_many_captions_combines_data_captions_and_templates_all_distinct(world, tmp_path):
    data_captions = 20  # 10 aeroplane images x 2 captions in the tiny world
    with pytest.raises(AttackError, match="distinct captions"):
        attack(world, tmp_path / "plain", "targeted", count=data_captions + 4)
    # The world's keyword file gives the prompts the words its captions use ("a photo of a jet.").
    result = attack(world, tmp_path / "many", "targeted", count=data_captions + 4, evade=EvadeVariant.many_captions,
                    keywords=world / "keywords.json")
    manifest = read_manifest(result.manifest_path)
    assert manifest.evade == {"variant": "many-captions"} and manifest.caption_source == "data+templates"
    poisons = poisons_of(result)
    assert len(poisons) == data_captions + 4
    assert len({record.caption for record, _ in poisons}) == len(poisons)
    assert len({record.image_sha256 for record, _ in poisons}) == 1
    assert {record.caption_origin for record, _ in poisons} == {"data", "template"}
    assert all(LABELS.label(record.caption).name == "aeroplane" for record, _ in poisons)


@pytest.mark.parametrize("kind, variant, goal, message", [
    ("single-label", EvadeVariant.clean_label, GOAL, "does not apply to single-label.*use it with backdoor"),
    ("backdoor", EvadeVariant.many_captions, GOAL, "does not apply to backdoor.*use it with targeted"),
    ("targeted", EvadeVariant.nearest, GOAL, "does not apply to targeted"),
])
def test_a_variant_on_an_attack_it_does_not_fit_is_refused(kind, variant, goal, message):
    with pytest.raises(AttackError, match=message):
        AttackConfig(kind=AttackKind(kind), goals=(parse_goal(goal),), count=3, evade=variant)


def test_surrogate_without_nearest_is_refused():
    with pytest.raises(AttackError, match="applies to nearest only"):
        AttackConfig(kind=AttackKind.single_label, goals=(parse_goal(GOAL),), count=3,
                     evade=EvadeVariant.blend, surrogate="clipguard-reference")


def test_cli_evade(world, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["attack", "single-label", str(world / "train"), "--out", str(out),
                                      "--goal", GOAL, "--count", "4", "--evade", "blend"])
    assert result.exit_code == 0, result.output
    assert "evade" in result.output and read_manifest(out).evade == {"variant": "blend"}
    bad = CliRunner().invoke(app, ["attack", "single-label", str(world / "train"), "--out", str(tmp_path / "bad"),
                                   "--goal", GOAL, "--count", "4", "--evade", "clean-label"])
    assert bad.exit_code != 0 and "does not apply to single-label" in bad.output
