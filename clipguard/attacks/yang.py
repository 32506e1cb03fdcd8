"""Yang et al. (ICML 2023) §3.2: poisons that pair class-A training texts with class-B images.

- Attack I (single image): {(t, x*) | t in T_A}, one target image x* of class B.
- Attack II (single label): {(t, x) | t in T_A, x in X_B}.
- Attack III (multiple labels): Attack II for several goals at once, classes disjoint.

Poisons copy a clean caption and a clean image byte for byte; nothing is synthesised. Texts are
distinct (shuffled with the seed) as long as class A has enough of them; images are distinct
images (by content hash) of class B, reused in turn when there are fewer than poisons.
"""

from __future__ import annotations

import numpy as np

from clipguard.attacks.goals import AttackError, Goal
from clipguard.attacks.index import CleanIndex, IndexedSample
from clipguard.attacks.plan import PoisonPlan, cycled_pairs, require_classes, shuffled, split_count


def _texts(index: CleanIndex, goal: Goal) -> list[IndexedSample]:
    texts = index.texts_of(goal.source)
    if not texts:
        raise AttackError(f"goal {goal}: no caption of class {goal.source!r} to poison with")
    return texts


def single_label(index: CleanIndex, goal: Goal, count: int, rng: np.random.Generator,
                 known: list[str] | None = None) -> list[PoisonPlan]:
    require_classes(index, known, source=goal.source, target=goal.target)
    texts = shuffled(_texts(index, goal), rng)
    images = index.images_of(goal.target)
    if not images:
        raise AttackError(f"goal {goal}: no image of class {goal.target!r} to pair with")
    images = shuffled(images, rng)
    pairs = cycled_pairs(texts, images, count, f"goal {goal}")
    return [PoisonPlan(goal=goal, image_source=image, caption=text.caption, text_source=text)
            for text, image in pairs]


def multi_label(index: CleanIndex, goals: tuple[Goal, ...], count: int, rng: np.random.Generator,
                known: list[str] | None = None) -> list[PoisonPlan]:
    """The rate covers all goals together (the paper: 0.08% for one goal, 0.16% for two)."""
    plans: list[PoisonPlan] = []
    for goal, share in zip(goals, split_count(count, len(goals))):
        plans.extend(single_label(index, goal, share, rng, known))
    return plans


def choose_target_image(index: CleanIndex, class_name: str, key: str | None, rng: np.random.Generator,
                        role: str = "target") -> IndexedSample:
    """The given key (which must carry ``class_name``) or a seeded random image of that class."""
    if key is not None:
        sample = index.find_key(key)
        if not sample.has_image:
            raise AttackError(f"--target-image {key!r} has no image field")
        if sample.label != class_name:
            raise AttackError(
                f"--target-image {key!r} is labelled {sample.label or 'nothing'}, not the {role} class {class_name!r}"
            )
        return sample
    images = index.images_of(class_name)
    if not images:
        raise AttackError(f"no image of class {class_name!r} to use as the target image")
    return images[int(rng.integers(len(images)))]


def single_image(index: CleanIndex, goal: Goal, count: int, rng: np.random.Generator,
                 target_key: str | None = None, known: list[str] | None = None) -> list[PoisonPlan]:
    require_classes(index, known, source=goal.source, target=goal.target)
    target = choose_target_image(index, goal.target, target_key, rng)
    texts = shuffled(_texts(index, goal), rng)
    if count > len(texts):
        raise AttackError(
            f"Attack I pairs each of {count} poisons with a different caption of {goal.source!r}, "
            f"but the data has only {len(texts)} distinct ones; lower --rate/--count"
        )
    return [PoisonPlan(goal=goal, image_source=target, caption=text.caption, text_source=text)
            for text in texts[:count]]
