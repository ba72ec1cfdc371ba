"""The `--init` mini-language, parsed once into an `Init`: where a network's weights start.

    random                  every weight drawn at random
    imagenet                Keras' ImageNet base, frozen
    finetune                Keras' ImageNet base, fine-tuned at lr x train.finetune_lr_factor
    PATH                    a weights file's base, frozen (the custom CNN: a warm start)
    finetune:PATH           a weights file's base, fine-tuned like ImageNet's
    pretrained              the file `covidtl pretrain --model M` writes with the run's params (like PATH)
    finetune:pretrained     that file, fine-tuned (like finetune:PATH)

Free of TensorFlow and of every other covidtl module but errors: the foundation of the layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from covidtl.errors import UserError

FINETUNE_PREFIX = "finetune:"
PRETRAINED = "pretrained"
NAMED = ("random", "imagenet", "finetune", PRETRAINED)
WEIGHTS_SUFFIXES = (".weights.h5", ".h5", ".hdf5")  # what a weights file's name ends in (Keras 3, legacy)
# The words a bad --init gets (as before Init existed: tests/test_bad_input_model.py holds them).
BAD_INIT = "no such weights file; give random, imagenet, finetune or an existing file saved with model.save_weights(...)"


@dataclass(frozen=True)
class Init:
    """One `--init` value. `source`: random | imagenet | pretrained | file; `file`: the weights
    file a PATH form names (pretrained's is found by `covidtl.pretrain.resolve_init`)."""

    text: str  # as given: what config.yaml, MLflow's init param and the card record
    source: str
    finetune: bool = False  # pre-trained weights that train at lr x train.finetune_lr_factor
    file: str | None = None

    @classmethod
    def parse(cls, text: str) -> Init:
        """`text` as an Init, or one line naming it and the fix."""
        if text in ("random", "imagenet"):
            return cls(text, text)
        if text == "finetune":
            return cls(text, "imagenet", finetune=True)
        finetune = text.startswith(FINETUNE_PREFIX)
        name = text.removeprefix(FINETUNE_PREFIX)
        if name == PRETRAINED:
            return cls(text, PRETRAINED, finetune)
        if name.endswith(WEIGHTS_SUFFIXES):
            return cls(text, "file", finetune, file=name)
        raise UserError(f"--init {text}: {BAD_INIT}")

    @classmethod
    def of(cls, value: Init | str) -> Init:
        """`value` as an Init: parsed if it is still the text."""
        return value if isinstance(value, Init) else cls.parse(value)

    @property
    def label(self) -> str:
        """The init's part of a cell name: `init_label`."""
        return init_label(self.text)

    @property
    def frozen_base(self) -> bool:
        """Whether a pre-trained base stays frozen: imagenet, pretrained or a file, not fine-tuned."""
        return self.source != "random" and not self.finetune

    def with_file(self, path: str) -> Init:
        """This init starting from `path` instead (`pretrained` as the file it names)."""
        return Init.parse((FINETUNE_PREFIX if self.finetune else "") + str(path))

    def __str__(self) -> str:
        return self.text


def is_init(text: str) -> bool:
    """Whether `--init` takes `text`."""
    try:
        Init.parse(text)
    except UserError:
        return False
    return True


def init_label(init: Init | str) -> str:
    """The cell-name part of an init, or of what a record says its init was: a named init as given,
    a weights file `file-<stem>`, `finetune:PATH` `finetune-file-<stem>`; a label stays as it is."""
    text = str(init)
    if text in NAMED or (text.startswith(("file-", "finetune-file-")) and "/" not in text and "." not in text):
        return text
    if text.startswith(FINETUNE_PREFIX):
        return f"finetune-{init_label(text.removeprefix(FINETUNE_PREFIX))}"
    name = text.rstrip("/").rsplit("/", 1)[-1]
    for suffix in WEIGHTS_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return f"file-{name}"
