"""Train one study cell (model x init x dataset): Adam (AdamW with weight decay), the paper's stop
rule, tracked in MLflow.

A run is planned first (`plan_run`: data, sizes, where it runs, the learning rate), then `train(plan)`
fits (`covidtl.train.fit`), scores (`score`) and records it (`record`): one MLflow run, one cell
folder (`cells.Cell`).

Each completed epoch is checkpointed (the model with the optimiser's state, the run id, the history); the
same command after a kill or Ctrl-C continues that run from there (`checkpoint_to_resume`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
from mlflow.exceptions import MlflowException

from covidtl import distribute, locks, tracking
from covidtl.cells import Cell
from covidtl.errors import UserError
from covidtl.frozen import FrozenTraining
from covidtl.models.registry import build_model
from covidtl.models.wrappers import with_tta
from covidtl.train.callbacks import (
    CovidAUC,
    PaperStopRule,
    RecalibrateBatchNorm,
    SelectBest,
    TrainingInterrupted,
    trainable_batchnorms,
)
from covidtl.train.fit import (
    VALIDATION_BATCH_FACTOR,
    Fitted,
    compile_model,
    fit,
    fit_datasets,
    fit_linear_probe,
    frozen_training,
)
from covidtl.train.plan import LearningRate, Plan, Resume, checkpoint_to_resume, plan_run, rows_of, run_digest
from covidtl.train.record import log_fit, log_missing_epochs, log_plan, record_results, run_tags
from covidtl.train.score import example_batch, example_images, inference_copy, predict, score_test, scorer_for

__all__ = [
    "CovidAUC", "Fitted", "LearningRate", "PaperStopRule", "Plan", "RecalibrateBatchNorm", "Resume",
    "RunOptions", "SelectBest", "TrainResult", "TrainingInterrupted", "checkpoint_to_resume",
    "compile_model", "example_batch", "fit", "log_missing_epochs", "plan_run", "predict", "rows_of",
    "run_digest", "run_tags", "train", "trainable_batchnorms",
]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_id: str
    epochs_used: int
    history: dict[str, list[float]]
    metrics: dict[str, float]
    model_path: Path
    train_seconds: float = 0.0


@dataclass(frozen=True)
class RunOptions:
    """How a planned run is run and recorded, beside what it is (the plan).

    `log_model`: True logs the model to MLflow, False never, None only to a tracking server.
    `restart`: drop a checkpoint of this run instead of continuing it."""

    run_name: str | None = None  # the MLflow run's name; None: the cell's
    nested: bool = False
    log_model: bool | None = True
    restart: bool = False
    evaluate_test: bool = True
    extra_callbacks: tuple[keras.callbacks.Callback, ...] = ()


def train(plan: Plan, options: RunOptions = RunOptions()) -> TrainResult:
    """Train the planned run: one MLflow run, the cell's files on disk.

    A checkpoint of the same settings in the cell continues its run; `options.restart` starts over."""
    tracking.tracking_uri()  # a tracking server that does not answer stops us before any training
    if not plan.on.is_chief:  # the chief records the run; the other workers only train
        plan = dataclasses.replace(plan, cell=Cell(distribute.worker_scratch()))
    # Before the checkpoint is looked at: a second process would otherwise resume this one's run.
    with locks.hold(plan.cell.dir, "covidtl train"):
        return _train_plan(plan, options)


def _train_plan(plan: Plan, options: RunOptions) -> TrainResult:
    """`train` of a planned run, its cell's lock held."""
    resume = checkpoint_to_resume(plan, options.restart)
    if resume is not None:
        log.info(f"Resuming run {resume.run_id} after epoch {resume.epochs_done} from {plan.cell.checkpoint_dir} "
                 "(--restart starts over)")
    cfg = plan.on.data_config(plan.cfg)  # train.batch_size: the global batch, split across replicas
    keras.utils.set_random_seed(cfg.train.seed)
    # First: a missing weights file fails fast. In the run's precision, mirrored across replicas.
    net = plan.on.build(lambda: build_model(plan.spec, plan.build_init, cfg.train, plan.image_size))
    frozen = frozen_training(plan, net)
    if frozen is None:
        train_ds, val_ds = fit_datasets(plan, cfg)
    elif cfg.train.head != "linear_probe":
        log.info(f"Training {plan.model}'s layers after its frozen part ({frozen.parts.cut}) on stored features "
                 f"({frozen.cache.root})")
        train_ds, val_ds = frozen.datasets(cfg.train.batch_size, VALIDATION_BATCH_FACTOR * cfg.train.batch_size)
    else:
        train_ds = val_ds = None
    plan.cell.begin()

    tracking.use_experiment(plan.dataset)
    with _start_run(plan, resume, options.run_name or plan.name, options.nested) as run:
        try:
            model_path, fitted, metrics = _run(plan, options, net, train_ds, val_ds, run.info.run_id,
                                               resume, frozen)
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
    plan: Plan, options: RunOptions, net: keras.Model, train_ds, val_ds, run_id: str,
    resume: Resume | None = None, frozen: FrozenTraining | None = None,
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
        fitted = fit(plan, frozen.parts.top if frozen else net, train_ds, val_ds, options.extra_callbacks,
                     run_id=run_id, resume=resume)
    log_fit(fitted, frozen)

    # The model that is saved, scored and explained: with train.tta the network averaged over its
    # views (covidtl.models.wrappers), so its operating point and test figures are the saved model's.
    clean = with_tta(inference_copy(net), plan.cfg.train.tta)
    operating, scored = score_test(plan, scorer_for(plan, clean, frozen), options.evaluate_test)
    if options.evaluate_test:
        mlflow.log_metric("operating_threshold", operating["threshold"])
    model_path, metrics = record_results(
        plan, clean, fitted, operating, scored, frozen, run_id, log_model=options.log_model,
        example=lambda: example_batch(val_ds) if frozen is None else example_images(plan))
    plan.cell.remove_checkpoint()
    return model_path, fitted, metrics
