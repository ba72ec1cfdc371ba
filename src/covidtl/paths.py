"""Where each stage reads and writes, and how a file's path is stored in a table (relative to its
dataset's root): one place, so stages never guess each other's files. Also the classes' order and
the one reading of p(COVID) out of the softmax."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

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


def relative_to_root(path: str | Path, root: Path) -> str:
    """A path as stored (tables, predictions.csv): POSIX, relative to root; one outside root stays absolute."""
    absolute, base = Path(os.path.abspath(path)), Path(os.path.abspath(root))
    if absolute.is_relative_to(base):
        return absolute.relative_to(base).as_posix()
    real, real_base = absolute.resolve(), base.resolve()  # one of them reached through a symlink
    if real.is_relative_to(real_base):
        return real.relative_to(real_base).as_posix()
    return str(absolute)


def usable_path(stored: str, root: Path) -> str:
    """A stored path as one that opens: root joined; an absolute one (an older table) as it is."""
    if Path(stored).is_absolute():
        return stored
    return os.path.abspath(Path(root) / PurePosixPath(stored))


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

