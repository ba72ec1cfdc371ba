"""The callbacks of a training run: the stop rules, the best epoch, precise BatchNorm, the MLflow
epoch log, the epoch checkpoint and Ctrl-C, and the AUC metric the epochs report."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import keras
import mlflow
import numpy as np
import tensorflow as tf

from covidtl import paths
from covidtl.cells import EPOCH_METRICS, Cell
from covidtl.errors import UserError
from covidtl.train.plan import Resume


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
