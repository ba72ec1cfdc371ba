"""Statistics a reader can trust: group bootstrap intervals, paired comparisons, calibration, operating points.

Pure functions of labels and probabilities (numpy only: no model, no file, no TensorFlow). Labels
are class indices in CLASSES order; probabilities are the (n, 2) softmax or the (n,) COVID
probability. COVID is called where p_covid >= threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from covidtl.config import parse_rule
from covidtl.errors import UserError
from covidtl.paths import CLASSES, POSITIVE_INDEX, p_covid

POS = POSITIVE_INDEX
NEG = 1 - POS

# Metric names: accuracy, each class's recall, precision and F1, their micro and macro averages
# (scikit-learn's definitions), ROC AUC, balanced accuracy and the Brier score.
METRICS = (
    "accuracy",
    *(f"{kind}_{name}" for name in CLASSES for kind in ("recall", "precision", "f1")),
    *(f"{kind}_{avg}" for avg in ("micro", "macro") for kind in ("recall", "precision", "f1")),
    "roc_auc",
    "balanced_accuracy",
    "brier",
)
# A metric defined in fewer resamples than this share gets no interval (see bootstrap_intervals).
MIN_DEFINED = 0.5
# Resamples run in blocks of about this many (resample, image) weights: memory stays near 100 MB
# whatever the test set's size.
_BLOCK = 2_000_000

RULES = ("youden", "sensitivity:X", "specificity:X")


# --------------------------------------------------------------------------- inputs


def covid_probability(y_true, prob) -> tuple[np.ndarray, np.ndarray]:
    """(labels, p_covid) as flat arrays from class indices and an (n, 2) or (n,) probability."""
    y = np.asarray(y_true).astype(int).ravel()
    p = np.asarray(prob, dtype=float)
    if p.ndim == 2:
        if p.shape[1] != len(CLASSES):
            raise ValueError(f"prob has {p.shape[1]} columns; expected {len(CLASSES)} (one per class)")
        p = p_covid(p)
    if p.shape != y.shape or y.size == 0:
        raise ValueError(f"{y.size} labels and {p.size} probabilities: expected the same non-zero number")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be class indices 0..{len(CLASSES) - 1} (CLASSES order)")
    return y, p


def _group_index(groups, n: int) -> np.ndarray:
    """Group number per image (0..G-1); each image its own group when there are none."""
    if groups is None:
        return np.arange(n)
    groups = np.asarray(groups).ravel()
    if groups.size != n:
        raise ValueError(f"{groups.size} groups for {n} images")
    return np.unique(groups, return_inverse=True)[1].ravel()


# --------------------------------------------------------------------------- metrics over weights


def _ratio(num: np.ndarray, den: np.ndarray, fill: float) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), fill)


def _auc(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted ROC AUC per row of w (B, n): P(p_pos > p_neg) + half the ties, NaN with one class."""
    order = np.argsort(p, kind="stable")
    p, pos, w = p[order], y[order] == POS, w[:, order]
    # Images with equal scores form one run; a positive beats the negatives before its run and
    # ties with those inside it, as the Mann-Whitney statistic (and sklearn's trapezoids) count.
    start = np.searchsorted(p, p, side="left")
    end = np.searchsorted(p, p, side="right")
    negatives = np.zeros((w.shape[0], w.shape[1] + 1))
    np.cumsum(w * ~pos, axis=1, out=negatives[:, 1:])
    below = negatives[:, start[pos]]
    tied = negatives[:, end[pos]] - below
    wins = np.sum(w[:, pos] * (below + 0.5 * tied), axis=1)
    return _ratio(wins, w[:, pos].sum(axis=1) * negatives[:, -1], np.nan)


def _metrics(y: np.ndarray, p: np.ndarray, w: np.ndarray, threshold: float, fill: float) -> dict[str, np.ndarray]:
    """Every metric of METRICS per row of image weights w (B, n); `fill` where a ratio is 0/0."""
    pos, called = y == POS, p >= threshold
    tp, fn, fp, tn = (w @ (a & b).astype(float) for a, b in
                      ((pos, called), (pos, ~called), (~pos, called), (~pos, ~called)))
    out = {"accuracy": _ratio(tp + tn, tp + fn + fp + tn, fill)}
    # Each class's (true, false positive, false negative) counts, seen with that class as positive.
    counts = {CLASSES[POS]: (tp, fp, fn), CLASSES[NEG]: (tn, fn, fp)}
    for name in CLASSES:
        t, f_pos, f_neg = counts[name]
        out[f"recall_{name}"] = _ratio(t, t + f_neg, fill)
        out[f"precision_{name}"] = _ratio(t, t + f_pos, fill)
        out[f"f1_{name}"] = _ratio(2 * t, 2 * t + f_pos + f_neg, fill)
    # One label per image, two classes: every micro average is the accuracy.
    for kind in ("recall", "precision", "f1"):
        out[f"{kind}_micro"] = out["accuracy"]
    for kind in ("recall", "precision", "f1"):
        out[f"{kind}_macro"] = np.mean([out[f"{kind}_{name}"] for name in CLASSES], axis=0)
    out["roc_auc"] = _auc(y, p, w)
    # Balanced accuracy needs both classes, like AUC: with one, it is NaN whatever `fill` says.
    both = (tp + fn > 0) & (tn + fp > 0)
    recalls = out[f"recall_{CLASSES[POS]}"] + out[f"recall_{CLASSES[NEG]}"]
    out["balanced_accuracy"] = np.where(both, recalls / 2, np.nan)
    out["brier"] = _ratio(w @ (p - pos) ** 2, w.sum(axis=1), np.nan)
    return out


def metrics_at(y_true, prob, threshold: float = 0.5) -> dict[str, float]:
    """Every metric of METRICS but Brier, with COVID called at p_covid >= threshold.

    At 0.5 these are scikit-learn's metrics of the softmax's argmax, but for an exact tie
    (p_covid == p_non_covid), which argmax calls non-COVID. ROC AUC is NaN for a set of one class.
    """
    y, p = covid_probability(y_true, prob)
    # 0/0 ratios are 0, as scikit-learn's zero_division=0 makes them.
    values = _metrics(y, p, np.ones((1, y.size)), threshold, fill=0.0)
    return {name: float(values[name][0]) for name in METRICS if name != "brier"}


# --------------------------------------------------------------------------- bootstrap


def _bootstrap(
    y: np.ndarray, groups, resamples: int, seed: int, statistic: Callable[[np.ndarray], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """statistic(image weights (B, n)) over `resamples` group resamples, B at a time."""
    if resamples < 1:
        raise ValueError(f"resamples={resamples}: need at least 1")
    index = _group_index(groups, y.size)
    n_groups = int(index.max()) + 1
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK // y.size)
    parts = []
    for start in range(0, resamples, block):
        # Drawing G groups with replacement = multinomial counts per group; an image weighs its
        # group's count, so no resampled rows are ever built.
        counts = rng.multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=min(block, resamples - start))
        parts.append(statistic(counts[:, index].astype(float)))
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """The central `confidence` interval of bootstrap replicates, the undefined (NaN) ones left out;
    (nan, nan) when fewer than MIN_DEFINED of them are defined."""
    defined = values[np.isfinite(values)]
    if defined.size == 0 or defined.size < MIN_DEFINED * values.size:
        return (math.nan, math.nan)
    tail = (1 - confidence) / 2
    low, high = np.quantile(defined, [tail, 1 - tail])
    return (float(low), float(high))


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}: must be in (0, 1)")


def bootstrap_intervals(
    y_true, prob, groups=None, *, resamples: int = 2000, confidence: float = 0.95, seed: int = 0,
    threshold: float = 0.5,
) -> dict[str, tuple[float, float]]:
    """Percentile interval of every metric of METRICS, resampling whole groups (patients) with replacement.

    A resample where a metric is undefined (one class: AUC, recall...) is skipped for it; where it is
    defined in under MIN_DEFINED of them, the rest are a biased subset and the interval is (nan, nan).
    """
    _check_confidence(confidence)
    y, p = covid_probability(y_true, prob)
    values = _bootstrap(y, groups, resamples, seed, lambda w: _metrics(y, p, w, threshold, fill=np.nan))
    return {name: percentile_interval(values[name], confidence) for name in METRICS}


# --------------------------------------------------------------------------- paired comparisons


@dataclass(frozen=True)
class Difference:
    """metric(a) - metric(b) on the same images, its percentile interval and two-sided p-value."""

    metric: str
    difference: float
    low: float
    high: float
    p_value: float


def _bootstrap_p(d: np.ndarray) -> float:
    """Twice the smaller share of resamples on either side of 0 (+1 each: never exactly 0)."""
    below = (1 + np.sum(d <= 0)) / (d.size + 1)
    above = (1 + np.sum(d >= 0)) / (d.size + 1)
    return float(min(1.0, 2 * min(below, above)))


def paired_difference(
    y_true, prob_a, prob_b, groups=None, *, metric: str = "accuracy", resamples: int = 2000,
    confidence: float = 0.95, seed: int = 0, threshold: float = 0.5,
) -> Difference:
    """Paired group bootstrap of metric(a) - metric(b) (accuracy, roc_auc or any of METRICS).

    Both models are scored on the same resampled groups, so what they share cancels out.
    """
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r}: expected one of {', '.join(METRICS)}")
    _check_confidence(confidence)
    y, pa = covid_probability(y_true, prob_a)
    _, pb = covid_probability(y_true, prob_b)

    def difference(w: np.ndarray) -> dict[str, np.ndarray]:
        a, b = (_metrics(y, p, w, threshold, fill=np.nan)[metric] for p in (pa, pb))
        return {metric: a - b}

    point = float(difference(np.ones((1, y.size)))[metric][0])
    d = _bootstrap(y, groups, resamples, seed, difference)[metric]
    low, high = percentile_interval(d, confidence)
    defined = d[np.isfinite(d)]
    p_value = _bootstrap_p(defined) if defined.size >= max(1, MIN_DEFINED * d.size) else math.nan
    return Difference(metric, point, low, high, p_value)


@dataclass(frozen=True)
class DeLong:
    """Two correlated ROC AUCs on the same images, their difference (a - b), its standard error and p."""

    auc_a: float
    auc_b: float
    difference: float
    se: float
    p_value: float


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    ranks = np.empty(x.size)
    ranks[order] = (np.searchsorted(xs, xs, "left") + np.searchsorted(xs, xs, "right") + 1) / 2
    return ranks


def delong_test(y_true, prob_a, prob_b) -> DeLong:
    """DeLong's test of AUC(a) = AUC(b) on the same images, by Sun & Xu's (2014) midrank algorithm.

    NaN throughout when a class has fewer than two images (no covariance); p = 1 for identical scores.
    """
    y, pa = covid_probability(y_true, prob_a)
    _, pb = covid_probability(y_true, prob_b)
    pos = y == POS
    m, n = int(pos.sum()), int((~pos).sum())
    if m < 2 or n < 2:
        return DeLong(math.nan, math.nan, math.nan, math.nan, math.nan)
    aucs, v10, v01 = [], [], []
    for p in (pa, pb):
        x, z = p[pos], p[~pos]
        joint = _midranks(np.concatenate([x, z]))
        aucs.append((joint[:m].sum() - m * (m + 1) / 2) / (m * n))
        # Structural components: each positive's share of negatives it beats, each negative's
        # share of positives that beat it (ties one half), from ranks instead of m x n pairs.
        v10.append((joint[:m] - _midranks(x)) / n)
        v01.append(1 - (joint[m:] - _midranks(z)) / m)
    s = np.cov(v10) / m + np.cov(v01) / n
    se = math.sqrt(max(s[0, 0] + s[1, 1] - 2 * s[0, 1], 0.0))
    diff = aucs[0] - aucs[1]
    if se == 0:
        p_value = 1.0 if diff == 0 else math.nan
    else:
        p_value = math.erfc(abs(diff) / se / math.sqrt(2))
    return DeLong(float(aucs[0]), float(aucs[1]), float(diff), se, p_value)


def holm(pvalues) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1); NaN stays NaN, uncounted."""
    p = np.asarray(pvalues, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    tested = np.flatnonzero(np.isfinite(p))
    order = tested[np.argsort(p[tested], kind="stable")]
    # The k-th smallest of m p-values is multiplied by m - k + 1; the running maximum keeps a
    # smaller p from being adjusted above a larger one's.
    scaled = (order.size - np.arange(order.size)) * p[order]
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return adjusted


# --------------------------------------------------------------------------- calibration


def brier(y_true, prob) -> float:
    """Mean squared error of the COVID probability (0 is perfect; 0.25 is a constant 0.5)."""
    y, p = covid_probability(y_true, prob)
    return float(np.mean((p - (y == POS)) ** 2))


@dataclass(frozen=True)
class Reliability:
    """Per non-empty equal-width bin: mean predicted COVID probability, observed COVID fraction, count."""

    mean_predicted: np.ndarray
    observed: np.ndarray
    count: np.ndarray
    ece: float  # expected calibration error: count-weighted mean |observed - mean_predicted|


def reliability(y_true, prob, bins: int = 10) -> Reliability:
    """Reliability diagram data and expected calibration error over `bins` equal-width bins of [0, 1]."""
    y, p = covid_probability(y_true, prob)
    # p = 1 belongs to the last bin, not to an eleventh.
    which = np.clip((p * bins).astype(int), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    kept = count > 0
    mean_predicted = np.bincount(which, weights=p, minlength=bins)[kept] / count[kept]
    observed = np.bincount(which, weights=(y == POS).astype(float), minlength=bins)[kept] / count[kept]
    ece = float(_ece(y, p, np.ones((1, y.size)), bins)[0])
    return Reliability(mean_predicted, observed, count[kept], ece)


def _ece(y: np.ndarray, p: np.ndarray, w: np.ndarray, bins: int) -> np.ndarray:
    """Expected calibration error per row of image weights w (B, n), over `bins` equal-width bins."""
    which = np.clip((p * bins).astype(int), 0, bins - 1)
    observed = (y == POS).astype(float)
    gaps = np.zeros(w.shape[0])
    for b in range(bins):
        inside = which == b
        # A bin's count x |observed - mean predicted| is |sum of observed - sum of predicted|.
        gaps += np.abs(w[:, inside] @ observed[inside] - w[:, inside] @ p[inside])
    return _ratio(gaps, w.sum(axis=1), np.nan)


def weighted_metrics(y_true, prob, weights: np.ndarray, threshold: float = 0.5, bins: int = 10) -> dict[str, np.ndarray]:
    """Every metric of METRICS and the ECE per row of image weights (B, n): a bootstrap's
    replicates at once (NaN where a replicate's ratio is 0/0 or it holds one class)."""
    y, p = covid_probability(y_true, prob)
    weights = np.atleast_2d(np.asarray(weights, dtype=float))
    return {**_metrics(y, p, weights, threshold, fill=np.nan), "ece": _ece(y, p, weights, bins)}


# --------------------------------------------------------------------------- operating points


def operating_point(y_true, prob, rule: str) -> float:
    """The threshold on p_covid that `rule` picks (see parse_rule), among the observed scores.

    youden: max sensitivity + specificity - 1 (the highest such threshold on ties); sensitivity:X:
    the highest threshold with sensitivity >= X; specificity:X: the lowest with specificity >= X.
    """
    name, target = parse_rule(rule)
    y, p = covid_probability(y_true, prob)
    pos = y == POS
    if pos.all() or not pos.any():
        raise UserError(
            f"operating point {rule!r}: the scored set holds {CLASSES[int(y[0])]} images only; "
            "it needs both classes (a larger validation split)"
        )
    # Candidates: every observed score, highest first, and one just above them all (calls nothing).
    thresholds = np.concatenate([[np.nextafter(p.max(), np.inf)], np.unique(p)[::-1]])
    # Images below a threshold are called non-COVID: missed positives, correctly cleared negatives.
    missed = np.searchsorted(np.sort(p[pos]), thresholds, side="left")
    cleared = np.searchsorted(np.sort(p[~pos]), thresholds, side="left")
    sensitivity = 1 - missed / pos.sum()
    specificity = cleared / (~pos).sum()
    if name == "youden":
        return float(thresholds[np.argmax(sensitivity + specificity - 1)])
    if name == "sensitivity":
        return float(thresholds[np.argmax(sensitivity >= target)])
    return float(thresholds[np.flatnonzero(specificity >= target)[-1]])
