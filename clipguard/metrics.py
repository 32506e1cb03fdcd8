"""The paper's metrics (Yang et al. 2023, §4.1) as pure functions over embeddings.

Inputs are numpy arrays or torch tensors (any float dtype, any device); every embedding is
L2-normalised here, so "similarity" always means cosine similarity. Similarities are computed in
float64, a block of query rows at a time, so that a few thousand queries against a few thousand
gallery items never hold more than ``_MAX_CHUNK_ELEMENTS`` similarities in memory.

Tie rule (used by every rank, Hit@K and MinRank here): ties count against the target. The rank of
the first target is ``1 + #{non-target gallery items whose similarity >= the best target's}``,
i.e. a target tied with non-targets takes the worst place in the tied block. This does not depend
on gallery order (an appended Attack I target gains nothing and loses nothing by being last), and
a collapsed model whose embeddings are all equal gets the worst rank, not Hit@1 = 1.
The same pessimism applies to zero-shot classification: a class wins only if it is strictly ahead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipguard.errors import ClipguardError

GOAL_HIT_KS: tuple[int, ...] = (1, 5, 10, 20, 30, 50)
UTILITY_HIT_KS: tuple[int, ...] = (1, 5, 10)

# 4M float64 similarities = 32 MiB per block, plus a boolean mask of the same shape.
_MAX_CHUNK_ELEMENTS = 1 << 22

# Two captions of one image must come with (nearly) the same image embedding; below this the
# image_ids are almost certainly wrong, and deduplicating would silently pick one of two images.
_SAME_IMAGE_MIN_COSINE = 0.99


class MetricInputError(ClipguardError, ValueError):
    """Embeddings, labels or target sets for which a metric is undefined."""


# --------------------------------------------------------------------------------------------
# Input handling


def _as_float_matrix(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor; duck-typed so that this module never imports torch
        x = x.detach().to("cpu").float().numpy()
    array = np.asarray(x, dtype=np.float64)
    if array.ndim != 2:
        raise MetricInputError(f"{name} must be a 2-D array (rows x dim), got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise MetricInputError(f"{name} holds NaN or infinite values")
    return array


def _as_vector(x: Any, name: str, dtype: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().to("cpu")
        x = (x.float() if x.is_floating_point() else x).numpy()  # numpy has no bfloat16
    array = np.asarray(x)
    if array.ndim != 1:
        raise MetricInputError(f"{name} must be 1-D, got shape {array.shape}")
    return array.astype(dtype, copy=False) if dtype is not None else array


def _l2_normalise(matrix: np.ndarray, name: str) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1)
    zero_rows = np.flatnonzero(norms == 0)
    if zero_rows.size:
        raise MetricInputError(
            f"{name} row {int(zero_rows[0])} has zero norm, so its cosine similarity is undefined"
        )
    return matrix / norms[:, None]


def _normalised(x: Any, name: str) -> np.ndarray:
    matrix = _as_float_matrix(x, name)
    if matrix.shape[0] == 0:
        raise MetricInputError(f"{name} is empty")
    return _l2_normalise(matrix, name)


def _check_same_dim(a: np.ndarray, b: np.ndarray, a_name: str, b_name: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise MetricInputError(
            f"{a_name} has dimension {a.shape[1]} but {b_name} has {b.shape[1]}: "
            "they must come from the same joint embedding space"
        )


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    checked = tuple(int(k) for k in ks)
    if not checked or any(k < 1 for k in checked):
        raise MetricInputError(f"K values must be positive integers, got {list(ks)}")
    return checked


def _iter_similarity_chunks(
    queries: np.ndarray, gallery: np.ndarray
) -> Iterator[tuple[slice, np.ndarray]]:
    rows_per_chunk = max(1, _MAX_CHUNK_ELEMENTS // max(1, gallery.shape[0]))
    for start in range(0, queries.shape[0], rows_per_chunk):
        rows = slice(start, min(start + rows_per_chunk, queries.shape[0]))
        yield rows, queries[rows] @ gallery.T


# --------------------------------------------------------------------------------------------
# Ranking


def cosine_similarity_matrix(a: Any, b: Any) -> np.ndarray:
    """Full (n x m) cosine similarity matrix; for small inputs and inspection only."""
    a_n, b_n = _normalised(a, "a"), _normalised(b, "b")
    _check_same_dim(a_n, b_n, "a", "b")
    return a_n @ b_n.T


def rank_gallery(queries: Any, gallery: Any, top_k: int | None = None) -> np.ndarray:
    """Gallery indices per query, most similar first (shape n x min(top_k, m)).

    For listing and inspection. Items with equal similarity are listed in ascending gallery index
    (a stable sort). The metrics below do not use this order: they apply the pessimistic tie rule
    of the module docstring, so a target tied with a non-target may be listed before it here but
    is ranked after it by ``first_target_ranks``.
    """
    q, g = _normalised(queries, "queries"), _normalised(gallery, "gallery")
    _check_same_dim(q, g, "queries", "gallery")
    width = g.shape[0] if top_k is None else min(int(top_k), g.shape[0])
    if width < 1:
        raise MetricInputError(f"top_k must be a positive integer, got {top_k}")
    order = np.empty((q.shape[0], width), dtype=np.int64)
    for rows, similarity in _iter_similarity_chunks(q, g):
        order[rows] = np.argsort(-similarity, axis=1, kind="stable")[:, :width]
    return order


def _pessimistic_first_target_ranks(similarity: np.ndarray, target_mask: np.ndarray) -> np.ndarray:
    best_target = np.where(target_mask, similarity, -np.inf).max(axis=1)
    ahead_or_tied = (similarity >= best_target[:, None]) & ~target_mask
    return 1 + ahead_or_tied.sum(axis=1)


def ranks_from_similarity(similarity: Any, target_mask: Any) -> np.ndarray:
    """1-based rank of each row's first target, with ties counted against the target.

    ``rank_i = 1 + #{j not a target of row i : similarity[i, j] >= best_i}``, where ``best_i`` is
    the highest similarity of any target of row i.
    ``target_mask`` is boolean, either (n x m) per row or (m,) shared by all rows. Every row needs
    at least one target: without one the rank is undefined and this raises ``MetricInputError``.
    """
    sim = _as_float_matrix(similarity, "similarity")
    mask = np.asarray(target_mask)
    if mask.dtype != np.bool_:
        raise MetricInputError(f"target_mask must be boolean, got dtype {mask.dtype}")
    if mask.ndim == 1:
        mask = np.broadcast_to(mask, sim.shape)
    if mask.shape != sim.shape:
        raise MetricInputError(
            f"target_mask shape {mask.shape} does not match similarity shape {sim.shape}"
        )
    rows_without_target = np.flatnonzero(~mask.any(axis=1))
    if rows_without_target.size:
        raise MetricInputError(
            f"query row {int(rows_without_target[0])} has no target in the gallery, "
            "so its rank is undefined"
        )
    return _pessimistic_first_target_ranks(sim, mask)


def _first_target_ranks_by_key(
    queries: np.ndarray, gallery: np.ndarray, query_keys: np.ndarray, gallery_keys: np.ndarray
) -> np.ndarray:
    """Ranks where gallery item j is a target of query i iff gallery_keys[j] == query_keys[i]."""
    ranks = np.empty(queries.shape[0], dtype=np.int64)
    for rows, similarity in _iter_similarity_chunks(queries, gallery):
        target_mask = gallery_keys[None, :] == query_keys[rows, None]
        ranks[rows] = _pessimistic_first_target_ranks(similarity, target_mask)
    return ranks


def hits_at_k(ranks: Any, ks: Sequence[int]) -> dict[int, float]:
    """Hit@K = fraction of queries whose first target has rank <= K, for each K in ``ks``.

    A K at least the gallery size gives 1.0, since every rank is at most the gallery size.
    """
    rank_array = _as_vector(ranks, "ranks", np.int64)
    if rank_array.size == 0:
        raise MetricInputError("Hit@K needs at least one query")
    return {k: float(np.mean(rank_array <= k)) for k in _check_ks(ks)}


# --------------------------------------------------------------------------------------------
# Goal retrieval (Attack I / II / III) and its random-text baseline


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields, not instances
class GoalRetrieval:
    """Target retrieval for a poisoning goal A2B (paper §4.1, Tables 2–4).

    hits: {K: fraction of queries with at least one target among the top K gallery items}.
    min_rank: mean over queries of the 1-based rank of the query's first target (MinRank).
    min_ranks: per-query first-target ranks (int array, in query order).
    n_queries, gallery_size, n_targets: the sizes the numbers were computed over.
    """

    hits: dict[int, float]
    min_rank: float
    min_ranks: np.ndarray
    n_queries: int
    gallery_size: int
    n_targets: int

    @classmethod
    def from_ranks(
        cls, min_ranks: Any, gallery_size: int, n_targets: int, ks: Sequence[int] = GOAL_HIT_KS
    ) -> GoalRetrieval:
        ranks = _as_vector(min_ranks, "min_ranks", np.int64)
        return cls(
            hits=hits_at_k(ranks, ks),
            min_rank=float(np.mean(ranks)),
            min_ranks=ranks,
            n_queries=int(ranks.size),
            gallery_size=int(gallery_size),
            n_targets=int(n_targets),
        )

    def to_dict(self) -> dict[str, float | int]:
        """Flat, JSON-ready summary (per-query ranks left out)."""
        summary: dict[str, float | int] = {f"hit@{k}": v for k, v in self.hits.items()}
        summary.update(
            min_rank=self.min_rank,
            n_queries=self.n_queries,
            gallery_size=self.gallery_size,
            n_targets=self.n_targets,
        )
        return summary


def target_mask_from(target: Any, gallery_size: int) -> np.ndarray:
    """Boolean gallery mask from target indices (ints) or an already boolean mask of gallery size.

    Raises ``MetricInputError`` for an empty target set (MinRank would be undefined) and for
    indices outside the gallery.
    """
    target_array = np.asarray(target.detach().to("cpu") if hasattr(target, "detach") else target)
    if target_array.dtype == np.bool_:
        if target_array.shape != (gallery_size,):
            raise MetricInputError(
                f"boolean target mask has shape {target_array.shape}, "
                f"gallery has {gallery_size} items"
            )
        mask = target_array.copy()
    else:
        indices = target_array.reshape(-1)
        if indices.size and not np.issubdtype(indices.dtype, np.integer):
            raise MetricInputError(f"target indices must be integers, got dtype {indices.dtype}")
        out_of_range = indices[(indices < 0) | (indices >= gallery_size)]
        if out_of_range.size:
            raise MetricInputError(
                f"target index {int(out_of_range[0])} is outside the gallery "
                f"of {gallery_size} items"
            )
        mask = np.zeros(gallery_size, dtype=bool)
        mask[indices.astype(np.int64)] = True
    if not mask.any():
        raise MetricInputError(
            "the target set is empty: the gallery holds no target image (for A2B, no test image of "
            "class B), so Hit@K and MinRank are undefined"
        )
    return mask


def goal_retrieval(
    text_queries: Any,
    image_gallery: Any,
    targets: Any,
    ks: Sequence[int] = GOAL_HIT_KS,
) -> GoalRetrieval:
    """Each text queries the whole image gallery; how early does a target image come?

    Attack II (A2B): ``text_queries`` = test texts of class A, ``image_gallery`` = all test images,
    ``targets`` = indices (or a boolean mask) of the class-B images in the gallery.
    Attack I: append the single target image to the gallery and pass its index as ``targets``.
    Ranking is by cosine similarity with ties counted against the target (module docstring);
    Hit@K = mean over queries of [rank <= K]; MinRank = mean over queries of the rank.
    """
    queries = _normalised(text_queries, "text_queries")
    gallery = _normalised(image_gallery, "image_gallery")
    _check_same_dim(queries, gallery, "text_queries", "image_gallery")
    mask = target_mask_from(targets, gallery.shape[0])
    ranks = _first_target_ranks_by_key(
        queries, gallery, np.ones(queries.shape[0], dtype=bool), mask
    )
    return GoalRetrieval.from_ranks(ranks, gallery.shape[0], int(mask.sum()), ks)


def draw_baseline_queries(n_texts: int, n_queries: int, seed: int) -> np.ndarray:
    """Sorted indices of ``n_queries`` distinct texts out of ``n_texts``, drawn with ``seed``."""
    if not 1 <= n_queries <= n_texts:
        raise MetricInputError(
            f"cannot draw {n_queries} distinct baseline texts from {n_texts} test texts"
        )
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_texts, size=n_queries, replace=False))


def random_text_baseline(
    all_text_embeddings: Any,
    image_gallery: Any,
    targets: Any,
    n_queries: int,
    seed: int = 0,
    ks: Sequence[int] = GOAL_HIT_KS,
) -> GoalRetrieval:
    """The paper's baseline: as many random test texts (any class) as the goal has queries.

    Draws ``n_queries`` distinct rows of ``all_text_embeddings`` with ``draw_baseline_queries``
    (same seed, same texts) and runs ``goal_retrieval`` with them on the same gallery and targets.
    """
    texts = _as_float_matrix(all_text_embeddings, "all_text_embeddings")
    chosen = draw_baseline_queries(texts.shape[0], n_queries, seed)
    return goal_retrieval(texts[chosen], image_gallery, targets, ks)


# --------------------------------------------------------------------------------------------
# Utility: image <-> text retrieval over the test pairs (Table 1)


@dataclass(frozen=True)
class Utility:
    """Retrieval over the test pairs (paper Table 1).

    text_retrieval (TR): {K: fraction of distinct images with any of their own captions in the top K
    of all texts}. image_retrieval (IR): {K: fraction of texts whose own image is in the top K of
    all distinct images}. n_images counts distinct image_ids, n_texts counts pairs.
    """

    text_retrieval: dict[int, float]
    image_retrieval: dict[int, float]
    n_images: int
    n_texts: int

    def to_dict(self) -> dict[str, float | int]:
        summary: dict[str, float | int] = {f"tr_hit@{k}": v for k, v in self.text_retrieval.items()}
        summary.update({f"ir_hit@{k}": v for k, v in self.image_retrieval.items()})
        summary.update(n_images=self.n_images, n_texts=self.n_texts)
        return summary


def _deduplicate_images(
    pair_images: np.ndarray, image_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct images (first occurrence of each id) and, per pair, the index of its image."""
    _, first_rows, pair_to_image = np.unique(image_ids, return_index=True, return_inverse=True)
    images = pair_images[first_rows]
    agreement = np.einsum("ij,ij->i", pair_images, images[pair_to_image])
    worst = int(np.argmin(agreement))
    if agreement[worst] < _SAME_IMAGE_MIN_COSINE:
        raise MetricInputError(
            f"pair {worst} shares image_id {image_ids[worst]!r} with pair "
            f"{int(first_rows[pair_to_image[worst]])} but their image embeddings differ "
            f"(cosine {agreement[worst]:.3f}); check the image_ids"
        )
    return images, pair_to_image.reshape(-1)


def retrieval_utility(
    image_embeddings: Any,
    text_embeddings: Any,
    image_ids: Any,
    ks: Sequence[int] = UTILITY_HIT_KS,
) -> Utility:
    """TR and IR Hit@K over test pairs; row i of each input is pair i = (image_ids[i], caption i).

    Images carried by several pairs are deduplicated by ``image_ids`` (the first row's embedding is
    kept; rows of one id must agree to cosine >= 0.99). TR: each distinct image queries all texts,
    and its targets are all of its captions. IR: each text queries all distinct images, and its
    target is its own image. Ranks use the pessimistic tie rule of the module docstring.
    """
    pair_images = _normalised(image_embeddings, "image_embeddings")
    texts = _normalised(text_embeddings, "text_embeddings")
    _check_same_dim(pair_images, texts, "image_embeddings", "text_embeddings")
    ids = _as_vector(image_ids, "image_ids", None)
    if not (pair_images.shape[0] == texts.shape[0] == ids.shape[0]):
        raise MetricInputError(
            "need one image row, one text row and one image_id per pair; "
            f"got {pair_images.shape[0]}, "
            f"{texts.shape[0]} and {ids.shape[0]}"
        )
    images, text_to_image = _deduplicate_images(pair_images, ids)
    image_keys = np.arange(images.shape[0])
    tr_ranks = _first_target_ranks_by_key(images, texts, image_keys, text_to_image)
    ir_ranks = _first_target_ranks_by_key(texts, images, text_to_image, image_keys)
    return Utility(
        text_retrieval=hits_at_k(tr_ranks, ks),
        image_retrieval=hits_at_k(ir_ranks, ks),
        n_images=int(images.shape[0]),
        n_texts=int(texts.shape[0]),
    )


# --------------------------------------------------------------------------------------------
# Encoder drift (Figure 1, Tables 11 and 14)


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields, not instances
class EncoderDrift:
    """mean_distance: mean over inputs of 1 - cos(a_i, b_i).

    distances: per input, each in [0, 2]; n: number of inputs.
    """

    mean_distance: float
    distances: np.ndarray
    n: int


def cosine_distances(a: Any, b: Any) -> np.ndarray:
    """Row-wise cosine distance 1 - cos(a_i, b_i), clipped to [0, 2] against rounding."""
    a_n, b_n = _normalised(a, "a"), _normalised(b, "b")
    if a_n.shape != b_n.shape:
        raise MetricInputError(
            f"row-wise distance needs equal shapes, got {a_n.shape} and {b_n.shape}"
        )
    return np.clip(1.0 - np.einsum("ij,ij->i", a_n, b_n), 0.0, 2.0)


def encoder_drift(embeddings_a: Any, embeddings_b: Any) -> EncoderDrift:
    """How far two encoders (e.g. clean vs poisoned) moved the same inputs: mean cosine distance.

    Row i of both arrays must embed the same input.
    """
    distances = cosine_distances(embeddings_a, embeddings_b)
    return EncoderDrift(
        mean_distance=float(np.mean(distances)), distances=distances, n=int(distances.size)
    )


# --------------------------------------------------------------------------------------------
# Zero-shot classification and backdoor success (Carlini & Terzis)


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields, not instances
class ZeroShotAccuracy:
    """accuracy: fraction of images whose true class is strictly the most similar class prompt.

    predictions: per image, the winning class index, or -1 where the top similarity is tied.
    """

    accuracy: float
    predictions: np.ndarray
    n_images: int


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields, not instances
class BackdoorSuccess:
    """success_rate: among triggered images whose true class is not the target, the fraction
    classified (strictly) as the target class.

    n_evaluated: images counted; n_excluded: images of the target class itself, left out.
    predictions: per evaluated image, the winning class index, or -1 for a tie at the top.
    """

    success_rate: float
    n_evaluated: int
    n_excluded: int
    predictions: np.ndarray


def zero_shot_predictions(image_embeddings: Any, class_embeddings: Any) -> np.ndarray:
    """Most similar class per image, -1 where two or more classes tie for the top similarity.

    ``class_embeddings`` holds one row per class (already averaged over prompt templates); each row
    is re-normalised, as CLIP does after averaging.
    """
    images = _normalised(image_embeddings, "image_embeddings")
    classes = _normalised(class_embeddings, "class_embeddings")
    _check_same_dim(images, classes, "image_embeddings", "class_embeddings")
    predictions = np.empty(images.shape[0], dtype=np.int64)
    for rows, similarity in _iter_similarity_chunks(images, classes):
        best = similarity.argmax(axis=1)
        tied = (similarity == similarity.max(axis=1, keepdims=True)).sum(axis=1) > 1
        predictions[rows] = np.where(tied, -1, best)
    return predictions


def _check_labels(labels: Any, n_images: int, n_classes: int, name: str) -> np.ndarray:
    label_array = _as_vector(labels, name, None)
    if label_array.shape[0] != n_images:
        raise MetricInputError(f"{name} has {label_array.shape[0]} entries for {n_images} images")
    if label_array.size and not np.issubdtype(label_array.dtype, np.integer):
        raise MetricInputError(
            f"{name} must be integer class indices, got dtype {label_array.dtype}"
        )
    label_array = label_array.astype(np.int64)
    if np.any((label_array < 0) | (label_array >= n_classes)):
        raise MetricInputError(f"{name} holds a class index outside 0..{n_classes - 1}")
    return label_array


def zero_shot_accuracy(
    image_embeddings: Any, class_embeddings: Any, labels: Any
) -> ZeroShotAccuracy:
    """Plain zero-shot top-1 accuracy; a tie at the top counts as wrong."""
    predictions = zero_shot_predictions(image_embeddings, class_embeddings)
    n_classes = _as_float_matrix(class_embeddings, "class_embeddings").shape[0]
    true = _check_labels(labels, predictions.shape[0], n_classes, "labels")
    return ZeroShotAccuracy(
        accuracy=float(np.mean(predictions == true)),
        predictions=predictions,
        n_images=int(predictions.shape[0]),
    )


def backdoor_success_rate(
    triggered_image_embeddings: Any, class_embeddings: Any, true_labels: Any, target_class: int
) -> BackdoorSuccess:
    """Carlini & Terzis zero-shot backdoor: how often a trigger turns an image into the target.

    Images whose true class already is the target are excluded (they would count as successes
    without any backdoor). A tie between the target and another class is not a success.
    """
    class_matrix = _as_float_matrix(class_embeddings, "class_embeddings")
    n_classes = class_matrix.shape[0]
    if not 0 <= int(target_class) < n_classes:
        raise MetricInputError(f"target_class {target_class} is outside 0..{n_classes - 1}")
    predictions = zero_shot_predictions(triggered_image_embeddings, class_matrix)
    true = _check_labels(true_labels, predictions.shape[0], n_classes, "true_labels")
    evaluated = true != int(target_class)
    if not evaluated.any():
        raise MetricInputError(
            "every triggered image already belongs to the target class; "
            "the success rate is undefined"
        )
    kept = predictions[evaluated]
    return BackdoorSuccess(
        success_rate=float(np.mean(kept == int(target_class))),
        n_evaluated=int(evaluated.sum()),
        n_excluded=int((~evaluated).sum()),
        predictions=kept,
    )


# --------------------------------------------------------------------------------------------
# ROC AUC (Mann–Whitney), reused by calibration


def roc_auc(scores: Any, labels: Any, sample_weight: Any = None) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counted half.

    ``labels`` are 1/True for positives (e.g. poisoned) and 0/False for negatives; a higher score
    must mean "more positive". With ``sample_weight`` w, every (positive i, negative j) pair counts
    w_i * w_j: AUC = sum_ij w_i w_j ([s_i > s_j] + 0.5 [s_i == s_j]) / (W_pos * W_neg).
    Computed in O(n log n) by grouping equal scores.
    """
    score_array = _as_vector(scores, "scores", np.float64)
    label_array = _as_vector(labels, "labels", None)
    if label_array.shape != score_array.shape:
        raise MetricInputError(f"{score_array.size} scores but {label_array.size} labels")
    if not np.all(np.isfinite(score_array)):
        raise MetricInputError("scores hold NaN or infinite values")
    if not np.all((label_array == 0) | (label_array == 1)):
        raise MetricInputError("labels must be 0/1 or boolean")
    positive = label_array.astype(bool)
    if sample_weight is None:
        weights = np.ones_like(score_array)
    else:
        weights = _as_vector(sample_weight, "sample_weight", np.float64)
        if weights.shape != score_array.shape:
            raise MetricInputError(f"{score_array.size} scores but {weights.size} sample weights")
        if not np.all(np.isfinite(weights)) or np.any(weights < 0):
            raise MetricInputError("sample weights must be finite and non-negative")
    positive_total = float(weights[positive].sum())
    negative_total = float(weights[~positive].sum())
    if positive_total <= 0 or negative_total <= 0:
        raise MetricInputError("ROC AUC needs positives and negatives with non-zero total weight")

    distinct, group = np.unique(score_array, return_inverse=True)
    group = group.reshape(-1)
    positive_weight = np.bincount(
        group, weights=np.where(positive, weights, 0.0), minlength=distinct.size
    )
    negative_weight = np.bincount(
        group, weights=np.where(positive, 0.0, weights), minlength=distinct.size
    )
    negative_below = np.cumsum(negative_weight) - negative_weight
    concordant = np.sum(positive_weight * (negative_below + 0.5 * negative_weight))
    return float(concordant / (positive_total * negative_total))
