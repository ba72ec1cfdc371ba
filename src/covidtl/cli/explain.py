"""Command for Grad-CAM explanations of a trained model's answers."""

from __future__ import annotations

import click

from covidtl.cli import config_from


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
    from covidtl.evaluate import load_trained
    from covidtl.explain import explain_files, image_files
    from covidtl.paths import CLASSES

    image_files(inputs)  # a missing path or no image at all fails before the model loads
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


COMMANDS: list[click.Command] = [explain]
