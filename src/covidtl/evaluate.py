"""Score a trained model on any dataset or folder: the training run's metrics, as a new MLflow run.

This is how a model is tested on another hospital's data: `covidtl evaluate --model-uri
runs:/<id>/model --data /path/to/folder`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

from covidtl import locks, tracking
from covidtl.cells import SCORE_COLUMNS, cell_name, write_predictions
from covidtl.config import Config
from covidtl.errors import UserError
from covidtl.files import atomic_write_text, file_sha256, json_text
from covidtl.models.wrappers import tta_of, with_tta
# Loading and scoring a model live in covidtl.trained (below the steps); their old names here too.
from covidtl.trained import (  # noqa: F401 - re-exported
    KERAS_LOAD_KWARGS,
    PYFUNC_CARD_KEY,
    PYFUNC_WRAPPER_KEY,
    SPLITS,
    UNSAFE_MODEL,
    LoadedModel,
    is_dataset_name,
    load_model_files,
    load_rows,
    load_trained,
    log_scored,
    model_files,
    score_rows,
    scoring_config,
)


@dataclass
class EvaluateResult:
    run_id: str
    metrics: dict[str, float]
    images: int
    scored: str = ""  # "the test split of dataset ct" or "a folder, every image"


def evaluate(
    cfg: Config,
    model_uri: str,
    data: str,
    split: str = "test",
    out_dir: str | Path | None = None,
    run_name: str | None = None,
    tta: str = "none",
) -> EvaluateResult:
    """Score `model_uri` on `data` (split of a dataset, or a whole folder); one MLflow run.

    `tta`: average the model over these views here (a model saved without TTA), so the same
    weights are measured with and without it; its operating point stays the one it was saved with."""
    if split not in SPLITS:
        raise UserError(f"--split {split}: choose one of {', '.join(SPLITS)}")
    tracking.tracking_uri()  # a tracking server that does not answer: refused before any scoring
    # Without --out nothing is written here but the MLflow run: no folder to lock.
    with locks.hold(out_dir, "covidtl evaluate") if out_dir is not None else contextlib.nullcontext():
        return _evaluate(cfg, model_uri, data, split, out_dir, run_name, tta)


def _evaluate(cfg: Config, model_uri: str, data: str, split: str, out_dir: str | Path | None,
              run_name: str | None, tta: str) -> EvaluateResult:
    """`evaluate`, the --out folder's lock held."""
    loaded = load_trained(model_uri, cfg)
    loaded = dataclasses.replace(loaded, model=with_tta(loaded.model, tta))
    with tempfile.TemporaryDirectory(prefix="covidtl-eval-") as tmp:
        rows, dataset, manifest, is_dataset = load_rows(cfg, data, split, Path(tmp))
        scored_split = split if is_dataset else "all"
        if rows.empty:
            raise UserError(f"--data {data}: the {scored_split} split holds no image")
        scored = score_rows(cfg, loaded, rows)
        manifest_sha = file_sha256(manifest)
    if not len(scored.scores):
        raise UserError(f"--data {data}: no image could be decoded")
    metrics = scored.scores.summary(scored_split, cfg.eval, loaded.operating_threshold)
    cell = cell_name(loaded.name, loaded.init, dataset)
    run_id = log_scored(
        cfg, loaded, scored, prefix=scored_split, experiment=dataset,
        run_name=run_name or f"evaluate-{cell}",
        tags={"dataset": dataset, "cell": cell, "model_uri": model_uri, "manifest_sha256": manifest_sha,
              "split_strategy": cfg.split.strategy if is_dataset else "none",
              "data_kind": "dataset" if is_dataset else "folder",
              # Every score taken on a folder is counted by the report (external sets: how many
              # looks at data that must never select a model).
              **({} if is_dataset else {"data_folder": str(Path(data).resolve())})},
        params={"model_uri": model_uri, "data": str(data), "split": scored_split,
                "tta_added": tta, "tta": tta_of(loaded.model)},
    )
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "metrics.json", json_text(metrics))
        write_predictions(out / "predictions.csv", scored.predictions(), SCORE_COLUMNS)
    scored_what = f"the {split} split of dataset {data}" if is_dataset else "a folder, every image"
    return EvaluateResult(run_id, metrics, len(scored.scores), scored_what)
