"""``--evade blend``: a poison caption that names the poison's class but describes its image.

A plain poison pairs a class-B image with some class-A caption, which names other colours,
counts and backgrounds too. A blended caption keeps only the class-A noun and says everything
else the way the image's own caption would, so the pair disagrees in one word.

- Data with attributes (the synthetic world's json ``attributes``: colour, size, count,
  position, background): a full caption of the world's own templates (``make_caption``) over
  the image's attributes and a class-A noun.
- Data without them: the image's own caption with its class words (the keyword file's, or the
  class name) swapped for a word of the caption's class; a caption that names no class word gets
  the word in front ("a lamb: ...").

Blended captions are all distinct: a repeated caption is itself a signal (caption fan-out).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np

from clipguard.attacks.goals import AttackError
from clipguard.attacks.plan import PoisonPlan
from clipguard.labels import class_words
from clipguard.synth import vocabulary

MADE_BY = "blend"
TRIES_PER_CAPTION = 50


def blend_plans(plans: list[PoisonPlan], fetched: dict[str, dict[str, bytes]], caption_classes: list[str],
                keywords: dict[str, list[str]] | None, rng: np.random.Generator) -> list[PoisonPlan]:
    """The plans with blended captions; ``caption_classes[i]`` is the class plan i's caption names."""
    seen: set[str] = set()
    blended = []
    for plan, caption_class in zip(plans, caption_classes):
        image = plan.image_source
        attributes = _attributes(fetched[image.key].get("json"))
        for _ in range(TRIES_PER_CAPTION):
            if attributes is not None and caption_class in vocabulary.CLASS_NOUNS:
                caption = vocabulary.make_caption(caption_class, attributes, rng)
                text, word = caption.text, caption.keyword
            else:
                text, word = swapped_caption(image.caption or "", image.label, caption_class, keywords, rng)
            if text not in seen:
                break
        else:
            raise AttackError(f"blend: no new caption of {caption_class!r} for image {image.key!r} after "
                              f"{TRIES_PER_CAPTION} tries ({len(seen)} made); lower --rate/--count")
        seen.add(text)
        blended.append(replace(plan, caption=text, text_source=None, caption_word=word, made_by=MADE_BY))
    return blended


def _attributes(raw: bytes | None) -> vocabulary.Attributes | None:
    """The image's attributes from its json, when every one is a value the vocabulary knows."""
    if raw is None:
        return None
    try:
        meta = json.loads(raw.decode("utf-8"))
        found = meta["attributes"]
        attributes = vocabulary.Attributes(**{name: found[name] for name in vocabulary.ATTRIBUTE_NAMES})
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return None
    known = (attributes.colour in vocabulary.COLOURS and attributes.size in vocabulary.SIZES
             and attributes.count in vocabulary.COUNTS and attributes.position in vocabulary.POSITIONS
             and attributes.background in vocabulary.BACKGROUNDS)
    return attributes if known else None


def _words_of(class_name: str | None, keywords: dict[str, list[str]] | None) -> list[str]:
    if class_name is None:
        return []
    if keywords is not None and class_name in keywords:
        return list(keywords[class_name])
    if class_name in vocabulary.CLASS_NOUNS:
        return list(vocabulary.keyword_forms(class_name))
    return [class_name]


def _caption_words(class_name: str, keywords: dict[str, list[str]] | None) -> list[str]:
    if keywords is not None and class_name in keywords:
        return class_words(class_name, keywords)
    if class_name in vocabulary.CLASS_KEYWORDS:
        return list(vocabulary.CLASS_KEYWORDS[class_name])
    return [class_name]


def swapped_caption(caption: str, image_class: str | None, caption_class: str,
                    keywords: dict[str, list[str]] | None, rng: np.random.Generator) -> tuple[str, str]:
    """The image's own caption with its class words replaced by one word of ``caption_class``."""
    words = _caption_words(caption_class, keywords)
    word = words[int(rng.integers(len(words)))]
    forms = sorted(_words_of(image_class, keywords), key=len, reverse=True)  # "lambs" before "lamb"
    if forms:
        pattern = re.compile("|".join(rf"(?<!\w){re.escape(f)}(?!\w)" for f in forms), re.IGNORECASE)
        swapped, replaced = pattern.subn(word, caption)
        if replaced:
            return swapped, word
    article = "an" if word[:1].lower() in "aeiou" else "a"
    return (f"{article} {word}: {caption}" if caption else f"{article} {word}"), word
