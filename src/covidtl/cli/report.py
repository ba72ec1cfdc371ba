"""Commands for the comparison report."""

from __future__ import annotations

import click

from covidtl.cli.options import config_from


@click.command("report")
@click.option("--out", default=None, help="Report folder (default: report.out in params.yaml).")
@click.option("--models-root", default="models", show_default=True, help="Where the study cells live.")
@click.option("--no-log", is_flag=True, help="Do not log the report as an MLflow run.")
@click.option("--with-experiment", "experiments", multiple=True, metavar="NAME",
              help="Also show the training runs of DVC experiment NAME (tag dvc_experiment), "
              "as their own group (repeatable).")
@click.pass_context
def report(ctx: click.Context, out: str | None, models_root: str, no_log: bool,
           experiments: tuple[str, ...]) -> None:
    """Compare the study cells' runs (and named experiments): reports/results.{csv,md}, figures."""
    from covidtl.report import build_report  # here, not above: keeps the CLI's start-up free of MLflow and matplotlib

    cfg = config_from(ctx, **{"report.out": out})
    result = build_report(cfg, models_root=models_root, log=not no_log, experiments=experiments)
    counts = result.table[result.table["group"] == "workspace"]["status"].value_counts().to_dict()
    click.echo(f"Report: {len(result.files)} files in {cfg.report.out}/ — cells {counts}")
    if result.run_id:
        click.echo(f"Logged as MLflow run {result.run_id} (experiment covidtl-report)")


COMMANDS: list[click.Command] = [report]
