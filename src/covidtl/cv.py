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
    cv/<dataset>/<cell>/cv_state.json  the parent MLflow run and a digest of the settings it ran

The same command again (after a kill, say) reuses each fold whose cell finished with the same
settings (its metrics.json digest), continues a fold's interrupted training from its checkpoint,
and records it all in the same parent run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from scipy import stats as scipy_stats
from sklearn.model_selection import StratifiedGroupKFold

from covidtl import locks, paths, tracking, train
from covidtl.cells import Cell, cell_name
from covidtl.config import Config
# The run folder's record files are cv_records'; read_summary, write and REWRITE keep their names here.
from covidtl.cv_records import (  # noqa: F401 - re-exported
    FOLDS_FILE,
    REWRITE,
    SUMMARY_FILE,
    Fold,
    pooled_scores,
    probe_dir,
    read_summary,
    write,
)
from covidtl.data import tables
from covidtl.errors import UserError
from covidtl.files import atomic_write_text, file_sha256, json_text
from covidtl.inits import Init
from covidtl.pretrain import check_not_leaking, pretrain as fit_pretrain, resolve_init, reuse_problem
from covidtl.scores import Scores

# The figures summarised across folds (each fold's test split, at 0.5 and at its operating point).
FOLD_METRICS = ("roc_auc", "accuracy", "op_accuracy", "op_balanced_accuracy", "op_recall_covid",
                "op_recall_non_covid", "ece")

log = logging.getLogger(__name__)

# A frozen base's feature entries per fold (metrics.json): computed here, or read from earlier folds/runs.
FEATURE_COUNTS = ("feature_entries_computed", "feature_entries_read")
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


def pretrained_init(init: Init, weights_file: str | Path) -> Init:
    """`cv --pretrain`: the fold's own pretrained file, fine-tuned (`--init finetune`, `finetune:...`)
    or as a plain weights file (any other init: a warm start for the custom CNN, a frozen base otherwise)."""
    return init.with_file(str(weights_file))


def cross_validate(
    cfg: Config, model: str, init: Init | str, dataset: str, *, out_root: str | Path | None = None,
    lr: float | None = None, pretrain: bool = False, command: str | None = None,
) -> CVResult:
    """Train and test `model` from `init` once per fold; write and log the folds and their summary.
    `pretrain`: first pretrain (SimCLR) on the fold's training rows, and train from that file.
    `command`: the command line that ran it, recorded in the summary (a results table prints it).

    Run again with the same settings, it reuses every finished fold and continues the one a kill
    cut short (from its epoch checkpoint), inside the same parent MLflow run."""
    init = Init.of(init)
    cfg = cfg.with_recipe(model, init.text)
    if pretrain:  # the fold's file replaces any file the init names (`pretrained`'s is never read)
        init = pretrained_init(init, PRETRAINED_FILE)  # the fold's file, by the name it gets
    else:
        weights_file = resolve_init(cfg, model, init).file
        if weights_file is not None:  # pretraining is fitted to data: a file from another split leaks
            check_not_leaking(weights_file, dataset)
    k = cfg.cv.folds
    name = cell_name(model, init, dataset, cfg.profile)
    out = Path(out_root if out_root is not None else cfg.cv.out) / dataset / name
    manifest = tables.read_manifest(cfg, dataset)
    folds = fold_tables(manifest, k, cfg.cv.seed, val_share(cfg))
    tracking.use_experiment(dataset)
    rows, predictions = [], []
    with (locks.hold(out, "covidtl cv"),  # before cv_state.json is read: one cv per folder
          parent_run(out, cv_digest(cfg, model, init, dataset, lr), f"cv {name}") as parent):
        mlflow.set_tags({**train.run_tags(cfg, model, init, dataset, kind="cv"), "cv_folds": str(k)})
        tracking.log_config(cfg)
        for i, table in enumerate(folds, start=1):
            fold = Fold(out / f"fold-{i}", i, k)
            row = run_fold(cfg, model, init, dataset, fold, table, lr=lr, pretrain=pretrain)
            fold_predictions = fold.cell.read_predictions()
            fold_predictions.insert(0, "fold", i)
            predictions.append(fold_predictions)
            rows.append(row)
            log.info(f"fold {i}/{k}: AUC {row.get('roc_auc', math.nan):.3f}, "
                     f"accuracy {row.get('accuracy', math.nan):.3f}")
        per_fold = pd.DataFrame(rows)
        pooled = pd.concat(predictions, ignore_index=True)
        summary = summarise(cfg, per_fold, pooled, model=model, init=init.text, dataset=dataset, cell=name,
                            profile=cfg.profile, run_id=parent.info.run_id, command=command)
        mlflow.log_metrics({key: value for key, value in _flat(summary).items()
                            if isinstance(value, float) and math.isfinite(value)})
        write(out, per_fold, pooled, summary)
        mlflow.log_artifact(str(out / SUMMARY_FILE))
        mlflow.log_artifact(str(out / FOLDS_FILE))
    return CVResult(out, per_fold, summary)


# --------------------------------------------------------------------------- resuming


STATE_FILE = "cv_state.json"  # cv/<dataset>/<cell>/cv_state.json: the parent run and its settings
COST_FILE = "cost.json"  # fold-<k>/cost.json: what the fold cost (FoldClock)


def cv_digest(cfg: Config, model: str, init: Init, dataset: str, lr: float | None) -> str:
    """What must not change for a rerun to continue the same parent run: the settings and data."""
    parts = [tracking.settings_yaml(cfg), model, init.text, dataset, repr(lr),
             file_sha256(paths.manifest_path(cfg, dataset))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def parent_run(out: Path, digest: str, run_name: str):
    """The parent MLflow run: the one cv_state.json names when it ran these settings, else a new
    one, recorded there (so one parent holds each fold once, across kills)."""
    state_file = out / STATE_FILE
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        state = {}
    if state.get("digest") == digest and state.get("run_id"):
        try:
            run = mlflow.start_run(run_id=state["run_id"])
        except MlflowException as exc:
            raise UserError(
                f"{state_file}: its run {state['run_id']} cannot be continued in {mlflow.get_tracking_uri()} "
                f"({str(exc).splitlines()[0][:200]}); use the tracking URI it ran in, or delete "
                f"{state_file} to start a new parent run") from None
        log.info(f"cv: continuing run {state['run_id']} ({state_file})")
        return run
    run = mlflow.start_run(run_name=run_name)
    atomic_write_text(state_file, json_text({"run_id": run.info.run_id, "digest": digest}))
    return run




def run_fold(
    cfg: Config, model: str, init: Init, dataset: str, fold: Fold, table: pd.DataFrame, *,
    lr: float | None, pretrain: bool,
) -> dict[str, Any]:
    """One fold's figures: read back from its cell when it finished with these settings before,
    else after (pretraining and) training it; a checkpoint of these settings is continued."""
    split_file = tables.write_split_at(cfg, dataset, table, fold.split_file)
    fold_init = pretrained_init(init, fold.dir / PRETRAINED_FILE) if pretrain else init
    plan = train.plan_run(cfg, model, fold_init, dataset, lr=lr, out_dir=fold.cell.dir, split_file=split_file)
    digest = train.run_digest(plan)  # what the fold's metrics.json and checkpoint record
    pretrain_problem = (reuse_problem(cfg, model, fold.dir / PRETRAINED_FILE, {dataset: split_file})
                        if pretrain else None)
    done = fold.cell.read_metrics() or {}
    if done.get("status") == "ok" and done.get("digest") == digest and pretrain_problem is None:
        log.info(f"{fold.label}: done before (run {done.get('run_id')}), reused")
        return {**fold_figures(fold), **FoldClock(fold, digest).recorded()}
    log.info(f"{fold.label}: {_counts(table)}")
    shutil.rmtree(probe_dir(fold.dir.parent), ignore_errors=True)  # `probe --cv` judged the models replaced
    clock = FoldClock(fold, digest)
    restart = False
    if pretrain:  # on this fold's training rows (and other datasets' training splits) only
        if pretrain_problem is None:
            log.info(f"{fold.label}: {PRETRAINED_FILE} made from this split and these params before, reused")
        else:
            log.info(f"{fold.label}: pretraining ({pretrain_problem})")
            fit_pretrain(cfg, model, out=fold.dir / PRETRAINED_FILE, split_files={dataset: split_file},
                         nested=True)
            clock.save()
            restart = True  # a checkpoint trained from the file it replaced is no start
    if _other_checkpoint(fold.cell, digest):
        log.info(f"{fold.label}: {fold.cell.checkpoint_dir} holds a run of other settings; training anew")
        restart = True
    train.train(plan, train.RunOptions(run_name=fold.label, nested=True, log_model=False, restart=restart,
                                       extra_callbacks=(clock.callback(),)))
    return {**fold_figures(fold), **clock.save(complete=True)}


class FoldClock:
    """Wall and CPU seconds (time.perf_counter, time.process_time) of a fold's pretraining and
    training, in fold-<k>/cost.json as they accrue (after each epoch): a rerun that continues the
    fold adds to what a kill left (losing at most the epoch it cut), a reused fold keeps them."""

    def __init__(self, fold: Fold, digest: str):
        self.file = fold.dir / COST_FILE
        self.digest = digest
        try:
            record = json.loads(self.file.read_text())
        except (OSError, ValueError):
            record = {}
        self.record = record if record.get("digest") == digest else {}
        carried = self.record if not self.record.get("complete") else {}  # a finished fold starts over
        self.wall_before = float(carried.get("wall_seconds") or 0.0)
        self.cpu_before = float(carried.get("cpu_seconds") or 0.0)
        self.wall_start, self.cpu_start = time.perf_counter(), time.process_time()

    def recorded(self) -> dict[str, float]:
        """A finished fold's figures as recorded (NaN for one finished before they were kept)."""
        done = self.record if self.record.get("complete") else {}
        return {key: float(done.get(key, math.nan)) for key in ("wall_seconds", "cpu_seconds")}

    def save(self, complete: bool = False) -> dict[str, float]:
        figures = {"wall_seconds": self.wall_before + time.perf_counter() - self.wall_start,
                   "cpu_seconds": self.cpu_before + time.process_time() - self.cpu_start}
        atomic_write_text(self.file, json_text({"digest": self.digest, **figures, "complete": complete}))
        return figures

    def callback(self):
        return keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: self.save())


def _other_checkpoint(cell: Cell, digest: str) -> bool:
    found = cell.read_checkpoint()
    return found is not None and found[0].get("digest") != digest


def fold_figures(fold: Fold) -> dict[str, Any]:
    """folds.csv's row: the fold's run, epochs and test figures, as its cell's metrics.json has them."""
    record = fold.cell.read_metrics() or {}
    figures = {key.removeprefix("test_"): math.nan if value is None else value
               for key, value in record.items() if key.startswith("test_")}
    # A frozen base's features: how many this fold computed, how many earlier folds or runs had stored.
    stored = {key: record[key] for key in FEATURE_COUNTS if key in record}
    return {"fold": fold.number, "run_id": record.get("run_id"), "epochs_used": record.get("epochs_used"),
            **stored, **figures}


def summarise(cfg: Config, per_fold: pd.DataFrame, pooled: pd.DataFrame, **about: Any) -> dict[str, Any]:
    """Across folds: mean, standard deviation and a t interval of the mean (the folds as the
    sample); pooled: every out-of-fold prediction at once, with group bootstrap intervals; patient:
    one score per group (`patient_scores`); compute: the folds' seconds, summed."""
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
    patients, mixed = patient_scores(pooled)
    return {
        **about, "folds": int(len(per_fold)), "confidence": cfg.eval.confidence,
        "images": int(len(pooled)), "groups": int(pooled["group"].nunique()),
        "across_folds": across,
        "pooled": scores.summary("pooled", cfg.eval),
        "patient": {**patients.summary("patient", cfg.eval), "patient_groups": len(patients),
                    "patient_mixed_groups": mixed},
        # Summed over folds; NaN (null) if a fold's figures were never recorded.
        "compute": {key: float(per_fold[key].to_numpy(float).sum()) if key in per_fold else math.nan
                    for key in ("wall_seconds", "cpu_seconds", *FEATURE_COUNTS)},
    }


def patient_scores(pooled: pd.DataFrame) -> tuple[Scores, int]:
    """One score per patient group: the mean p_covid over its slices, and its label, the majority
    of its slices' labels (a group of mixed labels, rare, takes its majority; a tie counts as
    COVID). Also how many groups were mixed."""
    covid = pooled["actual"] == paths.POSITIVE
    by_group = pd.DataFrame({"group": pooled["group"].astype(str), "covid": covid,
                             "p_covid": pooled["p_covid"].astype(float)}).groupby("group", sort=True)
    share = by_group["covid"].mean()
    y_index = np.where(share.to_numpy() >= 0.5, paths.POSITIVE_INDEX, 1 - paths.POSITIVE_INDEX)
    mixed = int(((share > 0) & (share < 1)).sum())
    return Scores.of(y_index, by_group["p_covid"].mean().to_numpy(), share.index.to_numpy()), mixed


def _clip01(value: float) -> float:
    return value if math.isnan(value) else min(1.0, max(0.0, value))


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
    flat.update({f"cv_{key}": float(value) for key, value in summary["patient"].items()})
    flat.update({f"cv_{key}": value for key, value in summary["compute"].items()})
    return flat

