"""The images a learning curve scores: the site's scoring half (and the source's home test split),
decoded once, the way `covidtl evaluate` decodes them, and scored by every adapted model.

Nothing here adapts: the adaptation methods and `site.site_data` never see these images, and this
module reads them through the data pipeline alone, so a spy on the decode can tell the two apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import pandas as pd

from covidtl import stats
from covidtl.adapt.features import BodyFeatures, model_p_covid
from covidtl.adapt.protocol import CURVE_METRICS
from covidtl.data.pipeline import make_dataset
from covidtl.errors import UserError
from covidtl.models.registry import get_spec
from covidtl.trained import LoadedModel, scoring_config


@dataclass(frozen=True)
class ScoringSet:
    name: str  # "scoring half" or "home test split of <dataset>"
    x: np.ndarray  # model inputs, preprocessed as the source model was trained
    y: np.ndarray  # class indices in CLASSES order
    groups: np.ndarray  # patient groups: the bootstrap's second level

    @classmethod
    def decode(cls, cfg, loaded: LoadedModel, rows: pd.DataFrame, name: str, batch_size: int) -> ScoringSet:
        """rows (path, label, group) decoded at the source model's input size and preprocessing."""
        side = int(loaded.model.input_shape[1])
        ds = make_dataset(rows, get_spec(loaded.name), scoring_config(cfg, loaded), side, training=False,
                          batch_size=batch_size)
        xs, ys = zip(*((np.asarray(x), np.asarray(y).argmax(axis=1)) for x, y in ds)) if len(rows) else ((), ())
        if sum(len(y) for y in ys) != len(rows):
            # A file that passed ingest's check but not the decode was dropped: rows no longer align.
            raise UserError(f"the {name}: {len(rows) - sum(len(y) for y in ys)} of {len(rows)} images could "
                            "not be decoded; run `covidtl ingest` on their folder to find and quarantine them")
        return cls(name, np.concatenate(xs), np.concatenate(ys), rows["group"].astype(str).to_numpy())

    def p_covid(self, model: keras.Model, batch_size: int, features: BodyFeatures | None = None) -> np.ndarray:
        """p(COVID) of each image by `model`, in inference mode (BatchNorm on its moving statistics);
        on the source's stored base features where `model`'s base is the source's own."""
        return model_p_covid(model, self.x, batch_size, features)

    def metrics(self, p: np.ndarray, threshold: float) -> dict[str, float]:
        """AUC, balanced accuracy at `threshold`, ECE and Brier score of one model's p(COVID)."""
        scored = stats.weighted_metrics(self.y, p, np.ones((1, len(self.y))), threshold)
        return {name: float(scored[name][0]) for name in CURVE_METRICS}
