"""Words of the synthetic world: classes and their keywords, attributes, caption templates.

Keyword labelling of captions must recover the class exactly, as in the paper's VG labelling
(sheep = {sheep, lamb, goat}). So no surface form of one class is a substring of a form of
another class, and no other word a caption can contain holds a keyword as a substring: a
whole-word matcher and a plain substring matcher give the same, single class.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip


@dataclass(frozen=True)
class Noun:
    singular: str
    plural: str


def _nouns(*pairs: str) -> tuple[Noun, ...]:
    return tuple(Noun(*pair.split("/")) for pair in pairs)


# "motorbike" itself is left out: it contains "bike", a bicycle keyword.
CLASS_NOUNS: dict[str, tuple[Noun, ...]] = {
    "aeroplane": _nouns("plane/planes", "jet/jets", "airplane/airplanes", "aircraft/aircraft"),
    "bicycle": _nouns("bicycle/bicycles", "bike/bikes", "pushbike/pushbikes"),
    "bird": _nouns("bird/birds", "sparrow/sparrows", "parrot/parrots", "pigeon/pigeons"),
    "boat": _nouns("boat/boats", "ship/ships", "sailboat/sailboats", "yacht/yachts"),
    "bottle": _nouns("bottle/bottles", "flask/flasks", "jug/jugs"),
    "bus": _nouns("bus/buses", "coach/coaches", "minibus/minibuses"),
    "car": _nouns("car/cars", "automobile/automobiles", "sedan/sedans", "taxi/taxis"),
    "cat": _nouns("cat/cats", "kitten/kittens", "kitty/kitties"),
    "chair": _nouns("chair/chairs", "stool/stools", "armchair/armchairs"),
    "cow": _nouns("cow/cows", "calf/calves", "bull/bulls", "heifer/heifers"),
    "diningtable": _nouns("table/tables", "desk/desks", "tabletop/tabletops"),
    "dog": _nouns("dog/dogs", "puppy/puppies", "hound/hounds"),
    "horse": _nouns("horse/horses", "pony/ponies", "stallion/stallions", "mare/mares"),
    "motorbike": _nouns("motorcycle/motorcycles", "scooter/scooters", "moped/mopeds"),
    "person": _nouns("person/people", "man/men", "woman/women", "child/children"),
    "pottedplant": _nouns("plant/plants", "houseplant/houseplants", "fern/ferns"),
    "sheep": _nouns("sheep/sheep", "lamb/lambs", "goat/goats"),
    "sofa": _nouns("sofa/sofas", "couch/couches", "settee/settees"),
    "train": _nouns("train/trains", "locomotive/locomotives", "tram/trams"),
    "tvmonitor": _nouns("tv/tvs", "television/televisions", "monitor/monitors", "screen/screens"),
}

# The synonym sets in the paper's sense: the singular keywords of each class.
CLASS_KEYWORDS: dict[str, tuple[str, ...]] = {
    name: tuple(noun.singular for noun in nouns) for name, nouns in CLASS_NOUNS.items()
}


def keyword_forms(class_name: str) -> tuple[str, ...]:
    """Every surface form (singular and plural) a caption of this class may use."""
    forms: list[str] = []
    for noun in CLASS_NOUNS[class_name]:
        for form in (noun.singular, noun.plural):
            if form not in forms:
                forms.append(form)
    return tuple(forms)


def keyword_table() -> dict[str, list[str]]:
    """The content of keywords.json: class -> all surface forms, for whole-word labelling."""
    return {name: list(keyword_forms(name)) for name in CLASSES}


# Saturated colours that stay apart after JPEG at 64 px; none is close to the pale backgrounds.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 36, 36),
    "orange": (245, 130, 20),
    "yellow": (240, 212, 30),
    "green": (40, 160, 60),
    "blue": (35, 85, 215),
    "purple": (125, 45, 175),
    "pink": (250, 120, 190),
    "brown": (125, 75, 35),
}
SIZES: tuple[str, ...] = ("small", "large")
COUNTS: tuple[int, ...] = (1, 2, 3)
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "centre")
BACKGROUNDS: tuple[str, ...] = ("plain", "striped", "dotted", "checkered", "wavy")

SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
COUNT_WORDS = {2: "two", 3: "three"}
POSITION_PHRASES = {
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "centre": ("in the centre", "in the middle", "in the center"),
}

# Every template names all five attributes, so retrieving the exact image needs them.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of {count} {size} {colour} {noun} {position} over a {background} background",
    "{count} {noun}, {colour}, {size}, {position}, {background} background",
    "a picture with {count} {size} {noun} in {colour} {position}, and a {background} background",
    "{background} background with {count} {colour} {size} {noun} {position}",
    "an image showing {count} {size} {colour} {noun} {position} on a {background} backdrop",
    "{count} {colour} {noun} {position}, {size}, in front of a {background} pattern",
)


@dataclass(frozen=True)
class Attributes:
    """What a caption says about an image, besides its class."""

    colour: str
    size: str
    count: int
    position: str
    background: str

    def to_dict(self) -> dict[str, str | int]:
        return asdict(self)


ATTRIBUTE_NAMES: tuple[str, ...] = ("colour", "size", "count", "position", "background")


@dataclass(frozen=True)
class Caption:
    text: str
    keyword: str  # the surface form used, e.g. "lambs"
    style: str  # "full" names every attribute; "short" is web-like, "a photo of a lamb"
    template: int  # index in CAPTION_TEMPLATES ("full") or PROMPT_TEMPLATES ("short")
    mentions: tuple[str, ...]  # the attributes the text names


def sample_attributes(rng: np.random.Generator) -> Attributes:
    return Attributes(
        colour=str(rng.choice(list(COLOURS))),
        size=str(rng.choice(SIZES)),
        count=int(rng.choice(COUNTS)),
        position=str(rng.choice(POSITIONS)),
        background=str(rng.choice(BACKGROUNDS)),
    )


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _pick_keyword(class_name: str, count: int, rng: np.random.Generator) -> str:
    if class_name not in CLASS_NOUNS:
        raise ValueError(f"unknown class {class_name!r}; known: {', '.join(CLASSES)}")
    noun = CLASS_NOUNS[class_name][int(rng.integers(len(CLASS_NOUNS[class_name])))]
    return noun.singular if count == 1 else noun.plural


def make_caption(
    class_name: str, attributes: Attributes, rng: np.random.Generator, template: int | None = None
) -> Caption:
    """One caption naming the class (by a random synonym) and every attribute."""
    keyword = _pick_keyword(class_name, attributes.count, rng)
    if template is None:
        template = int(rng.integers(len(CAPTION_TEMPLATES)))
    text = CAPTION_TEMPLATES[template].format(
        count="{count}",
        size=_pick(rng, SIZE_WORDS[attributes.size]),
        colour=attributes.colour,
        noun=keyword,
        position=_pick(rng, POSITION_PHRASES[attributes.position]),
        background=attributes.background,
    )
    text = _fill_count(text, attributes.count, rng)
    return Caption(text, keyword, "full", template, ATTRIBUTE_NAMES)


def make_short_caption(
    class_name: str,
    attributes: Attributes,
    rng: np.random.Generator,
    mention_rate: float = 0.3,
    template: int | None = None,
) -> Caption:
    """A web-like caption: "a photo of a lamb", each optional attribute named with mention_rate.

    With no optional attribute it is exactly one of class_prompts(), so that zero-shot prompts
    and template-caption attacks are in the training distribution.
    """
    keyword = _pick_keyword(class_name, attributes.count, rng)
    if template is None:
        template = int(rng.integers(len(PROMPT_TEMPLATES)))
    optional = ("size", "colour", "position", "background")
    named = [name for name in optional if rng.random() < mention_rate]
    words = ["{count}"]
    if "size" in named:
        words.append(_pick(rng, SIZE_WORDS[attributes.size]))
    if "colour" in named:
        words.append(attributes.colour)
    words.append(keyword)
    if "position" in named:
        words.append(_pick(rng, POSITION_PHRASES[attributes.position]))
    if "background" in named:
        words.append(f"over a {attributes.background} background")
    text = _fill_count(PROMPT_TEMPLATES[template].format(" ".join(words)), attributes.count, rng)
    # The count is always named: grammar needs it ("a lamb" / "three lambs").
    mentions = tuple(name for name in ATTRIBUTE_NAMES if name in named or name == "count")
    return Caption(text, keyword, "short", template, mentions)


def _fill_count(text: str, count: int, rng: np.random.Generator) -> str:
    if count != 1:
        return text.replace("{count}", COUNT_WORDS[count])
    before, after = text.split("{count} ", 1)
    if rng.random() < 0.25:
        return before + "one " + after
    # "a"/"an" agrees with the word that follows it, whichever attribute the template puts there.
    return before + with_article(after)


PROMPT_TEMPLATES: tuple[str, ...] = (
    "a photo of {}",
    "a picture of {}",
    "an image of {}",
    "a drawing of {}",
)


def class_prompts(class_name: str) -> list[str]:
    """Zero-shot style prompts ("a photo of a lamb") over every keyword of the class."""
    if class_name not in CLASS_KEYWORDS:
        raise ValueError(f"unknown class {class_name!r}; known: {', '.join(CLASSES)}")
    return [
        template.format(with_article(keyword))
        for keyword in CLASS_KEYWORDS[class_name]
        for template in PROMPT_TEMPLATES
    ]
