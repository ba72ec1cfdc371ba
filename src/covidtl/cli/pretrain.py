"""Command for self-supervised pretraining (SimCLR) on the training splits' images."""

from __future__ import annotations

import click

from covidtl.cli.options import AUTO, AUTO_INT, MODEL_HELP, config_from, model_from
from covidtl.mlflow_store import tracking_uri


@click.command()
@click.option("--model", default=AUTO, show_default=True, help=MODEL_HELP)
@click.option("--datasets", default=None,
              help="Comma-separated datasets whose training split it learns from; auto = pretrain.datasets.")
@click.option("--epochs", type=AUTO_INT, default=None, help="Epochs; auto = pretrain.epochs.")
@click.option("--out", default=None, help="The .weights.h5 file (default <pretrain.out>/<model>.weights.h5).")
@click.option("--prepare/--no-prepare", default=True, show_default=True,
              help="Make a missing split table first (synth, ingest, split), as `dvc repro split@DATASET`.")
@click.pass_context
def pretrain(ctx, model, datasets, epochs, out, prepare) -> None:
    """Learn MODEL's backbone from the unlabelled training images (SimCLR); writes a weights file
    that `covidtl train --init FILE` (or --init finetune:FILE) loads, and its record beside it."""
    names = [d.strip() for d in datasets.split(",") if d.strip()] if datasets and datasets != "auto" else None
    model = model_from(ctx, model)
    cfg = config_from(ctx, **{"pretrain.epochs": epochs, "pretrain.datasets": names})

    tracking_uri()  # an unreachable tracking server: one line now, not after TensorFlow loads
    if prepare:
        from covidtl.data.prepare import ensure_split  # here, not above: keeps the CLI's start-up free of pandas

        for name in cfg.pretrain.datasets:
            ensure_split(cfg, name)
    from covidtl.pretrain import pretrain as run  # here, not above: keeps the CLI's start-up free of TensorFlow

    result = run(cfg, model, out=out)
    click.echo(f"pretrain {model}: {result.images} training images, loss {result.losses[0]:.4f} -> "
               f"{result.losses[-1]:.4f}; run {result.run_id}; weights {result.weights_file}, "
               f"record {result.record_file}")


COMMANDS: list[click.Command] = [pretrain]
