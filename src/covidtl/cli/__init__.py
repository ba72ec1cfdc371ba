"""The `covidtl` command: one click group, one sub-command per stage of the study.

Commands only parse arguments and call the stage's module; DVC stages and MLproject entry points
only call these commands. Each stage's commands live in their own file of this package.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, Iterator

import click

# Each file holds one stage's commands; TensorFlow is imported only inside commands, so
# `covidtl --help` stays fast.
from covidtl.cli import (adapt, adapt_curve, cv, data, ensemble, explain, external, predict, pretrain, report,
                         results, team, train, tune, weights)
from covidtl.cli.options import ARGV_KEY
from covidtl.config import parse_override
from covidtl.crash import write_crash_log
from covidtl.errors import UserError
from covidtl.files import write_problem
from covidtl.mlflow_store import store_problem

# COVIDTL_DEBUG=1: an unexpected error is raised with its traceback instead of written to a log.
DEBUG_ENV = "COVIDTL_DEBUG"


class EchoHandler(logging.Handler):
    """A record of the covidtl logger as the command's own line on stderr, its message only, as the
    commands have always written them; click's stream is taken per line, so CliRunner catches it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(self.format(record), err=True)
        except Exception:  # noqa: BLE001 - logging's rule: a line that cannot be written ends nothing
            self.handleError(record)


ECHO = EchoHandler(logging.INFO)


@contextlib.contextmanager
def echo_logging() -> Iterator[None]:
    """The covidtl logger's progress lines and warnings said on stderr while a command runs. The
    handler comes off at its end (library calls after it print nothing again); a command run inside
    another leaves the outer one's in place, so no line is said twice. Records still propagate, so
    pytest's caplog and an application's own handlers see them."""
    logger = logging.getLogger("covidtl")
    if ECHO in logger.handlers:
        yield
        return
    level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(ECHO)
    try:
        yield
    finally:
        logger.removeHandler(ECHO)
        logger.setLevel(level)


class CovidtlGroup(click.Group):
    """Turns user errors into one line on stderr and exit status 2, never a traceback; a bug is
    one line too (exit 1), its traceback kept in a log file."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[ARGV_KEY] = list(args)  # shared with every sub-command's context
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(2)
        except OSError as exc:
            # A full disk or a forbidden folder outside the atomic writers (a folder, a log ...).
            fix = write_problem(exc)
            if fix is None or os.environ.get(DEBUG_ENV) == "1":
                _bug(exc)
            where = exc.filename or "a file"
            click.echo(f"Error: {where}: {exc.strerror or exc}; {fix}", err=True)
            sys.exit(2)
        except (click.exceptions.Exit, click.ClickException, click.Abort, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - the last resort: a bug, said in one line
            line = None if os.environ.get(DEBUG_ENV) == "1" else store_problem(exc)
            if line is None:
                _bug(exc)
            click.echo(f"Error: {line}", err=True)
            sys.exit(2)


def _bug(exc: BaseException) -> None:
    """Re-raise under COVIDTL_DEBUG=1; otherwise one line saying where the traceback was written."""
    if os.environ.get(DEBUG_ENV) == "1":
        raise exc

    log = write_crash_log(exc, sys.argv)
    what = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}" if str(exc) else type(exc).__name__
    saved = f"the traceback is in {log}" if log else "the traceback could not be saved"
    click.echo(f"Error: unexpected {what}. This is a bug in covidtl: {saved}; "
               f"please report it with that file (or re-run with {DEBUG_ENV}=1 to see it here)", err=True)
    sys.exit(1)


@click.group(cls=CovidtlGroup)
@click.option(
    "--params",
    "params_path",
    default="params.yaml",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Parameter file holding every default.",
)
@click.option(
    "-S",
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override one parameter, e.g. -S train.batch_size=16 (repeatable).",
)
@click.version_option(package_name="covidtl")
@click.pass_context
def main(ctx: click.Context, params_path: str, overrides: tuple[str, ...]) -> None:
    """Transfer learning for COVID-19 detection in chest X-rays and CT scans."""
    ctx.ensure_object(dict)
    ctx.with_resource(echo_logging())
    ctx.obj["params_path"] = params_path
    ctx.obj["overrides"] = dict(parse_override(o) for o in overrides)


def _register() -> None:
    for module in (data, weights, pretrain, train, cv, ensemble, tune, external, report, results, explain, predict,
                   team, adapt, adapt_curve):
        for command in module.COMMANDS:
            main.add_command(command)


_register()
