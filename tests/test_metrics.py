"""Metrics on small embeddings whose similarities, ranks and hits are worked out by hand below."""

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu

from clipguard import metrics
from clipguard.errors import ClipguardError
from clipguard.metrics import (
    GOAL_HIT_KS,
    MetricInputError,
    backdoor_success_rate,
    cosine_distances,
    draw_baseline_queries,
    encoder_drift,
    goal_retrieval,
    hits_at_k,
    rank_gallery,
    random_text_baseline,
    ranks_from_similarity,
    retrieval_utility,
    roc_auc,
    zero_shot_accuracy,
)

E0, E1, E2, E3 = np.eye(4)


def unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


# ----------------------------------------------------------------------------- ranks and ties


def test_ranks_from_similarity_hand_computed_including_ties():
    similarity = np.array(
        [
            [0.9, 0.5, 0.7, 0.1],  # target 2: only item 0 is ahead -> rank 2
            [0.5, 0.8, 0.8, 0.8],  # target 2 tied with non-targets 1 and 3 -> worst of the block: 3
            [0.8, 0.8, 0.8, 0.1],  # targets 0 and 2 tied with non-target 1 -> non-target first: 2
            [0.4, 0.3, 0.2, 0.1],  # target 3 is last -> 4
        ]
    )
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 2] = mask[1, 2] = mask[2, 0] = mask[2, 2] = mask[3, 3] = True
    assert ranks_from_similarity(similarity, mask).tolist() == [2, 3, 2, 4]


def test_tie_rule_does_not_depend_on_gallery_order():
    similarity = np.array([[0.5, 0.8, 0.8, 0.8, 0.2]])
    mask = np.array([False, False, True, False, False])
    for permutation in ([0, 1, 2, 3, 4], [2, 0, 1, 3, 4], [4, 3, 1, 0, 2]):
        assert ranks_from_similarity(similarity[:, permutation], mask[permutation]).tolist() == [3]


def test_ranks_reject_rows_without_target():
    with pytest.raises(MetricInputError, match="no target"):
        ranks_from_similarity(np.array([[0.1, 0.2]]), np.array([[False, False]]))


def test_rank_gallery_lists_ties_by_gallery_index_and_caps_top_k():
    gallery = np.stack([E0, E1, E1, unit(E0 + E1), E2])
    order = rank_gallery(np.stack([E1]), gallery)
    # similarities to E1: 0, 1, 1, 0.707, 0 -> [1, 2] (tie, by index), 3, [0, 4] (tie, by index)
    assert order.tolist() == [[1, 2, 3, 0, 4]]
    assert rank_gallery(np.stack([E1]), gallery, top_k=2).tolist() == [[1, 2]]
    assert rank_gallery(np.stack([E1]), gallery, top_k=50).shape == (1, 5)


# ----------------------------------------------------------------------------- goal retrieval

# Gallery of five images: g0=E0, g1=E1, g2=E1 (duplicate of g1), g3=(E0+E1)/sqrt2, g4=E2.
GALLERY = np.stack([E0, E1, E1, unit(E0 + E1), E2])
# Target g1. Query E1: g1 ties g2 at 1 -> rank 2. Query E0: g0 1, g3 .707, then g1 ties g2, g4 at
# 0 -> rank 5 (last). Query (E0+E1)/sqrt2: g3 1, then g0, g1, g2 tie at .707 -> rank 4.
QUERIES = np.stack([E1, E0, unit(E0 + E1)])


def test_goal_retrieval_hand_computed():
    result = goal_retrieval(QUERIES, GALLERY, [1])
    assert result.min_ranks.tolist() == [2, 5, 4]
    assert result.min_rank == pytest.approx(11 / 3)
    assert result.n_queries == 3 and result.gallery_size == 5 and result.n_targets == 1
    # K >= gallery size (10..50 here) puts every target in the top K.
    assert result.hits == {1: 0.0, 5: 1.0, 10: 1.0, 20: 1.0, 30: 1.0, 50: 1.0}
    assert tuple(result.hits) == GOAL_HIT_KS
    assert goal_retrieval(QUERIES, GALLERY, [1], ks=(2, 4)).hits == {2: 1 / 3, 4: 2 / 3}


def test_goal_retrieval_first_of_several_targets_and_boolean_mask():
    # Targets g3 and g4: query E1 -> g1, g2 at 1 are ahead of g3 (.707) -> 3; query E0 -> g0 ahead
    # of g3 -> 2; query (E0+E1)/sqrt2 -> g3 first -> 1.
    by_index = goal_retrieval(QUERIES, GALLERY, [3, 4])
    by_mask = goal_retrieval(QUERIES, GALLERY, np.array([False, False, False, True, True]))
    assert by_index.min_ranks.tolist() == [3, 2, 1]
    assert by_mask.min_ranks.tolist() == [3, 2, 1]
    assert by_index.n_targets == 2
    assert by_index.to_dict()["hit@1"] == pytest.approx(1 / 3)


def test_attack_one_target_appended_last_or_first_gets_the_same_rank():
    # A single target image (Attack I) appended to the gallery, tied with g1 and g2 for query E1.
    appended = np.vstack([GALLERY, E1])
    prepended = np.vstack([E1, GALLERY])
    last = goal_retrieval(QUERIES[:1], appended, [5])
    first = goal_retrieval(QUERIES[:1], prepended, [0])
    assert last.min_ranks.tolist() == first.min_ranks.tolist() == [3]


def test_query_whose_target_is_strictly_last():
    angles = np.radians([0, 30, 60, 90])
    gallery = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    result = goal_retrieval(np.array([[1.0, 0.0]]), gallery, [3])
    assert result.min_ranks.tolist() == [4]
    assert result.hits[1] == 0.0 and result.hits[5] == 1.0


@pytest.mark.parametrize("empty", [[], np.zeros(5, dtype=bool)])
def test_empty_target_set_is_a_clear_error(empty):
    with pytest.raises(MetricInputError, match="target set is empty"):
        goal_retrieval(QUERIES, GALLERY, empty)
    assert issubclass(MetricInputError, ClipguardError) and issubclass(MetricInputError, ValueError)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(MetricInputError, match="outside the gallery"):
        goal_retrieval(QUERIES, GALLERY, [5])
    with pytest.raises(MetricInputError, match="dimension"):
        goal_retrieval(QUERIES[:, :3], GALLERY, [1])
    with pytest.raises(MetricInputError, match="zero norm"):
        goal_retrieval(np.zeros((1, 4)), GALLERY, [1])
    with pytest.raises(MetricInputError, match="NaN"):
        goal_retrieval(np.full((1, 4), np.nan), GALLERY, [1])
    with pytest.raises(MetricInputError, match="positive"):
        hits_at_k([1, 2], ks=(0,))


def test_goal_retrieval_matches_brute_force_sort_and_chunking(monkeypatch):
    rng = np.random.default_rng(3)
    # Few distinct directions so that exact ties are common.
    directions = rng.normal(size=(6, 8))
    queries = directions[rng.integers(0, 6, size=40)]
    gallery = directions[rng.integers(0, 6, size=70)]
    targets = rng.choice(70, size=5, replace=False)
    is_target = np.zeros(70, dtype=bool)
    is_target[targets] = True

    similarity = metrics.cosine_similarity_matrix(queries, gallery)
    expected = []
    for row in similarity:
        # Full sort, descending similarity, non-targets before targets inside a tie.
        order = np.lexsort((is_target, -row))
        expected.append(int(np.flatnonzero(is_target[order])[0]) + 1)

    whole = goal_retrieval(queries, gallery, targets)
    monkeypatch.setattr(metrics, "_MAX_CHUNK_ELEMENTS", 7 * 70)
    chunked = goal_retrieval(queries, gallery, targets)
    assert whole.min_ranks.tolist() == expected
    assert chunked.min_ranks.tolist() == expected
    assert whole.hits == chunked.hits


def test_torch_tensors_give_the_same_result_as_numpy():
    from_numpy = goal_retrieval(QUERIES, GALLERY, [1])
    from_torch = goal_retrieval(
        torch.tensor(QUERIES, dtype=torch.float32), torch.tensor(GALLERY), torch.tensor([1])
    )
    assert from_torch.min_ranks.tolist() == from_numpy.min_ranks.tolist()


def test_a_few_thousand_queries_against_a_few_thousand_images():
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(3000, 32)).astype(np.float32)
    gallery = rng.normal(size=(3000, 32)).astype(np.float32)
    result = goal_retrieval(queries, gallery, np.arange(0, 3000, 100))
    assert result.n_queries == 3000
    assert 1 <= result.min_ranks.min() and result.min_ranks.max() <= 3000 - 30 + 1
    # 30 random targets out of 3000: the first target's expected rank is about 3001/31 ~ 97.
    assert 60 < result.min_rank < 140


# ----------------------------------------------------------------------------- baseline


def test_random_text_baseline_is_seeded_and_equals_goal_retrieval_on_the_drawn_texts():
    rng = np.random.default_rng(1)
    texts = rng.normal(size=(50, 4))
    first = draw_baseline_queries(50, 5, seed=7)
    assert first.tolist() == draw_baseline_queries(50, 5, seed=7).tolist()
    assert len(set(first.tolist())) == 5
    assert first.tolist() != draw_baseline_queries(50, 5, seed=8).tolist()

    baseline = random_text_baseline(texts, GALLERY, [1], n_queries=5, seed=7)
    again = random_text_baseline(texts, GALLERY, [1], n_queries=5, seed=7)
    direct = goal_retrieval(texts[first], GALLERY, [1])
    assert baseline.min_ranks.tolist() == again.min_ranks.tolist() == direct.min_ranks.tolist()
    assert baseline.n_queries == 5

    with pytest.raises(MetricInputError, match="cannot draw"):
        random_text_baseline(texts, GALLERY, [1], n_queries=51)


# ----------------------------------------------------------------------------- utility

# Images A=E0 (captions t0, t1), B=E1 (caption t2), C=E2 (caption t3).
# t0 = E0, t1 = (E1 + 2 E2)/sqrt5, t2 = (2 E0 + E1)/sqrt5, t3 = E2.
# IR (text -> images, own image): t0 -> A first: 1; t1: C .894, B .447, A 0 -> 3; t2: A .894,
#   B .447 -> 2; t3 -> 1. Hit@1 = 2/4, Hit@2 = 3/4, Hit@5 = 1.
# TR (image -> texts, any own caption): A: t0 at 1 -> 1; B: t1 and t2 tie at .447 and t2 is the
#   target -> 2; C: t3 at 1 -> 1. Hit@1 = 2/3, Hit@5 = 1.
TEXTS = np.stack([E0, unit(E1 + 2 * E2), unit(2 * E0 + E1), E2])[:, :3]
PAIR_IMAGES = np.stack([E0, E0, E1, E2])[:, :3]
IMAGE_IDS = ["a", "a", "b", "c"]


def test_utility_with_an_image_carrying_two_captions():
    utility = retrieval_utility(PAIR_IMAGES, TEXTS, IMAGE_IDS)
    assert utility.n_images == 3 and utility.n_texts == 4
    assert utility.text_retrieval == {1: pytest.approx(2 / 3), 5: 1.0, 10: 1.0}
    assert utility.image_retrieval == {1: 0.5, 5: 1.0, 10: 1.0}
    both = retrieval_utility(PAIR_IMAGES, TEXTS, IMAGE_IDS, ks=(2,))
    assert both.text_retrieval == {2: 1.0} and both.image_retrieval == {2: 0.75}
    assert both.to_dict()["ir_hit@2"] == 0.75


def test_utility_does_not_depend_on_pair_order_and_matches_when_chunked(monkeypatch):
    order = [3, 1, 2, 0]
    shuffled = retrieval_utility(PAIR_IMAGES[order], TEXTS[order], [IMAGE_IDS[i] for i in order])
    monkeypatch.setattr(metrics, "_MAX_CHUNK_ELEMENTS", 1)
    chunked = retrieval_utility(PAIR_IMAGES, TEXTS, IMAGE_IDS)
    for result in (shuffled, chunked):
        assert result.text_retrieval[1] == pytest.approx(2 / 3)
        assert result.image_retrieval[1] == 0.5


def test_utility_rejects_one_image_id_on_two_different_images():
    with pytest.raises(MetricInputError, match="image_id"):
        retrieval_utility(PAIR_IMAGES, TEXTS, ["a", "a", "a", "c"])
    with pytest.raises(MetricInputError, match="per pair"):
        retrieval_utility(PAIR_IMAGES, TEXTS, ["a", "a", "b"])


# ----------------------------------------------------------------------------- drift


def test_encoder_drift_identical_orthogonal_opposite():
    a = np.stack([E0, E1, E2])
    assert encoder_drift(a, 3.0 * a).mean_distance == pytest.approx(0.0, abs=1e-12)
    assert encoder_drift(a, np.stack([E1, E2, E0])).mean_distance == pytest.approx(1.0)
    assert encoder_drift(a, -a).mean_distance == pytest.approx(2.0)
    mixed = encoder_drift(a, np.stack([E0, E2, -E2]))
    assert mixed.distances.tolist() == pytest.approx([0.0, 1.0, 2.0])
    assert mixed.mean_distance == pytest.approx(1.0) and mixed.n == 3
    assert cosine_distances(torch.tensor(a), torch.tensor(-a)).tolist() == pytest.approx([2.0] * 3)
    with pytest.raises(MetricInputError, match="equal shapes"):
        encoder_drift(a, a[:2])


# ----------------------------------------------------------------------------- zero-shot, backdoor

CLASSES = np.stack([E0, E1, E2])[:, :3]


def test_zero_shot_accuracy_with_a_tie_counted_wrong():
    images = np.stack([E0, unit(E1 + 0.1 * E0), E2, unit(E0 + E1)])[:, :3]
    result = zero_shot_accuracy(images, CLASSES, [0, 1, 0, 0])
    assert result.predictions.tolist() == [0, 1, 2, -1]
    assert result.accuracy == 0.5 and result.n_images == 4


def test_backdoor_success_rate_excludes_target_class_images():
    triggered = np.stack([E2, E2, E0, unit(E0 + E2)])[:, :3]
    result = backdoor_success_rate(triggered, CLASSES, [0, 2, 1, 1], target_class=2)
    # Evaluated: image 0 (-> 2, success), image 2 (-> 0), image 3 (tie 0/2, not a success).
    assert result.n_evaluated == 3 and result.n_excluded == 1
    assert result.predictions.tolist() == [2, 0, -1]
    assert result.success_rate == pytest.approx(1 / 3)
    with pytest.raises(MetricInputError, match="already belongs"):
        backdoor_success_rate(triggered, CLASSES, [2, 2, 2, 2], target_class=2)
    with pytest.raises(MetricInputError, match="target_class"):
        backdoor_success_rate(triggered, CLASSES, [0, 0, 0, 0], target_class=3)


# ----------------------------------------------------------------------------- ROC AUC


def test_roc_auc_separated_reversed_tied_and_hand_computed():
    labels = [0, 0, 1, 1]
    assert roc_auc([0.1, 0.2, 0.8, 0.9], labels) == 1.0
    assert roc_auc([0.9, 0.8, 0.2, 0.1], labels) == 0.0
    assert roc_auc([0.5, 0.5, 0.5, 0.5], labels) == 0.5
    # Positives .8, .4; negatives .4, .2: pairs 1 + 1 + 0.5 (tie) + 1 = 3.5 of 4.
    assert roc_auc([0.8, 0.4, 0.4, 0.2], [1, 1, 0, 0]) == pytest.approx(0.875)
    # Weight 3 on the positive at .4: (1 + 1) + 3 * (0.5 + 1) = 6.5 over 4 * 2 pair weight.
    assert roc_auc([0.8, 0.4, 0.4, 0.2], [1, 1, 0, 0], sample_weight=[1, 3, 1, 1]) == pytest.approx(
        0.8125
    )


def test_roc_auc_matches_mann_whitney_and_replicated_weights():
    rng = np.random.default_rng(5)
    scores = rng.integers(0, 6, size=60).astype(float)  # many ties
    labels = rng.integers(0, 2, size=60)
    u = mannwhitneyu(scores[labels == 1], scores[labels == 0]).statistic
    assert roc_auc(scores, labels) == pytest.approx(u / ((labels == 1).sum() * (labels == 0).sum()))

    weights = rng.integers(0, 4, size=60)
    replicated = roc_auc(np.repeat(scores, weights), np.repeat(labels, weights))
    assert roc_auc(scores, labels, sample_weight=weights) == pytest.approx(replicated)
    from_torch = roc_auc(torch.tensor(scores, dtype=torch.bfloat16), torch.tensor(labels))
    assert from_torch == pytest.approx(roc_auc(scores, labels))


def test_roc_auc_needs_both_classes():
    with pytest.raises(MetricInputError, match="positives and negatives"):
        roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(MetricInputError, match="positives and negatives"):
        roc_auc([0.1, 0.2], [1, 0], sample_weight=[0, 1])
    with pytest.raises(MetricInputError, match="0/1"):
        roc_auc([0.1, 0.2], [2, 0])
    assert roc_auc([0.3, 0.3], [True, False]) == 0.5
