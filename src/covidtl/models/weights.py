"""Where initial weights come from: Keras' ImageNet cache, or a weights file of the user's.

ImageNet files are the ones keras.applications downloads into `$KERAS_HOME/models` (default
`~/.keras/models`). Offline and uncached, loading fails in seconds with one line naming the file.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import keras

from covidtl import cells
from covidtl.errors import UserError

if TYPE_CHECKING:
    from covidtl.models.registry import ModelSpec

DOWNLOAD_TIMEOUT_S = 10


def imagenet_weights_path(spec: ModelSpec) -> Path:
    return cells.imagenet_weights_path(spec.name)  # the one table of Keras' file names


def load_imagenet(base: keras.Model, spec: ModelSpec) -> None:
    """Load Keras' ImageNet weights into `base`, downloading them through Keras if uncached."""
    path = imagenet_weights_path(spec)
    if not path.exists():
        _download_through_keras(base, spec, path)
    load_weights_file(base, str(path), what="ImageNet weights")


def _download_through_keras(base: keras.Model, spec: ModelSpec, path: Path) -> None:
    # keras.applications downloads (and checks the hash of) the file into its cache; a short
    # socket timeout makes an offline machine fail in seconds instead of hanging.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            spec.backbone(include_top=False, weights="imagenet", input_shape=base.input_shape[1:])
    except Exception as exc:  # noqa: BLE001 - any download failure means the same fix
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise UserError(
            f"init=imagenet: {spec.name} needs Keras' ImageNet file {spec.imagenet_file}, which "
            f"is not in {path.parent} and could not be downloaded ({reason}); copy that file "
            f"to {path} (or point KERAS_HOME at a folder whose models/ holds it) and run again"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
    if not path.exists():  # Keras used its import-time cache: look there too
        raise UserError(
            f"init=imagenet: Keras downloaded {spec.imagenet_file} outside {path.parent}; "
            "set KERAS_HOME before starting covidtl so both agree"
        )


def load_weights_file(model: keras.Model, path: str, what: str = "weights file") -> None:
    """Load a `.weights.h5` (Keras 3) or legacy `.h5` file, one clear line if it does not fit."""
    file = Path(path)
    if not file.is_file():
        raise UserError(
            f"--init {path}: no such {what}; give random, imagenet, finetune or an existing "
            "file saved with model.save_weights(...)"
        )
    if not file.name.endswith((".weights.h5", ".h5", ".hdf5")):
        raise UserError(
            f"--init {path}: a {what} must end in .weights.h5 (Keras 3) or .h5 (legacy Keras)"
        )
    try:
        model.load_weights(str(file))
    except Exception as exc:  # noqa: BLE001 - shape or format mismatch: the user picked a wrong file
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UserError(
            f"{path}: this {what} does not fit {model.name} at input {model.input_shape[1:]} "
            f"({reason}); use a file saved from the same architecture"
        ) from None
