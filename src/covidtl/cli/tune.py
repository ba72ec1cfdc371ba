"""Commands for the learning-rate search."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
