"""The values a method runs with: params.yaml's `adapt` group, and the rules it shares with the
rest of the study (the operating-point rule, the linear probe's C grid)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from covidtl.config import Config


@dataclass(frozen=True)
class AdaptSettings:
    batch_size: int  # every method's batches (statistics, fine-tuning, Tent's steps)
    learning_rate: float  # head / head_bn fine-tuning (Adam)
    epochs: int  # passes over the labelled images (head, head_bn)
    tent_steps: int  # Tent's entropy steps on the unlabelled pool
    tent_learning_rate: float
    operating_point: str  # eval.operating_point: the threshold rule on the labelled images
    c_grid: tuple[float, ...]  # probe_refit: train.linear_probe's
    folds: int
    # head / head_bn, tuned inside K: the (learning rate, epochs) pair of this grid with the lowest
    # out-of-fold cross-entropy over the labelled groups (covidtl.adapt.tuning); empty: no tuning.
    tune_learning_rates: tuple[float, ...] = ()
    tune_epochs: tuple[int, ...] = ()
    tune_folds: int = 3

    @classmethod
    def of(cls, cfg: Config) -> AdaptSettings:
        a = cfg.adapt
        return cls(a.batch_size, a.learning_rate, a.epochs, a.tent_steps, a.tent_learning_rate,
                   cfg.eval.operating_point, tuple(cfg.train.linear_probe.c_grid), cfg.train.linear_probe.folds,
                   tuple(a.tune_learning_rates), tuple(a.tune_epochs), a.tune_folds)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
