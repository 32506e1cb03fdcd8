"""Web-like noise for the synthetic world's clean training data (`WorldSpec(noise="web")`).

Real scraped alt-text is not a clean description of its image: it names the object and little
else, names a detail the picture does not have, says "click to enlarge", names the wrong thing,
and the same stock picture sits on many pages under many captions. Under a reference CLIP that
spreads clean pairs' distances up into the range of poisons (the paper's Figure 6: clean near
0.75, poisons near 0.85, overlapping), which is where a pair filter has to prove itself.

Each pair gets one caption kind (recorded in its json as ``"noise"``):

- ``none``: the world's ordinary caption;
- ``partial``: the class noun in web wording, at most one attribute ("red lamb for sale");
- ``wrong_attribute``: a description (full or short) in which min_wrong_attributes to
  max_wrong_attributes of the attributes are wrong (a product page reusing another model's text);
- ``boilerplate``: alt-text unrelated to the picture, drawn Zipf-like from a fixed pool (so the
  same text sits behind many images of every class) or a camera file name;
- ``label_noise``: a caption that names another class, chosen uniformly among the other classes,
  so natural mislabels spread thinly over many (caption, image) class cells. Either the picture
  described with the wrong noun, or (``misaligned_share`` of them) the alt-text of another
  picture altogether, as when a page's captions and images are out of step.

Independently, ``stock_page_rate`` of the image slots show a stock picture shared with other
slots (each stock picture on 2 to ``stock_max_pages`` slots, each slot with its own captions),
so one image's bytes sit behind several different captions.

All draws for one image come from that image's own noise stream, and the stock plan from a
stream of its own, so the ordinary captions and pictures are the ones `noise="none"` writes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from clipguard.errors import ClipguardError
from clipguard.synth.vocabulary import (
    ATTRIBUTE_NAMES,
    BACKGROUNDS,
    CLASS_NOUNS,
    CLASSES,
    COLOURS,
    COUNTS,
    POSITION_PHRASES,
    POSITIONS,
    SIZE_WORDS,
    SIZES,
    Attributes,
    Caption,
    make_caption,
    make_short_caption,
    sample_attributes,
)

NOISE_KINDS: tuple[str, ...] = ("none", "web")
CAPTION_KINDS: tuple[str, ...] = ("none", "partial", "wrong_attribute", "boilerplate", "label_noise")
# Splits that get web noise. `reference` stays clean: the bundled reference model was trained on
# the clean reference split of the default world, and it plays curated data (Visual Genome's
# role: sterilizing fine-tunes). `test` and `validation` measure the attacks' goals.
NOISY_SPLITS: tuple[str, ...] = ("train",)
MIN_STOCK_PAGES = 2

# Alt-text that says nothing about the picture. Early entries are drawn far more often (Zipf),
# as on the web, where "click to enlarge" sits under thousands of unrelated images. No entry may
# hold a class keyword as a substring (tests/test_noisy_world.py checks it).
BOILERPLATE: tuple[str, ...] = (
    "click to enlarge",
    "stock photo",
    "image",
    "untitled",
    "photo",
    "view larger image",
    "thumbnail",
    "royalty free stock image",
    "download",
    "see more",
    "no description available",
    "free hd wallpaper",
    "product image",
    "featured image",
    "placeholder",
    "photo gallery",
    "copyright all rights reserved",
    "image may contain",
    "new arrivals",
    "read more",
)
# Camera and upload file names, numbered per image: "IMG_2041.jpg".
FILE_NAME_TEMPLATES: tuple[str, ...] = ("IMG_{:04d}.jpg", "DSC{:05d}.JPG", "photo_{:04d}.png", "P{:07d}.JPG")
# "image 3 of 12": gallery captions, numbered per image.
GALLERY_TEMPLATE = "image {} of {}"
# Web wording around a noun phrase that names the class and at most one attribute.
PARTIAL_TEMPLATES: tuple[str, ...] = (
    "{} for sale",
    "cute {} pictures",
    "{} | free download",
    "best {} photos",
    "my {}",
    "{}, close up",
    "look at this {}!",
    "{} stock image",
    "{} of the day",
    "{} - wikipedia",
)


class WebNoiseError(ClipguardError):
    """Web-noise parameters or a caption kind that cannot be used."""


@dataclass(frozen=True)
class WebNoiseConfig:
    """Shares of a noisy split's pairs by caption kind (the rest keep the ordinary caption), and
    the share of image slots showing a reused stock picture. Defaults were chosen so that, under
    the bundled reference, clean pairs and Attack II poisons overlap (docs/results.md, "The
    noisy web world")."""

    partial_rate: float = 0.2
    wrong_attribute_rate: float = 0.35
    boilerplate_rate: float = 0.15
    label_noise_rate: float = 0.06
    # One wrong attribute barely moves a pair under the reference (median distance 0.28 against
    # 0.22 for the ordinary caption); two to five wrong is what spreads clean pairs into the
    # poisons' range, as loosely related web text does.
    min_wrong_attributes: int = 2
    max_wrong_attributes: int = 5
    misaligned_share: float = 0.7
    # Boilerplate that is a file name or "image 3 of 12" (unique-ish) rather than a pool text.
    file_name_share: float = 0.3
    boilerplate_zipf: float = 1.0
    stock_page_rate: float = 0.05
    stock_max_pages: int = 5

    def problems(self) -> list[str]:
        found = []
        rates = ("partial_rate", "wrong_attribute_rate", "boilerplate_rate", "label_noise_rate",
                 "file_name_share", "stock_page_rate", "misaligned_share")
        for name in rates:
            if not 0.0 <= getattr(self, name) <= 1.0:
                found.append(f"web_noise.{name} must be in [0, 1]")
        if sum(self.caption_rates().values()) > 1.0 + 1e-9:
            found.append("web_noise caption rates (partial, wrong_attribute, boilerplate, label_noise) must sum to at most 1")
        if self.boilerplate_zipf < 0:
            found.append("web_noise.boilerplate_zipf must be non-negative")
        if not 1 <= self.min_wrong_attributes <= self.max_wrong_attributes <= len(ATTRIBUTE_NAMES):
            found.append("web_noise needs 1 <= min_wrong_attributes <= max_wrong_attributes <= "
                         f"{len(ATTRIBUTE_NAMES)}")
        if self.stock_max_pages < MIN_STOCK_PAGES:
            found.append(f"web_noise.stock_max_pages must be at least {MIN_STOCK_PAGES}")
        return found

    def validate(self) -> None:
        if problems := self.problems():
            raise WebNoiseError("; ".join(problems))

    def caption_rates(self) -> dict[str, float]:
        return {
            "partial": self.partial_rate,
            "wrong_attribute": self.wrong_attribute_rate,
            "boilerplate": self.boilerplate_rate,
            "label_noise": self.label_noise_rate,
        }


@dataclass(frozen=True)
class NoisyCaption:
    caption: Caption
    kind: str  # one of CAPTION_KINDS
    caption_class: str | None  # the class the text names (None for boilerplate)
    wrong_attributes: tuple[str, ...] = ()  # wrong_attribute: the attributes named wrongly


def caption_kind(config: WebNoiseConfig, rng: np.random.Generator) -> str:
    draw, edge = rng.random(), 0.0
    for kind, rate in config.caption_rates().items():
        edge += rate
        if draw < edge:
            return kind
    return "none"


def noisy_caption(
    kind: str, ordinary: Caption, class_name: str, attributes: Attributes, rng: np.random.Generator,
    config: WebNoiseConfig, short_rate: float, mention_rate: float,
) -> NoisyCaption:
    """The pair's caption for a drawn kind; ``ordinary`` is what `noise="none"` would write."""
    if kind == "none":
        return NoisyCaption(ordinary, kind, class_name)
    if kind == "partial":
        return NoisyCaption(partial_caption(class_name, attributes, rng), kind, class_name)
    if kind == "wrong_attribute":
        how_many = int(rng.integers(config.min_wrong_attributes, config.max_wrong_attributes + 1))
        wrong = wrong_attributes(attributes, rng, how_many)
        changed = {name for name in ATTRIBUTE_NAMES if getattr(wrong, name) != getattr(attributes, name)}
        caption = _describe(class_name, wrong, rng, short_rate, mention_rate, changed)
        named_wrongly = tuple(name for name in caption.mentions if getattr(wrong, name) != getattr(attributes, name))
        return NoisyCaption(caption, kind, class_name, named_wrongly)
    if kind == "boilerplate":
        return NoisyCaption(boilerplate_caption(rng, config), kind, None)
    if kind == "label_noise":
        other = other_class(class_name, rng)
        described = sample_attributes(rng) if rng.random() < config.misaligned_share else attributes
        return NoisyCaption(_describe(other, described, rng, short_rate, mention_rate), kind, other)
    raise WebNoiseError(f"unknown caption kind {kind!r}; known: {', '.join(CAPTION_KINDS)}")


def _describe(class_name: str, attributes: Attributes, rng: np.random.Generator, short_rate: float,
              mention_rate: float, must_name: set[str] | None = None) -> Caption:
    """A caption in the world's ordinary mix of styles. A short one that names none of
    ``must_name`` (the wrong attributes) gives way to a full one, which names them all: a
    wrong_attribute caption does say something wrong."""
    if rng.random() >= short_rate:
        return make_caption(class_name, attributes, rng)
    caption = make_short_caption(class_name, attributes, rng, mention_rate)
    if must_name and not must_name & set(caption.mentions):
        return make_caption(class_name, attributes, rng)
    return caption


def partial_caption(class_name: str, attributes: Attributes, rng: np.random.Generator) -> Caption:
    """The class noun and at most one attribute in web wording: "two red lambs for sale"."""
    nouns = CLASS_NOUNS[class_name]
    noun = nouns[int(rng.integers(len(nouns)))]
    keyword = noun.singular if attributes.count == 1 else noun.plural
    named = ("none", "colour", "size")[int(rng.integers(3))]
    words = [keyword]
    if named == "colour":
        words.insert(0, attributes.colour)
    elif named == "size":
        options = SIZE_WORDS[attributes.size]
        words.insert(0, options[int(rng.integers(len(options)))])
    template = int(rng.integers(len(PARTIAL_TEMPLATES)))
    text = PARTIAL_TEMPLATES[template].format(" ".join(words))
    mentions = () if named == "none" else (named,)
    return Caption(text, keyword, "partial", template, mentions)


def wrong_attributes(attributes: Attributes, rng: np.random.Generator, how_many: int) -> Attributes:
    """The same attributes with ``how_many`` of them changed to another value."""
    changed = [ATTRIBUTE_NAMES[int(i)] for i in rng.permutation(len(ATTRIBUTE_NAMES))[:how_many]]
    values = {"colour": tuple(COLOURS), "size": SIZES, "count": COUNTS, "position": POSITIONS,
              "background": BACKGROUNDS}
    updates = {}
    for name in changed:
        others = [v for v in values[name] if v != getattr(attributes, name)]
        updates[name] = others[int(rng.integers(len(others)))]
    return replace(attributes, **updates)


def boilerplate_caption(rng: np.random.Generator, config: WebNoiseConfig) -> Caption:
    if rng.random() < config.file_name_share:
        if rng.random() < 0.5:
            total = 2 + int(rng.integers(19))
            text = GALLERY_TEMPLATE.format(1 + int(rng.integers(total)), total)
            return Caption(text, "", "boilerplate", -1, ())
        template = int(rng.integers(len(FILE_NAME_TEMPLATES)))
        number = int(rng.integers(10 ** (4 if template != 1 else 5)))
        return Caption(FILE_NAME_TEMPLATES[template].format(number), "", "boilerplate", -1, ())
    weights = 1.0 / np.arange(1, len(BOILERPLATE) + 1) ** config.boilerplate_zipf
    index = int(rng.choice(len(BOILERPLATE), p=weights / weights.sum()))
    return Caption(BOILERPLATE[index], "", "boilerplate", index, ())


def other_class(class_name: str, rng: np.random.Generator) -> str:
    others = [name for name in CLASSES if name != class_name]
    return others[int(rng.integers(len(others)))]


def stock_sources(slots: int, config: WebNoiseConfig, rng: np.random.Generator) -> dict[int, int]:
    """Slot -> the slot whose picture it shows instead of its own (the stock original).

    About ``stock_page_rate * slots`` slots end up on a shared picture: groups of 2 to
    stock_max_pages slots, the first of each group keeping its own picture.
    """
    budget = int(round(config.stock_page_rate * slots))
    order = [int(i) for i in rng.permutation(slots)]
    sources: dict[int, int] = {}
    position = 0
    while budget >= MIN_STOCK_PAGES and position + MIN_STOCK_PAGES <= slots:
        pages = min(int(rng.integers(MIN_STOCK_PAGES, config.stock_max_pages + 1)), budget)
        group = order[position : position + pages]
        if len(group) < MIN_STOCK_PAGES:
            break
        for copy in group[1:]:
            sources[copy] = group[0]
        position += pages
        budget -= pages
    return sources


__all__ = [
    "BOILERPLATE",
    "CAPTION_KINDS",
    "NOISE_KINDS",
    "NOISY_SPLITS",
    "NoisyCaption",
    "WebNoiseConfig",
    "WebNoiseError",
    "caption_kind",
    "noisy_caption",
    "stock_sources",
]
