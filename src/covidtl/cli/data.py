"""Commands for synth, ingest, split and augment."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
