"""A labelled method's settings chosen inside K: on the K labelled groups alone, by grouped folds.

The learning curve's protocol lets a method tune only on what it is given. For `head` and
`head_bn` the learning rate and number of epochs matter most (at the first curve's 1e-4 x 5 epochs
the head barely moved), so each (rate, epochs) pair of params.yaml's grid is fitted on all but one
fold of the labelled patient groups and scored on the held-out fold. The pair with the lowest
out-of-fold cross-entropy (a proper scoring rule: it rewards ranking and calibration together)
wins; ties go to the smaller step budget. A fold holds whole patient groups and, where the groups
allow, both classes. At K = 1 (one group per class) no fold can train on both classes and score
a held-out patient: the committed `learning_rate` and `epochs` are used and the record says so.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from dataclasses import dataclass
from typing import Callable

import keras
import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from covidtl.adapt.features import model_p_covid
from covidtl.adapt.settings import AdaptSettings
from covidtl.adapt.site import Labelled, SiteData
from covidtl.paths import POSITIVE_INDEX as POS

log = logging.getLogger(__name__)
Apply = Callable[[keras.Model, SiteData, AdaptSettings, int], keras.Model]


@dataclass(frozen=True)
class Choice:
    settings: AdaptSettings  # the settings the method then runs with on all K groups
    tuned: bool
    why: str  # the winner and its score, or why no tuning ran
    scores: dict[str, float]  # "lr=...,epochs=..." -> out-of-fold cross-entropy

    def as_params(self) -> dict:
        return {"tuned": self.tuned, "tuned_learning_rate": self.settings.learning_rate,
                "tuned_epochs": self.settings.epochs}


def grouped_folds(labelled: Labelled, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Train/held-out rows by patient group, each training side holding both classes; [] where
    the groups cannot give two such folds."""
    per_class = min(len(set(labelled.groups[labelled.y == c])) for c in np.unique(labelled.y))
    if len(np.unique(labelled.y)) < 2 or per_class < 2:
        return []
    splitter = StratifiedGroupKFold(n_splits=min(folds, per_class), shuffle=True, random_state=seed)
    found = list(splitter.split(np.zeros((len(labelled.y), 1)), labelled.y, labelled.groups))
    return found if all(len(np.unique(labelled.y[train])) == 2 for train, _ in found) else []


def cross_entropy(y: np.ndarray, p_covid: np.ndarray) -> float:
    p = np.clip(p_covid, 1e-7, 1 - 1e-7)
    positive = y == POS
    return float(-np.mean(np.where(positive, np.log(p), np.log(1 - p))))


def choose(apply: Apply, model: keras.Model, site: SiteData, settings: AdaptSettings, seed: int,
           name: str) -> Choice:
    """The grid's best (learning rate, epochs) for `apply` on site.labelled, by grouped folds."""
    grid = list(itertools.product(settings.tune_learning_rates, settings.tune_epochs))
    if not grid:
        return Choice(settings, False, "no grid (adapt.tune_learning_rates / tune_epochs empty)", {})
    labelled = site.labelled
    folds = grouped_folds(labelled, settings.tune_folds, seed)
    if not folds:
        return Choice(settings, False, "too few labelled groups per class for grouped folds (K = 1): "
                      f"learning_rate {settings.learning_rate}, epochs {settings.epochs}", {})
    scores = {}
    for rate, epochs in grid:
        candidate = dataclasses.replace(settings, learning_rate=float(rate), epochs=int(epochs))
        p = np.empty(len(labelled.y))
        for train, held in folds:
            part = Labelled(labelled.x[train], labelled.y[train], labelled.groups[train])
            fitted = apply(model, dataclasses.replace(site, labelled=part), candidate, seed)
            p[held] = model_p_covid(fitted, labelled.x[held], settings.batch_size, site.features)
        scores[f"lr={rate:g},epochs={epochs}"] = cross_entropy(labelled.y, p)
    (rate, epochs), best = min(zip(grid, scores.values()), key=lambda item: (item[1], item[0][0] * item[0][1]))
    chosen = dataclasses.replace(settings, learning_rate=float(rate), epochs=int(epochs))
    why = f"lr {rate:g}, {epochs} epochs: out-of-fold cross-entropy {best:.3f} over {len(folds)} grouped folds"
    log.info("adapt %s: tuned inside K: %s", name, why)
    return Choice(chosen, True, why, scores)
