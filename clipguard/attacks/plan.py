"""What a poison is made of, before it has bytes or a key, and the counting rules shared by all
attacks (how many poisons a rate means, how a count is split over goals)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np

from clipguard.attacks.goals import AttackError, Goal
from clipguard.attacks.index import CleanIndex, IndexedSample
from clipguard.labels import LabelCounts, require_class


class CaptionSource(str, Enum):
    data = "data"  # captions of the clean data that carry the label
    templates = "templates"  # "a photo of a {label}" prompts


@dataclass(frozen=True)
class PoisonPlan:
    goal: Goal
    image_source: IndexedSample
    caption: str
    text_source: IndexedSample | None = None  # None for a template caption
    caption_word: str | None = None  # the class word a template caption uses
    stamp_trigger: bool = False
    made_by: str | None = None  # an evasion that wrote the caption itself ("blend")

    @property
    def caption_origin(self) -> str:
        if self.made_by is not None:
            return self.made_by
        return "data" if self.text_source is not None else "template"


def poison_count_for_rate(rate: float, clean_pairs: int) -> int:
    """|Dp| such that |Dp| = round(rate * |D|) with |D| = clean_pairs + |Dp| (paper: φ = |Dp|/|D|).

    Solving n = φ(N + n) gives n* = φN / (1 − φ); n = round(n*) is a fixed point of
    n = round(φ(N + n)), because φ(N + n) = n* + φ(n − n*) lies within 1/2 of n.
    """
    if not 0.0 < rate < 1.0:
        raise AttackError(f"--rate {rate} must be in (0, 1); e.g. 0.0008 for the paper's 0.08%")
    if clean_pairs < 1:
        raise AttackError("the clean shards hold no pairs")
    count = int(math.floor(rate * clean_pairs / (1.0 - rate) + 0.5))
    if count < 1:
        smallest = 0.5 / (clean_pairs + 0.5)  # where n* = φN/(1-φ) reaches 1/2
        raise AttackError(
            f"rate {rate} of {clean_pairs} clean pairs rounds to 0 poisons; use a rate of at least "
            f"about {smallest:.2g} or --count"
        )
    return count


def achieved_rate(count: int, clean_pairs: int) -> float:
    return count / (clean_pairs + count)


def split_count(count: int, parts: int) -> list[int]:
    """Equal shares, the first goals taking one more when the count does not divide."""
    base, extra = divmod(count, parts)
    shares = [base + (i < extra) for i in range(parts)]
    if min(shares) < 1:
        raise AttackError(f"{count} poisons cannot be shared by {parts} goals; raise --rate or --count")
    return shares


def require_classes(index: CleanIndex, known: list[str] | None, **roles: str) -> None:
    counts: LabelCounts = index.label_counts
    for role, name in roles.items():
        require_class(name, counts, known, role.replace("_", " "))


def shuffled(items: list, rng: np.random.Generator) -> list:
    return [items[i] for i in rng.permutation(len(items))]


def cycled_pairs(texts: list, images: list, count: int, what: str) -> list[tuple]:
    """``count`` (text, image) pairs walking both shuffled lists in step, all distinct.

    Texts are distinct as long as there are enough; pair i is (texts[i % a], images[i % b]),
    which repeats only after lcm(a, b) pairs.
    """
    a, b = len(texts), len(images)
    limit = a * b // math.gcd(a, b)
    if count > limit:
        raise AttackError(f"{what}: only {limit} distinct pairs can be made from {a} texts and {b} images, "
                          f"{count} asked for")
    return [(texts[i % a], images[i % b]) for i in range(count)]
