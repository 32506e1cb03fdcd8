"""The evaluation harness on a tiny labelled test set: known answers, reuse, errors, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from clipguard import metrics
from clipguard.attacks import Goal, TriggerSpec, stamp_image_bytes
from clipguard.cli.main import app
from clipguard.evaluation import (
    BackdoorTrigger,
    EvaluationError,
    TargetImage,
    TestEmbeddings,
    embed_image_bytes,
    embed_test_set,
    embed_texts,
    evaluate,
    load_test_set,
    model_fingerprint,
    read_target_image,
)
from clipguard.labels import class_prompts, make_labeler
from clipguard.model.loading import ModelSpec, load_model
from conftest import TINY_MODEL, jpeg_bytes, write_shard

# Test pair i has image i; one caption each. Classes by position:
ORDER = ("sheep", "aeroplane", "cat", "dog", "sheep", "aeroplane", "cat", "dog")
WORDS = {"sheep": "lamb", "aeroplane": "jet", "cat": "kitten", "dog": "puppy"}
KEYWORDS = {name: [word] for name, word in WORDS.items()}


@pytest.fixture
def test_dir(tmp_path: Path) -> Path:
    samples = []
    for i, name in enumerate(ORDER):
        caption = f"a {WORDS[name]} number {i}"
        samples.append({"__key__": f"{i:09d}", "jpg": jpeg_bytes(500 + i, size=40), "txt": caption,
                        "json": json.dumps({"caption": caption, "class": name})})
    write_shard(tmp_path / "test" / "000000.tar", samples)
    return tmp_path / "test"


@pytest.fixture
def test_set(test_dir):
    return load_test_set(str(test_dir))


@pytest.fixture(scope="module")
def other_model():
    """Random weights of its own. Without a seed of its own it drew from the global generator,
    which earlier fine-tunes reset to their seed: run after them, it could come out identical to
    tiny_loaded and the tests comparing the two failed."""
    with torch.random.fork_rng():
        torch.manual_seed(20_261_123)
        return load_model(ModelSpec(name=TINY_MODEL, pretrained=None))


def unit_rows(rows) -> torch.Tensor:
    matrix = torch.tensor(np.array(rows), dtype=torch.float32)
    return matrix / matrix.norm(dim=1, keepdim=True)


E = np.eye(8)
# Images are orthogonal, so a text's similarity to image j is its j-th coefficient.
IMAGES = unit_rows(E)
TEXTS = unit_rows([
    0.9 * E[0] + 0.5 * E[2] + 0.3 * E[5] + 0.2 * E[6],  # sheep: aeroplane image 5 is 3rd; image 6 4th
    E[1], E[2], E[3],
    0.8 * E[1] + 0.6 * E[4],  # sheep: aeroplane image 1 first; its own image second
    E[5], E[6], E[7],
])


def test_labels_and_images_of_the_test_set(test_set):
    assert test_set.n_pairs == 8 and len(test_set.images) == 8
    assert test_set.texts_of("sheep").tolist() == [0, 4]
    assert test_set.images_of("aeroplane").tolist() == [1, 5]
    assert test_set.classes() == ["aeroplane", "cat", "dog", "sheep"]


def test_goal_utility_and_drift_on_known_embeddings(test_set, tiny_loaded, other_model):
    test_set.use_embeddings(tiny_loaded, TestEmbeddings(images=IMAGES, texts=TEXTS))
    baseline_texts = TEXTS.clone()
    baseline_texts[0] = IMAGES[0]
    test_set.use_embeddings(other_model, TestEmbeddings(images=IMAGES, texts=baseline_texts))

    report = evaluate(tiny_loaded, test_set, [Goal("sheep", "aeroplane")], baseline=other_model, seed=4)
    goal = report.goal("sheep:aeroplane")
    # Query 0: images 0 and 2 are ahead of aeroplane image 5 -> rank 3. Query 4: rank 1.
    assert goal.model.min_ranks.tolist() == [3, 1]
    assert goal.model.hits == {1: 0.5, 5: 1.0, 10: 1.0, 20: 1.0, 30: 1.0, 50: 1.0}
    assert goal.model.min_rank == 2.0
    assert (goal.model.n_queries, goal.model.gallery_size, goal.model.n_targets) == (2, 8, 2)
    # The clean baseline's text 0 is its own image: the aeroplane images (similarity 0) come after
    # image 0 and tie with the 5 other non-targets, which the tie rule puts ahead -> rank 7.
    assert goal.baseline.min_ranks.tolist() == [7, 1]
    # Random-text baseline: the same two rows metrics would draw with this seed.
    expected = metrics.random_text_baseline(TEXTS, IMAGES, np.array([1, 5]), 2, seed=4)
    assert goal.random_text.min_ranks.tolist() == expected.min_ranks.tolist()
    # Utility: every image finds its caption first; text 4 finds its image second.
    assert report.utility.text_retrieval == {1: 1.0, 5: 1.0, 10: 1.0}
    assert report.utility.image_retrieval == {1: 0.875, 5: 1.0, 10: 1.0}
    # Drift: only text 0 moved, by 1 - 0.9/|t0|; images did not move.
    t0_norm = np.sqrt(0.81 + 0.25 + 0.09 + 0.04)
    assert report.drift.text == pytest.approx((1 - 0.9 / t0_norm) / 8, abs=1e-6)
    assert report.drift.image == pytest.approx(0.0, abs=1e-6)
    json.dumps(report.to_dict())  # the whole report is JSON-ready


def test_attack_one_target_is_appended_and_the_only_target(test_set, test_dir, tiny_loaded):
    test_set.use_embeddings(tiny_loaded, TestEmbeddings(images=IMAGES, texts=TEXTS))
    # x* has the bytes of test image 6, so it shares its embedding and ties with it.
    target = read_target_image("000000006", str(test_dir))
    report = evaluate(tiny_loaded, test_set, [Goal("sheep", "aeroplane")], target_image=target)
    goal = report.goals[0]
    assert goal.target_kind == "image" and goal.model.gallery_size == 9 and goal.model.n_targets == 1
    # Query 0: images 0, 2, 5 and the tied twin 6 are ahead -> 5. Query 4: everything ties at 0 -> 9.
    assert goal.model.min_ranks.tolist() == [5, 9]
    assert goal.model.hits[5] == 0.5 and goal.model.min_rank == 7.0


def test_attack_one_target_outside_the_test_set_is_embedded(test_set, tiny_loaded):
    target = TargetImage(key="x", image=jpeg_bytes(99, size=40), source="memory")
    report = evaluate(tiny_loaded, test_set, [Goal("sheep", "aeroplane")], target_image=target)
    emb = embed_test_set(tiny_loaded, test_set)
    gallery = torch.cat([emb.images, embed_image_bytes(tiny_loaded, [target.image])])
    expected = metrics.goal_retrieval(emb.texts[[0, 4]], gallery, [8])
    assert report.goals[0].model.min_ranks.tolist() == expected.min_ranks.tolist()


def test_embeddings_are_computed_once_per_weights(test_set, tiny_loaded, other_model):
    first = embed_test_set(tiny_loaded, test_set)
    evaluate(tiny_loaded, test_set, [Goal("sheep", "aeroplane")], baseline=other_model)
    assert embed_test_set(tiny_loaded, test_set) is first
    assert embed_test_set(other_model, test_set) is not first
    # A model changed in place is a different model.
    before = model_fingerprint(other_model)
    with torch.no_grad():
        other_model.model.logit_scale.add_(1.0)
    assert model_fingerprint(other_model) != before


def test_backdoor_success_on_real_embeddings(test_set, tiny_loaded):
    spec = TriggerSpec(pattern="checkerboard", size=0.25)
    report = evaluate(tiny_loaded, test_set, [], trigger=BackdoorTrigger("cat", spec), keywords=KEYWORDS)
    classes = ["aeroplane", "cat", "dog", "sheep"]
    prompts = [embed_texts(tiny_loaded, class_prompts(c, KEYWORDS)).mean(0) for c in classes]
    stamped = embed_image_bytes(tiny_loaded, [stamp_image_bytes(image, spec) for image in test_set.images])
    true = [classes.index(c) for c in ORDER]
    expected = metrics.backdoor_success_rate(stamped, torch.stack(prompts), true, 1)
    assert report.backdoor.success_rate == expected.success_rate
    assert (report.backdoor.n_evaluated, report.backdoor.n_excluded) == (6, 2)


def test_goal_errors_name_the_classes(test_set, tiny_loaded):
    with pytest.raises(EvaluationError, match="no text of class 'unicorn'.*aeroplane, cat, dog, sheep"):
        evaluate(tiny_loaded, test_set, [Goal("unicorn", "aeroplane")])
    with pytest.raises(EvaluationError, match="no image of class 'horse'"):
        evaluate(tiny_loaded, test_set, [Goal("sheep", "horse")])
    with pytest.raises(EvaluationError, match="not a class of the test set"):
        evaluate(tiny_loaded, test_set, [], trigger=BackdoorTrigger("horse"))
    with pytest.raises(EvaluationError, match="not in the target shards"):
        read_target_image("nope", str(test_set.shards[0].url))


def test_keyword_labels_for_a_test_set_without_metadata(tmp_path):
    samples = [{"__key__": f"{i:09d}", "jpg": jpeg_bytes(i, size=40), "txt": caption}
               for i, caption in enumerate(["a lamb", "a jet", "a lamb and a jet", "nothing here"])]
    write_shard(tmp_path / "t" / "0.tar", samples)
    test = load_test_set(str(tmp_path / "t"), make_labeler(keywords=KEYWORDS))
    assert test.pair_labels == ["sheep", "aeroplane", None, None]
    assert test.label_counts.unlabelled == {"several_classes": 1, "no_keyword": 1}


def test_cli_evaluate_writes_json(test_dir, tiny_checkpoint, tmp_path):
    out = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["evaluate", str(tiny_checkpoint), "--test", str(test_dir),
                                      "--goal", "sheep:aeroplane", "--baseline", str(tiny_checkpoint),
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "goal sheep:aeroplane" in result.output and "Hit@10" in result.output
    report = json.loads(out.read_text())
    goal = report["goals"][0]
    assert goal["model"]["n_queries"] == 2 and goal["model"] == goal["baseline"]  # same weights
    assert report["drift"]["text"] == pytest.approx(0.0, abs=1e-6)
    bad = CliRunner().invoke(app, ["evaluate", str(tiny_checkpoint), "--test", str(test_dir),
                                   "--goal", "unicorn:aeroplane"])
    assert bad.exit_code == 2 and "unicorn" in bad.output
