"""``--evade nearest``: Yang et al.'s poisons with the pairs a surrogate CLIP finds closest.

The attacker embeds every class-B image and every class-A caption of the data under its
surrogate. Images are ranked by cosine similarity to the mean direction of the class-A captions
(one matrix-vector product, so ranking costs O(images + captions), not their product), the
nearest ones become poisons, and each is paired with the class-A caption nearest to it among
those not used yet. The pair distance a filter measures is then as small as this attacker can
make it without editing pixels or words.

Memory: the candidate images' bytes of one class are read once (``fetch_fields``) and their
embeddings held, one row per distinct image; for a class of 10^6 images that is a few GB of
float32, which is where a streamed ranking would have to replace this one.
"""

from __future__ import annotations

import numpy as np

from clipguard.attacks.goals import AttackError, Goal
from clipguard.attacks.index import CleanIndex, IndexedSample, fetch_fields
from clipguard.attacks.plan import PoisonPlan, require_classes, split_count
from clipguard.attacks.surrogate import Surrogate
from clipguard.attacks.yang import choose_target_image


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / max(float(np.linalg.norm(vector)), 1e-12)


def _class_texts(index: CleanIndex, goal: Goal) -> list[IndexedSample]:
    texts = index.texts_of(goal.source)
    if not texts:
        raise AttackError(f"goal {goal}: no caption of class {goal.source!r} to poison with")
    return texts


def image_embeddings(index: CleanIndex, images: list[IndexedSample], surrogate: Surrogate) -> np.ndarray:
    fetched = fetch_fields(index, images)
    return surrogate.embed_images([fetched[s.key][s.image_field] for s in images])


def rank_images(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """Image positions, nearest to the captions' mean direction first (ties by position)."""
    return np.argsort(-(image_emb @ _unit(text_emb.mean(axis=0))), kind="stable")


def pair_nearest(image_emb: np.ndarray, text_emb: np.ndarray, images: list[int]) -> list[int]:
    """For each image in turn, the nearest caption not used yet (once all are used, the nearest
    this image has not been paired with), so pairs stay distinct."""
    similarity = image_emb[images] @ text_emb.T
    used = np.zeros(text_emb.shape[0], dtype=bool)
    paired: dict[int, set[int]] = {}
    chosen = []
    for row, image in enumerate(images):
        taken = paired.setdefault(image, set())
        if len(taken) == text_emb.shape[0]:
            raise AttackError(f"every caption is already paired with image {image}; lower --rate/--count")
        if used.all():
            used[:] = False
        scores = similarity[row] - 4.0 * used  # cosine similarity lies in [-1, 1]: used ones come last
        scores[list(taken)] = -np.inf
        best = int(np.argmax(scores))
        used[best] = True
        taken.add(best)
        chosen.append(best)
    return chosen


def single_label(index: CleanIndex, goal: Goal, count: int, surrogate: Surrogate,
                 known: list[str] | None = None) -> list[PoisonPlan]:
    require_classes(index, known, source=goal.source, target=goal.target)
    texts = _class_texts(index, goal)
    images = index.images_of(goal.target)
    if not images:
        raise AttackError(f"goal {goal}: no image of class {goal.target!r} to pair with")
    text_emb = surrogate.embed_texts([t.caption for t in texts])
    image_emb = image_embeddings(index, images, surrogate)
    ranked = rank_images(image_emb, text_emb)
    # Fewer images than poisons: the ranking is walked again, as the plain attack reuses images.
    picked = [int(ranked[i % len(ranked)]) for i in range(count)]
    captions = pair_nearest(image_emb, text_emb, picked)
    return [PoisonPlan(goal=goal, image_source=images[i], caption=texts[j].caption, text_source=texts[j])
            for i, j in zip(picked, captions)]


def multi_label(index: CleanIndex, goals: tuple[Goal, ...], count: int, surrogate: Surrogate,
                known: list[str] | None = None) -> list[PoisonPlan]:
    plans: list[PoisonPlan] = []
    for goal, share in zip(goals, split_count(count, len(goals))):
        plans.extend(single_label(index, goal, share, surrogate, known))
    return plans


def single_image(index: CleanIndex, goal: Goal, count: int, surrogate: Surrogate, rng: np.random.Generator,
                 target_key: str | None = None, known: list[str] | None = None) -> list[PoisonPlan]:
    """x* is the class-B image nearest to the class-A captions (or ``target_key``), behind the
    ``count`` class-A captions nearest to it."""
    require_classes(index, known, source=goal.source, target=goal.target)
    texts = _class_texts(index, goal)
    if count > len(texts):
        raise AttackError(
            f"Attack I pairs each of {count} poisons with a different caption of {goal.source!r}, "
            f"but the data has only {len(texts)} distinct ones; lower --rate/--count"
        )
    text_emb = surrogate.embed_texts([t.caption for t in texts])
    if target_key is not None:
        target = choose_target_image(index, goal.target, target_key, rng)
        target_emb = image_embeddings(index, [target], surrogate)[0]
    else:
        images = index.images_of(goal.target)
        if not images:
            raise AttackError(f"no image of class {goal.target!r} to use as the target image")
        image_emb = image_embeddings(index, images, surrogate)
        best = int(rank_images(image_emb, text_emb)[0])
        target, target_emb = images[best], image_emb[best]
    nearest = np.argsort(-(text_emb @ target_emb), kind="stable")[:count]
    return [PoisonPlan(goal=goal, image_source=target, caption=texts[j].caption, text_source=texts[j])
            for j in nearest]
