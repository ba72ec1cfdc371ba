"""`covidtl adapt`: a trained model adapted to a new site (covidtl.adapt)."""

from __future__ import annotations

from pathlib import Path

import click

from covidtl.cli.options import AUTO_INT, config_from, is_auto


def _list_methods() -> None:
    from covidtl.adapt.methods import METHODS  # here, not above: keeps the CLI's start-up free of TensorFlow

    click.echo(f"{'method':<12} {'labels':<7} {'batchnorm':<10} summary")
    for m in METHODS.values():
        click.echo(f"{m.name:<12} {'yes' if m.needs_labels else 'no':<7} "
                   f"{'yes' if m.needs_batchnorm else 'no':<10} {m.summary}")


@click.command()
@click.option("--model-uri", default="auto", show_default=True,
              help="The source model: a model.keras, a cell folder, runs:/... or models:/...; auto = adapt.model.")
@click.option("--site", default="auto", show_default=True,
              help="The site's images (class folders, or a flat folder for the unlabelled methods); auto = adapt.site.")
@click.option("--labelled", default="auto", show_default=True,
              help="K labelled site patients' images (class folders); auto = adapt.labelled, none = no labels.")
@click.option("--method", default="auto", show_default=True, help="See --list; auto = adapt.method.")
@click.option("--out", default="auto", show_default=True,
              help="The adapted model's folder (keep it outside models/); auto = adapt.out.")
@click.option("--seed", type=AUTO_INT, default="auto", show_default=True, help="auto = adapt.seed.")
@click.option("--exclude", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A file of image paths or sha256s, one a line, that are scored: labelled images among "
                   "them are refused as a leak.")
@click.option("--log-model/--no-log-model", default=True, show_default=True,
              help="Also log the adapted model to its MLflow run.")
@click.option("--list", "list_methods", is_flag=True, help="List the methods and exit.")
@click.pass_context
def adapt(ctx, model_uri, site, labelled, method, out, seed, exclude, log_model, list_methods) -> None:
    """Adapt a trained model to a new hospital site, with or without labelled site patients."""
    if list_methods:
        _list_methods()
        return
    cfg = config_from(ctx)
    a = cfg.adapt
    labelled = a.labelled if is_auto(labelled) else labelled
    from covidtl.adapt.run import adapt as run_adapt  # here, not above: TensorFlow loads here

    result = run_adapt(
        cfg, a.model if is_auto(model_uri) else model_uri, a.method if is_auto(method) else method,
        a.site if is_auto(site) else site, None if labelled in (None, "none") else labelled,
        a.out if is_auto(out) else out, a.seed if seed is None else seed,
        Path(exclude).read_text().split() if exclude else (), log_model,
    )
    click.echo(f"adapted model in {result.out.dir} ({result.images} site images; threshold "
               f"{result.threshold:.4g}; MLflow run {result.run_id})")


COMMANDS: list[click.Command] = [adapt]
