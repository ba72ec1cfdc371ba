"""One model's predictions on one set of images, and every figure reported about them.

Point metrics at 0.5 and at the model's operating point, each with a group (patient) bootstrap
interval (`covidtl.stats`), Brier score and calibration error. Used wherever a model is scored:
training's test split, `covidtl evaluate`, the external test sets and the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidtl import stats
from covidtl.cells import PREDICTION_COLUMNS, SCORE_COLUMNS
from covidtl.config import EvalConfig
from covidtl.paths import CLASSES, POSITIVE_INDEX, relative_to_root

# The metrics also reported at the operating point (threshold chosen on the validation split).
AT_OPERATING_POINT = (
    "accuracy", "balanced_accuracy", "recall_covid", "recall_non_covid", "precision_covid", "f1_covid",
)
DEFAULT_THRESHOLD = 0.5


@dataclass
class Scores:
    y_true: np.ndarray  # class indices in CLASSES order
    p_covid: np.ndarray
    groups: np.ndarray | None = None  # patient groups: what the bootstrap resamples

    @classmethod
    def of(cls, y_true, prob, groups=None) -> Scores:
        y, p = stats.covid_probability(y_true, prob)
        if groups is not None and len(groups) != len(y):
            groups = None  # a file dropped at decode time: images stand alone rather than misalign
        return cls(y, p, None if groups is None else np.asarray(groups))

    def __len__(self) -> int:
        return len(self.y_true)

    def predicted(self, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
        return np.where(self.p_covid >= threshold, POSITIVE_INDEX, 1 - POSITIVE_INDEX)

    def point(self, threshold: float = DEFAULT_THRESHOLD) -> dict[str, float]:
        return {**stats.metrics_at(self.y_true, self.p_covid, threshold),
                "brier": stats.brier(self.y_true, self.p_covid)}

    def summary(
        self, prefix: str, cfg: EvalConfig, operating_threshold: float | None = None
    ) -> dict[str, float]:
        """Flat `<prefix>_<metric>` values with `_ci_low` / `_ci_high`, and `<prefix>_op_*` at
        the operating point; `<prefix>_ece` and `<prefix>_images`."""
        out: dict[str, float] = {}
        levels = [("", DEFAULT_THRESHOLD, stats.METRICS)]
        if operating_threshold is not None:
            levels.append(("op_", operating_threshold, AT_OPERATING_POINT))
        for tag, threshold, names in levels:
            point = self.point(threshold)
            intervals = self.intervals(cfg, threshold)
            for name in names:
                out[f"{prefix}_{tag}{name}"] = point[name]
                if name in intervals:
                    low, high = intervals[name]
                    out[f"{prefix}_{tag}{name}_ci_low"] = low
                    out[f"{prefix}_{tag}{name}_ci_high"] = high
        out[f"{prefix}_ece"] = stats.reliability(self.y_true, self.p_covid).ece
        out[f"{prefix}_images"] = float(len(self))
        return out

    def intervals(self, cfg: EvalConfig, threshold: float = DEFAULT_THRESHOLD) -> dict[str, tuple[float, float]]:
        if not cfg.bootstrap:
            return {}
        return stats.bootstrap_intervals(
            self.y_true, self.p_covid, self.groups, resamples=cfg.bootstrap,
            confidence=cfg.confidence, seed=cfg.seed, threshold=threshold,
        )


@dataclass
class Scored:
    """A model's outputs on a table of images, aligned row by row: training's test split,
    `covidtl evaluate`, an ensemble's splits, an external set."""

    rows: pd.DataFrame  # the images scored, in prediction order (unreadable files dropped)
    scores: Scores
    image_size: int | None = None  # the input size the model scored them at, where known

    @classmethod
    def of(cls, rows: pd.DataFrame, y_true, prob, image_size: int | None = None) -> Scored:
        """From class indices and softmax outputs; the rows' patient groups go to the bootstrap."""
        if not len(y_true):  # nothing decoded: the caller says so in its own words
            return cls(rows, Scores(np.zeros(0, dtype=int), np.zeros(0)), image_size)
        groups = rows["group"].astype(str).to_numpy() if "group" in rows else None
        return cls(rows, Scores.of(y_true, prob, groups), image_size)

    def predictions(self, root: Path | None = None) -> pd.DataFrame:
        """predictions.csv's rows (`covidtl.cells`): the truth, the call at 0.5 and p_covid per image;
        given the dataset's `root`, first each image's path (relative to it) and its group."""
        frame = pd.DataFrame({
            "actual": [CLASSES[t] for t in self.scores.y_true],
            "predicted": [CLASSES[c] for c in self.scores.predicted()],
            "p_covid": self.scores.p_covid,
        })
        if root is None:
            return frame[list(SCORE_COLUMNS)]
        # Row by row while both last (a file dropped at decode time leaves fewer scores than rows).
        n = min(len(frame), len(self.rows))
        rows = self.rows.iloc[:n]
        return frame.iloc[:n].assign(
            path=[relative_to_root(p, root) for p in rows["path"]],
            group=rows["group"].to_numpy() if "group" in rows else [""] * n,
        )[list(PREDICTION_COLUMNS)]


def with_interval(value, low, high) -> str:
    """'0.750 [0.610, 0.860]'; '[n/a]' where the metric is undefined in most resamples."""
    def missing(x) -> bool:
        return x is None or (isinstance(x, float) and np.isnan(x))

    if missing(value):
        return "—"
    return f"{value:.3f} [n/a]" if missing(low) or missing(high) else f"{value:.3f} [{low:.3f}, {high:.3f}]"


def choose_operating_point(scores: Scores | None, rule: str) -> dict[str, Any]:
    """The threshold `rule` picks on the validation split, or 0.5 where it cannot (one class)."""
    if scores is None or len(np.unique(scores.y_true)) < 2:
        return {"rule": rule, "threshold": DEFAULT_THRESHOLD, "chosen_on": "none: validation split "
                "lacks a class, 0.5 kept"}
    threshold = stats.operating_point(scores.y_true, scores.p_covid, rule)
    return {"rule": rule, "threshold": float(threshold), "chosen_on": "validation"}
