"""Carlini & Terzis (ICLR 2022): targeted poisoning and backdoors of contrastive models.

Goal ``A:B``: images of class A (``*`` = any class) are to be read as label B.

- Targeted: one target image x' (of class A, or ``--target-image``) paired with many distinct
  captions of label B: captions of the data that carry the label, or "a photo of a {label}"
  prompts over the label's words.
- Backdoor: distinct images of class A (any class but B for ``*``), each stamped with the fixed
  trigger patch, paired with captions of label B (reused in turn when fewer than poisons).

Variants that evade a pair filter (``evade.py``): ``many_captions`` (targeted behind data and
template captions together) and ``clean_label`` (the trigger on images that really are B).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clipguard.attacks.goals import ANY_CLASS, AttackError, Goal
from clipguard.attacks.index import CleanIndex, IndexedSample
from clipguard.attacks.plan import CaptionSource, PoisonPlan, cycled_pairs, require_classes, shuffled
from clipguard.attacks.yang import choose_target_image
from clipguard.labels import PROMPT_TEMPLATES, KeywordLabeler, _with_article, class_words
from clipguard.synth import vocabulary


@dataclass(frozen=True)
class LabelCaption:
    text: str
    text_source: IndexedSample | None  # the clean sample it comes from, None for a prompt
    word: str | None = None  # the class word a prompt uses


def label_captions(index: CleanIndex, label: str, source: CaptionSource,
                   keywords: dict[str, list[str]] | None, rng: np.random.Generator) -> list[LabelCaption]:
    """Distinct captions of ``label`` in seeded random order."""
    if source is CaptionSource.data:
        texts = index.texts_of(label)
        if not texts:
            raise AttackError(f"no caption of class {label!r} in the data; try --caption-source templates")
        return [LabelCaption(t.caption, t) for t in shuffled(texts, rng)]
    prompts = [(_with_article(template, word), word)
               for word in class_words(label, keywords) for template in PROMPT_TEMPLATES]
    unique = list(dict.fromkeys(prompts))
    return [LabelCaption(text, None, word) for text, word in shuffled(unique, rng)]


def _poison(caption: LabelCaption, goal: Goal, image: IndexedSample, stamp: bool) -> PoisonPlan:
    return PoisonPlan(goal=goal, image_source=image, caption=caption.text, text_source=caption.text_source,
                      caption_word=caption.word, stamp_trigger=stamp)


def _check_classes(index: CleanIndex, goal: Goal, source: CaptionSource, known: list[str] | None) -> None:
    roles = {"target": goal.target} if source is CaptionSource.data else {}
    if goal.source != ANY_CLASS:
        roles["source"] = goal.source
    require_classes(index, known, **roles)


def _target_image(index: CleanIndex, goal: Goal, rng: np.random.Generator, target_key: str | None) -> IndexedSample:
    if goal.source == ANY_CLASS:
        if target_key is None:
            raise AttackError("targeted with goal '*:B' needs --target-image KEY")
        target = index.find_key(target_key)
        if not target.has_image:
            raise AttackError(f"--target-image {target_key!r} has no image field")
    else:
        target = choose_target_image(index, goal.source, target_key, rng, role="source")
    if target.label == goal.target:
        raise AttackError(f"the target image {target.key!r} already has label {goal.target!r}")
    return target


def targeted(index: CleanIndex, goal: Goal, count: int, rng: np.random.Generator, source: CaptionSource,
             keywords: dict[str, list[str]] | None, target_key: str | None = None,
             known: list[str] | None = None) -> list[PoisonPlan]:
    _check_classes(index, goal, source, known)
    target = _target_image(index, goal, rng, target_key)
    captions = label_captions(index, goal.target, source, keywords, rng)
    if count > len(captions):
        raise AttackError(
            f"targeted poisoning pairs one image with {count} distinct captions of {goal.target!r}, "
            f"but only {len(captions)} exist ({source.value}); lower --rate/--count"
        )
    return [_poison(c, goal, target, stamp=False) for c in captions[:count]]


def backdoor(index: CleanIndex, goal: Goal, count: int, rng: np.random.Generator, source: CaptionSource,
             keywords: dict[str, list[str]] | None, known: list[str] | None = None) -> list[PoisonPlan]:
    _check_classes(index, goal, source, known)
    if goal.source == ANY_CLASS:
        images = index.images_of(None, exclude=goal.target)
    else:
        images = index.images_of(goal.source)
    if not images:
        raise AttackError(f"backdoor {goal}: no image to stamp")
    images = shuffled(images, rng)
    captions = label_captions(index, goal.target, source, keywords, rng)
    # Images are the scarce side here: each poison gets its own image while there are enough.
    pairs = cycled_pairs(images, captions, count, f"backdoor {goal}")
    return [_poison(c, goal, image, stamp=True) for image, c in pairs]


def many_captions(index: CleanIndex, goal: Goal, count: int, rng: np.random.Generator,
                  keywords: dict[str, list[str]] | None, target_key: str | None = None,
                  known: list[str] | None = None) -> list[PoisonPlan]:
    """``--evade many-captions``: targeted poisoning behind the label's data captions and its
    template prompts together, all distinct, so that no caption repeats and more poisons fit."""
    _check_classes(index, goal, CaptionSource.templates, known)
    target = _target_image(index, goal, rng, target_key)
    data = label_captions(index, goal.target, CaptionSource.data, keywords, rng) if index.texts_of(goal.target) else []
    prompts = label_captions(index, goal.target, CaptionSource.templates, keywords, rng)
    unique = list({c.text: c for c in data + prompts}.values())  # a data caption that is a prompt counts once
    captions = shuffled(unique, rng)
    if count > len(captions):
        raise AttackError(
            f"many-captions pairs one image with {count} distinct captions of {goal.target!r}, but the data "
            f"and the templates give only {len(captions)} ({len(data)} data, {len(prompts)} prompts); lower --rate/--count"
        )
    return [_poison(c, goal, target, stamp=False) for c in captions[:count]]


def clean_label(index: CleanIndex, goal: Goal, count: int, rng: np.random.Generator,
                keywords: dict[str, list[str]] | None, known: list[str] | None = None) -> list[PoisonPlan]:
    """``--evade clean-label``: the trigger on samples of the target label, each keeping its own
    caption, which names that label (checked by keywords). Image and caption agree, so a pair
    filter cannot tell them from clean pairs; the trigger is what the model learns to read as B.

    Captions are checked with the keyword file, or with the synthetic world's own keyword table
    when the label is one of its classes: a sample labelled B by its json whose caption names
    another class (label noise) is not clean-label and is left out.
    """
    roles = {"target": goal.target} if goal.source == ANY_CLASS else {"source": goal.source, "target": goal.target}
    require_classes(index, known, **roles)
    checker = KeywordLabeler(_keyword_table(goal.target, keywords))
    candidates = [s for s in index.samples if s.label == goal.target and s.has_image and s.has_caption
                  and checker.label(s.caption).name == goal.target]
    if count > len(candidates):
        raise AttackError(f"clean-label backdoor {goal}: {count} poisons asked for, but only {len(candidates)} "
                          f"samples of {goal.target!r} have a caption naming it; lower --rate/--count")
    # Distinct images first: a second caption of an already stamped image only once all are used.
    seen: set[str] = set()
    first, rest = [], []
    for sample in shuffled(candidates, rng):
        (rest if sample.image_sha256 in seen else first).append(sample)
        seen.add(sample.image_sha256)
    return [PoisonPlan(goal=goal, image_source=s, caption=s.caption, text_source=s, stamp_trigger=True)
            for s in (first + rest)[:count]]


def _keyword_table(label: str, keywords: dict[str, list[str]] | None) -> dict[str, list[str]]:
    if keywords is not None:
        if label not in keywords:
            raise AttackError(f"clean-label: the keyword file has no class {label!r} to check captions with")
        return keywords
    if label in vocabulary.CLASSES:
        return vocabulary.keyword_table()
    raise AttackError(f"clean-label checks that each caption names {label!r}; give --keywords FILE with its words")
