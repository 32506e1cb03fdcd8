"""The statistics behind `clipguard calibrate`: sample designs, estimates with intervals that
cover, threshold choice, label planning and the density figure.

Synthetic populations follow the paper's Figure 6: clean pairs near cosine distance 0.75,
poisons near 0.85, poison rates of 0.1%–1%.
"""

import json
import math

import numpy as np
import pytest
from scipy import stats

from clipguard.calibration import (
    Population,
    SampleDesign,
    canary_recall,
    choose_threshold,
    clopper_pearson,
    draw_sample,
    estimate_at,
    label_sample,
    labels_needed,
    plot_distance_densities,
    weighted_roc_auc,
)
from clipguard.errors import (
    CalibrationError,
    ClipguardError,
    NoLabelledSampleError,
    OneClassLabelsError,
    UnreachableTargetError,
)

COVERAGE_REPEATS = 300


def make_population(size, poison_rate, seed, clean=(0.75, 0.03), poison=(0.85, 0.02)):
    """Distances and the true poison flags of a synthetic dataset, shuffled."""
    rng = np.random.default_rng(seed)
    n_poison = int(round(size * poison_rate))
    is_poison = np.zeros(size, dtype=bool)
    is_poison[:n_poison] = True
    distances = np.where(is_poison, rng.normal(*poison, size), rng.normal(*clean, size))
    order = rng.permutation(size)
    return np.clip(distances, 0.0, 2.0)[order], is_poison[order]


def true_rates(distances, is_poison, gamma):
    flagged = distances >= gamma
    return {
        "recall": (flagged & is_poison).sum() / is_poison.sum(),
        "precision": (flagged & is_poison).sum() / flagged.sum(),
        "false_positive_rate": (flagged & ~is_poison).sum() / (~is_poison).sum(),
        "n_poisons": float(is_poison.sum()),
    }


def labelled(design, distances, is_poison):
    return label_sample(design, distances, design.indices, is_poison[design.indices])


# --- sample design -------------------------------------------------------------------------------


@pytest.mark.parametrize("stratify", [False, True])
def test_draw_sample_is_deterministic_for_a_seed(stratify):
    distances, _ = make_population(20_000, 0.005, seed=0)
    first = draw_sample(distances, 300, seed=7, stratify=stratify)
    again = draw_sample(distances, 300, seed=7, stratify=stratify)
    other = draw_sample(distances, 300, seed=8, stratify=stratify)
    np.testing.assert_array_equal(first.indices, again.indices)
    np.testing.assert_array_equal(first.inclusion_probabilities, again.inclusion_probabilities)
    assert not np.array_equal(first.indices, other.indices)
    assert np.unique(first.indices).size == 300


@pytest.mark.parametrize("stratify", [False, True])
def test_inclusion_probabilities_sum_to_n(stratify):
    distances, _ = make_population(20_000, 0.005, seed=0)
    design = draw_sample(distances, 500, seed=1, stratify=stratify)
    population_pi_total = sum(s.population_size * s.inclusion_probability for s in design.strata)
    assert population_pi_total == pytest.approx(500)
    # Horvitz–Thompson estimate of the population size is exact for any of these designs.
    assert np.sum(1.0 / design.inclusion_probabilities) == pytest.approx(20_000)
    if not stratify:
        np.testing.assert_allclose(design.inclusion_probabilities, 500 / 20_000)


def test_stratified_design_over_samples_the_tail():
    distances, _ = make_population(100_000, 0.005, seed=0)
    design = draw_sample(distances, 500, seed=1, stratify=True)
    bulk, middle, top = design.strata
    assert [s.population_size for s in design.strata] == [95_000, 4_000, 1_000]
    assert [s.sample_size for s in design.strata] == [150, 150, 200]
    assert top.inclusion_probability == pytest.approx(40 * 500 / 100_000)
    assert top.inclusion_probability > middle.inclusion_probability > bulk.inclusion_probability
    selected = distances[design.indices]
    np.testing.assert_array_equal(design.stratum_of(selected), design.stratum_of_selected)


def test_allocation_is_capped_at_stratum_size():
    distances, _ = make_population(1_000, 0.01, seed=0)
    design = draw_sample(distances, 600, seed=0, stratify=True)
    top = design.strata[-1]
    assert top.sample_size == top.population_size == 10
    assert sum(s.sample_size for s in design.strata) == 600
    assert all(s.sample_size <= s.population_size for s in design.strata)


def test_design_round_trips_through_a_plain_dict():
    distances, _ = make_population(5_000, 0.01, seed=0)
    design = draw_sample(distances, 200, seed=3, stratify=True)
    restored = SampleDesign.from_dict(json.loads(json.dumps(design.to_dict())))
    np.testing.assert_array_equal(restored.indices, design.indices)
    np.testing.assert_allclose(restored.inclusion_probabilities, design.inclusion_probabilities)
    assert restored.strata == design.strata


# --- estimates -----------------------------------------------------------------------------------


def test_a_full_census_gives_the_exact_answer():
    distances, is_poison = make_population(3_000, 0.01, seed=2)
    design = draw_sample(distances, 3_000, seed=0, stratify=True)
    estimates = estimate_at(labelled(design, distances, is_poison), distances, 0.80)
    truth = true_rates(distances, is_poison, 0.80)
    for name, value in truth.items():
        estimate = getattr(estimates, name)
        assert estimate.point == pytest.approx(value)
        assert estimate.lower == pytest.approx(value) and estimate.upper == pytest.approx(value)
    assert estimates.flagged_fraction.point == pytest.approx(np.mean(distances >= 0.80))


@pytest.mark.parametrize(
    "stratify, poison_rate",
    [(False, 0.005), (True, 0.005), (True, 0.001)],
    ids=["uniform-0.5%", "stratified-0.5%", "stratified-0.1%"],
)
def test_intervals_cover_the_full_data_values(stratify, poison_rate):
    """Nominal 95% intervals cover the true full-data rates in >= 90% of repeated samples, and
    precision / FPR intervals stay within about twice the real spread of the estimates."""
    gamma = 0.82
    distances, is_poison = make_population(40_000, poison_rate, seed=1)
    truth = true_rates(distances, is_poison, gamma)
    population = Population.from_distances(distances, draw_sample(distances, 500, seed=0, stratify=stratify))
    names = list(truth)
    points = np.full((COVERAGE_REPEATS, len(names)), np.nan)
    lower = np.empty_like(points)
    upper = np.empty_like(points)
    for repeat in range(COVERAGE_REPEATS):
        design = draw_sample(distances, 500, seed=repeat, stratify=stratify)
        estimates = estimate_at(labelled(design, distances, is_poison), population, gamma, draws=2000, seed=repeat)
        for j, name in enumerate(names):
            estimate = getattr(estimates, name)
            points[repeat, j] = np.nan if estimate.point is None else estimate.point
            lower[repeat, j], upper[repeat, j] = estimate.lower, estimate.upper
    target = np.array([truth[name] for name in names])
    coverage = dict(zip(names, np.mean((lower <= target) & (target <= upper), axis=0)))
    print(f"coverage ({'stratified' if stratify else 'uniform'}, phi={poison_rate}):", coverage)
    assert all(value >= 0.90 for value in coverage.values()), coverage
    for name in ("precision", "false_positive_rate"):
        j = names.index(name)
        spread = np.subtract(*np.nanpercentile(points[:, j], [97.5, 2.5]))
        assert np.median(upper[:, j] - lower[:, j]) <= 2.5 * spread, name


def test_recall_is_wide_and_honest_with_zero_or_one_labelled_poison():
    distances, is_poison = make_population(20_000, 0.005, seed=4)
    design = draw_sample(distances, 500, seed=0, stratify=True)
    none = label_sample(design, distances, design.indices, np.zeros(500, dtype=bool))
    recall = estimate_at(none, distances, 0.80).recall
    assert recall.point is None and (recall.lower, recall.upper) == (0.0, 1.0)

    one = np.zeros(500, dtype=bool)
    one[np.argmax(distances[design.indices])] = True
    recall = estimate_at(label_sample(design, distances, design.indices, one), distances, 0.80).recall
    assert recall.point == 1.0 and recall.upper == 1.0 and recall.lower < 0.5

    uniform = draw_sample(distances, 500, seed=0)
    single = np.zeros(500, dtype=bool)
    single[0] = True
    recall = estimate_at(label_sample(uniform, distances, uniform.indices, single), distances,
                         distances[uniform.indices[0]]).recall
    assert recall.method == "clopper-pearson"
    assert recall.lower == pytest.approx(0.025) and recall.upper == 1.0


def test_clopper_pearson_matches_scipy():
    for successes, trials in [(0, 10), (3, 10), (10, 10), (17, 500)]:
        lower, upper = clopper_pearson(np.array(successes), np.array(trials))
        reference = stats.binomtest(successes, trials).proportion_ci(0.95, method="exact")
        assert float(lower) == pytest.approx(reference.low, abs=1e-9)
        assert float(upper) == pytest.approx(reference.high, abs=1e-9)


def test_canary_recall_counts_canaries_at_or_above_gamma():
    canaries = np.concatenate([np.full(95, 0.9), np.full(5, 0.7)])
    estimate = canary_recall(canaries, 0.9)
    reference = stats.binomtest(95, 100).proportion_ci(0.95, method="exact")
    assert estimate.point == 0.95 and estimate.source == "canaries"
    assert (estimate.lower, estimate.upper) == pytest.approx((reference.low, reference.high))


def test_weighted_roc_auc_is_mann_whitney_with_weights():
    rng = np.random.default_rng(0)
    distances = np.round(rng.normal(0.75, 0.05, 60), 2)
    labels = rng.random(60) < 0.3
    u = stats.mannwhitneyu(distances[labels], distances[~labels]).statistic
    assert weighted_roc_auc(distances, labels, np.ones(60)) == pytest.approx(u / (labels.sum() * (~labels).sum()))
    doubled = weighted_roc_auc(distances, labels, np.where(np.arange(60) == 0, 2.0, 1.0))
    repeated = weighted_roc_auc(np.append(distances, distances[0]), np.append(labels, labels[0]), np.ones(61))
    assert doubled == pytest.approx(repeated)
    assert weighted_roc_auc(distances, np.zeros(60, dtype=bool), np.ones(60)) is None


# --- threshold choice ----------------------------------------------------------------------------


@pytest.mark.parametrize("poison_rate", [0.005, 0.001])
def test_threshold_choice_meets_recall_and_fpr_on_separable_data(poison_rate):
    distances, is_poison = make_population(100_000, poison_rate, seed=3, clean=(0.72, 0.03), poison=(0.90, 0.02))
    design = draw_sample(distances, 500, seed=0, stratify=True)
    sample = labelled(design, distances, is_poison)
    population = Population.from_distances(distances, design)
    canaries = np.random.default_rng(5).normal(0.90, 0.03, 1_000)
    choices = {
        "fpr": choose_threshold(sample, population, target_fpr=0.01),
        "f1": choose_threshold(sample, population, max_f1=True),
        "canary-recall": choose_threshold(sample, population, target_recall=0.95, canary_distances=canaries),
    }
    for name, calibration in choices.items():
        truth = true_rates(distances, is_poison, calibration.gamma)
        assert truth["recall"] >= 0.95, (name, calibration.gamma, truth)
        assert truth["false_positive_rate"] <= 0.01, (name, calibration.gamma, truth)
    fpr_choice = choices["fpr"]
    assert fpr_choice.estimates.false_positive_rate.upper <= 0.01
    assert choices["canary-recall"].recall_source == "canaries"
    assert choices["canary-recall"].canary_recall.lower >= 0.95


def test_calibration_serialises_to_plain_json():
    distances, is_poison = make_population(20_000, 0.005, seed=6)
    design = draw_sample(distances, 400, seed=0, stratify=True)
    calibration = choose_threshold(labelled(design, distances, is_poison), distances, target_fpr=0.02,
                                   canary_distances=np.full(50, 0.9))
    data = json.loads(json.dumps(calibration.to_dict()))
    for key in ("gamma", "method", "targets", "n_labelled", "n_positive_labels", "estimates", "roc_auc",
                "flagged_fraction", "recall_source"):
        assert key in data
    assert data["method"] == "target_fpr" and data["targets"]["fpr"] == 0.02
    assert data["n_labelled"] == 400 and data["n_positive_labels"] == int(is_poison[design.indices].sum())
    for name in ("precision", "recall", "false_positive_rate", "n_poisons", "canary_recall"):
        assert set(data["estimates"][name]) == {"point", "lower", "upper", "method", "source"}
    assert data["estimates"]["canary_recall"]["source"] == "canaries"
    assert data["flagged_fraction"] == pytest.approx(np.mean(distances >= calibration.gamma))
    assert 0.9 < data["roc_auc"] <= 1.0


def test_labels_needed_follows_the_inverse_square_root_rule():
    distances, is_poison = make_population(20_000, 0.01, seed=7)
    design = draw_sample(distances, 300, seed=0)
    calibration = choose_threshold(labelled(design, distances, is_poison), distances, max_f1=True)
    plan = labels_needed(calibration, target_width=0.05)
    widths = {name: e.width for name, e in calibration.estimates.interval_estimates().items()}
    assert plan.metric == max(widths, key=widths.get)
    assert plan.n_total == math.ceil(300 * (plan.current_width / 0.05) ** 2)
    assert plan.n_additional == plan.n_total - 300 > 0
    assert labels_needed(calibration, target_width=1.0).n_additional == 0


# --- errors --------------------------------------------------------------------------------------


def test_one_class_labels_say_what_to_do():
    distances, _ = make_population(20_000, 0.005, seed=8)
    design = draw_sample(distances, 300, seed=0)
    all_clean = label_sample(design, distances, design.indices, np.zeros(300, dtype=bool))
    with pytest.raises(OneClassLabelsError) as excinfo:
        choose_threshold(all_clean, distances, target_fpr=0.01)
    message = str(excinfo.value)
    assert "label more" in message and "--stratify" in message and "--canaries" in message
    all_poison = label_sample(design, distances, design.indices, np.ones(300, dtype=bool))
    with pytest.raises(OneClassLabelsError):
        choose_threshold(all_poison, distances, max_f1=True)
    # With canaries, clean-only labels still bound the FPR, and canaries measure recall.
    calibration = choose_threshold(all_clean, distances, target_fpr=0.05, canary_distances=np.full(100, 0.95))
    assert calibration.recall_source == "canaries" and calibration.n_positive_labels == 0


def test_missing_and_foreign_labels_are_errors():
    distances, _ = make_population(5_000, 0.01, seed=9)
    design = draw_sample(distances, 100, seed=0)
    with pytest.raises(NoLabelledSampleError):
        label_sample(design, distances, np.array([], dtype=np.int64), np.array([], dtype=bool))
    outside = np.setdiff1d(np.arange(5_000), design.indices)[:1]
    with pytest.raises(CalibrationError, match="not in the drawn sample"):
        label_sample(design, distances, outside, np.array([True]))
    stratified = draw_sample(distances, 100, seed=0, stratify=True)
    with pytest.raises(CalibrationError, match="do not match"):
        label_sample(stratified, distances[::-1].copy(), stratified.indices, np.zeros(100, dtype=bool))
    assert issubclass(CalibrationError, ClipguardError)


def test_unreachable_targets_are_errors():
    distances, is_poison = make_population(20_000, 0.005, seed=10)
    design = draw_sample(distances, 300, seed=0, stratify=True)
    sample = labelled(design, distances, is_poison)
    few_canaries = np.full(40, 0.9)
    with pytest.raises(UnreachableTargetError, match="recall"):
        choose_threshold(sample, distances, target_recall=0.99, canary_distances=few_canaries)
    with pytest.raises(UnreachableTargetError, match="labels"):
        choose_threshold(sample, distances, target_recall=0.95)
    with pytest.raises(CalibrationError, match="exactly one"):
        choose_threshold(sample, distances, target_fpr=0.01, max_f1=True)


# --- figure --------------------------------------------------------------------------------------


def test_density_plot_is_written_when_one_group_is_tiny(tmp_path):
    distances, _ = make_population(20_000, 0.005, seed=11)
    design = draw_sample(distances, 300, seed=0, stratify=True)
    labels = np.zeros(300, dtype=bool)
    labels[np.argmax(distances[design.indices])] = True
    sample = label_sample(design, distances, design.indices, labels)
    figure = plot_distance_densities(sample.distances, sample.labels, sample.weights, 0.80,
                                     tmp_path / "densities.png", canary_distances=np.full(20, 0.9))
    assert (figure.n_clean, figure.n_poison, figure.n_canaries) == (299, 1, 20)
    assert figure.path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
