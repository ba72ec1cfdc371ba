"""Commands for train and evaluate."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from covidtl.cells import Cell
from covidtl.cli.options import AUTO, AUTO_INT, INIT, INIT_HELP, MODEL_HELP, config_from, recipe_from, scored_data_options
from covidtl.errors import UserError
from covidtl.mlflow_store import tracking_uri
from covidtl.weight_records import unavailable_reason


def _rate(value: str | None) -> float | None:
    """`--lr auto` (or nothing) = the model's rate from params.yaml."""
    if value is None or value.strip().lower() in ("", "auto", "default", "none"):
        return None
    try:
        return float(value)
    except ValueError:
        raise UserError(f"--lr {value}: not a number; give e.g. 1e-4, or auto") from None


@click.command()
@click.option("--model", default=AUTO, show_default=True, help=MODEL_HELP)
@click.option("--init", type=INIT, default=AUTO, show_default=True, help=INIT_HELP)
@click.option("--dataset", required=True, help="A dataset of params.yaml (data.datasets).")
@click.option("--epochs", type=AUTO_INT, default=None, help="Cap on epochs; auto = train.max_epochs.")
@click.option("--lr", default=None, help="Learning rate (Adam, or AdamW when train.weight_decay > 0); auto = train.learning_rates.<model>; "
              "tuned = the best rate of `covidtl tune` under this profile "
              "(tuned/<model>-<init>-<dataset>[-<profile>].yaml).")
@click.option("--batch-size", type=AUTO_INT, default=None, help="Batch size per replica (GPU); auto = train.batch_size.")
@click.option("--seed", type=AUTO_INT, default=None, help="Seed; auto = train.seed.")
@click.option("--image-size", type=int, default=None, help="Input size (train.image_size.<model>).")
@click.option("--preprocessing", type=click.Choice(["model", "rescale"]), default=None,
              help="model: the backbone's preprocess_input; rescale: the paper's [0, 1].")
@click.option("--max-train-samples", type=int, default=None, help="Use only this many training images.")
@click.option("--out", default=None, help="Output folder (default models/<model>-<init>-<dataset>).")
@click.option("--log-model/--no-log-model", default=True, show_default=True,
              help="Also store the model in MLflow (the DVC study keeps its one copy as a DVC output; "
              "with a tracking server at an http(s) MLFLOW_TRACKING_URI it is stored there anyway).")
@click.option("--skip-unavailable", is_flag=True,
              help="If the init's ImageNet weights are not available, write a skipped cell and exit 0.")
@click.option("--restart", is_flag=True,
              help="Start over, dropping the checkpoint a killed or interrupted run left (default: continue it).")
@click.option("--prepare/--no-prepare", default=True, show_default=True,
              help="Make a missing split table first (synth, ingest, split), as `dvc repro split@DATASET`.")
@click.pass_context
def train(ctx, model, init, dataset, epochs, lr, batch_size, seed, image_size, preprocessing,
          max_train_samples, out, log_model, skip_unavailable, restart, prepare) -> None:
    """Train MODEL from INIT on DATASET's split; logs one MLflow run and writes the cell's files.

    After a kill or Ctrl-C, the same command continues the run from its last completed epoch."""
    model, init = recipe_from(ctx, model, init)
    reason = unavailable_reason(model, init) if skip_unavailable else None
    if reason:
        # With --out the folder is given: no params file is needed to name it (a profile's is).
        profile = config_from(ctx).profile if not out else "paper"
        cell = Cell(Path(out)) if out else Cell.of(model, init, dataset, profile=profile)
        cell.write_skipped(reason)
        click.echo(f"SKIPPED {cell.name}: {reason}", err=True)
        return

    cfg = config_from(ctx, **{
        "train.max_epochs": epochs, "train.batch_size": batch_size, "train.seed": seed,
        f"train.image_size.{model}": image_size, "train.preprocessing": preprocessing,
        "train.max_train_samples": max_train_samples,
    })

    tracking_uri()  # an unreachable tracking server: one line now, not after MLflow and TensorFlow load
    # here, not above: keeps the CLI's start-up free of TensorFlow, which loads after the cheap checks
    from covidtl.train import RunOptions, TrainingInterrupted, plan_run, train as run

    if prepare:
        from covidtl.data.prepare import ensure_split  # here, not above: keeps the CLI's start-up free of pandas

        ensure_split(cfg, dataset)
    source = None
    if lr is not None and lr.strip().lower() == "tuned":
        # here, not above: keeps the CLI's start-up free of Optuna
        from covidtl.tune import tuned_learning_rate, tuned_path

        rate = tuned_learning_rate(cfg, model, dataset, init)
        source = str(tuned_path(cfg, model, init, dataset))
    else:
        rate = _rate(lr)
    plan = plan_run(cfg, model, init, dataset, lr=rate, lr_source=source, out_dir=out)
    options = RunOptions(log_model=log_model or None,  # --no-log-model: only to a tracking server
                         restart=restart)
    try:
        result = run(plan, options)
    except TrainingInterrupted as exc:
        click.echo(str(exc), err=True)
        sys.exit(130)  # 128 + SIGINT, as a shell reports Ctrl-C
    m = result.metrics
    summary = ", ".join(
        f"{k} {m[f'test_{k}']:.4f}" for k in ("accuracy", "recall_covid", "precision_covid", "f1_covid", "roc_auc")
        if f"test_{k}" in m
    )
    click.echo(
        f"train {model}-{init}-{dataset}: {result.epochs_used} epochs in {result.train_seconds:.0f} s; "
        f"test {summary or 'not scored'}; run {result.run_id}; model {result.model_path}"
    )


@click.command()
@scored_data_options
@click.option("--out", default=None, help="Also write metrics.json and predictions.csv here.")
@click.option("--tta", type=click.Choice(["none", "flip", "flip_zoom"]), default="none", show_default=True,
              help="Average a model saved without test-time augmentation over these views here "
                   "(a model trained with train.tta applies its own).")
@click.pass_context
def evaluate(ctx, model_uri, data, split, out, tta) -> None:
    """Score a trained model on a dataset or folder; logs a kind=evaluate MLflow run."""
    tracking_uri()  # an unreachable tracking server: one line before MLflow and TensorFlow load
    from covidtl.evaluate import evaluate as run  # here, not above: keeps the CLI's start-up free of TensorFlow

    result = run(config_from(ctx), model_uri, data, split=split, out_dir=out, tta=tta)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()
                      if k.endswith(("accuracy", "recall_covid", "precision_covid", "f1_covid", "roc_auc")))
    click.echo(f"evaluate {model_uri} on {data}: {result.images} images ({result.scored}); {shown}; "
               f"run {result.run_id}")


COMMANDS: list[click.Command] = [train, evaluate]
