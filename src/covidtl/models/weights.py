"""Where initial weights come from: the ImageNet file the weights stage recorded, or a user's file
(`covidtl pretrain`'s with its record beside it).

ImageNet files are the ones keras.applications downloads; `covidtl.weight_records` finds them
(`weights/`, then Keras' cache `$KERAS_HOME/models`) and records which file, with its sha256.
Training loads the recorded file after checking its hash; without a record (a run outside DVC) it
looks the same way and downloads through Keras. Offline and uncached, loading fails in seconds
with one line naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import warnings
from pathlib import Path
from typing import Any, Callable, Protocol

import h5py
import keras

from covidtl import weight_records
from covidtl.weight_records import pretrain_record_path
from covidtl.errors import UserError
from covidtl.files import atomic_write_text


class ImageNetModel(Protocol):
    """What loading ImageNet weights reads of a registry entry (registry.ModelSpec; that module
    imports this one)."""

    @property
    def name(self) -> str: ...

    @property
    def imagenet_file(self) -> str | None: ...

    @property
    def backbone(self) -> Callable[..., keras.Model] | None: ...


DOWNLOAD_TIMEOUT_S = 10


def imagenet_weights_path(spec: ImageNetModel) -> Path:
    """Where Keras keeps (and downloads) `spec`'s ImageNet file."""
    return weight_records.imagenet_weights_path(spec.name)  # the one table of Keras' file names


def load_imagenet(base: keras.Model, spec: ImageNetModel) -> None:
    """Load `spec`'s ImageNet weights into `base`: the recorded file, else found or downloaded."""
    path = weight_records.recorded_imagenet_file(spec.name)
    if path is None:
        record = weight_records.locate(spec.name, "imagenet", download=lambda: download_imagenet(spec))
        if record["status"] != "available":
            raise UserError(
                f"init=imagenet: {spec.name}: {record['reason']}; put "
                f"{spec.imagenet_file} in {weight_records.WEIGHTS_DIR}/ or {weight_records.keras_cache_dir()} "
                "(or point KERAS_HOME at a folder whose models/ holds it) and run again"
            )
        path = Path(record["path"])
    load_weights_file(base, str(path), what="ImageNet weights")


def download_imagenet(spec: ImageNetModel) -> Path:
    """Download `spec`'s ImageNet file through Keras into its cache; UserError(Keras' reason) if not."""
    # keras.applications downloads (and checks the hash of) the file into its cache; a short
    # socket timeout makes an offline machine fail in seconds instead of hanging.
    path = imagenet_weights_path(spec)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            spec.backbone(include_top=False, weights="imagenet")
    except Exception as exc:  # noqa: BLE001 - any download failure means the same fix
        raise UserError(str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__) from None
    finally:
        socket.setdefaulttimeout(previous)
    if not path.exists():  # Keras used its import-time cache
        raise UserError(f"Keras saved it outside {path.parent}; set KERAS_HOME before starting covidtl")
    return path


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
    problem = unreadable(file)
    if problem:
        raise UserError(f"{path}: this {what} cannot be read ({problem}); it is truncated or damaged: replace it "
                        "with a complete copy (check its sha256 against its source)")
    try:
        # Keras warns per layer it skips before it raises; the one line below says it all.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.load_weights(str(file))
    except Exception as exc:  # noqa: BLE001 - shape or format mismatch: the user picked a wrong file
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UserError(
            f"{path}: this {what} does not fit {model.name} at input {model.input_shape[1:]} "
            f"({reason}); use a file saved from the same architecture"
        ) from None


def unreadable(file: Path) -> str | None:
    """Why an HDF5 weights file cannot be read whole (a truncated or damaged copy), or None."""
    try:
        with h5py.File(file, "r") as f:
            f.visititems(lambda name, node: node[()] if isinstance(node, h5py.Dataset) else None)
    except Exception as exc:  # noqa: BLE001 - h5py raises OSError, KeyError, RuntimeError ... for damage
        return str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
    return None


# --------------------------------------------------------------------------- `covidtl pretrain`'s files


def write_pretrain_record(weights_file: str | Path, record: dict[str, Any]) -> Path:
    """The record `covidtl pretrain` writes beside its weights file (what made it, and how)."""
    return atomic_write_text(pretrain_record_path(weights_file), json.dumps(record, indent=2) + "\n")


def read_pretrain_record(weights_file: str | Path) -> dict[str, Any] | None:
    """The record `pretrain` wrote beside a weights file; None for a file it did not write."""
    path = pretrain_record_path(weights_file)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path}: not valid JSON; run `covidtl pretrain` again to rewrite it") from None


def check_fits(weights_file: str | Path, model: str, head: str, image_size: int) -> None:
    """A file `pretrain` wrote, refused in one line when it was made for another model, head or size."""
    record = read_pretrain_record(weights_file)
    if not record or "method" not in record:
        return  # not a pretrain file: the loader's own check names a mismatch
    wanted = {"model": model, "image_size": image_size}
    if model == "custom_cnn":  # its file holds the whole classifier, head included
        wanted["head"] = head
    for key, value in wanted.items():
        if record.get(key) != value:
            option = {"model": "--model", "image_size": f"-S train.image_size.{model}", "head": "-S train.head"}[key]
            raise UserError(f"{weights_file}: pretrained with {key} {record.get(key)}, this run has {value}; "
                            f"train with {option}={record.get(key)} or pretrain again with this run's settings")
