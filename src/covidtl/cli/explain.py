"""Commands that show what a trained model uses: Grad-CAM overlays and the shortcut probe."""

from __future__ import annotations

import click

from covidtl.cli.options import config_from, scored_data_options
from covidtl.errors import UserError
from covidtl.paths import CLASSES


@click.command()
@click.argument("inputs", nargs=-1, required=True, metavar="IMAGE_OR_FOLDER...")
@click.option("--model-uri", required=True,
              help="runs:/<run_id>/model, models:/<name>/<version>, or a model.keras (or its folder).")
@click.option("--out", required=True, help="Folder for the <image stem>-gradcam.png overlays.")
@click.option("--class", "class_name", type=click.Choice(["covid", "non_covid"]), default=None,
              help="Explain this class (default: the class each image is predicted as).")
@click.pass_context
def explain(ctx, inputs, model_uri, out, class_name) -> None:
    """Write a Grad-CAM overlay per image (folders: their images, subfolders too)."""
    # here, not above: keeps the CLI's start-up free of TensorFlow
    from covidtl.data.images import image_files
    from covidtl.explain import explain_files
    from covidtl.trained import load_trained

    image_files(inputs)  # a missing path or no image at all fails before the model loads
    # here, not above: keeps the CLI's start-up free of TensorFlow
    from covidtl.models.registry import get_spec, preprocess_for

    loaded = load_trained(model_uri, config_from(ctx))
    # Decode and preprocess as the model was trained, whatever params.yaml says now.
    preprocess = preprocess_for(get_spec(loaded.name), loaded.preprocessing)
    class_index = None if class_name is None else CLASSES.index(class_name)
    results = explain_files(loaded.model, preprocess, inputs, out, class_index=class_index)

    done = [r for r in results if r.reason is None]
    bad = [r for r in results if r.reason is not None]
    width = max(len(str(r.path)) for r in results)
    click.echo(f"{'file':<{width}}  p_covid  predicted  output")
    for r in done:
        click.echo(f"{str(r.path):<{width}}  {r.p_covid:7.3f}  {r.predicted:<9}  {r.output}")
    for r in bad:
        click.echo(f"{str(r.path):<{width}}  {'-':>7}  {'-':<9}  not explained: {r.reason}")
    explained = "explaining " + ("the predicted class" if class_name is None else f"class {class_name}")
    click.echo(f"explain {model_uri}: {len(done)} overlays in {out} ({explained}); "
               f"{len(bad)} unreadable file{'s' if len(bad) != 1 else ''}")


@click.command()
@scored_data_options(required=False)
@click.option("--cv", "cv_dir", default=None, metavar="CV_DIR",
              help="Instead of --model-uri/--data: a `covidtl cv` run (cv/<dataset>/<cell>), each fold's "
                   "model on its own test fold, pooled and judged once (files in CV_DIR/probe/).")
@click.option("--out", default=None,
              help="Folder for probe.csv/.json, probe_classes.csv, probe.png (default for a "
                   "models/<cell>/ folder: its probe/, read by the model card).")
@click.option("--samples", default=3, show_default=True, help="Grad-CAM overlays per class in the figure.")
@click.option("--no-log", is_flag=True, help="Do not log the probe to the model's MLflow run.")
@click.pass_context
def probe(ctx, model_uri, data, split, cv_dir, out, samples, no_log) -> None:
    """Shortcut test: score a model with the lungs hidden, only the border or centre kept, shrunk
    and shifted; Grad-CAM weight inside vs outside the lungs; verdict shortcut_risk."""
    from covidtl.probe import probe as run, probe_cv  # here, not above: keeps the CLI's start-up free of TensorFlow

    if cv_dir is not None:
        if model_uri or data or split != "test":
            raise UserError(f"--cv {cv_dir}: its folds' own models and test folds are probed; drop "
                            "--model-uri, --data and --split")
        result = probe_cv(config_from(ctx), cv_dir, out, samples=samples, log=not no_log)
    elif not (model_uri and data):
        raise UserError("probe: give --model-uri and --data (one model), or --cv CV_DIR (a cv run's folds)")
    else:
        result = run(config_from(ctx), model_uri, data, split, out, samples=samples, log=not no_log)
    click.echo(f"{'variant':<14} {'images':>6}  {'ROC AUC [95% CI]':<24} accuracy [95% CI]")
    for row in result.table.to_dict("records"):
        auc = f"{row['roc_auc']:.3f} [{row['roc_auc_ci_low']:.3f}, {row['roc_auc_ci_high']:.3f}]"
        acc = f"{row['accuracy']:.3f} [{row['accuracy_ci_low']:.3f}, {row['accuracy_ci_high']:.3f}]"
        click.echo(f"{row['variant']:<14} {row['images']:>6}  {auc:<24} {acc}")
    if result.cams.outside_all is not None:
        click.echo(f"Grad-CAM weight outside the lung region: {result.cams.outside_all:.1%}")
    elif result.cams.note:
        click.echo(result.cams.note)
    click.echo(f"shortcut_risk: {str(result.verdict['shortcut_risk']).lower()}. {result.verdict['sentence']}")
    logged = f"; logged to run {result.run_id}" if result.run_id else ""
    click.echo(f"probe {cv_dir or model_uri}: files in {result.out}{logged}")


COMMANDS: list[click.Command] = [explain, probe]
