"""Every trained cell of a dataset scored on that dataset's external test sets (params `external`).

One process per dataset, so TensorFlow starts once: each external folder is ingested once (grouped
by the dataset's rules, bad files quarantined), then each trained cell's model is loaded once and
scored on every folder, at threshold 0.5 as `covidtl evaluate` scores. External sets are test only:
nothing here trains, tunes or selects. The one owner of external/<dataset>/:

external/<dataset>/
    sets/<set>/manifest.csv, quarantine.csv, ingest.json   the folder as ingested (paths relative)
    <cell>/<set>/predictions.csv   path (relative to the set's folder), group, actual, predicted, p_covid
    <cell>/<set>/metrics.json      all_* as covidtl.scores gives them
    results.json                   every set and every cell of the study (ok, skipped, failed,
                                   missing) with its scores; written last: the record
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from covidtl import locks, paths
from covidtl.cells import MODELS_ROOT, Cell, write_predictions
from covidtl.config import Config, DatasetConfig, ExternalSet
from covidtl.data import ingest, tables
from covidtl.errors import UserError
from covidtl.files import atomic_write_text, file_sha256, json_text

EXTERNAL_ROOT = "external"

logger = logging.getLogger(__name__)  # `log` is the MLflow switch of this module's functions


@dataclass(frozen=True)
class ExternalDir:
    """external/<dataset>/: where each file of the stage lives."""

    root: Path

    @classmethod
    def of(cls, dataset: str, root: str | Path = EXTERNAL_ROOT) -> ExternalDir:
        return cls(Path(root) / dataset)

    @property
    def sets_dir(self) -> Path:
        return self.root / "sets"  # the ingest workdir: sets/<set>/manifest.csv ...

    def scored_dir(self, cell: str, name: str) -> Path:
        return self.root / cell / name

    @property
    def results_file(self) -> Path:
        return self.root / "results.json"

    def read_results(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.results_file.read_text())
        except (OSError, ValueError):
            return None


@dataclass
class IngestedSet:
    entry: ExternalSet
    cfg: Config  # the config under which the folder is a dataset named entry.name
    manifest: pd.DataFrame
    quarantine: pd.DataFrame
    notes: list[str]  # ingest's warnings (images above the decompression-bomb limit)

    @property
    def root(self) -> Path:
        return tables.dataset_root(self.cfg, self.entry.name)

    def summary(self) -> dict[str, Any]:
        classes = self.manifest["label"].value_counts()
        return {
            "path": self.entry.path, "series": self.entry.series, "images": len(self.manifest),
            "classes": {c: int(classes.get(c, 0)) for c in paths.CLASSES},
            "groups": int(self.manifest["group"].nunique()), "quarantined": len(self.quarantine),
            "manifest_sha256": file_sha256(paths.manifest_path(self.cfg, self.entry.name)),
        }


@dataclass
class ExternalResult:
    results: dict[str, Any]
    out: ExternalDir


def set_config(cfg: Config, entry: ExternalSet, workdir: Path) -> Config:
    """cfg with the external folder as the one dataset, named like the set: ingest's own rules apply."""
    return dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, workdir=str(workdir),
        datasets={entry.name: DatasetConfig(path=entry.path, subdir=None, series=entry.series,
                                            shared_frame=entry.shared_frame)},
    ))


def ingest_set(cfg: Config, dataset: str, index: int, entry: ExternalSet, workdir: Path,
               progress: bool = True) -> IngestedSet:
    """Check, group and record one external folder; a class folder it cannot map stops the run."""
    if not Path(entry.path).expanduser().is_dir():
        hint = "run `covidtl synth` first" if Path(entry.path).parts[:1] == ("data",) else "check the path"
        raise UserError(f"external.{dataset}[{index}].path: folder {entry.path} does not exist; {hint}, "
                        f"or point the set at a folder of class folders in params.yaml")
    own = set_config(cfg, entry, workdir)
    result = ingest.run(own, entry.name, progress=progress, strict=True)
    return IngestedSet(entry, own, result.manifest, result.quarantine, result.notes)


def cell_status(cell: Cell) -> tuple[str, str]:
    """(ok | skipped | failed | missing, why) from the cell's metrics.json."""
    record = cell.read_metrics()
    if record is None:
        return "missing", f"no {cell.metrics_file}: the cell has not run (dvc repro)"
    status = record.get("status")
    if status in ("skipped", "failed"):
        return status, str(record.get("reason", ""))
    if status != "ok":
        return "missing", f"{cell.metrics_file}: status {status!r}; re-run the cell"
    if not cell.model_file.is_file():
        return "missing", f"no {cell.model_file}: `dvc pull` or re-run the cell"
    return "ok", ""


def score_dataset(
    cfg: Config,
    dataset: str,
    models_root: str | Path = MODELS_ROOT,
    out_root: str | Path = EXTERNAL_ROOT,
    log: bool = True,
    progress: bool = True,
) -> ExternalResult:
    """Ingest each external set of `dataset` once, score every trained study cell on each, write
    external/<dataset>/ afresh (and a kind=evaluate MLflow run per cell and set)."""
    cfg.dataset(dataset)  # an unknown dataset: one clear line
    out = ExternalDir.of(dataset, out_root)
    with locks.hold(out.root, "covidtl external"):
        return _score_dataset(cfg, dataset, models_root, out, log, progress)


def _score_dataset(cfg: Config, dataset: str, models_root: str | Path, out: ExternalDir, log: bool,
                   progress: bool) -> ExternalResult:
    """`score_dataset`, external/<dataset>/'s lock held."""
    entries = cfg.external.get(dataset, [])
    shutil.rmtree(out.root, ignore_errors=True)  # no stale cell or set from an earlier study
    sets = [ingest_set(cfg, dataset, i, e, out.sets_dir, progress) for i, e in enumerate(entries)]
    for s in sets:
        for row in s.quarantine.itertuples():
            logger.warning(f"Quarantined ({s.entry.name}): {row.path}: {row.reason}")
        for note in s.notes:
            logger.warning(f"Warning ({s.entry.name}): {note}")

    cells: dict[str, Any] = {}
    for profile, model, init in cfg.study.cells():
        cell = Cell.of(model, init, dataset, models_root, profile)
        status, reason = cell_status(cell)
        record: dict[str, Any] = {"model": model, "init": init, "profile": profile, "status": status}
        if status != "ok":
            record["reason"] = reason
        elif sets:
            record["run_id"] = cell.run_id()
            record["scores"] = _score_cell(cfg, dataset, cell, sets, out, log)
        cells[cell.name] = record
    results = {
        "dataset": dataset,
        # all_* at 0.5, all_op_* at each cell's own operating point (its card); 95% intervals
        # resample the external set's groups (its manifest's).
        "threshold": 0.5,
        "sets": {s.entry.name: s.summary() for s in sets},
        "cells": cells,
    }
    atomic_write_text(out.results_file, json_text(results))
    return ExternalResult(results, out)


def _score_cell(cfg: Config, dataset: str, cell: Cell, sets: list[IngestedSet], out: ExternalDir,
                log: bool) -> dict[str, Any]:
    # here, not above: `covidtl external` ingests its sets and finds the cells before TensorFlow loads
    import keras
    from covidtl.trained import load_trained, log_scored, score_rows

    loaded = load_trained(str(cell.dir), cfg)
    # The training run named by the cell's record, whatever card.json says.
    loaded = dataclasses.replace(loaded, source_run_id=cell.run_id() or loaded.source_run_id)
    scores = {}
    for s in sets:
        scored = score_rows(cfg, loaded, s.manifest)
        metrics = scored.scores.summary("all", cfg.eval, loaded.operating_threshold)
        folder = out.scored_dir(cell.name, s.entry.name)
        write_predictions(folder / "predictions.csv", scored.predictions(s.root))
        atomic_write_text(folder / "metrics.json", json_text(metrics))
        entry: dict[str, Any] = {"images": len(scored.scores), "metrics": metrics}
        if log:
            entry["evaluate_run_id"] = log_scored(
                cfg, loaded, scored, prefix="all", experiment=dataset,
                run_name=f"external-{cell.name}-{s.entry.name}",
                tags={"dataset": dataset, "cell": cell.name, "external_set": s.entry.name,
                      "data_folder": str(Path(s.entry.path).resolve()),
                      "model_uri": str(cell.model_file), "split_strategy": "none",
                      "manifest_sha256": s.summary()["manifest_sha256"]},
                params={"model_uri": str(cell.model_file), "data": s.entry.path, "split": "all"},
            )
        scores[s.entry.name] = entry
        auc = metrics["all_roc_auc"]
        logger.info(f"external {cell.name} on {s.entry.name}: {len(scored.scores)} images; accuracy "
                    f"{metrics['all_accuracy']:.4f}, ROC AUC {'n/a' if math.isnan(auc) else f'{auc:.4f}'}")
    del loaded
    keras.backend.clear_session()  # the next cell's model starts from a clean graph
    return scores


