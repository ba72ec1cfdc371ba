"""What the commands share: option types, the shared help texts and options, and the resolved config.

Apart from the group (`covidtl.cli`), which imports every command's file to register it: a
command's file imports this module, never the group, so the package has no import circle.
"""

from __future__ import annotations

import shlex
from typing import Any

import click

from covidtl.config import Config, load_config
from covidtl.inits import Init

ARGV_KEY = "covidtl.argv"  # ctx.meta: the arguments the command line gave (command_line)


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
    return shlex.join(["covidtl", *ctx.meta.get(ARGV_KEY, [])])


def config_from(ctx: click.Context, **extra: Any) -> Config:
    """The resolved config: params file, then -S overrides, then command options (not None)."""
    # here, not above: keeps the CLI's start-up free of numpy and Pillow
    from covidtl.data.images import set_pixel_limit

    overrides = dict(ctx.obj.get("overrides", {}))
    overrides.update({k: v for k, v in extra.items() if v is not None})
    cfg = load_config(ctx.obj.get("params_path"), overrides)
    set_pixel_limit(cfg.ingest.max_megapixels)  # every image this command reads, in any thread
    return cfg
