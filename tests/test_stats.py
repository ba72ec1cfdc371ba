"""Statistics: group bootstrap intervals, paired comparisons, DeLong, Holm, calibration, operating points."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from sklearn import metrics as skm

from covidtl import stats
from covidtl.errors import UserError
from covidtl.paths import CLASSES, POSITIVE_INDEX


def phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def patients(rng, n_patients: int, per_patient: int, shift=1.0, between=1.0, within=0.5):
    """Labels, COVID probabilities and patient ids: logit = +-shift + patient effect + image noise.

    True accuracy at 0.5 is phi(shift / sd) and true AUC phi(2 shift / (sd sqrt 2)), sd the total spread.
    """
    label = rng.integers(0, 2, n_patients)
    effect = rng.normal(0, between, n_patients)
    y = np.repeat(label, per_patient)
    logit = np.where(y == 1, shift, -shift) + np.repeat(effect, per_patient) + rng.normal(0, within, y.size)
    return y, 1 / (1 + np.exp(-logit)), np.repeat(np.arange(n_patients), per_patient)


def truth(shift=1.0, between=1.0, within=0.5) -> tuple[float, float]:
    sd = math.hypot(between, within)
    return phi(shift / sd), phi(2 * shift / (sd * math.sqrt(2)))


def softmax(p_covid: np.ndarray) -> np.ndarray:
    return np.column_stack([1 - p_covid, p_covid])


def sklearn_metrics(y_true: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """The reference: scikit-learn's metrics of the softmax's argmax, in METRICS' order (accuracy,
    per class, micro and macro averages, ROC AUC), 0/0 as 0 (zero_division=0)."""
    y_true, prob = np.asarray(y_true, dtype=int), np.asarray(prob, dtype=float)
    y_pred = prob.argmax(axis=1)
    labels = list(range(len(CLASSES)))
    out = {"accuracy": float(skm.accuracy_score(y_true, y_pred))}
    precision, recall, f1, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    for i, name in enumerate(CLASSES):
        out[f"recall_{name}"], out[f"precision_{name}"], out[f"f1_{name}"] = (
            float(recall[i]), float(precision[i]), float(f1[i]))
    for average in ("micro", "macro"):
        p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, average=average,
                                                         zero_division=0)
        out[f"recall_{average}"], out[f"precision_{average}"], out[f"f1_{average}"] = float(r), float(p), float(f)
    out["roc_auc"] = (float(skm.roc_auc_score(y_true == POSITIVE_INDEX, prob[:, POSITIVE_INDEX]))
                      if len(np.unique(y_true)) == 2 else float("nan"))
    return out


def width(interval: tuple[float, float]) -> float:
    return interval[1] - interval[0]


# --------------------------------------------------------------------------- intervals


def test_the_interval_resamples_groups_not_images():
    # 200 images in 10 patients of 20; each patient all right or all wrong: 6 of 10 right.
    right = np.repeat([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], 20).astype(bool)
    y = np.tile([0, 1], 100)
    prob = np.where(right, np.where(y == 1, 0.9, 0.1), np.where(y == 1, 0.1, 0.9))
    groups = np.repeat(np.arange(10), 20)
    singletons = stats.bootstrap_intervals(y, prob, resamples=1000)["accuracy"]
    grouped = stats.bootstrap_intervals(y, prob, groups, resamples=1000)["accuracy"]
    assert singletons[0] < 0.6 < singletons[1] and grouped[0] < 0.6 < grouped[1]
    # Binomial widths: 2 x 1.96 x sqrt(.24 / 200) = 0.14 for 200 images, 0.61 for 10 patients.
    assert width(singletons) < 0.2 and width(grouped) > 0.4


def test_intervals_cover_the_truth_at_about_the_nominal_rate():
    """200 simulated test sets each. 200 coverage draws have a standard error of 0.015 at 0.95: the
    bands allow about 3 of them, plus the percentile method's known slight undercoverage with few
    clusters (measured 0.905-0.94 over four seeds at 60 patients)."""
    rng = np.random.default_rng(1)
    acc_iid, auc_iid = truth(between=0.0, within=math.hypot(1.0, 0.5))
    acc, auc = truth()
    covered = {"iid": [], "grouped": [], "as singletons": []}
    for rep in range(200):
        y, p, _ = patients(rng, 300, 1, between=0.0, within=math.hypot(1.0, 0.5))
        i = stats.bootstrap_intervals(y, p, resamples=400, seed=rep)
        covered["iid"].append((i["accuracy"][0] <= acc_iid <= i["accuracy"][1],
                               i["roc_auc"][0] <= auc_iid <= i["roc_auc"][1]))
        y, p, g = patients(rng, 60, 5)
        for name, groups in (("grouped", g), ("as singletons", None)):
            i = stats.bootstrap_intervals(y, p, groups, resamples=400, seed=rep)
            covered[name].append((i["accuracy"][0] <= acc <= i["accuracy"][1],
                                  i["roc_auc"][0] <= auc <= i["roc_auc"][1]))
    rate = {name: np.mean(hits, axis=0) for name, hits in covered.items()}
    assert np.all((0.90 <= rate["iid"]) & (rate["iid"] <= 0.99)), rate
    assert np.all((0.88 <= rate["grouped"]) & (rate["grouped"] <= 0.99)), rate
    # Five correlated images per patient counted as five patients: far too narrow.
    assert np.all(rate["as singletons"] < 0.82), rate


def test_resampled_metrics_equal_sklearn_metrics_on_the_resampled_rows():
    """The weighted computation equals scoring the materialised resample, ties and empty classes included."""
    rng = np.random.default_rng(5)
    for _ in range(200):
        n = int(rng.integers(2, 25))
        y = rng.integers(0, 2, n)
        p = rng.choice([0.2, 0.4, 0.6, 0.8], n)  # ties, and no exact 0.5 (see metrics_at)
        counts = rng.integers(0, 3, n)
        if counts.sum() == 0:
            continue
        w = counts[None].astype(float)
        rows = np.repeat(np.arange(n), counts)
        expected = sklearn_metrics(y[rows], softmax(p[rows]))
        as_sklearn = stats._metrics(y, p, w, 0.5, fill=0.0)  # zero_division=0, as sklearn_metrics
        for name, value in expected.items():
            assert as_sklearn[name][0] == pytest.approx(value, abs=1e-12, nan_ok=True), name
        # The bootstrap's version leaves 0/0 undefined; that happens only where a class is missing
        # from the resample's labels or calls.
        weighted = stats._metrics(y, p, w, 0.5, fill=np.nan)
        complete = len(set(y[rows])) == 2 and len(set(p[rows] >= 0.5)) == 2
        for name in expected:
            if math.isnan(weighted[name][0]):
                assert not complete, name
            else:
                assert weighted[name][0] == as_sklearn[name][0], name
        assert weighted["brier"][0] == pytest.approx(skm.brier_score_loss(y[rows], p[rows], pos_label=1))


def test_point_metrics_at_one_half_are_sklearn_metrics():
    rng = np.random.default_rng(2)
    y, p, _ = patients(rng, 300, 1)
    prob = softmax(p)
    at_half = stats.metrics_at(y, prob, 0.5)
    expected = sklearn_metrics(y, prob)
    assert list(at_half) == [*expected, "balanced_accuracy"]
    for name, value in expected.items():
        assert at_half[name] == pytest.approx(value, abs=1e-12), name
    assert at_half["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, p >= 0.5))
    assert stats.metrics_at(y, p, 0.5) == at_half  # (n,) COVID probability or (n, 2) softmax
    # A higher threshold calls fewer COVID: recall of COVID falls, of non-COVID rises.
    strict = stats.metrics_at(y, prob, 0.8)
    assert strict["recall_covid"] < at_half["recall_covid"]
    assert strict["recall_non_covid"] > at_half["recall_non_covid"]


def test_same_seed_same_interval_other_seed_other_interval():
    rng = np.random.default_rng(3)
    y, p, g = patients(rng, 40, 3)
    first = stats.bootstrap_intervals(y, softmax(p), g, resamples=300, seed=7)
    assert stats.bootstrap_intervals(y, p, g, resamples=300, seed=7) == first
    assert stats.bootstrap_intervals(y, p, g, resamples=300, seed=8) != first
    assert set(first) == set(stats.METRICS)


def test_undefined_metrics_are_skipped_per_resample_or_have_no_interval():
    y = np.ones(30, dtype=int)
    p = np.linspace(0.1, 0.9, 30)
    one_class = stats.bootstrap_intervals(y, p, resamples=200)
    for name in ("roc_auc", "balanced_accuracy", "recall_non_covid"):
        assert all(math.isnan(v) for v in one_class[name]), name
    assert 0 < one_class["accuracy"][0] < one_class["accuracy"][1] < 1
    # One COVID image among 20: about a third of resamples miss it and are skipped, not counted as 0.
    y = np.zeros(20, dtype=int)
    y[7] = 1
    rare = stats.bootstrap_intervals(y, np.where(y == 1, 0.9, np.linspace(0.05, 0.5, 20)), resamples=500)
    assert rare["roc_auc"] == (1.0, 1.0)
    assert rare["recall_covid"] == (1.0, 1.0)


def test_bootstrap_of_a_thousand_images_is_fast():
    rng = np.random.default_rng(4)
    y, p, g = patients(rng, 250, 4)
    start = time.perf_counter()
    intervals = stats.bootstrap_intervals(y, softmax(p), g, resamples=2000)
    # Measured 0.1-0.3 s on 2 cores; a loop scoring materialised resamples takes tens of seconds.
    assert time.perf_counter() - start < 10
    assert intervals["roc_auc"][0] < stats.metrics_at(y, p)["roc_auc"] < intervals["roc_auc"][1]


# --------------------------------------------------------------------------- paired comparisons


def test_a_model_against_itself_differs_by_exactly_zero():
    rng = np.random.default_rng(6)
    y, p, g = patients(rng, 50, 4)
    for metric in ("accuracy", "roc_auc"):
        same = stats.paired_difference(y, p, softmax(p), g, metric=metric, resamples=300)
        assert (same.difference, same.low, same.high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    delong = stats.delong_test(y, p, p)
    assert (delong.difference, delong.se, delong.p_value) == (0.0, 0.0, 1.0)


def test_a_clearly_better_model_is_distinguished_and_agrees_with_delong():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 400)
    good = 1 / (1 + np.exp(-(np.where(y == 1, 1.5, -1.5) + rng.normal(0, 1, y.size))))
    weak = 1 / (1 + np.exp(-(np.where(y == 1, 0.3, -0.3) + rng.normal(0, 1, y.size))))
    for metric in ("accuracy", "roc_auc"):
        d = stats.paired_difference(y, good, weak, metric=metric, resamples=1000)
        assert d.difference > 0 and d.low > 0 and d.p_value < 0.01, d
        reverse = stats.paired_difference(y, weak, good, metric=metric, resamples=1000)
        assert reverse.difference == -d.difference and reverse.high < 0
    auc = stats.paired_difference(y, good, weak, metric="roc_auc", resamples=2000)
    delong = stats.delong_test(y, good, weak)
    assert delong.difference == pytest.approx(auc.difference, abs=1e-12)
    assert delong.p_value < 1e-6
    # Two estimates of one sampling spread: interval width / (2 x 1.96) ~ DeLong's standard error.
    assert width((auc.low, auc.high)) / (2 * 1.96) == pytest.approx(delong.se, rel=0.2)


def slow_delong(y, a, b):
    """DeLong et al. (1988) from its definition: every positive-negative pair, no ranks."""
    components = []
    for p in (a, b):
        x, z = p[y == 1][:, None], p[y == 0][None, :]
        psi = (x > z) + 0.5 * (x == z)
        components.append((psi.mean(axis=1), psi.mean(axis=0), psi.mean()))
    (v10a, v01a, auc_a), (v10b, v01b, auc_b) = components
    m, n = len(v10a), len(v01a)
    var = (np.var(v10a, ddof=1) + np.var(v10b, ddof=1) - 2 * np.cov(v10a, v10b)[0, 1]) / m + (
        np.var(v01a, ddof=1) + np.var(v01b, ddof=1) - 2 * np.cov(v01a, v01b)[0, 1]
    ) / n
    return auc_a, auc_b, math.sqrt(var)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delong_matches_the_pairwise_definition(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 90)
    a = np.round(rng.uniform(size=90) + 0.3 * y, 1)  # rounded: many ties
    b = np.round(rng.uniform(size=90) + 0.1 * y, 2)
    result = stats.delong_test(y, softmax(a), b)
    auc_a, auc_b, se = slow_delong(y, a, b)
    assert result.auc_a == pytest.approx(skm.roc_auc_score(y, a)) == pytest.approx(auc_a)
    assert result.auc_b == pytest.approx(auc_b)
    assert result.se == pytest.approx(se, rel=1e-10)
    z = (auc_a - auc_b) / se
    assert result.p_value == pytest.approx(2 * (1 - phi(abs(z))), rel=1e-9)


def test_delong_needs_two_images_of_each_class():
    result = stats.delong_test([0, 1, 1], [0.2, 0.7, 0.9], [0.4, 0.3, 0.8])
    assert all(math.isnan(v) for v in (result.auc_a, result.se, result.p_value))


def test_holm_on_hand_computed_examples():
    # Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> running max 0.06.
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.6]).tolist() == [1.0, 1.0]  # 0.5 x 2 capped at 1; 0.6 no lower
    # An untested comparison (NaN) neither gets a p-value nor counts toward m.
    adjusted = stats.holm([0.01, float("nan"), 0.02])
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.02)


# --------------------------------------------------------------------------- calibration


def test_brier_of_perfect_and_of_constant_predictions():
    y = np.array([0, 1, 1, 0])
    assert stats.brier(y, y.astype(float)) == 0.0
    assert stats.brier(y, softmax(np.full(4, 0.5))) == 0.25
    p = np.array([0.1, 0.8, 0.6, 0.3])
    assert stats.brier(y, p) == pytest.approx(skm.brier_score_loss(y, p, pos_label=1))


def test_reliability_separates_a_calibrated_model_from_an_overconfident_one():
    rng = np.random.default_rng(8)
    p = rng.uniform(size=20_000)
    y = (rng.uniform(size=p.size) < p).astype(int)
    calibrated = stats.reliability(y, p)
    assert calibrated.ece < 0.02
    assert calibrated.count.sum() == p.size and len(calibrated.count) == 10
    assert np.allclose(calibrated.observed, calibrated.mean_predicted, atol=0.03)
    overconfident = stats.reliability(y, np.where(p > 0.5, 0.99, 0.01))
    assert overconfident.ece > 0.2
    assert len(overconfident.count) == 2  # empty bins dropped


def test_reliability_bins_by_hand():
    result = stats.reliability([0, 1, 1, 1], [0.05, 0.15, 0.95, 1.0], bins=10)
    assert result.count.tolist() == [1, 1, 2]  # 1.0 falls in the last bin, [0.9, 1]
    assert result.mean_predicted == pytest.approx([0.05, 0.15, 0.975])
    assert result.observed.tolist() == [0.0, 1.0, 1.0]
    assert result.ece == pytest.approx((0.05 + 0.85 + 2 * 0.025) / 4)


# --------------------------------------------------------------------------- operating points


HAND_Y = np.array([0, 0, 1, 0, 1, 1, 1, 1])
HAND_P = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])


@pytest.mark.parametrize(
    ("rule", "threshold"),
    [
        ("youden", 0.5),  # sensitivity 4/5 + specificity 3/3 - 1 = 0.8; 0.3 gives 1 + 2/3 - 1
        ("sensitivity:0.95", 0.3),  # every COVID image: down to the lowest COVID score
        ("sensitivity:0.8", 0.5),  # 4 of 5 suffice: the highest threshold keeping them
        ("specificity:0.9", 0.5),  # every non-COVID image below: just past the 0.4
        ("specificity:0.6", 0.3),  # 2 of 3 below suffice: the lowest threshold with that
        (" Sensitivity:1 ", 0.3),
    ],
)
def test_operating_points_on_a_hand_example(rule, threshold):
    assert stats.operating_point(HAND_Y, softmax(HAND_P), rule) == threshold


def test_a_sensitivity_rule_meets_its_target_at_the_highest_such_threshold():
    rng = np.random.default_rng(9)
    y, p, _ = patients(rng, 500, 1)
    t = stats.operating_point(y, p, "sensitivity:0.95")
    assert stats.metrics_at(y, p, t)["recall_covid"] >= 0.95
    assert stats.metrics_at(y, p, np.nextafter(t, 1))["recall_covid"] < 0.95
    t = stats.operating_point(y, p, "specificity:0.9")
    assert stats.metrics_at(y, p, t)["recall_non_covid"] >= 0.9
    assert stats.metrics_at(y, p, p[p < t].max())["recall_non_covid"] < 0.9
    youden = stats.operating_point(y, p, "youden")
    best = stats.metrics_at(y, p, youden)["balanced_accuracy"]
    assert all(stats.metrics_at(y, p, s)["balanced_accuracy"] <= best for s in np.unique(p))


def test_full_specificity_when_a_negative_scores_highest_calls_nothing():
    t = stats.operating_point([1, 0, 1, 0], [0.6, 0.9, 0.3, 0.2], "specificity:1")
    assert t > 0.9 and stats.metrics_at([1, 0, 1, 0], [0.6, 0.9, 0.3, 0.2], t)["recall_non_covid"] == 1


@pytest.mark.parametrize(
    "rule", ["", "youdan", "youden:0.5", "sensitivity", "sensitivity:", "sens:0.9", "sensitivity:1.5",
             "specificity:0", "specificity:abc", "specificity:nan"],
)
def test_a_bad_rule_is_one_clear_line(rule):
    with pytest.raises(UserError) as caught:
        stats.operating_point(HAND_Y, HAND_P, rule)
    message = str(caught.value)
    assert "\n" not in message and repr(rule) in message and "sensitivity:0.95" in message


def test_an_operating_point_needs_both_classes():
    with pytest.raises(UserError, match="covid images only; it needs both classes"):
        stats.operating_point([1, 1, 1], [0.2, 0.5, 0.9], "youden")
