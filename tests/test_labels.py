"""Class labels from json metadata or keyword search, and the prompts built from keywords."""

from __future__ import annotations

import json

import pytest

from clipguard.labels import (
    NO_CLASS_METADATA,
    NO_KEYWORD,
    SEVERAL_CLASSES,
    KeywordLabeler,
    LabelCounts,
    LabelError,
    LabelSource,
    UnknownClassError,
    class_prompts,
    class_words,
    load_keywords,
    make_labeler,
    require_class,
)

KEYWORDS = {
    "sheep": ["sheep", "lamb", "lambs", "goat"],
    "aeroplane": ["plane", "jet", "airplane", "airplanes"],
    "diningtable": ["dining table", "table"],
}


def test_keyword_match_is_whole_word_and_case_insensitive():
    labeler = KeywordLabeler(KEYWORDS)
    assert labeler.label("A LAMB on the grass").name == "sheep"
    assert labeler.label("two lambs, grazing").name == "sheep"
    assert labeler.label("Jet-black sky").name == "aeroplane"  # a hyphen is a word boundary
    # Substrings of longer words are not keywords: lambswool, planet, goatee.
    for caption in ("a lambswool jumper", "the planet Mars", "a man with a goatee"):
        label = labeler.label(caption)
        assert label.name is None and label.reason == NO_KEYWORD


def test_multiword_keywords_match_across_whitespace():
    labeler = KeywordLabeler(KEYWORDS)
    assert labeler.label("a set  dining\ttable").name == "diningtable"


def test_caption_naming_two_classes_gets_no_label():
    label = KeywordLabeler(KEYWORDS).label("a lamb watching a jet")
    assert label.name is None
    assert label.reason == SEVERAL_CLASSES
    assert set(label.matched) == {"sheep", "aeroplane"}


def test_auto_source_prefers_json_class_and_falls_back_to_keywords():
    labeler = make_labeler(LabelSource.auto, KEYWORDS)
    with_meta = {"json": json.dumps({"class": "aeroplane"}).encode()}
    assert labeler.label(with_meta, "a lamb").name == "aeroplane"  # metadata wins
    assert labeler.label(with_meta, "a lamb").source == "json"
    label = labeler.label({"json": b'{"caption": "x"}'}, "a lamb")
    assert (label.name, label.source) == ("sheep", "keywords")


def test_json_source_without_class_is_counted_not_guessed():
    labeler = make_labeler(LabelSource.json)
    counts = LabelCounts()
    for fields in ({"json": b'{"class": "sheep"}'}, {"json": b"not json"}, {}, {"json": b'{"class": 3}'}):
        counts.add(labeler.label(fields, "a lamb"))
    assert counts.per_class == {"sheep": 1}
    assert counts.unlabelled == {NO_CLASS_METADATA: 3}
    assert counts.total == 4 and counts.labelled == 1


def test_label_counts_add_up_by_reason():
    labeler = make_labeler(LabelSource.keywords, KEYWORDS)
    counts = LabelCounts()
    for caption in ("a lamb", "a jet", "a lamb and a jet", "a cat", "a goat"):
        counts.add(labeler.label({}, caption))
    assert counts.to_dict() == {
        "labelled": 3,
        "total": 5,
        "per_class": {"aeroplane": 1, "sheep": 2},
        "unlabelled": {NO_KEYWORD: 1, SEVERAL_CLASSES: 1},
        "by_source": {"keywords": 3},
    }


def test_keyword_source_needs_a_keyword_file():
    with pytest.raises(LabelError, match="keyword file"):
        make_labeler(LabelSource.keywords, None)


@pytest.mark.parametrize(
    "content, message",
    [
        ('["sheep"]', "JSON object"),
        ('{"sheep": []}', "non-empty list"),
        ('{"sheep": ["lamb", ""]}', "non-empty list"),
        ("{not json", "not readable JSON"),
    ],
)
def test_bad_keyword_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "keywords.json"
    path.write_text(content)
    with pytest.raises(LabelError, match=message):
        load_keywords(path)


def test_missing_keyword_file(tmp_path):
    with pytest.raises(LabelError, match="does not exist"):
        load_keywords(tmp_path / "nope.json")


def test_keyword_file_round_trip(tmp_path):
    path = tmp_path / "keywords.json"
    path.write_text(json.dumps({"sheep": [" lamb ", "lamb", "goat"]}))
    assert load_keywords(path) == {"sheep": ["lamb", "goat"]}


def test_class_words_drop_regular_plurals_and_prompts_use_articles():
    assert class_words("sheep", KEYWORDS) == ["sheep", "lamb", "goat"]
    assert class_words("aeroplane", KEYWORDS) == ["plane", "jet", "airplane"]
    assert class_words("sheep", None) == ["sheep"]
    prompts = class_prompts("aeroplane", KEYWORDS)
    assert "a photo of an airplane." in prompts
    assert "a photo of a jet." in prompts
    assert "a photo of the plane." in prompts
    assert len(prompts) == len(set(prompts))
    with pytest.raises(UnknownClassError, match="not in the keyword file"):
        class_words("unicorn", KEYWORDS)


def test_require_class_names_the_classes_present():
    counts = LabelCounts()
    labeler = make_labeler(LabelSource.keywords, KEYWORDS)
    counts.add(labeler.label({}, "a lamb"))
    require_class("sheep", counts, None, "source")
    with pytest.raises(UnknownClassError, match="'unicorn'.*classes present: sheep"):
        require_class("unicorn", counts, None, "source")
    with pytest.raises(UnknownClassError, match="keyword file knows"):
        require_class("unicorn", counts, list(KEYWORDS), "target")
