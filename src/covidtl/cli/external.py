"""Command for the external test sets: every trained cell of a dataset scored on each of them."""

from __future__ import annotations

import click

from covidtl.cli.options import config_from


@click.command("external")
@click.argument("dataset")
@click.option("--models-root", default="models", show_default=True, help="Where the study cells live.")
@click.option("--out", "out_root", default="external", show_default=True,
              help="Results go to OUT/<DATASET>/ (rewritten whole).")
@click.option("--no-log", is_flag=True, help="Do not log a kind=evaluate MLflow run per cell and set.")
@click.option("--quiet", is_flag=True, help="No progress bar while ingesting.")
@click.pass_context
def external(ctx: click.Context, dataset: str, models_root: str, out_root: str, no_log: bool,
             quiet: bool) -> None:
    """Score every trained cell of DATASET on its external test sets (params.yaml `external`)."""
    from covidtl.external import score_dataset  # here, not above: keeps the CLI's start-up free of pandas

    cfg = config_from(ctx)
    result = score_dataset(cfg, dataset, models_root=models_root, out_root=out_root, log=not no_log,
                           progress=not quiet)
    sets = result.results["sets"]
    for name, s in sets.items():
        click.echo(f"set {name}: {s['images']} images ({s['classes']['covid']} covid) in {s['groups']} "
                   f"groups, {s['quarantined']} quarantined")
    for name, cell in result.results["cells"].items():
        if cell["status"] != "ok":
            click.echo(f"{cell['status'].upper()} {name}: {cell['reason']}")
    counts: dict[str, int] = {}
    for cell in result.results["cells"].values():
        counts[cell["status"]] = counts.get(cell["status"], 0) + 1
    click.echo(f"external {dataset}: {len(sets)} sets, cells {counts} -> {result.out.results_file}")


COMMANDS: list[click.Command] = [external]
