"""Fitting a planned run: Adam (AdamW with weight decay) on the training split until the stop rule
or max_epochs, from a checkpoint when one continues it; or the linear probe's closed-form head."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import keras
import mlflow

from covidtl import linear_probe, optim
from covidtl.config import Config
from covidtl.data.augment import make_offline_dataset
from covidtl.data.pipeline import label_indices, make_dataset, readable_rows
from covidtl.frozen import BASE, FrozenTraining, cache_cut
from covidtl.train.callbacks import (
    CovidAUC,
    EpochCheckpoint,
    MlflowEpochLogger,
    PaperStopRule,
    RecalibrateBatchNorm,
    SelectBest,
    StopOnInterrupt,
    interrupt_after_batch,
    stopped,
)
from covidtl.train.plan import Plan, Resume, run_digest

# ignore_errors() leaves the first epoch's length unknown; Keras then warns at its end.
warnings.filterwarnings("ignore", message="Your input ran out of data")

VALIDATION_BATCH_FACTOR = 4  # validation batches are this many training batches


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
    """Adam (AdamW when train.weight_decay > 0) on the training split, validated each epoch, until the
    stop rule or max_epochs; from `resume`'s epoch, weights and the optimiser's state when given. With
    `train.select` other than last, the model ends holding the best validation epoch's weights."""
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
    return optim.steps_per_epoch(len(plan.train_rows), plan.on.global_batch(plan.cfg.train.batch_size))


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
