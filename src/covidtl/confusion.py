"""A scored set's confusion matrix (its numbers and its drawing) and classification report, with
scikit-learn, at one call per image. The metrics themselves, with their intervals, are
`covidtl.stats`'.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from covidtl.paths import CLASSES


def confusion(y_true: np.ndarray, y_pred: np.ndarray) -> list[list[int]]:
    """Rows = actual, columns = predicted, both in CLASSES order."""
    return skm.confusion_matrix(y_true, y_pred, labels=list(range(len(CLASSES)))).tolist()


def draw_confusion(ax, matrix, labels=CLASSES) -> None:
    """A confusion matrix (rows = actual, columns = predicted, in `labels`' order) drawn on `ax`
    by scikit-learn's ConfusionMatrixDisplay: counts on a blue scale from 0, no colour bar."""
    skm.ConfusionMatrixDisplay(np.asarray(matrix), display_labels=list(labels)).plot(
        ax=ax, cmap="Blues", colorbar=False, values_format="d", im_kw={"vmin": 0})


def report_text(y_true: np.ndarray, y_pred: np.ndarray) -> str:
    return skm.classification_report(
        y_true, y_pred, labels=list(range(len(CLASSES))), target_names=list(CLASSES),
        digits=4, zero_division=0,
    )
