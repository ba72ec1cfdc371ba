"""The linear probe: L2-regularised logistic regression on a frozen base's pooled features.

The classic measure of what pre-trained features hold (Kornblith et al. 2019, "Do better ImageNet
models transfer better?"): no network weight moves, only a linear read-out is fitted. Its C is
chosen by patient-grouped cross-validation inside the training rows alone, so validation and test
patients never steer it. The fit becomes the weights of the network's Dense(2) layer, the scaler
folded in, so the cell's model is an ordinary Keras model (`weights_for_dense`).

scikit-learn and numpy only: no TensorFlow, no files.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from covidtl.errors import UserError
from covidtl.paths import CLASSES, POSITIVE_INDEX as POS

MAX_ITER = 5000


@dataclass
class Probe:
    """The fitted read-out on raw pooled features: p(COVID) = sigmoid(features @ coef + intercept)."""

    coef: np.ndarray
    intercept: float
    c: float  # the chosen inverse regularisation strength
    search: list[dict] = field(default_factory=list)  # per C: mean and sd of the inner folds' AUC
    inner_folds: int = 0

    def p_covid(self, features: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(pooled(features) @ self.coef + self.intercept)))


def pooled(features: np.ndarray) -> np.ndarray:
    """Global average pooling of (n, h, w, c) features (what the network's GAP layer computes)."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=tuple(range(1, features.ndim - 1))) if features.ndim > 2 else features


def _classifier(c: float):
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=MAX_ITER))


def select_c(x: np.ndarray, y: np.ndarray, groups: np.ndarray, c_grid: list[float], folds: int,
             seed: int) -> tuple[float, list[dict], int]:
    """The C of `c_grid` with the best mean ROC AUC over patient-grouped, class-stratified folds of
    the rows given (the training rows: nothing else is passed in). Ties go to the smaller C."""
    positive = y == POS
    fewest = min(len(set(groups[positive])), len(set(groups[~positive])))
    if fewest < 2:
        raise UserError("train.head linear_probe: its C is chosen by grouped cross-validation inside the "
                        f"training rows, which hold {fewest} patient group(s) of a class; it needs at least 2 "
                        "of each: use more training images, or train.head gap")
    splits = min(folds, fewest)
    inner = list(StratifiedGroupKFold(n_splits=splits, shuffle=True, random_state=seed).split(x, y, groups))
    search = []
    for c in sorted(c_grid):
        aucs = []
        for fit_rows, held in inner:
            if len(np.unique(y[held])) < 2:
                continue
            model = _fit(_classifier(c), x[fit_rows], positive[fit_rows])
            aucs.append(roc_auc_score(positive[held], model.predict_proba(x[held])[:, 1]))
        search.append({"c": float(c), "auc_mean": float(np.mean(aucs)) if aucs else math.nan,
                       "auc_sd": float(np.std(aucs, ddof=1)) if len(aucs) > 1 else math.nan,
                       "folds": len(aucs)})
    scored = [s for s in search if math.isfinite(s["auc_mean"])]
    best = max(scored, key=lambda s: s["auc_mean"]) if scored else search[0]  # max keeps the first (smallest) tie
    return best["c"], search, splits


def fit(x: np.ndarray, y: np.ndarray, groups, c_grid: list[float], folds: int, seed: int) -> Probe:
    """C chosen by `select_c` on these rows, then the probe refitted on all of them."""
    x, y, groups = pooled(x), np.asarray(y).astype(int), np.asarray(groups).astype(str)
    c, search, splits = select_c(x, y, groups, c_grid, folds, seed)
    model = _fit(_classifier(c), x, y == POS)
    scaler, regression = model[0], model[1]
    # Folded into one affine map on the raw features: w . (x - mean) / scale + b.
    coef = regression.coef_[0] / scaler.scale_
    intercept = float(regression.intercept_[0] - np.sum(regression.coef_[0] * scaler.mean_ / scaler.scale_))
    return Probe(coef, intercept, c, search, splits)


def _fit(model, x: np.ndarray, positive: np.ndarray):
    with warnings.catch_warnings():  # a C at the weak end of the grid may not converge: it then scores lower
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(x, positive)


def weights_for_dense(probe: Probe) -> tuple[np.ndarray, np.ndarray]:
    """Kernel (d, 2) and bias (2,) of a softmax Dense(2) that gives the probe's p(COVID): logits 0
    and z for the two classes make softmax's COVID column sigmoid(z)."""
    kernel = np.zeros((probe.coef.size, len(CLASSES)), dtype=np.float32)
    bias = np.zeros(len(CLASSES), dtype=np.float32)
    kernel[:, POS] = probe.coef
    bias[POS] = probe.intercept
    return kernel, bias
