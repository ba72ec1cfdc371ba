"""Command for the README's results tables, generated from cross-validation summaries."""

from __future__ import annotations

import click

from covidtl.cli.options import config_from
from covidtl.files import atomic_write_text


@click.command("results")
@click.argument("cv_dirs", nargs=-1, metavar="[CV_DIR...]")
@click.option("--baseline", "baselines", multiple=True, metavar="NAME",
              help="Compare every other run of its dataset against the cv run NAME (its cell name, "
              "e.g. custom_cnn-random-ct; repeatable). Default: the custom CNN's runs.")
@click.option("--readme", default=None, type=click.Path(dir_okay=False),
              help="Replace the text between <!-- results:begin --> and <!-- results:end --> in this file.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Write the markdown to this file.")
@click.pass_context
def results(ctx, cv_dirs, baselines, readme, out) -> None:
    """Results tables from `covidtl cv` runs (CV_DIR: cv/<dataset>/<cell>; default every run
    under cv.out): one per dataset, with paired comparisons against the baselines."""
    # here, not above: keeps the CLI's start-up free of pandas
    from covidtl.results import replace_block, results_markdown

    text = results_markdown(config_from(ctx), cv_dirs, baselines)
    if readme:
        click.echo(f"results: the block in {replace_block(readme, text)} replaced", err=True)
    if out:
        click.echo(f"results: {atomic_write_text(out, text)}", err=True)
    if not readme and not out:
        click.echo(text, nl=False)


COMMANDS: list[click.Command] = [results]
