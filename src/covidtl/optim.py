"""The optimiser and loss a run trains with: the paper's Adam at a constant rate, or the stronger
recipe's levers (decoupled weight decay, linear warm-up, cosine decay, label smoothing).

The schedule counts optimiser steps, so a resumed run (whose checkpoint restores the step count)
continues the same curve.
"""

from __future__ import annotations

import math

import keras

from covidtl.config import TrainConfig


def steps_per_epoch(train_images: int, global_batch: int) -> int:
    """Optimiser steps in one pass over `train_images` (the last batch may be short)."""
    return max(1, math.ceil(train_images / max(1, global_batch)))


def learning_rate_schedule(rate: float, train_cfg: TrainConfig, steps: int):
    """`rate` itself (constant, no warm-up), or a Keras schedule over `train.max_epochs` epochs."""
    # A run shorter than its profile's warm-up (a one-epoch check) keeps at least one epoch after it.
    warmup = min(train_cfg.warmup_epochs, train_cfg.max_epochs - 1) * steps
    total = train_cfg.max_epochs * steps
    if train_cfg.schedule == "constant" and not warmup:
        return rate
    if train_cfg.schedule == "cosine":
        # From 0 up to `rate` over the warm-up, then half a cosine down to 0 at the last step.
        return keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if warmup else rate, decay_steps=max(1, total - warmup),
            warmup_target=rate if warmup else None, warmup_steps=warmup,
        )
    return WarmupThenConstant(rate, warmup)


@keras.saving.register_keras_serializable(package="covidtl")
class WarmupThenConstant(keras.optimizers.schedules.LearningRateSchedule):
    """A linear ramp from 0 to `rate` over `warmup_steps`, then `rate`."""

    def __init__(self, rate: float, warmup_steps: int):
        self.rate = float(rate)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        ramp = (step + 1.0) / float(max(1, self.warmup_steps))
        return self.rate * keras.ops.minimum(1.0, ramp)

    def get_config(self):
        return {"rate": self.rate, "warmup_steps": self.warmup_steps}


def make_optimizer(rate: float, train_cfg: TrainConfig, steps: int) -> keras.optimizers.Optimizer:
    """Adam (the paper) or AdamW when `train.weight_decay` > 0, on the run's schedule."""
    lr = learning_rate_schedule(rate, train_cfg, steps)
    if train_cfg.weight_decay > 0:
        return keras.optimizers.AdamW(learning_rate=lr, weight_decay=train_cfg.weight_decay)
    return keras.optimizers.Adam(learning_rate=lr)


def make_loss(train_cfg: TrainConfig) -> keras.losses.Loss:
    """The paper's categorical cross-entropy, with `train.label_smoothing` when set."""
    return keras.losses.CategoricalCrossentropy(label_smoothing=train_cfg.label_smoothing)
