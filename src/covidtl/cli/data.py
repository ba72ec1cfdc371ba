"""Commands for synth, ingest, split and augment."""

from __future__ import annotations

import click

from covidtl import paths
from covidtl.cli.options import config_from


@click.command()
@click.option("--out", default=None, help="Folder to write (default: synth.out).")
@click.pass_context
def synth(ctx: click.Context, out: str | None) -> None:
    """Write the embedded synthetic CT-like and X-ray-like datasets and their second sites."""
    from covidtl.data import synth as module  # here, not above: keeps the CLI's start-up free of numpy and Pillow

    cfg = config_from(ctx, **{"synth.out": out})
    counts = module.generate(cfg.synth)
    click.echo(f"synth: {counts['ct']} CT-like and {counts['xray']} X-ray-like images in {cfg.synth.out}; "
               f"second site (external test sets): {counts['ct-site2']} and {counts['xray-site2']}")


@click.command()
@click.argument("dataset")
@click.option("--path", default=None, help="Dataset folder (overrides data.datasets.<DATASET>.path).")
@click.option("--jobs", default=0, show_default=True, type=click.IntRange(min=0),
              help="Decoding processes; 0 = one per core.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def ingest(ctx: click.Context, dataset: str, path: str | None, jobs: int, quiet: bool) -> None:
    """Check every image of DATASET and write its manifest, groups and quarantine report."""
    # here, not above: keeps the CLI's start-up free of pandas and Pillow
    from covidtl.data import ingest as module
    from covidtl.data import tables

    # --path points a declared dataset elsewhere; it declares none (split and train would not know it).
    config_from(ctx).dataset(dataset)
    cfg = config_from(ctx, **{f"data.datasets.{dataset}.path": path})
    result = module.run(cfg, dataset, jobs=jobs, progress=not quiet)
    for folder in result.empty_class_folders:
        click.echo(f"Warning: class folder {folder} is empty", err=True)
    for note in result.notes:
        click.echo(f"Warning: {note}", err=True)
    for folder, count in result.unmapped.items():
        click.echo(f"Warning: {module.unmapped_warning(folder, count)}", err=True)
    for row in result.quarantine.itertuples():
        click.echo(f"Quarantined: {row.path}: {row.reason}", err=True)
    m = result.manifest
    counts = ", ".join(f"{k} {v}" for k, v in m["label"].value_counts().sort_index().items())
    click.echo(
        f"ingest {dataset}: {len(m)} images ({counts}) in {m['group'].nunique()} groups, "
        f"{len(result.quarantine)} quarantined, {len(result.skipped)} non-image files skipped, "
        f"{sum(result.unmapped.values())} images in folders of no class "
        f"-> {paths.manifest_path(cfg, dataset)}, {tables.summary_path(cfg, dataset)}"
    )


@click.command()
@click.argument("dataset")
@click.option("--strategy", type=click.Choice(["grouped", "random"]), default=None,
              help="Override split.strategy.")
@click.option("--seed", type=int, default=None, help="Override split.seed.")
@click.pass_context
def split(ctx: click.Context, dataset: str, strategy: str | None, seed: int | None) -> None:
    """Split DATASET's manifest into train/val/test and report what crosses the splits."""
    from covidtl.data import split as module  # here, not above: keeps the CLI's start-up free of pandas

    cfg = config_from(ctx, **{"split.strategy": strategy, "split.seed": seed})
    _, report = module.run(cfg, dataset)
    for name, per_class in report["counts"].items():
        for label, n in per_class.items():
            if n == 0:
                click.echo(f"Warning: {name} has no {label} images (too few groups of that class "
                           "for three splits); metrics on it will be undefined", err=True)
    counts = "; ".join(f"{s} {sum(c.values())} ({c['covid']} covid)" for s, c in report["counts"].items())
    crossing = report["crossing_pairs"]
    click.echo(
        f"split {dataset} ({report['strategy']}): {counts}; crossing pairs: "
        f"{crossing['same_group_total']} same-group, {crossing['near_duplicate_total']} near-duplicate "
        f"-> {paths.split_path(cfg, dataset)}, {paths.leakage_path(cfg, dataset)}"
    )


COMMANDS: list[click.Command] = [synth, ingest, split]


# --- augment: the paper's offline augmented copy of a dataset (dvc.yaml's offline study) ---
@click.command("augment")
@click.argument("dataset")
@click.option("--size", "sizes", type=int, multiple=True,
              help="Only this input size (repeatable); default: every size the study's models need.")
@click.pass_context
def augment(ctx: click.Context, dataset: str, sizes: tuple[int, ...]) -> None:
    """Write the seeded offline augmented copy of DATASET's training split (uint8 arrays + manifest)."""
    from covidtl.data import augment as module  # here, not above: keeps the CLI's start-up free of TensorFlow

    cfg = config_from(ctx)
    manifest = module.augment(cfg, dataset, list(sizes) or None)
    per_size = manifest.groupby("size").size().to_dict()
    click.echo(f"augment {dataset}: images per size {per_size} -> {paths.augmented_dir(cfg, dataset)}")


COMMANDS.append(augment)


# --- cache prune: the decode and feature caches kept within cache.max_gb ---
@click.group("cache")
def cache() -> None:
    """The decoded-image and feature caches under data.workdir/cache."""


@cache.command("prune")
@click.option("--keep", type=click.IntRange(min=0), default=12, show_default=True,
              help="How many of the most recently used caches to keep (decode caches, one per split "
                   "table and size, and feature views together).")
@click.option("--max-gb", type=float, default=None,
              help="Their total size to prune down to, least recently used first; 0 = no limit "
                   "(default: cache.max_gb).")
@click.pass_context
def cache_prune(ctx: click.Context, keep: int, max_gb: float | None) -> None:
    """Remove the least recently used caches beyond KEEP or MAX_GB (a changed manifest, size or
    decode rule leaves its old cache behind), and what killed builds left."""
    # here, not above: pandas loads for this command only, not at the CLI's start-up
    from covidtl.data.cache import budget_bytes, cache_dir, prune

    cfg = config_from(ctx, **{"cache.max_gb": max_gb})
    root = cache_dir(cfg)
    pruned = prune(root, keep, max_bytes=budget_bytes(cfg.cache.max_gb))
    click.echo(f"cache prune: removed {pruned.files} files ({pruned.freed_bytes / 1e6:.1f} MB): "
               f"{pruned.summary()}; kept {pruned.kept} caches ({pruned.kept_bytes / 1e9:.2f} GB) in {root}")


COMMANDS.append(cache)
