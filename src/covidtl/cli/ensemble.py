"""Command for an ensemble of trained models."""

from __future__ import annotations

import click

from covidtl.cli.options import config_from
from covidtl.errors import UserError
from covidtl.mlflow_store import tracking_uri


@click.command()
@click.argument("members", nargs=-1, metavar="MEMBER...")
@click.option("--cv", "cv_dir", default=None,
              help="Also take the fold models of a `covidtl cv` run (cv/<dataset>/<cell>).")
@click.option("--out", required=True, help="The ensemble's folder (model/model.keras, card.json, metrics).")
@click.option("--log-model/--no-log-model", default=True, show_default=True,
              help="Also store the ensemble's model in MLflow (as `covidtl train` does).")
@click.pass_context
def ensemble(ctx, members, cv_dir, out, log_model) -> None:
    """One model averaging MEMBERs' probabilities (model.keras files, cell folders, MLflow run ids
    or runs:/ URIs) of one dataset, input size and preprocessing; logs a kind=ensemble run."""
    if len(members) + (cv_dir is not None) < 1 or (cv_dir is None and len(members) < 2):
        raise UserError("covidtl ensemble: give at least two members (model.keras, cell folders or "
                        "run ids), or --cv DIR")
    tracking_uri()  # an unreachable tracking server: one line before MLflow and TensorFlow load
    from covidtl.ensemble import build_ensemble  # here, not above: keeps the CLI's start-up free of TensorFlow

    result = build_ensemble(config_from(ctx), list(members), out, cv_dir=cv_dir, log_model=log_model)
    m = result.metrics
    shown = ", ".join(f"{k} {m[f'test_{k}']:.4f}" for k in ("accuracy", "roc_auc") if f"test_{k}" in m)
    click.echo(f"ensemble of {len(result.members)}: test {shown or 'not scored'}; operating threshold "
               f"{result.operating['threshold']:.4g}; run {result.run_id}; model {result.model_path}")


COMMANDS: list[click.Command] = [ensemble]
