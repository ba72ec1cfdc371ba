"""Which differences between the study's models are real: paired tests on the same test images.

Two cells of one dataset are compared on the images both scored (their predictions.csv, joined on
the image path), resampling the same patient groups for both (`stats.paired_difference`), with
DeLong's test for AUC, and a Holm correction across every comparison shown. The pairs are the
paper's questions: each model against the custom CNN (same init), and each pre-trained init
against random weights (same model).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from covidtl import stats
from covidtl.config import EvalConfig
from covidtl.paths import CLASSES

BASELINE_MODEL = "custom_cnn"
BASELINE_INIT = "random"
ALPHA = 0.05
COLUMNS = [
    "dataset", "a", "b", "question", "images", "metric", "a_value", "b_value", "difference",
    "ci_low", "ci_high", "p_value", "p_holm", "distinguishable", "test",
]


@dataclass(frozen=True)
class CellPredictions:
    """One cell's test predictions, as the report reads them."""

    dataset: str
    model: str
    init: str
    predictions: pd.DataFrame  # path, group, actual, p_covid

    @property
    def name(self) -> str:
        return f"{self.model}-{self.init}"


def pairs(cells: list[CellPredictions]) -> list[tuple[CellPredictions, CellPredictions, str]]:
    """(a, b, question) for each comparison the paper's claims need, within one dataset."""
    by_key = {(c.dataset, c.model, c.init): c for c in cells}
    out = []
    for c in cells:
        base = by_key.get((c.dataset, BASELINE_MODEL, c.init))
        if c.model != BASELINE_MODEL and base is not None:
            out.append((c, base, f"{c.model} vs the custom CNN ({c.init})"))
        scratch = by_key.get((c.dataset, c.model, BASELINE_INIT))
        if c.init != BASELINE_INIT and scratch is not None:
            out.append((c, scratch, f"{c.init} vs random weights ({c.model})"))
    return out


@dataclass(frozen=True)
class Paired:
    """Two models' predictions on the images both scored, joined on the image path."""

    joined: pd.DataFrame  # every column of each, suffixed _a and _b
    y: np.ndarray  # class indices in CLASSES order
    pa: np.ndarray
    pb: np.ndarray
    groups: np.ndarray | None  # patient groups: what the paired bootstrap resamples


def paired(a: pd.DataFrame, b: pd.DataFrame) -> Paired:
    """Predictions (path, group, actual, p_covid) of two models, on the paths both hold."""
    joined = a.merge(b, on="path", suffixes=("_a", "_b"))
    y = joined["actual_a"].map({name: i for i, name in enumerate(CLASSES)}).to_numpy()
    groups = joined["group_a"].astype(str).to_numpy() if "group_a" in joined else None
    return Paired(joined, y, joined["p_covid_a"].to_numpy(float), joined["p_covid_b"].to_numpy(float), groups)


def resamples(cfg: EvalConfig) -> int:
    return cfg.bootstrap or 2000  # a comparison without an interval says nothing


def compare(a: CellPredictions, b: CellPredictions, question: str, cfg: EvalConfig) -> list[dict]:
    """Accuracy (paired bootstrap) and ROC AUC (DeLong, bootstrap interval) of a minus b."""
    both = paired(a.predictions, b.predictions)
    if both.joined.empty:
        return []
    joined, y, pa, pb, groups = both.joined, both.y, both.pa, both.pb, both.groups
    rows = []
    for metric in ("accuracy", "roc_auc"):
        if metric == "roc_auc" and len(np.unique(y)) < 2:
            continue
        diff = stats.paired_difference(y, pa, pb, groups, metric=metric, resamples=resamples(cfg),
                                       confidence=cfg.confidence, seed=cfg.seed)
        p_value, test = diff.p_value, "paired group bootstrap"
        if metric == "roc_auc":
            p_value, test = stats.delong_test(y, pa, pb).p_value, "DeLong"
        values = [stats.metrics_at(y, p)[metric] for p in (pa, pb)]
        rows.append({
            "dataset": a.dataset, "a": a.name, "b": b.name, "question": question,
            "images": len(joined), "metric": metric, "a_value": values[0], "b_value": values[1],
            "difference": diff.difference, "ci_low": diff.low, "ci_high": diff.high,
            "p_value": p_value, "test": test,
        })
    return rows


def comparison_table(cells: list[CellPredictions], cfg: EvalConfig) -> pd.DataFrame:
    """Every comparison, Holm-adjusted across all of them."""
    rows = [row for a, b, question in pairs(cells) for row in compare(a, b, question, cfg)]
    table = pd.DataFrame(rows, columns=COLUMNS)
    if not table.empty:
        table["p_holm"] = stats.holm(table["p_value"].to_numpy(float))
        table["distinguishable"] = table["p_holm"] < ALPHA
    return table


def in_words(row: pd.Series) -> str:
    """One sentence a reader can act on."""
    if pd.isna(row["p_holm"]):
        verdict = "cannot be tested on these images (the test is undefined: too few of them)"
    elif row["distinguishable"]:
        verdict = "distinguishable from zero"
    else:
        verdict = "not distinguishable from zero"
    interval = ("no interval" if pd.isna(row["ci_low"])
                else f"[{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]")
    return (f"{row['dataset']}: {row['question']}: {row['metric']} {row['a_value']:.3f} vs "
            f"{row['b_value']:.3f}, difference {row['difference']:+.3f} {interval} on "
            f"{row['images']} images — {verdict} ({row['test']}, Holm-adjusted p = {row['p_holm']:.3g}).")
