"""Train one study cell (model x init x dataset): Adam, the paper's stop rule, tracked in MLflow.

Writes the cell's outputs to models/<model>-<init>-<dataset>/ and logs one MLflow run.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import keras
import mlflow
import numpy as np
import pandas as pd

from covidtl import paths, tracking
from covidtl.cells import EPOCH_METRICS, MODEL_DIR
from covidtl.config import Config
from covidtl.data import tables
from covidtl.data.pipeline import make_dataset, make_offline_dataset
from covidtl.errors import UserError
from covidtl.metrics import classification_metrics
from covidtl.models.registry import (
    build_model,
    get_spec,
    image_size_for,
    init_label,
    learning_rate_for,
)

# ignore_errors() leaves the first epoch's length unknown; Keras then warns at its end.
warnings.filterwarnings("ignore", message="Your input ran out of data")

INTENDED_USE = "Research only: not a diagnostic device."


@dataclass
class TrainResult:
    run_id: str
    epochs_used: int
    history: dict[str, list[float]]
    metrics: dict[str, float]
    model_path: Path
    train_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class PaperStopRule(keras.callbacks.Callback):
    """Stop at the first epoch with val_accuracy >= 0.89 and val_loss < 0.3 (the paper's rule)."""

    def __init__(self, val_accuracy: float = 0.89, val_loss: float = 0.3):
        super().__init__()
        self.val_accuracy = val_accuracy
        self.val_loss = val_loss
        self.stopped_epoch: int | None = None  # 1-based, None if the rule never fired

    def reached(self, logs: dict[str, float]) -> bool:
        acc, loss = logs.get("val_accuracy"), logs.get("val_loss")
        return acc is not None and loss is not None and acc >= self.val_accuracy and loss < self.val_loss

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        if self.reached(logs or {}):
            self.stopped_epoch = epoch + 1
            self.model.stop_training = True


class RecalibrateBatchNorm(keras.callbacks.Callback):
    """Before each validation, re-estimate BatchNorm statistics from training batches.

    Trained from scratch at Adam 1e-3, the weights move faster than Keras' moving averages
    (momentum 0.99) follow them, so in inference mode a network that fits its training batches
    predicts one class everywhere (measured on the CT scans: the custom CNN's test AUC went from
    0.49 to 0.88 with 30 batches). This is "precise BatchNorm" (Wu & Johnson 2021): the moving
    statistics become the plain average of `batches` fresh batch statistics; weights are untouched.
    """

    def __init__(self, train_ds, batches: int):
        super().__init__()
        self.train_ds = train_ds
        self.batches = batches

    def on_test_begin(self, logs=None) -> None:
        layers = trainable_batchnorms(self.model)
        if not layers or not self.batches:
            return
        momenta = [layer.momentum for layer in layers]
        try:
            for k, (images, _) in enumerate(self.train_ds.take(self.batches)):
                for layer in layers:  # running mean: step k weighs the new batch by 1/(k+1)
                    layer.momentum = k / (k + 1)
                self.model(images, training=True)
        finally:
            for layer, momentum in zip(layers, momenta):
                layer.momentum = momentum


def trainable_batchnorms(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    """BatchNorm layers that training updates (a frozen ImageNet base keeps its statistics)."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.extend(trainable_batchnorms(layer) if layer.trainable else [])
        elif isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:
            found.append(layer)
    return found


class MlflowEpochLogger(keras.callbacks.Callback):
    """Per-epoch loss/accuracy/val_loss/val_accuracy into the active MLflow run."""

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        logs = logs or {}
        mlflow.log_metrics({k: float(logs[k]) for k in EPOCH_METRICS if k in logs}, step=epoch + 1)


def load_split(cfg: Config, dataset: str) -> pd.DataFrame:
    """The dataset's split table (data/<dataset>/split.csv), or one line saying how to make it."""
    return tables.read_split(cfg, dataset)


def rows_of(table: pd.DataFrame, split: str) -> pd.DataFrame:
    return table if split == "all" else table[table["split"] == split]


def predict(model: keras.Model, ds) -> tuple[np.ndarray, np.ndarray]:
    """Class indices and softmax outputs, read from the same batches so they stay aligned."""
    truth, probs = [], []
    for x, y in ds:
        probs.append(np.asarray(model(x, training=False)))
        truth.append(np.asarray(y).argmax(axis=1))
    if not probs:
        return np.zeros(0, dtype=int), np.zeros((0, 2))
    return np.concatenate(truth), np.concatenate(probs)


def inference_copy(model: keras.Model) -> keras.Model:
    """The same network and weights, uncompiled: saves without the optimizer's state."""
    # clone_model would also clone the compiled optimizer; from_config never carries it.
    copy = type(model).from_config(model.get_config())
    copy.set_weights(model.get_weights())
    return copy


def example_batch(ds, n: int = 1) -> np.ndarray:
    for x, _ in ds.take(1):
        return np.asarray(x[:n], dtype="float32")
    raise UserError("no readable image to use as the model's input example")


def train(
    cfg: Config,
    model: str,
    init: str,
    dataset: str,
    *,
    lr: float | None = None,
    extra_callbacks: Iterable[keras.callbacks.Callback] = (),
    run_name: str | None = None,
    nested: bool = False,
    evaluate_test: bool = True,
    out_dir: str | Path | None = None,
    log_model: bool = True,
) -> TrainResult:
    """Train `model` from `init` on `dataset`'s split; one MLflow run; the cell's files on disk."""
    spec = get_spec(model)
    table = load_split(cfg, dataset)
    size = image_size_for(spec, cfg.train)
    rate = lr if lr is not None else learning_rate_for(spec, cfg.train)
    # Fine-tuning moves pre-trained weights: the whole network runs at the lower rate.
    effective_rate = rate * cfg.train.finetune_lr_factor if init == "finetune" else rate
    cell = paths.cell_name(model, init_label(init), dataset)
    out = Path(out_dir) if out_dir is not None else paths.cell_dir(model, init_label(init), dataset)

    keras.utils.set_random_seed(cfg.train.seed)
    train_rows = rows_of(table, "train")
    if cfg.train.max_train_samples and len(train_rows) > cfg.train.max_train_samples:
        train_rows = train_rows.sample(cfg.train.max_train_samples, random_state=cfg.train.seed)
    for name, rows in (("train", train_rows), ("val", rows_of(table, "val"))):
        if rows.empty:
            raise UserError(f"{paths.split_path(cfg, dataset)}: the {name} split is empty; "
                            "re-split with more images or other split.fractions")
    net = build_model(spec, init, cfg.train, size)  # first: a missing weights file fails fast
    if cfg.augment.mode == "offline":  # the versioned copies written by `covidtl augment`
        train_ds = make_offline_dataset(cfg, dataset, spec, size)
    else:
        train_ds = make_dataset(train_rows, spec, cfg, size, training=True)
    val_ds = make_dataset(rows_of(table, "val"), spec, cfg, size, training=False)

    net.compile(
        optimizer=keras.optimizers.Adam(effective_rate),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
        # Tracing the train/test graphs costs more than a few tiny epochs (see params.yaml).
        run_eagerly=cfg.train.run_eagerly,
    )
    stop = PaperStopRule(cfg.train.stop.val_accuracy, cfg.train.stop.val_loss)
    checkpoint_dir = out / "checkpoint"
    # One fixed file name: every epoch overwrites the previous checkpoint (Adam's state makes
    # each one ~3x the model), and it is removed once the run has finished.
    checkpoint = keras.callbacks.ModelCheckpoint(str(checkpoint_dir / "last.keras"))
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_dir.mkdir(exist_ok=True)

    tracking.use_experiment(dataset)
    with mlflow.start_run(run_name=run_name or cell, nested=nested) as run:
        mlflow.set_tags(run_tags(cfg, model, init, dataset, kind="train"))
        tracking.log_config(cfg)
        # Names apart from `mlflow run`'s entry-point params (lr=auto...): MLflow forbids changes.
        mlflow.log_params({
            "model": model, "init": init, "dataset": dataset, "learning_rate": rate,
            "effective_lr": effective_rate, "image_size": size,
            "train_images": len(train_rows), "val_images": int((table["split"] == "val").sum()),
            "test_images": int((table["split"] == "test").sum()),
        })
        started = time.perf_counter()
        history = net.fit(
            train_ds,
            validation_data=val_ds,
            epochs=cfg.train.max_epochs,
            callbacks=[
                RecalibrateBatchNorm(train_ds, cfg.train.bn_recalibration_batches),
                stop, checkpoint, MlflowEpochLogger(), *extra_callbacks,
            ],
            shuffle=False,  # the dataset shuffles itself, with the seed
            verbose="auto",
        )
        seconds = time.perf_counter() - started
        hist = {k: [float(v) for v in vals] for k, vals in history.history.items()}
        epochs_used = len(hist.get("loss", []))
        mlflow.log_metrics({"epochs_used": epochs_used, "train_seconds": seconds})
        mlflow.set_tag("stopped_by", "paper_rule" if stop.stopped_epoch else "max_epochs")
        tracking.log_history(hist)

        test_metrics: dict[str, float] = {}
        predictions = None
        if evaluate_test:
            test_ds = make_dataset(rows_of(table, "test"), spec, cfg, size, training=False)
            y_true, prob = predict(net, test_ds)
            if len(y_true):
                test_metrics = {f"test_{k}": v for k, v in classification_metrics(y_true, prob).items()}
                tracking.log_metrics(test_metrics)
                tracking.log_evaluation(y_true, prob, prefix="test")
                predictions = (y_true, prob.argmax(axis=1))

        clean = inference_copy(net)
        # The model and its card form one folder: the study's DVC output (`models/<cell>/model/`).
        model_path = out / MODEL_DIR / "model.keras"
        model_path.parent.mkdir(parents=True, exist_ok=True)
        clean.save(model_path)
        mlflow.set_tag("model_path", str(model_path.resolve()))
        write_cell(out, cfg, hist, {"status": "ok", **test_metrics, "epochs_used": epochs_used}, predictions)
        card = {
            "model": model, "init": init, "dataset": dataset, "image_size": size,
            "preprocessing": cfg.train.preprocessing, "classes": list(paths.CLASSES),
            "positive": paths.POSITIVE, "learning_rate": effective_rate,
            "epochs_used": epochs_used, "run_id": run.info.run_id,
            "git_commit": tracking.git_commit(), "intended_use": INTENDED_USE,
        }
        (model_path.parent / "card.json").write_text(json.dumps(card, indent=2) + "\n")
        mlflow.log_dict(card, "card.json")
        if log_model:  # the study passes False: the DVC output is the one stored copy
            tracking.log_keras_model(clean, example_batch(val_ds))
        shutil.rmtree(checkpoint_dir, ignore_errors=True)

    return TrainResult(
        run_id=run.info.run_id,
        epochs_used=epochs_used,
        history=hist,
        metrics=test_metrics,
        model_path=model_path,
        train_seconds=seconds,
    )


def run_tags(cfg: Config, model: str, init: str, dataset: str, kind: str) -> dict[str, str]:
    """What ties a run to its exact code and data."""
    return {
        "model": model,
        "init": init_label(init),
        "dataset": dataset,
        "split_strategy": cfg.split.strategy,
        "git_commit": tracking.git_commit(),
        "manifest_sha256": tracking.file_sha256(paths.manifest_path(cfg, dataset)),
        "cell": paths.cell_name(model, init_label(init), dataset),
        "kind": kind,
    }


def write_cell(
    out: Path,
    cfg: Config,
    history: dict[str, list[float]],
    metrics: dict[str, float],
    predictions: tuple[np.ndarray, np.ndarray] | None,
) -> None:
    """metrics.json, history.csv, predictions.csv and config.yaml beside model.keras."""
    clean = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in metrics.items()}
    (out / "metrics.json").write_text(json.dumps(clean, indent=2) + "\n")
    epochs = len(history.get("loss", []))
    frame = pd.DataFrame({"epoch": range(1, epochs + 1)})
    for key in EPOCH_METRICS:
        frame[key] = history.get(key, [np.nan] * epochs)
    frame.to_csv(out / "history.csv", index=False)
    if predictions is not None:
        y_true, y_pred = predictions
        pd.DataFrame({
            "actual": [paths.CLASSES[i] for i in y_true],
            "predicted": [paths.CLASSES[i] for i in y_pred],
        }).to_csv(out / "predictions.csv", index=False)
    (out / "config.yaml").write_text(tracking.config_yaml(cfg))

