"""Patient-grouped, stratified k-fold cross-validation (`covidtl cv`): a recipe judged on every
patient once, not on one test split of a few patients.

The folds are made over groups (a patient's slices, near-duplicates: `data/groups.py`), stratified
by class, from the dataset's whole manifest. Fold k tests its groups with a model trained on the
others; that model's validation groups (stopping, `train.select`, the operating point) are drawn
from its own training folds, so nothing of the test fold steers its training. Each fold is an
ordinary training run (`train.train`, a nested MLflow run) with its own cell folder; anything a
recipe learns from data is fitted inside that run, on its training rows only.

    cv/<dataset>/<cell>/fold-<k>/      the fold's split.csv and its cell (model, metrics, predictions)
    cv/<dataset>/<cell>/folds.csv      one row per fold: its figures with intervals
    cv/<dataset>/<cell>/predictions.csv  every image, scored by the fold that held it out
    cv/<dataset>/<cell>/summary.json   mean, spread and a t interval across folds; pooled figures
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from covidtl import paths, tracking
from covidtl.cells import FINETUNE_PREFIX, PREDICTION_COLUMNS, Cell, cell_name, init_file, is_finetune
from covidtl.config import Config
from covidtl.data import tables
from covidtl.errors import UserError
from covidtl.files import atomic_write_text, json_text
from covidtl.scores import Scores

# The figures summarised across folds (each fold's test split, at 0.5 and at its operating point).
FOLD_METRICS = ("roc_auc", "accuracy", "op_balanced_accuracy", "op_recall_covid", "op_recall_non_covid",
                "ece")

PRETRAINED_FILE = "pretrain.weights.h5"  # cv --pretrain: fold-<k>/pretrain.weights.h5 (+ pretrain.json)


def fold_tables(manifest: pd.DataFrame, folds: int, seed: int, val_share: float) -> list[pd.DataFrame]:
    """`folds` copies of the manifest with a `split` column: each group is `test` in exactly one.

    Within a fold, about `val_share` of the other groups (stratified, whole groups) are `val`."""
    labels, groups = manifest["label"].to_numpy(), manifest["group"].to_numpy()
    n_groups = {label: manifest.loc[manifest["label"] == label, "group"].nunique()
                for label in np.unique(labels)}
    if len(n_groups) < 2 or min(n_groups.values()) < folds:
        raise UserError(f"cv.folds: {folds} folds need at least {folds} groups of each class, the "
                        f"dataset has {n_groups}; use fewer folds (-S cv.folds=N)")
    outer = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    out = []
    for k, (rest, test) in enumerate(outer.split(np.zeros(len(labels)), labels, groups)):
        split = np.full(len(labels), "train", dtype=object)
        split[test] = "test"
        # One inner fold is the validation split: about val_share of the groups, at least one
        # group of each class (few groups: a larger share).
        fewest = min(len(set(groups[rest][labels[rest] == label])) for label in n_groups)
        inner_splits = max(2, min(round(1 / val_share), fewest))
        inner = StratifiedGroupKFold(n_splits=inner_splits, shuffle=True, random_state=seed + 1 + k)
        _, val = next(inner.split(np.zeros(len(rest)), labels[rest], groups[rest]))
        split[rest[val]] = "val"
        table = manifest.copy()
        table["split"] = split
        out.append(table)
    return out


def val_share(cfg: Config) -> float:
    """The validation split's share of the images that are not test, as `split.fractions` has it."""
    fr = cfg.split.fractions
    return fr["val"] / (fr["train"] + fr["val"]) if fr["train"] + fr["val"] > 0 else 0.1


@dataclass
class CVResult:
    out: Path
    folds: pd.DataFrame  # one row per fold
    summary: dict[str, Any]


def pretrained_init(init: str, weights_file: str | Path) -> str:
    """`cv --pretrain`: the fold's own pretrained file, fine-tuned (`--init finetune`, `finetune:...`)
    or as a plain weights file (any other init: a warm start for the custom CNN, a frozen base otherwise)."""
    return f"{FINETUNE_PREFIX}{weights_file}" if is_finetune(init) else str(weights_file)


def cross_validate(
    cfg: Config, model: str, init: str, dataset: str, *, out_root: str | Path | None = None,
    lr: float | None = None, pretrain: bool = False, say: Callable[[str], None] = lambda line: None,
) -> CVResult:
    """Train and test `model` from `init` once per fold; write and log the folds and their summary.
    `pretrain`: first pretrain (SimCLR) on the fold's training rows, and train from that file."""
    import mlflow

    from covidtl import train
    from covidtl.pretrain import check_not_leaking, pretrain as fit_pretrain, resolve_init

    cfg = cfg.with_recipe(model, init)
    if pretrain:  # the fold's file replaces any file the init names (`pretrained`'s is never read)
        init = pretrained_init(init, PRETRAINED_FILE)  # the fold's file, by the name it gets
    else:
        weights_file = init_file(resolve_init(cfg, model, init))
        if weights_file is not None:  # pretraining is fitted to data: a file from another split leaks
            check_not_leaking(weights_file, dataset)
    k = cfg.cv.folds
    out = Path(out_root if out_root is not None else cfg.cv.out) / dataset / cell_name(model, init, dataset, cfg.profile)
    manifest = tables.read_manifest(cfg, dataset)
    folds = fold_tables(manifest, k, cfg.cv.seed, val_share(cfg))
    tracking.use_experiment(dataset)
    rows, predictions = [], []
    with mlflow.start_run(run_name=f"cv {cell_name(model, init, dataset, cfg.profile)}") as parent:
        mlflow.set_tags({**train.run_tags(cfg, model, init, dataset, kind="cv"), "cv_folds": str(k)})
        tracking.log_config(cfg)
        for i, table in enumerate(folds, start=1):
            fold_dir = out / f"fold-{i}"
            split_file = tables.write_split_at(cfg, dataset, table, fold_dir / "split.csv")
            say(f"fold {i}/{k}: {_counts(table)}")
            fold_init = init
            if pretrain:  # on this fold's training rows (and other datasets' training splits) only
                done = fit_pretrain(cfg, model, out=fold_dir / PRETRAINED_FILE,
                                    split_files={dataset: split_file}, nested=True, say=say)
                fold_init = pretrained_init(init, done.weights_file)
            result = train.train(
                cfg, model, fold_init, dataset, lr=lr, run_name=f"fold {i}/{k}", nested=True,
                out_dir=fold_dir / "cell", split_file=split_file, log_model=False,
            )
            fold_predictions = Cell(fold_dir / "cell").read_predictions()
            fold_predictions.insert(0, "fold", i)
            predictions.append(fold_predictions)
            rows.append({"fold": i, "run_id": result.run_id, "epochs_used": result.epochs_used,
                         **{key.removeprefix("test_"): value for key, value in result.metrics.items()}})
            say(f"fold {i}/{k}: AUC {result.metrics.get('test_roc_auc', math.nan):.3f}, "
                f"accuracy {result.metrics.get('test_accuracy', math.nan):.3f}")
        per_fold = pd.DataFrame(rows)
        pooled = pd.concat(predictions, ignore_index=True)
        summary = summarise(cfg, per_fold, pooled, model=model, init=init, dataset=dataset,
                            run_id=parent.info.run_id)
        mlflow.log_metrics({key: value for key, value in _flat(summary).items()
                            if isinstance(value, float) and math.isfinite(value)})
        write(out, per_fold, pooled, summary)
        mlflow.log_artifact(str(out / "summary.json"))
        mlflow.log_artifact(str(out / "folds.csv"))
    return CVResult(out, per_fold, summary)


def summarise(cfg: Config, per_fold: pd.DataFrame, pooled: pd.DataFrame, **about: Any) -> dict[str, Any]:
    """Across folds: mean, standard deviation and a t interval of the mean (the folds as the
    sample); pooled: every out-of-fold prediction at once, with group bootstrap intervals."""
    from scipy import stats as scipy_stats

    across: dict[str, dict[str, float]] = {}
    for name in FOLD_METRICS:
        values = per_fold[name].dropna().to_numpy(float) if name in per_fold else np.zeros(0)
        n = len(values)
        mean = float(values.mean()) if n else math.nan
        sd = float(values.std(ddof=1)) if n > 1 else math.nan
        half = float(scipy_stats.t.ppf(0.5 + cfg.eval.confidence / 2, n - 1) * sd / math.sqrt(n)) if n > 1 else math.nan
        # Every fold metric is a proportion or a score in [0, 1]: so is the interval of its mean
        # (a t interval of 5 folds with sd 0.13 otherwise reads AUC 0.72-1.03).
        across[name] = {"mean": mean, "sd": sd, "ci_low": _clip01(mean - half), "ci_high": _clip01(mean + half),
                        "min": float(values.min()) if n else math.nan,
                        "max": float(values.max()) if n else math.nan, "folds": n}
    scores = pooled_scores(pooled)
    return {
        **about, "folds": int(len(per_fold)), "confidence": cfg.eval.confidence,
        "images": int(len(pooled)), "groups": int(pooled["group"].nunique()),
        "across_folds": across,
        "pooled": scores.summary("pooled", cfg.eval),
    }


def pooled_scores(pooled: pd.DataFrame) -> Scores:
    """A cv run's out-of-fold predictions (predictions.csv: actual, p_covid, group) as Scores."""
    # Class indices in CLASSES order, as Scores expects them.
    y_index = pooled["actual"].map(paths.CLASSES.index).to_numpy(int)
    return Scores.of(y_index, pooled["p_covid"].to_numpy(float), pooled["group"].astype(str).to_numpy())


def _clip01(value: float) -> float:
    return value if math.isnan(value) else min(1.0, max(0.0, value))


def write(out: Path, per_fold: pd.DataFrame, pooled: pd.DataFrame, summary: dict[str, Any]) -> None:
    """folds.csv and predictions.csv first, summary.json last: its presence means a complete run."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "folds.csv", per_fold.to_csv(index=False))
    atomic_write_text(out / "predictions.csv", pooled[["fold", *PREDICTION_COLUMNS]].to_csv(index=False))
    atomic_write_text(out / "summary.json", json_text(summary))


def _counts(table: pd.DataFrame) -> str:
    parts = []
    for split in ("train", "val", "test"):
        rows = table[table["split"] == split]
        parts.append(f"{split} {len(rows)} images / {rows['group'].nunique()} groups")
    return ", ".join(parts)


def _flat(summary: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, values in summary["across_folds"].items():
        for stat in ("mean", "sd", "ci_low", "ci_high"):
            flat[f"cv_{name}_{stat}"] = values[stat]
    flat.update({f"cv_{key}": value for key, value in summary["pooled"].items()})
    return flat

