"""Where each stage reads and writes: one place, so stages never guess each other's files."""

from __future__ import annotations

from pathlib import Path

from covidtl.config import Config

# Class index order of the two-unit softmax head; COVID is the positive class.
CLASSES = ("non_covid", "covid")
POSITIVE = "covid"
POSITIVE_INDEX = CLASSES.index(POSITIVE)


def p_covid(probabilities):
    """p(COVID) out of softmax outputs in CLASSES order, the one place that reads it: (n, 2) rows
    give (n,), one image's (2,) its value. Any array indexed like NumPy's (a TensorFlow or Keras
    tensor too: training's AUC reads its one-hot labels' COVID column the same way)."""
    return probabilities[..., POSITIVE_INDEX]


def dataset_dir(cfg: Config, dataset: str) -> Path:
    return Path(cfg.data.workdir) / dataset


def manifest_path(cfg: Config, dataset: str) -> Path:
    return dataset_dir(cfg, dataset) / "manifest.csv"


def quarantine_path(cfg: Config, dataset: str) -> Path:
    return dataset_dir(cfg, dataset) / "quarantine.csv"


def split_path(cfg: Config, dataset: str) -> Path:
    return dataset_dir(cfg, dataset) / "split.csv"


def leakage_path(cfg: Config, dataset: str) -> Path:
    return dataset_dir(cfg, dataset) / "leakage.json"


def augmented_dir(cfg: Config, dataset: str) -> Path:
    return dataset_dir(cfg, dataset) / "augmented"

