"""Test metrics with scikit-learn: per class, micro and macro averages, accuracy, ROC AUC, confusion.

For one label per image and two classes, micro-averaged recall, precision and F1 all equal the
accuracy (every error is one false positive for one class and one false negative for the other).
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from covidtl.paths import CLASSES, POSITIVE


def classification_metrics(y_true: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """Flat `test_`-less metric dict from class indices and (n, 2) softmax outputs."""
    y_true = np.asarray(y_true, dtype=int)
    prob = np.asarray(prob, dtype=float)
    y_pred = prob.argmax(axis=1)
    labels = list(range(len(CLASSES)))
    out: dict[str, float] = {"accuracy": float(skm.accuracy_score(y_true, y_pred))}
    precision, recall, f1, _ = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    for i, name in enumerate(CLASSES):
        out[f"recall_{name}"] = float(recall[i])
        out[f"precision_{name}"] = float(precision[i])
        out[f"f1_{name}"] = float(f1[i])
    for average in ("micro", "macro"):
        p, r, f, _ = skm.precision_recall_fscore_support(
            y_true, y_pred, labels=labels, average=average, zero_division=0
        )
        out[f"recall_{average}"], out[f"precision_{average}"], out[f"f1_{average}"] = (
            float(r), float(p), float(f),
        )
    positive = CLASSES.index(POSITIVE)
    # AUC is undefined when the scored set holds one class only; NaN says so honestly.
    if len(np.unique(y_true)) == 2:
        out["roc_auc"] = float(skm.roc_auc_score(y_true == positive, prob[:, positive]))
    else:
        out["roc_auc"] = float("nan")
    return out


def confusion(y_true: np.ndarray, y_pred: np.ndarray) -> list[list[int]]:
    """Rows = actual, columns = predicted, both in CLASSES order."""
    return skm.confusion_matrix(y_true, y_pred, labels=list(range(len(CLASSES)))).tolist()


def report_text(y_true: np.ndarray, y_pred: np.ndarray) -> str:
    return skm.classification_report(
        y_true, y_pred, labels=list(range(len(CLASSES))), target_names=list(CLASSES),
        digits=4, zero_division=0,
    )
