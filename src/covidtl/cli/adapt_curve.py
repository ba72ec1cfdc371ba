"""`covidtl adapt-curve`: the learning curve of a model adapted to a new site (covidtl.adapt.curve)."""

from __future__ import annotations

import click

from covidtl.cli.options import AUTO_INT, config_from, is_auto


def parse_ks(value: str) -> tuple[int, ...]:
    """'0,1,2,5,10' -> (0, 1, 2, 5, 10), sorted, each once."""
    try:
        ks = sorted({int(k) for k in value.split(",") if k.strip()})
    except ValueError:
        raise click.BadParameter(f"{value!r}: give whole numbers of groups per class, e.g. 0,1,2,5,10") from None
    if not ks or ks[0] < 0:
        raise click.BadParameter(f"{value!r}: give K >= 0 groups per class, e.g. 0,1,2,5,10")
    return tuple(ks)


@click.command("adapt-curve")
@click.option("--model-uri", default="auto", show_default=True,
              help="The source model: a model.keras, a cell folder, runs:/... or models:/...; auto = adapt.model.")
@click.option("--site", default="auto", show_default=True,
              help="The site's labelled images (class folders), halved into scoring and adaptation; auto = adapt.site.")
@click.option("--methods", default="auto", show_default=True,
              help="Comma-separated (`covidtl adapt --list`); auto = adapt.curve_methods, whose auto is every "
                   "method the source model takes (the others skipped and listed).")
@click.option("--k", "ks", default="auto", show_default=True,
              help="Labelled patient groups per class, e.g. 0,1,2,5,10; auto = adapt.curve_ks.")
@click.option("--seeds", type=AUTO_INT, default="auto", show_default=True,
              help="Draws per K (and seeds of a seeded method); auto = adapt.curve_seeds.")
@click.option("--split-seed", type=AUTO_INT, default="auto", show_default=True,
              help="Halves the site's groups, once per site (halves.csv); auto = adapt.split_seed.")
@click.option("--out", default="auto", show_default=True,
              help="The curve's folder (keep it outside models/); auto = adapt.curve_out.")
@click.option("--home/--no-home", default=None,
              help="Also score each adapted model on the source's home test split; default: where its card "
                   "names a dataset with a split.")
@click.pass_context
def adapt_curve(ctx, model_uri, site, methods, ks, seeds, split_seed, out, home) -> None:
    """Adapt a model to a site with K = 0, 1, 2, ... labelled patient groups per class, scored on a fixed half."""
    cfg = config_from(ctx)
    a = cfg.adapt
    # here, not above: keeps the CLI's start-up free of TensorFlow
    from covidtl.adapt.curve import CurveRequest, adapt_curve as run_curve

    request = CurveRequest(
        a.model if is_auto(model_uri) else model_uri, a.site if is_auto(site) else site,
        a.curve_methods if is_auto(methods) else methods,
        tuple(sorted(set(a.curve_ks))) if is_auto(ks) else parse_ks(ks),
        a.curve_seeds if seeds is None else seeds, a.split_seed if split_seed is None else split_seed,
        a.curve_out if is_auto(out) else out, home,
    )
    curve = run_curve(cfg, request)
    skipped = f"; skipped: {', '.join(curve.skipped)}" if curve.skipped else ""
    click.echo(f"learning curve in {curve.out.dir}: {len(curve.table)} points{skipped} (MLflow run {curve.run_id})")


COMMANDS: list[click.Command] = [adapt_curve]
