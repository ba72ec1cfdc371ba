"""Train one study cell (model x init x dataset): Adam (AdamW with weight decay), the paper's stop rule, tracked in MLflow.

`train()` runs four steps, each its own function: `plan_run` fixes what the run is (data, sizes,
the learning rate, into the config that is recorded), `fit` trains, `score` tests, and the cell's
files (`cells.Cell`) and the MLflow run record what ran. One MLflow run, one cell folder.

Each completed epoch is checkpointed (the model with the optimiser's state, the run id, the history); the
same command after a kill or Ctrl-C continues that run from there (`checkpoint_to_resume`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import keras
import mlflow
import numpy as np
import pandas as pd
import tensorflow as tf
from mlflow.exceptions import MlflowException

from covidtl import distribute, linear_probe, locks, optim, paths, pretrained, tracking
from covidtl.cells import EPOCH_METRICS, Cell, cell_name, init_label, is_finetune
from covidtl.cards import training_card
from covidtl.config import Config
from covidtl.data import tables
from covidtl.data.pipeline import label_indices, make_dataset, make_offline_dataset, readable_rows
from covidtl.errors import UserError
from covidtl.explain import sample_figure
from covidtl.files import file_sha256
from covidtl.frozen import BASE, FrozenTraining, cache_cut
from covidtl.models.registry import (
    ModelSpec,
    build_model,
    get_spec,
    learning_rate_for,
    preprocess_for,
    trainable_image_size,
)
from covidtl.models.wrappers import with_tta
from covidtl.pretrain import resolve_init
from covidtl.scores import DEFAULT_THRESHOLD, Scored, choose_operating_point

# ignore_errors() leaves the first epoch's length unknown; Keras then warns at its end.
warnings.filterwarnings("ignore", message="Your input ran out of data")

VALIDATION_BATCH_FACTOR = 4  # validation batches are this many training batches


@dataclass
class TrainResult:
    run_id: str
    epochs_used: int
    history: dict[str, list[float]]
    metrics: dict[str, float]
    model_path: Path
    train_seconds: float = 0.0


class PaperStopRule(keras.callbacks.Callback):
    """Stop at the first epoch with val_accuracy >= 0.89 and val_loss < 0.3 (the paper's rule)."""

    name = "paper_rule"

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


@keras.saving.register_keras_serializable(package="covidtl")
class CovidAUC(keras.metrics.AUC):
    """ROC AUC of p(COVID), the softmax's COVID column, against the truth: the figure the report
    gives, named as such (Keras' AUC pools both one-hot columns; for two softmax outputs that comes
    to the same value, but only while the outputs are exactly p and 1 - p). 1000 thresholds put it
    within ~1e-3 of the exact value."""

    def __init__(self, name: str = "auc", num_thresholds: int = 1000, **kwargs):
        super().__init__(name=name, num_thresholds=num_thresholds, **kwargs)

    def update_state(self, y_true, y_pred, sample_weight=None):
        return super().update_state(paths.p_covid(y_true), paths.p_covid(y_pred), sample_weight)


class SelectBest(keras.callbacks.Callback):
    """The best validation epoch by a threshold-free metric (`train.select`: val_auc or val_loss).

    Its weights are kept in the checkpoint folder (so a resumed run still knows them) and put back
    by `restore` when training ends. With `patience`, training stops once the metric has not
    improved for that many epochs (`train.stop.rule: patience`)."""

    name = "patience"

    def __init__(self, monitor: str, cell: Cell, resume: Resume | None, patience: int | None = None):
        super().__init__()
        self.monitor = monitor
        self.cell = cell
        self.patience = patience
        self.best_epoch = resume.best_epoch if resume else None
        self.best_file = resume.best_file if resume else None
        history = resume.history.get(monitor, []) if resume else []
        self.best_value = history[self.best_epoch - 1] if self.best_epoch else None
        self.stopped_epoch: int | None = None

    def improved(self, value: float) -> bool:
        if math.isnan(value):  # e.g. AUC of a validation split that holds one class
            return False
        if self.best_value is None:
            return True
        return value > self.best_value if self.monitor == "val_auc" else value < self.best_value

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        value = (logs or {}).get(self.monitor)
        if value is None:
            raise UserError(f"train.select: {self.monitor} is not among the epoch's metrics "
                            f"({', '.join(sorted(logs or {}))}); choose val_auc, val_loss or last")
        if self.improved(float(value)):
            self.best_value, self.best_epoch = float(value), epoch + 1
            self.best_file = self.cell.save_best(self.model.save_weights, epoch + 1)
        elif self.patience and epoch + 1 - (self.best_epoch or 0) >= self.patience:
            self.stopped_epoch = epoch + 1
            self.model.stop_training = True

    def restore(self, net: keras.Model, epochs_used: int) -> None:
        """The best epoch's weights back into `net` (nothing to do when it was the last one)."""
        if self.best_file and self.best_epoch != epochs_used:
            net.load_weights(self.cell.checkpoint_dir / self.best_file)


class RecalibrateBatchNorm(keras.callbacks.Callback):
    """Before each validation, re-estimate BatchNorm statistics from training batches.

    Trained from scratch at Adam 1e-3, the weights move faster than Keras' moving averages
    (momentum 0.99) follow them, so in inference mode a network that fits its training batches
    predicts one class everywhere (measured on the CT scans: the custom CNN's test AUC went from
    0.49 to 0.88 with 30 batches). This is "precise BatchNorm" (Wu & Johnson 2021): the moving
    statistics become the plain average of `batches` fresh batch statistics; weights are untouched.
    A pre-trained base's frozen BatchNorm layers keep their statistics (`trainable_batchnorms`).
    """

    def __init__(self, train_ds, batches: int):
        super().__init__()
        self.train_ds = train_ds
        self.batches = batches
        self.forward: Callable | None = None  # traced once, reused every epoch
        # One iterator for the whole run: a fresh one each epoch cost more than the passes
        # themselves (tf.data warming up its parallelism again: ~2.8 s of 5 per epoch).
        self.source: Iterator | None = None

    def on_test_begin(self, logs=None) -> None:
        layers = trainable_batchnorms(self.model)
        if not layers or not self.batches:
            return
        momenta = [layer.momentum for layer in layers]
        # Momentum 0: each forward pass leaves one batch's statistics in the moving ones; their
        # plain average is then assigned. Traced once (eagerly it cost ~5 s per epoch at 20 batches).
        if self.forward is None:
            self.forward = self.model if self.model.run_eagerly else tf.function(self.model, reduce_retracing=True)
        sums = [[np.zeros(layer.moving_mean.shape), np.zeros(layer.moving_variance.shape)] for layer in layers]
        seen = 0
        try:
            for layer in layers:
                layer.momentum = 0.0
            if self.source is None:
                self.source = iter(self.train_ds.repeat())
            for _ in range(self.batches):
                images, _ = next(self.source)
                self.forward(images, training=True)
                for total, layer in zip(sums, layers):
                    total[0] += np.asarray(layer.moving_mean)
                    total[1] += np.asarray(layer.moving_variance)
                seen += 1
        finally:
            for layer, momentum in zip(layers, momenta):
                layer.momentum = momentum
        for (mean, variance), layer in zip(sums, layers):
            if seen:
                layer.moving_mean.assign(mean / seen)
                layer.moving_variance.assign(variance / seen)


def trainable_batchnorms(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    """BatchNorm layers that training updates (a pre-trained base's are frozen and keep theirs)."""
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


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during fit: stopped after the current batch; the last completed epoch's checkpoint stays."""

    def __init__(self, epochs_done: int, checkpoint_dir: Path):
        self.epochs_done = epochs_done
        if epochs_done:
            where = f"after epoch {epochs_done} (checkpoint {checkpoint_dir})"
            then = "run the same command to continue from epoch " + str(epochs_done + 1)
        else:
            where, then = "in epoch 1", "run the same command to redo it in the same MLflow run"
        super().__init__(f"Interrupted {where}: {then}, or add --restart to start over.")


class StopOnInterrupt(keras.callbacks.Callback):
    """Ends fit after the batch during which Ctrl-C came (`interrupt_after_batch` sets the flag)."""

    def __init__(self, checkpoint: EpochCheckpoint):
        super().__init__()
        self.checkpoint = checkpoint
        self.requested = False

    def _check(self, batch=None, logs=None) -> None:
        if self.requested:
            raise TrainingInterrupted(self.checkpoint.epochs_done, self.checkpoint.cell.checkpoint_dir)

    on_train_batch_end = on_test_batch_end = _check


@contextlib.contextmanager
def interrupt_after_batch(stopper: StopOnInterrupt) -> Iterator[None]:
    """While fitting, the first Ctrl-C asks `stopper` to end after the current batch; a second one
    interrupts at once. Outside the main thread (no signals there) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        stopper.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class EpochCheckpoint(keras.callbacks.Callback):
    """After each completed epoch: the model with the optimiser's state, and state.json with what resuming
    needs (run id, settings digest, epochs done, history, the stop rule's state, seconds)."""

    def __init__(self, cell: Cell, run: dict[str, str], resume: Resume | None,
                 rules: list[PaperStopRule | SelectBest], select: SelectBest | None):
        super().__init__()
        self.cell = cell
        self.run = run  # run_id and digest
        self.rules = rules
        self.select = select
        self.history = {k: list(v) for k, v in (resume.history if resume else {}).items()}
        self.epochs_done = resume.epochs_done if resume else 0
        self.seconds_before = resume.seconds if resume else 0.0
        self.started = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        for key, value in (logs or {}).items():  # what keras' History keeps, across resumes
            self.history.setdefault(key, []).append(float(value))
        self.epochs_done = epoch + 1
        self.cell.save_checkpoint(self.model.save, {
            **self.run, "epochs_done": self.epochs_done, "history": self.history,
            **stopped(self.rules), "seconds": self.seconds,
            "best_epoch": self.select.best_epoch if self.select else None,
            "best_file": self.select.best_file if self.select else None,
        })


def stopped(rules: list[PaperStopRule | SelectBest]) -> dict[str, Any]:
    """Which rule ended training, and at which epoch (None: none has yet)."""
    fired = next((rule for rule in rules if rule.stopped_epoch), None)
    return {"stopped_epoch": fired.stopped_epoch if fired else None,
            "stopped_by": fired.name if fired else None}


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


# --------------------------------------------------------------------------- plan


def with_learning_rate(cfg: Config, model: str, rate: float) -> Config:
    """The config with `rate` as the model's base rate: what config.yaml and MLflow then record."""
    if not rate > 0:
        raise UserError(f"--lr {rate:g}: the learning rate must be > 0; give e.g. 1e-4, or auto")
    rates = {**cfg.train.learning_rates, model: float(rate)}
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, learning_rates=rates))


@dataclass
class Plan:
    """What one run is, fixed before it starts; every record of the run is written from this."""

    cfg: Config  # train.learning_rates.<model> holds the base rate that ran (--lr included)
    spec: ModelSpec
    model: str
    init: str
    dataset: str
    image_size: int
    learning_rate: float  # the optimiser's rate (Adam; AdamW when train.weight_decay > 0): the base rate, x train.finetune_lr_factor for finetune
    lr_source: str  # params | --lr | the tuned-rate file it came from
    table: pd.DataFrame
    train_rows: pd.DataFrame
    cell: Cell
    split_file: Path  # where `table` came from: the dataset's split.csv, or a cross-validation fold's
    build_init: str  # what the network is built from: `init`, with `pretrained` as its file's path
    run_eagerly: bool  # train.run_eagerly settled for the training batches an epoch (auto: a few)
    # Where it ran: precision, strategy, replicas, lr_scaling, global_batch_size (covidtl.distribute).
    run_on: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return cell_name(self.model, self.init, self.dataset, self.cfg.profile)

    def rows(self, split: str) -> pd.DataFrame:
        return self.train_rows if split == "train" else rows_of(self.table, split)


def plan_run(
    cfg: Config,
    model: str,
    init: str,
    dataset: str,
    *,
    lr: float | None = None,
    lr_source: str | None = None,
    out_dir: str | Path | None = None,
    split_file: str | Path | None = None,
) -> Plan:
    """Resolve the run's data, input size and learning rate; refuse what cannot train."""
    spec = get_spec(model)
    cfg = cfg.with_recipe(model, init)
    if lr is not None:
        cfg = with_learning_rate(cfg, model, lr)
    base_rate = learning_rate_for(spec, cfg.train)
    # Fine-tuning moves pre-trained weights: the whole network runs at the lower rate.
    rate = base_rate * cfg.train.finetune_lr_factor if is_finetune(init) else base_rate
    split_file = Path(split_file) if split_file is not None else paths.split_path(cfg, dataset)
    table = tables.read_split(cfg, dataset, split_file)
    train_rows = rows_of(table, "train")
    if cfg.train.max_train_samples and len(train_rows) > cfg.train.max_train_samples:
        train_rows = train_rows.sample(cfg.train.max_train_samples, random_state=cfg.train.seed)
    for name, rows in (("train", train_rows), ("val", rows_of(table, "val"))):
        if rows.empty:
            raise UserError(f"{split_file}: the {name} split is empty; "
                            "re-split with more images or other split.fractions")
    cell = Cell(Path(out_dir)) if out_dir is not None else Cell.of(model, init, dataset, profile=cfg.profile)
    return Plan(
        cfg=cfg, spec=spec, model=model, init=init, dataset=dataset,
        image_size=trainable_image_size(spec, cfg.train), learning_rate=rate,
        lr_source=lr_source or ("params" if lr is None else "--lr"),
        table=table, train_rows=train_rows, cell=cell, split_file=split_file,
        build_init=resolve_init(cfg, model, init),
        # On one device; distribute.adapt settles it again for the global batch.
        run_eagerly=distribute.eager_for(cfg.train.run_eagerly,
                                         optim.steps_per_epoch(len(train_rows), cfg.train.batch_size)),
    )


# --------------------------------------------------------------------------- resume


@dataclass
class Resume:
    """A checkpoint of this same run: where to continue from."""

    run_id: str
    epochs_done: int
    history: dict[str, list[float]]
    stopped_epoch: int | None
    seconds: float
    model_file: Path | None  # None: killed in the first epoch, the run continues from scratch
    stopped_by: str | None = None  # the rule that ended training, if one did (paper_rule | patience)
    best_epoch: int | None = None  # train.select's best epoch so far, its weights in best_file
    best_file: str | None = None


def run_digest(plan: Plan) -> str:
    """What must not change for a checkpoint to continue: the resolved config, the cell and its data."""
    cfg = plan.cfg
    parts = [
        tracking.settings_yaml(cfg), plan.model, plan.init, plan.dataset, repr(plan.learning_rate),
        file_sha256(plan.split_file),
        file_sha256(paths.manifest_path(cfg, plan.dataset)),
        *sorted(map(str, plan.train_rows["path"])),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def checkpoint_to_resume(plan: Plan, restart: bool = False) -> Resume | None:
    """The cell's checkpoint if it is of this same run; `restart` drops it; other settings refuse."""
    if restart:
        plan.cell.remove_checkpoint()
        return None
    found = plan.cell.read_checkpoint()
    if found is None:
        return None
    state, model_file = found
    if state.get("digest") != run_digest(plan):
        raise UserError(
            f"{plan.cell.checkpoint_dir}: the settings or data changed since this checkpoint (epoch "
            f"{state.get('epochs_done')} of run {state.get('run_id')}); delete it or pass --restart")
    return Resume(run_id=state["run_id"], epochs_done=int(state["epochs_done"]),
                  history={k: [float(v) for v in vals] for k, vals in state["history"].items()},
                  stopped_epoch=state.get("stopped_epoch"),
                  stopped_by=state.get("stopped_by") or ("paper_rule" if state.get("stopped_epoch") else None),
                  seconds=float(state.get("seconds", 0.0)), model_file=model_file,
                  best_epoch=state.get("best_epoch"), best_file=state.get("best_file"))


def log_missing_epochs(run_id: str, history: dict[str, list[float]]) -> None:
    """Per-epoch metrics a kill cut off between the checkpoint and its MLflow log: each step once."""
    client = mlflow.tracking.MlflowClient()
    for key in EPOCH_METRICS:
        logged = {m.step for m in client.get_metric_history(run_id, key)}
        for step, value in enumerate(history.get(key, []), start=1):
            if step not in logged:
                mlflow.log_metric(key, value, step=step)


# --------------------------------------------------------------------------- fit and score


@dataclass
class Fitted:
    history: dict[str, list[float]]
    stopped_by: str  # paper_rule | patience | max_epochs
    seconds: float
    selected_by: str = "last"  # train.select
    best_epoch: int | None = None  # the epoch whose weights the model holds (None: no epoch ran)
    about: dict[str, Any] = field(default_factory=dict)  # what the card says of a fit without epochs

    @property
    def epochs_used(self) -> int:
        return len(self.history.get("loss", []))


def compile_model(
    net: keras.Model, make_optimizer: Callable[[], keras.optimizers.Optimizer], run_eagerly: bool,
    loss: keras.losses.Loss | str = "categorical_crossentropy",
) -> None:
    """The paper's loss (or `loss`); the optimizer is made in the model's strategy scope (its
    state mirrored)."""
    with net.distribute_strategy.scope():
        net.compile(
            optimizer=make_optimizer(),
            loss=loss,
            metrics=["accuracy", CovidAUC()],
            # Tracing the train/test graphs costs more than a few tiny epochs (distribute.eager_for).
            run_eagerly=run_eagerly,
        )


def fit(
    plan: Plan, net: keras.Model, train_ds, val_ds, callbacks: Iterable[keras.callbacks.Callback] = (),
    *, run_id: str = "", resume: Resume | None = None,
) -> Fitted:
    """Adam (AdamW when train.weight_decay > 0) on the training split, validated each epoch, until the stop rule or max_epochs;
    from `resume`'s epoch, weights and the optimiser's state when given. With `train.select` other than
    last, the model ends holding the best validation epoch's weights."""
    cfg = plan.cfg
    steps = _steps_per_epoch(plan, train_ds)
    compile_model(net, lambda: optim.make_optimizer(plan.learning_rate, cfg.train, steps),
                  plan.run_eagerly, loss=optim.make_loss(cfg.train))
    rule = cfg.train.stop
    select = (SelectBest(cfg.train.select, plan.cell, resume,
                         rule.patience if rule.rule == "patience" else None)
              if cfg.train.select != "last" else None)
    paper = PaperStopRule(rule.val_accuracy, rule.val_loss) if rule.rule == "paper" else None
    rules = [r for r in (paper, select) if r is not None]
    if resume is not None and resume.model_file is not None:
        # load_weights restores the optimiser's moments and step count only into a built optimizer.
        with net.distribute_strategy.scope():  # its slots mirrored like the weights
            net.optimizer.build(net.trainable_variables)
        net.load_weights(resume.model_file)
        for r in rules:
            if r.name == resume.stopped_by:
                r.stopped_epoch = resume.stopped_epoch
    # Each epoch replaces the previous checkpoint (the optimiser's state makes it ~3x the model); it is
    # removed once the run has finished.
    checkpoint = EpochCheckpoint(plan.cell, {"run_id": run_id, "digest": run_digest(plan)}, resume,
                                 rules, select)
    stopper = StopOnInterrupt(checkpoint)
    done = resume.epochs_done if resume else 0
    if not stopped(rules)["stopped_epoch"] and done < cfg.train.max_epochs:
        with interrupt_after_batch(stopper):
            net.fit(
                train_ds,
                validation_data=val_ds,
                epochs=cfg.train.max_epochs,
                initial_epoch=done,  # callbacks see absolute epochs: MLflow steps continue
                callbacks=[  # the best epoch's weights are saved before the checkpoint names them
                    stopper, RecalibrateBatchNorm(train_ds, cfg.train.bn_recalibration_batches),
                    *rules, checkpoint, MlflowEpochLogger(), *callbacks,
                ],
                shuffle=False,  # the dataset shuffles itself, with the seed
                verbose="auto",
            )
    epochs = len(checkpoint.history.get("loss", []))
    if select is not None:
        select.restore(net, epochs)
    return Fitted(checkpoint.history, stopped(rules)["stopped_by"] or "max_epochs", checkpoint.seconds,
                  selected_by=cfg.train.select,
                  best_epoch=select.best_epoch if select else (epochs or None))


def _steps_per_epoch(plan: Plan, train_ds) -> int:
    """Optimiser steps per epoch, for the learning-rate schedule: the dataset's own count when
    tf.data knows it, else the training rows over the global batch."""
    try:
        known = int(train_ds.cardinality())
    except (AttributeError, TypeError, ValueError):
        known = -1
    if known > 0:
        return known
    batch = int(plan.run_on.get("global_batch_size") or plan.cfg.train.batch_size)
    return optim.steps_per_epoch(len(plan.train_rows), batch)


def fit_datasets(plan: Plan, cfg: Config | None = None) -> tuple[Any, Any]:
    """What `fit` reads: the training and validation batches, decoded once into the uint8 cache.
    `cfg`: the plan's, with train.batch_size the global batch of a distributed run."""
    cfg = cfg or plan.cfg
    if cfg.augment.mode == "offline":  # the versioned copies written by `covidtl augment`
        train_ds = make_offline_dataset(cfg, plan.dataset, plan.spec, plan.image_size)
    else:
        train_ds = make_dataset(plan.train_rows, plan.spec, cfg, plan.image_size, training=True, cache=True)
    # Validation runs BatchNorm in inference mode, so its batch size changes only the speed. The
    # final scores (`score`) decode the files as `covidtl evaluate` and `predict` do.
    val_ds = make_dataset(plan.rows("val"), plan.spec, cfg, plan.image_size, training=False, cache=True,
                          batch_size=VALIDATION_BATCH_FACTOR * cfg.train.batch_size)
    return train_ds, val_ds


def score(plan: Plan, net: keras.Model, split: str = "test") -> Scored | None:
    """The model's predictions on one split (None if that split holds no readable image)."""
    rows = readable_rows(plan.rows(split))
    y_true, prob = predict(net, make_dataset(rows, plan.spec, plan.cfg, plan.image_size, training=False))
    if not len(y_true):
        return None
    return Scored.of(rows, y_true, prob, plan.image_size)


def score_frozen(plan: Plan, frozen: FrozenTraining, split: str = "test") -> Scored | None:
    """`score` through the stored features: the top on them is the network on the images."""
    rows, y_true, prob = frozen.predict(plan.rows(split))
    if not len(y_true):
        return None
    return Scored.of(rows, y_true, prob, plan.image_size)


def frozen_training(plan: Plan, net: keras.Model) -> FrozenTraining | None:
    """The stored-feature path for a network with a frozen part (None: the whole network trains
    on images every epoch). A linear probe always reads features: it has no epochs to run through."""
    cut = cache_cut(plan)
    if plan.cfg.train.head == "linear_probe":
        cut = cut or BASE
    return FrozenTraining(plan, net, cut) if cut is not None else None


def fit_linear_probe(plan: Plan, net: keras.Model, frozen: FrozenTraining) -> Fitted:
    """`train.head: linear_probe`: the logistic regression fitted on the training rows' pooled
    features (C by grouped CV inside them) becomes the network's Dense(2)."""
    started = time.perf_counter()
    rows = readable_rows(plan.train_rows)
    settings = plan.cfg.train.linear_probe
    probe = linear_probe.fit(frozen.features(rows), label_indices(rows), rows["group"].to_numpy(),
                             settings.c_grid, settings.folds, plan.cfg.train.seed)
    net.get_layer("probabilities").set_weights(list(linear_probe.weights_for_dense(probe)))
    about = {"c": probe.c, "inner_folds": probe.inner_folds, "search": probe.search,
             "train_images": len(rows)}
    mlflow.log_params({"linear_probe_c": probe.c, "linear_probe_inner_folds": probe.inner_folds})
    mlflow.log_dict(about, "linear_probe.json")
    return Fitted({}, "linear_probe", time.perf_counter() - started, selected_by="linear_probe_grouped_cv",
                  about={"linear_probe": about})


def example_images(plan: Plan) -> np.ndarray:
    """One validation image as the model takes it (MLflow's input example)."""
    rows = readable_rows(plan.rows("val")).head(1)
    return example_batch(make_dataset(rows, plan.spec, plan.cfg, plan.image_size, training=False))


# --------------------------------------------------------------------------- the run


def train(
    cfg: Config,
    model: str,
    init: str,
    dataset: str,
    *,
    lr: float | None = None,
    lr_source: str | None = None,
    extra_callbacks: Iterable[keras.callbacks.Callback] = (),
    run_name: str | None = None,
    nested: bool = False,
    evaluate_test: bool = True,
    out_dir: str | Path | None = None,
    log_model: bool | None = True,
    restart: bool = False,
    split_file: str | Path | None = None,
    say: Callable[[str], None] = lambda line: None,
) -> TrainResult:
    """Train `model` from `init` on `dataset`'s split; one MLflow run; the cell's files on disk.

    A checkpoint of the same settings in the cell continues its run; `restart` starts over.
    `log_model`: True logs the model to MLflow, False never, None only to a tracking server."""
    tracking.tracking_uri()  # a tracking server that does not answer stops us before any training
    dist = distribute.setup(cfg.train)  # before any TensorFlow op: TF_CONFIG's workers connect here
    if not dist.is_chief:  # the chief records the run; the other workers only train
        out_dir = distribute.worker_scratch()
    plan = distribute.adapt(plan_run(cfg, model, init, dataset, lr=lr, lr_source=lr_source,
                                     out_dir=out_dir, split_file=split_file), dist)
    # Before the checkpoint is looked at: a second process would otherwise resume this one's run.
    with locks.hold(plan.cell.dir, "covidtl train", say):
        return _train_plan(plan, dist, dataset, extra_callbacks=extra_callbacks, run_name=run_name,
                           nested=nested, evaluate_test=evaluate_test, log_model=log_model,
                           restart=restart, say=say)


def _train_plan(
    plan: Plan, dist: distribute.Distribution, dataset: str, *, extra_callbacks, run_name: str | None,
    nested: bool, evaluate_test: bool, log_model: bool | None, restart: bool, say: Callable[[str], None],
) -> TrainResult:
    """`train` of a planned run, its cell's lock held."""
    resume = checkpoint_to_resume(plan, restart)
    if resume is not None:
        say(f"Resuming run {resume.run_id} after epoch {resume.epochs_done} from {plan.cell.checkpoint_dir} "
            "(--restart starts over)")
    cfg = dist.data_config(plan.cfg)  # train.batch_size: the global batch, split across replicas
    keras.utils.set_random_seed(cfg.train.seed)
    # First: a missing weights file fails fast. In the run's precision, mirrored across replicas.
    net = dist.build(lambda: build_model(plan.spec, plan.build_init, cfg.train, plan.image_size))
    frozen = frozen_training(plan, net)
    if frozen is None:
        train_ds, val_ds = fit_datasets(plan, cfg)
    elif cfg.train.head != "linear_probe":
        say(f"Training {plan.model}'s layers after its frozen part ({frozen.parts.cut}) on stored features "
            f"({frozen.cache.root})")
        train_ds, val_ds = frozen.datasets(cfg.train.batch_size, VALIDATION_BATCH_FACTOR * cfg.train.batch_size)
    else:
        train_ds = val_ds = None
    plan.cell.begin()

    tracking.use_experiment(dataset)
    with _start_run(plan, resume, run_name or plan.name, nested) as run:
        try:
            model_path, fitted, metrics = _run(plan, net, train_ds, val_ds, extra_callbacks,
                                               evaluate_test, log_model, run.info.run_id, resume, frozen)
        except TrainingInterrupted as exc:
            plan.cell.write_failed(run.info.run_id, str(exc))
            mlflow.end_run("KILLED")
            raise
        except BaseException as exc:
            plan.cell.write_failed(run.info.run_id, f"{type(exc).__name__}: {str(exc)[:300]}")
            raise

    return TrainResult(
        run_id=run.info.run_id,
        epochs_used=fitted.epochs_used,
        history=fitted.history,
        metrics=metrics,
        model_path=model_path,
        train_seconds=fitted.seconds,
    )


def _start_run(plan: Plan, resume: Resume | None, run_name: str, nested: bool):
    """A new MLflow run, or the checkpoint's run again (a missing one is the user's to fix)."""
    if resume is None:
        return mlflow.start_run(run_name=run_name, nested=nested)
    try:
        return mlflow.start_run(run_id=resume.run_id, nested=nested)
    except MlflowException as exc:
        raise UserError(
            f"{plan.cell.checkpoint_state_file}: its run {resume.run_id} cannot be continued in "
            f"{mlflow.get_tracking_uri()} ({str(exc).splitlines()[0][:200]}); use the tracking URI it "
            "ran in, or pass --restart") from None


def _run(
    plan: Plan, net: keras.Model, train_ds, val_ds, callbacks, evaluate_test: bool, log_model: bool | None,
    run_id: str, resume: Resume | None = None, frozen: FrozenTraining | None = None,
) -> tuple[Path, Fitted, dict[str, float]]:
    """Inside the run: log what it is, fit, score, write the cell's files, log the results."""
    if resume is None:
        log_plan(plan)
        # The run id before any epoch ends: a kill in the first epoch continues this run too.
        plan.cell.save_checkpoint(None, {"run_id": run_id, "digest": run_digest(plan), "epochs_done": 0,
                                         "history": {}, "stopped_epoch": None, "seconds": 0.0})
    else:  # the plan was logged when the run began; only what a kill cut off is added
        log_missing_epochs(run_id, resume.history)
        mlflow.set_tag("resumed_after_epoch", resume.epochs_done)
    if plan.cfg.train.head == "linear_probe":
        fitted = fit_linear_probe(plan, net, frozen)
    else:  # the top alone trains when the frozen part's features are stored: it shares net's layers
        fitted = fit(plan, frozen.parts.top if frozen else net, train_ds, val_ds, callbacks,
                     run_id=run_id, resume=resume)
    if frozen is not None:
        mlflow.log_metrics({"feature_entries_computed": frozen.cache.counts.computed,
                            "feature_entries_read": frozen.cache.counts.read})
    mlflow.log_metrics({"epochs_used": fitted.epochs_used, "train_seconds": fitted.seconds})
    if fitted.best_epoch:
        mlflow.log_metric("best_epoch", fitted.best_epoch)
    mlflow.set_tags({"stopped_by": fitted.stopped_by, "selected_by": fitted.selected_by})
    tracking.log_history(fitted.history)

    operating = {"rule": plan.cfg.eval.operating_point, "threshold": DEFAULT_THRESHOLD,
                 "chosen_on": "none: the run scored no split"}
    scored, metrics = None, {}
    # The model that is saved, scored and explained: with train.tta the network averaged over its
    # views (covidtl.models.wrappers), so its operating point and test figures are the saved model's.
    clean = with_tta(inference_copy(net), plan.cfg.train.tta)
    if frozen is not None and plan.cfg.train.tta == "none":  # the same figures, without the frozen pass
        scorer = lambda split: score_frozen(plan, frozen, split)  # noqa: E731
    else:
        scorer = lambda split: score(plan, clean, split)  # noqa: E731
    if evaluate_test:
        val = scorer("val")
        operating = choose_operating_point(val.scores if val else None, plan.cfg.eval.operating_point)
        mlflow.log_metric("operating_threshold", operating["threshold"])
        scored = scorer("test")
    if scored is not None:
        metrics = scored.scores.summary("test", plan.cfg.eval, operating["threshold"])
        tracking.log_metrics(metrics)
        tracking.log_evaluation(scored.scores.y_true, scored.scores.p_covid, prefix="test")
        tracking.log_curves(scored.scores, prefix="test")
        if len(scored.rows) == len(scored.scores):  # a file dropped at decode time: no aligned sample
            figure = sample_figure(clean, preprocess_for(plan.spec, plan.cfg.train.preprocessing),
                                   scored.rows, scored.scores.y_true, scored.scores.p_covid,
                                   seed=plan.cfg.eval.seed)
            plan.cell.save_figure(figure, plan.cell.gradcam_file)
            mlflow.log_figure(figure, "test_gradcam_samples.png")

    model_path = plan.cell.save_model(clean.save)
    card = training_card(plan, fitted, run_id, operating, frozen)
    root = tables.dataset_root(plan.cfg, plan.dataset)
    plan.cell.write_results(
        metrics={"status": "ok", **metrics, "epochs_used": fitted.epochs_used,
                 "best_epoch": fitted.best_epoch, "selected_by": fitted.selected_by,
                 "operating_threshold": operating["threshold"], "run_id": run_id,
                 **({"feature_entries_computed": frozen.cache.counts.computed,
                     "feature_entries_read": frozen.cache.counts.read} if frozen else {}),
                 "digest": run_digest(plan)},  # what a rerun (cv's fold reuse) compares
        history=fitted.history,
        predictions=scored.predictions(root) if scored else None,
        config_yaml=tracking.config_yaml(plan.cfg),
        card=card,
    )
    mlflow.log_dict(card, "card.json")
    # The study's cells pass None: the DVC output is the one stored copy, but a tracking server's
    # runs must not depend on this disk, so there the model goes to its artifact store too.
    model_uri = None
    if log_model or (log_model is None and tracking.is_remote()):
        example = example_batch(val_ds) if frozen is None else example_images(plan)
        model_uri = tracking.log_keras_model(clean, example)
    mlflow.set_tags(tracking.model_tags(model_path, model_uri))
    plan.cell.remove_checkpoint()
    return model_path, fitted, metrics


def log_plan(plan: Plan) -> None:
    """What the run is, before it trains: tags, the whole config, the run's own params, its data."""
    cfg = plan.cfg
    mlflow.set_tags(run_tags(cfg, plan.model, plan.init, plan.dataset, kind="train"))
    tracking.log_config(cfg)
    # Names apart from `mlflow run`'s entry-point params (lr=auto...): MLflow forbids changes.
    # model, init and dataset share theirs: a value `mlflow run` logged (model=auto) stays, and
    # train.model / train.init say what ran.
    asked = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    own = {"model": plan.model, "init": plan.init, "dataset": plan.dataset}
    mlflow.log_params({
        **{key: value for key, value in own.items() if key not in asked},
        "learning_rate": plan.learning_rate, "lr_source": plan.lr_source,
        "run_eagerly_used": plan.run_eagerly,  # train.run_eagerly (auto included) as it ran
        "image_size": plan.image_size, "train_images": len(plan.train_rows),
        "val_images": len(plan.rows("val")), "test_images": len(plan.rows("test")),
        **plan.run_on,
    })
    provenance = pretrained.provenance(plan.model, plan.build_init)
    if provenance:  # the exact file it started from, whatever its path
        mlflow.log_params({"init_file": provenance["file"], "init_sha256": provenance["sha256"]})
        mlflow.set_tag("init_source", provenance["source"])
    tracking.log_split_inputs(
        plan.dataset, plan.split_file, paths.manifest_path(cfg, plan.dataset),
        {"train": plan.train_rows, "val": plan.rows("val"), "test": plan.rows("test")},
    )


def run_tags(cfg: Config, model: str, init: str, dataset: str, kind: str) -> dict[str, str]:
    """What ties a run to its exact code and data (and to the DVC experiment that ran it)."""
    return {
        "model": model,
        "init": init_label(init),
        "dataset": dataset,
        "split_strategy": cfg.split.strategy,
        "git_commit": tracking.git_commit(),
        "manifest_sha256": file_sha256(paths.manifest_path(cfg, dataset)),
        "cell": cell_name(model, init, dataset, cfg.profile),
        "profile": cfg.profile,
        "kind": kind,
        **tracking.experiment_tags(),
    }
