"""A trained model, loaded and scored: what every step that scores a saved model shares.

`load_trained` reads a model file or an MLflow URI with its card; `load_rows` the images to score
(a dataset's split, or any folder, ingested on the fly); `score_rows` runs the model on them at
its own input size and preprocessing; `log_scored` records one kind=evaluate MLflow run. Used by
evaluate, predict, explain, the ensemble, the external sets, the probe and the server.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import pandas as pd

from covidtl import paths, tracking
from covidtl.cells import SCORE_COLUMNS, Cell, predictions_csv
from covidtl.config import Config, DatasetConfig
from covidtl.data import ingest, tables
from covidtl.data.pipeline import make_dataset, readable_rows
from covidtl.errors import UserError
from covidtl.models import wrappers  # noqa: F401 - registers the wrappers' layers for loading
from covidtl.models import site_layers  # noqa: F401 - registers the adapted models' layers for loading
from covidtl.models.registry import MODELS, get_spec
from covidtl.scores import Scored
from covidtl.train import predict, rows_of

SPLITS = ("test", "val", "train", "all")  # what `--split` scores of a dataset

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: keras.Model
    name: str  # registry key
    init: str
    preprocessing: str
    source_run_id: str | None
    # The threshold chosen on the validation split when it was trained (None: an older model).
    operating_threshold: float | None = None
    dataset: str | None = None  # what it was trained on (card or run params), where known


def load_trained(model_uri: str, cfg: Config | None = None) -> LoadedModel:
    """The one model loader (evaluate, predict, explain, the server): a .keras file or a cell's
    folder (card.json beside the model), runs:/ or models:/<name>/<version|@alias> URIs.

    Keras' safe mode is on: a model file holding Python code (a Lambda layer) is refused.
    """
    if "://" not in model_uri and ":/" not in model_uri:
        model_file, card_file = model_files(model_uri)
        return load_model_files(model_file, card_file, cfg)

    mlflow.set_tracking_uri(tracking.tracking_uri())
    try:
        info = mlflow.models.get_model_info(model_uri)
        if PYFUNC_WRAPPER_KEY in (info.flavors.get("python_function", {}).get("artifacts") or {}):
            # A model put in the registry by `covidtl register`: the .keras file and its card.
            local = Path(mlflow.artifacts.download_artifacts(model_uri))
            wrapper = info.flavors["python_function"]["artifacts"]
            return load_model_files(local / wrapper[PYFUNC_WRAPPER_KEY]["path"],
                               local / wrapper[PYFUNC_CARD_KEY]["path"], cfg)
        model = mlflow.keras.load_model(model_uri, load_model_kwargs=KERAS_LOAD_KWARGS)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - unknown run/model/URI: the user's value
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        if "safe_mode" in str(exc):
            raise UserError(f"--model-uri {model_uri}: {UNSAFE_MODEL}") from None
        raise UserError(
            f"--model-uri {model_uri}: cannot load it from {tracking.tracking_uri()} ({first}); "
            "check the run id (`mlflow ui`) and MLFLOW_TRACKING_URI"
        ) from None
    params, metrics = {}, {}
    if info.run_id:
        run = mlflow.get_run(info.run_id)
        params, metrics = run.data.params, run.data.metrics
    return LoadedModel(  # train.model / train.init: what ran (`model` may be `mlflow run`'s auto)
        model, params.get("train.model") or params.get("model") or _name_from_model(model),
        params.get("train.init") or params.get("init", "unknown"),
        params.get("train.preprocessing", _default_preprocessing(cfg)), info.run_id,
        metrics.get("operating_threshold"), params.get("dataset"),
    )


# The artifacts of the pyfunc model `covidtl register` logs (read back above).
PYFUNC_WRAPPER_KEY = "keras_model"
PYFUNC_CARD_KEY = "card"
# Explicit although it is Keras 3's default: no code from a model file ever runs here.
KERAS_LOAD_KWARGS = {"compile": False, "safe_mode": True}
UNSAFE_MODEL = ("refused: the model holds Python code (a Lambda layer) and models load in Keras' "
                "safe mode; rebuild it without Lambda layers (`covidtl train` never makes one)")


def model_files(model_path: str | Path, option: str = "--model-uri") -> tuple[Path, Path | None]:
    """(model.keras, its card.json or None) for a .keras file, a cell's folder or its model/ folder."""
    path = Path(model_path)
    if path.is_dir() and Cell(path).model_file.is_file():  # a study cell's folder
        path = Cell(path).model_file
    elif path.is_dir() and (path / "model.keras").is_file():  # a cell's model/ folder
        path = path / "model.keras"
    if not path.is_file():
        uris = (", runs:/<run_id>/model, models:/<name>/<version> or models:/<name>@<alias>"
                if option == "--model-uri" else " or its model/ folder")
        raise UserError(f"{option} {model_path}: no such file; give a model.keras, a models/<cell>/ "
                        f"folder{uris}")
    card_file = path.parent / "card.json"  # written beside model.keras by cells.Cell
    return path, card_file if card_file.is_file() else None


def load_model_files(
    model_file: str | Path, card_file: str | Path | None, cfg: Config | None = None
) -> LoadedModel:
    """`load_trained` of a local model.keras and its card (also the served model's loader)."""
    model = _load_keras(Path(model_file))
    card_file = Path(card_file) if card_file is not None else None
    card = json.loads(card_file.read_text()) if card_file is not None else {}
    return LoadedModel(
        model, card.get("model") or _name_from_model(model), card.get("init", "unknown"),
        card.get("preprocessing", _default_preprocessing(cfg)), card.get("run_id"),
        (card.get("operating_point") or {}).get("threshold"), card.get("dataset"),
    )


def _default_preprocessing(cfg: Config | None) -> str:
    # Only for a model without card or run params; the server has no params.yaml: the paper's.
    return cfg.train.preprocessing if cfg is not None else "rescale"


def _load_keras(path: Path) -> keras.Model:
    try:
        return keras.models.load_model(path, **KERAS_LOAD_KWARGS)
    except Exception as exc:  # noqa: BLE001 - a wrong or damaged file
        if "safe_mode" in str(exc):
            raise UserError(f"{path}: {UNSAFE_MODEL}") from None
        raise UserError(f"{path}: not a readable Keras model ({str(exc)[:160]})") from None


def _name_from_model(model: keras.Model) -> str:
    # Models built here are named "<registry key>_<init>"; the longest matching key wins.
    for name in sorted(MODELS, key=len, reverse=True):
        if model.name == name or model.name.startswith(f"{name}_"):
            return name
    raise UserError(
        f"model {model.name!r}: cannot tell its architecture; keep the card.json written beside "
        "model.keras by `covidtl train`"
    )


def is_dataset_name(cfg: Config, data: str) -> bool:
    """`--data` names a dataset of params.yaml: a bare configured name, even where a folder of that
    name exists here (a path says so: `./xray`, `/x/ct`). One meaning per value, never a guess."""
    return data in cfg.data.datasets and "/" not in data and os.sep not in data


def load_rows(cfg: Config, data: str, split: str, workdir: Path) -> tuple[pd.DataFrame, str, Path, bool]:
    """(rows, experiment name, manifest path, is a dataset) for a dataset name or any image folder."""
    if is_dataset_name(cfg, data):
        if Path(data).is_dir():
            log.info(f"Note: --data {data} is the dataset {data} of params.yaml ({cfg.dataset(data).path}); "
                     f"to score the folder ./{data} instead, give --data ./{data}")
        table = tables.read_split(cfg, data)
        return rows_of(table, split), data, paths.manifest_path(cfg, data), True
    folder = Path(data).expanduser()
    if not folder.is_dir():
        known = ", ".join(sorted(cfg.data.datasets)) or "none"
        raise UserError(
            f"--data {data}: neither a dataset in params.yaml ({known}) nor a folder of class "
            "folders (e.g. COVID/ and non-COVID/)"
        )
    # A folder is ingested on the fly into a throw-away workdir, its root as given; the split does
    # not apply, and a class folder it cannot map stops the run (a partial score is a wrong one).
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", folder.resolve().name) or "folder"
    if name in cfg.data.datasets:  # a folder named like a dataset is not that dataset's test split
        name = f"folder-{name}"
    on_the_fly = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, workdir=str(workdir), datasets={name: DatasetConfig(path=str(folder))},
    ))
    result = ingest.run(on_the_fly, name, progress=False, strict=True)
    for row in result.quarantine.itertuples():
        log.warning(f"Quarantined: {row.path}: {row.reason}")
    for note in result.notes:
        log.warning(f"Warning: {note}")
    return result.manifest, name, paths.manifest_path(on_the_fly, name), False


def scoring_config(cfg: Config, loaded: LoadedModel) -> Config:
    """Score with the preprocessing the model was trained with, whatever params.yaml says now."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, preprocessing=loaded.preprocessing))


def score_rows(cfg: Config, loaded: LoadedModel, rows: pd.DataFrame) -> Scored:
    """The loaded model's softmax outputs on `rows` (path, label) at its own input size."""
    cfg = scoring_config(cfg, loaded)
    size = int(loaded.model.input_shape[1])
    rows = readable_rows(rows)
    y_true, prob = predict(loaded.model, make_dataset(rows, get_spec(loaded.name), cfg, size, training=False))
    if len(y_true) != len(rows):
        # A file that passed PIL's check but not TensorFlow's decode was dropped: rows no longer align.
        raise UserError(f"{len(rows) - len(y_true)} of {len(rows)} images could not be decoded; "
                        "run `covidtl ingest` on their folder to find and quarantine them")
    return Scored.of(rows.reset_index(drop=True), y_true, prob, size)


def log_scored(
    cfg: Config,
    loaded: LoadedModel,
    scored: Scored,
    *,
    prefix: str,
    experiment: str,
    run_name: str,
    tags: dict[str, str],
    params: dict[str, object],
) -> str:
    """One kind=evaluate MLflow run of a scored set: metrics, confusion matrix, predictions."""
    tracking.use_experiment(experiment)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.set_tags({
            "model": loaded.name, "init": loaded.init, "git_commit": tracking.git_commit(),
            "kind": "evaluate", "source_run_id": loaded.source_run_id or "none",
            **tracking.experiment_tags(), **tags,
        })
        tracking.log_config(scoring_config(cfg, loaded))
        mlflow.log_params({**params, "images": len(scored.scores), "image_size": scored.image_size})
        tracking.log_metrics(scored.scores.summary(prefix, cfg.eval, loaded.operating_threshold))
        if loaded.operating_threshold is not None:
            mlflow.log_metric("operating_threshold", loaded.operating_threshold)
        tracking.log_evaluation(scored.scores.y_true, scored.scores.p_covid, prefix=prefix)
        tracking.log_curves(scored.scores, prefix=prefix)
        mlflow.log_text(predictions_csv(scored.predictions(), SCORE_COLUMNS), "predictions.csv")
    return run.info.run_id
