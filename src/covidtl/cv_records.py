"""A `covidtl cv` run's folder: the one code that writes its record files and reads them back.

    cv/<dataset>/<cell>/fold-<k>/        a fold: its split.csv and its cell (model, metrics, predictions)
    cv/<dataset>/<cell>/folds.csv        one row per fold: its figures with intervals
    cv/<dataset>/<cell>/predictions.csv  every image, scored by the fold that held it out
    cv/<dataset>/<cell>/summary.json     across folds, pooled and per patient; written last: the record
    cv/<dataset>/<cell>/probe/           `covidtl probe --cv`'s files (probe.json: its verdict)

Written by cv; read by the ensemble (a cv run's fold models and pooled predictions), the probe
and the results table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from covidtl import paths
from covidtl.cells import CV_PREDICTION_COLUMNS, Cell, read_predictions, write_predictions
from covidtl.errors import UserError
from covidtl.files import atomic_write_text, json_text
from covidtl.scores import Scores

REWRITE = "run the same cv command again to rewrite it"  # the fix for a damaged file of a cv run
SUMMARY_FILE = "summary.json"
FOLDS_FILE = "folds.csv"


@dataclass(frozen=True)
class Fold:
    """fold-<k>/ of a cv run: split.csv, cell/, and with --pretrain pretrain.weights.h5 (+ .json)."""

    dir: Path
    number: int
    of: int

    @property
    def cell(self) -> Cell:
        return Cell(self.dir / "cell")

    @property
    def split_file(self) -> Path:
        return self.dir / "split.csv"

    @property
    def label(self) -> str:
        return f"fold {self.number}/{self.of}"


def probe_dir(out: str | Path) -> Path:
    return Path(out) / "probe"


def write(out: Path, per_fold: pd.DataFrame, pooled: pd.DataFrame, summary: dict[str, Any]) -> None:
    """folds.csv and predictions.csv first, summary.json last: its presence means a complete run."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / FOLDS_FILE, per_fold.to_csv(index=False))
    write_predictions(out / "predictions.csv", pooled, CV_PREDICTION_COLUMNS)
    atomic_write_text(out / SUMMARY_FILE, json_text(summary))


def read_summary(out: str | Path) -> dict[str, Any]:
    """A finished cv run's summary.json, or one line saying it is not one."""
    path = Path(out) / SUMMARY_FILE
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{out}: no summary.json, not a finished `covidtl cv` run; give "
                        "cv/<dataset>/<cell> (or run the same cv command again to finish it)") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable ({exc}); {REWRITE}") from None
    if not isinstance(summary, dict) or "dataset" not in summary:
        raise UserError(f"{path}: not a cv summary (no dataset); {REWRITE}")
    return summary


def read_pooled(out: str | Path) -> pd.DataFrame:
    """Every image (path as stored), its fold and out-of-fold p_covid."""
    return read_predictions(Path(out) / "predictions.csv", REWRITE)


def pooled_scores(pooled: pd.DataFrame) -> Scores:
    """A cv run's out-of-fold predictions (predictions.csv: actual, p_covid, group) as Scores."""
    # Class indices in CLASSES order, as Scores expects them.
    y_index = pooled["actual"].map(paths.CLASSES.index).to_numpy(int)
    return Scores.of(y_index, pooled["p_covid"].to_numpy(float), pooled["group"].astype(str).to_numpy())


def members(out: str | Path) -> list[str]:
    """The fold models of a finished cv run: <dir>/fold-<k>/cell, in fold order."""
    folds = sorted(Path(out).glob("fold-*/cell"), key=lambda p: int(p.parent.name.split("-")[1]))
    if not (Path(out) / SUMMARY_FILE).is_file() or not folds:
        raise UserError(f"--cv {out}: not a finished `covidtl cv` run (no summary.json and "
                        "fold-<k>/cell folders); give cv/<dataset>/<cell>")
    return [str(p) for p in folds]
