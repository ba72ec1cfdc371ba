"""The learning curve's protocol: which site images adapt a model, which score it, and how sure a figure is.

A site's patient groups (ingest's `group`: file numbers restart per class, neighbours are one
patient) are split once, by a seed fixed before the first score, into a scoring half and an
adaptation half, class by class, so both halves hold both classes. Every labelled draw of K groups
per class, and the unlabelled pool, come from the adaptation half only; the scoring half is only
ever scored. Pure functions of tables and arrays: no model, no TensorFlow.

The figures' intervals come from a two-level bootstrap: the seeds (which K groups were drawn, how
the method ran) are resampled, then the scoring half's patient groups, so an interval counts both
the luck of the draw and the few patients scored.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from covidtl import stats
from covidtl.errors import UserError
from covidtl.paths import CLASSES

COLUMNS = ("path", "label", "group")  # a site table: one row per image, label a class name
CURVE_METRICS = ("roc_auc", "balanced_accuracy", "ece", "brier")


@dataclass(frozen=True)
class Halves:
    scoring: pd.DataFrame
    adaptation: pd.DataFrame
    seed: int


def split_halves(site: pd.DataFrame, seed: int) -> Halves:
    """The site's groups halved per class by `seed` (the extra group of an odd count goes to scoring)."""
    _check_columns(site)
    scoring = []
    rng = np.random.default_rng(seed)
    for label in CLASSES:
        groups = _groups_of(site, label)
        if len(groups) < 2:
            raise UserError(f"the site holds {len(groups)} {label} patient group(s); halving it into "
                            "a scoring and an adaptation half needs at least 2 per class")
        shuffled = rng.permutation(groups)
        scoring.extend(shuffled[: (len(groups) + 1) // 2])
    in_scoring = site["group"].isin(scoring)
    return Halves(site[in_scoring].reset_index(drop=True), site[~in_scoring].reset_index(drop=True), seed)


def draw_labelled(adaptation: pd.DataFrame, k: int, seed: int) -> pd.DataFrame:
    """K patient groups per class, drawn without replacement from the adaptation half (K = 0: none)."""
    _check_columns(adaptation)
    if k < 0:
        raise UserError(f"K={k}: the number of labelled groups per class cannot be negative")
    rng = np.random.default_rng(seed)
    chosen = []
    for label in CLASSES:
        groups = _groups_of(adaptation, label)
        if k > len(groups):
            raise UserError(f"K={k} groups per class, but the adaptation half holds {len(groups)} {label} "
                            f"groups: choose K <= {len(groups)} (or a larger site)")
        chosen.extend(rng.choice(groups, size=k, replace=False))
    return adaptation[adaptation["group"].isin(chosen)].reset_index(drop=True)


def refuse_leaks(labelled: pd.DataFrame, scoring: pd.DataFrame, key: str = "path") -> None:
    """One line, before anything is adapted, when a labelled image is also in the scoring half."""
    shared = sorted(set(labelled[key]) & set(scoring[key]))
    if shared:
        raise UserError(f"{len(shared)} labelled image(s) are also in the scoring half (first: {shared[0]}): "
                        "refused as a leak; label images of the adaptation half only")


def _check_columns(table: pd.DataFrame) -> None:
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"a site table needs the columns {COLUMNS}; missing {missing}")


def _groups_of(table: pd.DataFrame, label: str) -> np.ndarray:
    # Sorted, so a seed draws the same groups whatever order the table's rows came in.
    return np.sort(table.loc[table["label"] == label, "group"].astype(str).unique())


# --------------------------------------------------------------------------- scoring, two-level bootstrap


@dataclass(frozen=True)
class SeedScores:
    """One seed's adapted model on the scoring half: COVID probabilities and its operating threshold."""

    p_covid: np.ndarray
    threshold: float


@dataclass(frozen=True)
class CurvePoint:
    """A method at one K: each metric's mean over seeds and its two-level bootstrap interval."""

    k: int
    seeds: int
    mean: dict[str, float]
    interval: dict[str, tuple[float, float]]


def class_indices(scoring: pd.DataFrame) -> np.ndarray:
    """The scoring half's labels as class indices (CLASSES order), as covidtl.stats takes them."""
    return np.array([CLASSES.index(label) for label in scoring["label"]])


def curve_point(k: int, y: np.ndarray, groups, seeds: list[SeedScores], *, resamples: int = 2000,
                confidence: float = 0.95, seed: int = 0, bins: int = 10) -> CurvePoint:
    """Mean over seeds of AUC, balanced accuracy (each seed at its own threshold), ECE and Brier, with
    the percentile interval of a bootstrap that resamples seeds, then the scoring half's groups."""
    if not seeds:
        raise ValueError("a curve point needs at least one seed's scores")
    y = np.asarray(y)
    group_index = np.unique(np.asarray(groups).astype(str), return_inverse=True)[1].ravel()
    n_groups = int(group_index.max()) + 1
    per_seed = [stats.weighted_metrics(y, s.p_covid, np.ones((1, y.size)), s.threshold, bins) for s in seeds]
    mean = {m: float(np.mean([v[m][0] for v in per_seed])) for m in CURVE_METRICS}

    rng = np.random.default_rng(seed)
    drawn_seeds = rng.integers(0, len(seeds), size=(resamples, len(seeds)))
    weights = rng.multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=resamples)[:, group_index]
    weights = weights.astype(float)
    # Each seed scored under every group resample; a replicate averages its drawn seeds' rows.
    by_seed = [stats.weighted_metrics(y, s.p_covid, weights, s.threshold, bins) for s in seeds]
    interval = {}
    for m in CURVE_METRICS:
        table = np.stack([v[m] for v in by_seed])  # (seeds, resamples)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a replicate whose every seed is NaN
            replicate = np.nanmean(table[drawn_seeds.T, np.arange(resamples)], axis=0)
        interval[m] = stats.percentile_interval(replicate, confidence)
    return CurvePoint(k, len(seeds), mean, interval)
