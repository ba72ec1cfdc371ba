"""Commands for the learning-rate search."""

from __future__ import annotations

import click

from covidtl.cli.options import AUTO, AUTO_INT, INIT, MODEL_HELP, config_from, model_from
from covidtl.mlflow_store import tracking_uri


@click.command("tune")
@click.option("--model", default=AUTO, show_default=True, help=MODEL_HELP)
@click.option("--dataset", required=True, help="Dataset name from params.yaml, e.g. ct.")
@click.option(
    "--trials", type=AUTO_INT, default=None,
    help="Trials to run now [tune.trials]; re-running with the same settings adds that many more "
    "to the same study.",
)
@click.option(
    "--total", is_flag=True,
    help="Count the study's finished trials towards --trials: stop once it holds that many.",
)
@click.option("--init", type=INIT, default=AUTO, show_default=True,
              help="Init whose rate is searched; auto = tune.init (its own key: tune/dvc.yaml names its outputs by it).")
@click.option("--epochs", type=AUTO_INT, default=None, help="Epochs per trial [tune.epochs].")
@click.option(
    "--storage", default=None, metavar="URL",
    help="Optuna storage [tune.storage: sqlite:///optuna.db]; a postgresql:// URL lets several "
    "workers share one study.",
)
@click.option(
    "--bounds", type=float, nargs=2, default=None, metavar="LOW HIGH",
    help="Learning-rate range [tune.bounds.<model>, else tune.decades around the paper's rate].",
)
@click.option(
    "--enqueue", type=float, multiple=True, metavar="LR",
    help="Also try this rate (repeatable); the paper's rate is always queued first.",
)
@click.pass_context
def tune(ctx, model, dataset, trials, total, init, epochs, storage, bounds, enqueue) -> None:
    """Search the learning rate of MODEL on DATASET with Optuna (validation split only)."""
    model = model_from(ctx, model)  # the searched init is tune.init's, not train.init's
    cfg = config_from(
        ctx, **{"tune.trials": trials, "tune.epochs": epochs, "tune.init": None if init is None else init.text,
                "tune.storage": storage}
    )

    tracking_uri()  # an unreachable tracking server: one line before MLflow and TensorFlow load
    from covidtl.tune import run_study  # here, not above: keeps the CLI's start-up free of TensorFlow

    result = run_study(
        cfg, model, dataset, bounds=tuple(bounds) if bounds else None,
        enqueue_rates=tuple(enqueue), total=total,
    )
    counts = ", ".join(f"{n} {state}" for state, n in result.counts.items() if n)
    acc = result.best_val_accuracy
    acc = "" if acc is None else f", val_accuracy {acc:.4f}"
    click.echo(
        f"{result.study}: {counts}; best lr {result.best_lr:.3g} (trial {result.best_trial}, "
        f"{cfg.tune.metric} {result.best_value:.4f}{acc}) in {result.seconds:.0f} s -> "
        f"{result.tuned_file} (MLflow run {result.run_id})"
    )


COMMANDS: list[click.Command] = [tune]
