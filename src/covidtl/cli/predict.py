"""Commands that use a trained model on new images: predict, and register it for serving."""

from __future__ import annotations

import click

from covidtl.cli.options import config_from
from covidtl.mlflow_store import tracking_uri


@click.command()
@click.argument("inputs", nargs=-1, required=True, metavar="IMAGE_OR_FOLDER...")
@click.option("--model-uri", required=True,
              help="A model.keras (or its cell folder), runs:/<run_id>/model, "
                   "models:/<name>/<version> or models:/<name>@<alias>.")
@click.option("--out", default=None, help="Also write the table to FILE.csv or FILE.json.")
@click.pass_context
def predict(ctx, inputs, model_uri, out) -> None:
    """p_covid and the label at the model's operating point, per image (folders: subfolders too)."""
    # here, not above: keeps the CLI's start-up free of TensorFlow
    from covidtl.data.images import image_files
    from covidtl.predict import Predictor, check_out, predict_files, write_predictions
    from covidtl.trained import load_trained

    image_files(inputs, purpose="to predict")  # a missing path fails before the model loads
    if out is not None:
        check_out(out)
    loaded = load_trained(model_uri, config_from(ctx))
    threshold = Predictor(loaded).threshold
    results = predict_files(loaded, inputs)

    width = max(len(r.file) for r in results)
    click.echo(f"{'file':<{width}}  p_covid  label")
    for r in results:
        if r.error is None:
            click.echo(f"{r.file:<{width}}  {r.p_covid:7.4f}  {r.label}")
        else:
            click.echo(f"{r.file:<{width}}  {'-':>7}  not scored: {r.error}")
    bad = sum(r.error is not None for r in results)
    click.echo(f"predict {model_uri}: {len(results) - bad} images scored (label covid at "
               f"p_covid >= {threshold:.4g}); {bad} unreadable file{'s' if bad != 1 else ''}")
    if out is not None:
        click.echo(f"wrote {write_predictions(results, out, threshold)}")


@click.command()
@click.argument("model_path", metavar="CELL_OR_MODEL_PATH")
@click.option("--name", required=True, help="The registered model's name in the MLflow Model Registry.")
@click.option("--alias", default="champion", show_default=True,
              help="The alias the new version gets (serve it as models:/<name>@<alias>).")
@click.pass_context
def register(ctx, model_path, name, alias) -> None:
    """Log a study cell's model as a servable MLflow model, register it and set an alias."""
    tracking_uri()  # an unreachable tracking server: one line before MLflow and TensorFlow load
    from covidtl.serving.register import register_model  # here, not above: keeps the CLI's start-up free of TensorFlow

    result = register_model(config_from(ctx), model_path, name, alias)
    click.echo(f"registered {result.uri} (version {result.version}, run {result.run_id}); serve it "
               f"with: mlflow models serve -m {result.uri} --env-manager local --host 127.0.0.1")


COMMANDS: list[click.Command] = [predict, register]
