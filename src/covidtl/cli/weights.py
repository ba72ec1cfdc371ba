"""Command for the weights stage: find a model's ImageNet file and record which file it is."""

from __future__ import annotations

import click

from covidtl import weight_records


@click.command("weights")
@click.argument("model")
@click.option("--init", type=click.Choice(["random", "imagenet", "finetune"]), default="imagenet",
              show_default=True, help="The cell's init; random needs no file.")
@click.option("--download/--no-download", default=True, show_default=True,
              help="If the file is neither in weights/ nor in Keras' cache, try Keras' download.")
def weights(model: str, init: str, download: bool) -> None:
    """Record MODEL's initial weights for INIT in data/weights/<model>-<init>.json (stage weights@…)."""
    def fetch():
        # here, not above: TensorFlow loads only when no file is on disk (test_weight_records)
        from covidtl.models.registry import get_spec
        from covidtl.models.weights import download_imagenet

        return download_imagenet(get_spec(model))

    record = weight_records.locate(model, init, download=fetch if download else None)
    path = weight_records.write_record(record)
    if record["status"] == "available":
        click.echo(f"weights {model}-{init}: {record['path']} ({record['found_in']}, "
                   f"sha256 {record['sha256'][:12]}…) -> {path}")
    elif record["status"] == "unavailable":
        click.echo(f"weights {model}-{init}: UNAVAILABLE: {weight_records.message(record)} -> {path}", err=True)
    else:
        click.echo(f"weights {model}-{init}: {record['reason']} -> {path}")


COMMANDS: list[click.Command] = [weights]
