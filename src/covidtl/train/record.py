"""What a run records: its plan in MLflow before it trains, and after it the cell's files (model,
metrics, history, predictions, Grad-CAM sample, config, card) with their MLflow copies.

The one place where training reaches the Grad-CAM sample (`sample_figure`) and the model card
(`training_card`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import keras
import mlflow
import numpy as np

from covidtl import paths, tracking, weight_records
from covidtl.cards import training_card
from covidtl.cells import EPOCH_METRICS, cell_name
from covidtl.config import Config
from covidtl.data import tables
from covidtl.gradcam import sample_figure
from covidtl.files import file_sha256
from covidtl.frozen import FrozenTraining
from covidtl.inits import Init, init_label
from covidtl.models.registry import preprocess_for
from covidtl.scores import Scored
from covidtl.train.fit import Fitted
from covidtl.train.plan import Plan, run_digest


def log_plan(plan: Plan) -> None:
    """What the run is, before it trains: tags, the whole config, the run's own params, its data."""
    cfg = plan.cfg
    mlflow.set_tags(run_tags(cfg, plan.model, plan.start, plan.dataset, kind="train"))
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
    provenance = weight_records.provenance(plan.model, plan.build_init)
    if provenance:  # the exact file it started from, whatever its path
        mlflow.log_params({"init_file": provenance["file"], "init_sha256": provenance["sha256"]})
        mlflow.set_tag("init_source", provenance["source"])
    tracking.log_split_inputs(
        plan.dataset, plan.split_file, paths.manifest_path(cfg, plan.dataset),
        {"train": plan.train_rows, "val": plan.rows("val"), "test": plan.rows("test")},
    )


def run_tags(cfg: Config, model: str, init: Init | str, dataset: str, kind: str) -> dict[str, str]:
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


def log_missing_epochs(run_id: str, history: dict[str, list[float]]) -> None:
    """Per-epoch metrics a kill cut off between the checkpoint and its MLflow log: each step once."""
    client = mlflow.tracking.MlflowClient()
    for key in EPOCH_METRICS:
        logged = {m.step for m in client.get_metric_history(run_id, key)}
        for step, value in enumerate(history.get(key, []), start=1):
            if step not in logged:
                mlflow.log_metric(key, value, step=step)


def log_fit(fitted: Fitted, frozen: FrozenTraining | None) -> None:
    """How training went: its epochs and seconds, the best epoch, what stopped and selected it."""
    if frozen is not None:
        mlflow.log_metrics(feature_counts(frozen))
    mlflow.log_metrics({"epochs_used": fitted.epochs_used, "train_seconds": fitted.seconds})
    if fitted.best_epoch:
        mlflow.log_metric("best_epoch", fitted.best_epoch)
    mlflow.set_tags({"stopped_by": fitted.stopped_by, "selected_by": fitted.selected_by})
    tracking.log_history(fitted.history)


def feature_counts(frozen: FrozenTraining) -> dict[str, int]:
    """The frozen part's feature entries: computed in this run, or read from earlier ones."""
    return {"feature_entries_computed": frozen.cache.counts.computed,
            "feature_entries_read": frozen.cache.counts.read}


def record_results(
    plan: Plan, clean: keras.Model, fitted: Fitted, operating: dict[str, Any], scored: Scored | None,
    frozen: FrozenTraining | None, run_id: str, *, log_model: bool | None, example: Callable[[], np.ndarray],
) -> tuple[Path, dict[str, float]]:
    """The scored model's figures and files: test metrics and curves, the Grad-CAM sample, the
    model, the cell's record and card; the model in MLflow too when `log_model` asks for it."""
    metrics: dict[str, float] = {}
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
                 **(feature_counts(frozen) if frozen else {}),
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
        model_uri = tracking.log_keras_model(clean, example())
    mlflow.set_tags(tracking.model_tags(model_path, model_uri))
    return model_path, metrics
