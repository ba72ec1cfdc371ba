"""Scoring a fitted run: its predictions on a split, through the images or the stored features,
and the operating point chosen on validation before the test split is scored."""

from __future__ import annotations

from typing import Any, Callable

import keras
import numpy as np

from covidtl.data.pipeline import make_dataset, readable_rows
from covidtl.errors import UserError
from covidtl.frozen import FrozenTraining
from covidtl.scores import DEFAULT_THRESHOLD, Scored, choose_operating_point
from covidtl.train.plan import Plan


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


def example_images(plan: Plan) -> np.ndarray:
    """One validation image as the model takes it (MLflow's input example)."""
    rows = readable_rows(plan.rows("val")).head(1)
    return example_batch(make_dataset(rows, plan.spec, plan.cfg, plan.image_size, training=False))


def score_test(
    plan: Plan, scorer: Callable[[str], Scored | None], evaluate_test: bool,
) -> tuple[dict[str, Any], Scored | None]:
    """The operating point (the `eval.operating_point` rule, chosen on the validation split) and the
    test split's scores; without `evaluate_test`, the default threshold and no scores."""
    if not evaluate_test:
        return {"rule": plan.cfg.eval.operating_point, "threshold": DEFAULT_THRESHOLD,
                "chosen_on": "none: the run scored no split"}, None
    val = scorer("val")
    return choose_operating_point(val.scores if val else None, plan.cfg.eval.operating_point), scorer("test")


def scorer_for(plan: Plan, clean: keras.Model, frozen: FrozenTraining | None) -> Callable[[str], Scored | None]:
    """How the saved model's figures are computed: through the stored features when there are
    some and no test-time views (the same figures, without the frozen pass), else on the images."""
    if frozen is not None and plan.cfg.train.tta == "none":
        return lambda split: score_frozen(plan, frozen, split)
    return lambda split: score(plan, clean, split)
