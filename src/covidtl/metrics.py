"""A scored set's confusion matrix and classification report, with scikit-learn (both at one
call per image). The metrics themselves, with their intervals, are `covidtl.stats`'.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from covidtl.paths import CLASSES


def confusion(y_true: np.ndarray, y_pred: np.ndarray) -> list[list[int]]:
    """Rows = actual, columns = predicted, both in CLASSES order."""
    return skm.confusion_matrix(y_true, y_pred, labels=list(range(len(CLASSES)))).tolist()


def report_text(y_true: np.ndarray, y_pred: np.ndarray) -> str:
    return skm.classification_report(
        y_true, y_pred, labels=list(range(len(CLASSES))), target_names=list(CLASSES),
        digits=4, zero_division=0,
    )
