"""The `covidtl` command: one click group, one sub-command per stage of the study.

Commands only parse arguments and call the stage's module; DVC stages and MLproject entry points
only call these commands. Each stage's commands live in their own file of this package.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from covidtl.config import Config, load_config, parse_override
from covidtl.errors import UserError
from covidtl.inits import Init

# COVIDTL_DEBUG=1: an unexpected error is raised with its traceback instead of written to a log.
DEBUG_ENV = "COVIDTL_DEBUG"


ARGV_KEY = "covidtl.argv"  # ctx.meta: the arguments the command line gave (command_line)


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
            from covidtl.files import write_problem

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
            from covidtl.mlflow_store import store_problem

            line = None if os.environ.get(DEBUG_ENV) == "1" else store_problem(exc)
            if line is None:
                _bug(exc)
            click.echo(f"Error: {line}", err=True)
            sys.exit(2)


def _bug(exc: BaseException) -> None:
    """Re-raise under COVIDTL_DEBUG=1; otherwise one line saying where the traceback was written."""
    if os.environ.get(DEBUG_ENV) == "1":
        raise exc
    from covidtl.crash import write_crash_log

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
    ctx.obj["params_path"] = params_path
    ctx.obj["overrides"] = dict(parse_override(o) for o in overrides)


class AutoInt(click.ParamType):
    """A whole number, or `auto` (the params file's value): MLproject passes `auto` by default."""

    name = "integer|auto"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int):
            return value
        if str(value).strip().lower() in ("", "auto"):
            return None
        try:
            return int(value)
        except ValueError:
            self.fail(f"{value!r} is not a whole number or auto", param, ctx)


AUTO_INT = AutoInt()
AUTO = "auto"
MODEL_HELP = "custom_cnn, densenet121, resnet50, inceptionv3, resnet101v2 or vgg16; auto = train.model."
INIT_HELP = ("random | imagenet | finetune | PATH to a .weights.h5 file for the base (frozen; the custom CNN: "
             "a warm start) | finetune:PATH (fine-tuned at the lower rate) | pretrained (finetune:pretrained): "
             "the file `covidtl pretrain` wrote with the same params; auto = train.init.")


def is_auto(value: str | None) -> bool:
    """`auto` or nothing: the params file's value (MLproject passes `auto` by default)."""
    return value is None or value.strip().lower() in ("", AUTO)


class InitType(click.ParamType):
    """`--init` parsed once into an Init (one line naming a bad value and the forms it takes);
    `auto` (the params file's value) as None."""

    name = "init|auto"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, Init):
            return value
        return None if is_auto(value) else Init.parse(value)


INIT = InitType()


def recipe_from(ctx: click.Context, model: str, init: Init | None) -> tuple[str, Init]:
    """--model / --init, each `auto` resolved to train.model / train.init (the profile and -S applied)."""
    if not (is_auto(model) or init is None):
        return model, init  # both given: no params file is read
    train = config_from(ctx).train
    return (train.model if is_auto(model) else model), (Init.parse(train.init) if init is None else init)


def model_from(ctx: click.Context, model: str) -> str:
    """--model of a command without --init (or with its own): `auto` = train.model."""
    return config_from(ctx).train.model if is_auto(model) else model


def scored_data_options(command=None, *, required: bool = True):
    """--model-uri, --data and --split: what every command that scores a trained model reads
    (`required=False`: a command that can take its models and data from elsewhere checks them)."""
    def add(command):
        for option in reversed([
            click.option("--model-uri", required=required,
                         help="runs:/<run_id>/model, models:/<name>/<version>, or a model.keras (or its folder)."),
            click.option("--data", required=required, help="A dataset of params.yaml, or any folder of class folders."),
            click.option("--split", type=click.Choice(["test", "val", "train", "all"]), default="test",
                         show_default=True, help="Which split of a dataset (a folder is scored whole)."),
        ]):
            command = option(command)
        return command

    return add(command) if command is not None else add


def command_line(ctx: click.Context) -> str:
    """The covidtl command line that is running, as a shell would take it back."""
    import shlex

    return shlex.join(["covidtl", *ctx.meta.get(ARGV_KEY, [])])


def config_from(ctx: click.Context, **extra: Any) -> Config:
    """The resolved config: params file, then -S overrides, then command options (not None)."""
    from covidtl.data.images import set_pixel_limit

    overrides = dict(ctx.obj.get("overrides", {}))
    overrides.update({k: v for k, v in extra.items() if v is not None})
    cfg = load_config(ctx.obj.get("params_path"), overrides)
    set_pixel_limit(cfg.ingest.max_megapixels)  # every image this command reads, in any thread
    return cfg


def _register() -> None:
    # Each file holds one stage's commands; TensorFlow is imported only inside commands, so
    # `covidtl --help` stays fast.
    from covidtl.cli import (cv, data, ensemble, explain, external, predict, pretrain, report, results, team,
                             train, tune, weights)

    for module in (data, weights, pretrain, train, cv, ensemble, tune, external, report, results, explain, predict,
                   team):
        for command in module.COMMANDS:
            main.add_command(command)


_register()
