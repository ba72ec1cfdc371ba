"""Test metrics (stats.metrics_at, what every score uses): scikit-learn's definitions, micro averages
equal accuracy, AUC edge cases; the confusion matrix and report (covidtl.confusion)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from covidtl.confusion import confusion, report_text
from covidtl.paths import CLASSES
from covidtl.stats import metrics_at


def probs_for(pred: np.ndarray, rng) -> np.ndarray:
    """Softmax-like outputs whose argmax is `pred`."""
    p_covid = np.where(pred == CLASSES.index("covid"), rng.uniform(0.5, 1, pred.size), rng.uniform(0, 0.5, pred.size))
    return np.column_stack([1 - p_covid, p_covid])


def test_per_class_and_averages_follow_the_confusion_counts():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    pred = np.where(rng.uniform(size=200) < 0.8, y, 1 - y)
    m = metrics_at(y, probs_for(pred, rng))
    covid, non = CLASSES.index("covid"), CLASSES.index("non_covid")
    tp = np.sum((pred == covid) & (y == covid))
    fp = np.sum((pred == covid) & (y == non))
    fn = np.sum((pred == non) & (y == covid))
    tn = np.sum((pred == non) & (y == non))
    assert m["recall_covid"] == pytest.approx(tp / (tp + fn))
    assert m["precision_covid"] == pytest.approx(tp / (tp + fp))
    assert m["recall_non_covid"] == pytest.approx(tn / (tn + fp))
    assert m["precision_non_covid"] == pytest.approx(tn / (tn + fn))
    f1 = 2 * m["precision_covid"] * m["recall_covid"] / (m["precision_covid"] + m["recall_covid"])
    assert m["f1_covid"] == pytest.approx(f1)
    assert m["recall_macro"] == pytest.approx((m["recall_covid"] + m["recall_non_covid"]) / 2)
    # One label per image, two classes: micro-averaged recall = precision = F1 = accuracy.
    for key in ("recall_micro", "precision_micro", "f1_micro"):
        assert m[key] == pytest.approx(m["accuracy"])
    assert m["accuracy"] == pytest.approx((tp + tn) / 200)
    assert confusion(y, pred) == [[tn, fp], [fn, tp]]
    assert "covid" in report_text(y, pred)


def test_auc_ranks_covid_probability():
    y = np.array([0, 0, 1, 1])
    perfect = metrics_at(y, np.array([[0.9, 0.1], [0.6, 0.4], [0.4, 0.6], [0.2, 0.8]]))
    inverted = metrics_at(y, np.array([[0.1, 0.9], [0.4, 0.6], [0.6, 0.4], [0.8, 0.2]]))
    assert perfect["roc_auc"] == 1.0 and inverted["roc_auc"] == 0.0


def test_one_class_set_has_undefined_auc_not_a_crash():
    m = metrics_at(np.array([1, 1, 1]), np.array([[0.2, 0.8], [0.7, 0.3], [0.1, 0.9]]))
    assert math.isnan(m["roc_auc"])
    assert m["recall_covid"] == pytest.approx(2 / 3)
    assert m["precision_non_covid"] == 0.0  # no non-COVID image: zero_division, not an error
