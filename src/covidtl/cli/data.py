"""Commands for synth, ingest, split and augment."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []


# --- augment (owned by the study pipeline; keep this block when editing the commands above) ---
@click.command("augment")
@click.argument("dataset")
@click.option("--size", "sizes", type=int, multiple=True, help="Only this input size (repeatable); default: every size the study's models need.")
@click.pass_context
def augment_command(ctx: click.Context, dataset: str, sizes: tuple[int, ...]) -> None:
    """Write the seeded offline augmented copy of DATASET's training split (uint8 arrays + manifest)."""
    from covidtl.cli import config_from
    from covidtl.data.augment import augment
    from covidtl.paths import augmented_dir

    cfg = config_from(ctx)
    manifest = augment(cfg, dataset, list(sizes) or None)
    per_size = manifest.groupby("size").size().to_dict()
    click.echo(f"Augmented {dataset}: images per size {per_size} in {augmented_dir(cfg, dataset)}/")


COMMANDS.append(augment_command)
