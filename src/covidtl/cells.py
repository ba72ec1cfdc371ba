"""A study cell's file layout, and skipping a cell that cannot run here.

Kept free of TensorFlow: a skipped cell of the DVC matrix costs a second, not an import of Keras.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")
MODEL_DIR = "model"  # models/<cell>/model/: model.keras + card.json, or SKIPPED.txt

# The files keras.applications downloads (no top) into $KERAS_HOME/models; None: no ImageNet
# weights exist for that model.
IMAGENET_FILES: dict[str, str | None] = {
    "custom_cnn": None,
    "densenet121": "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "resnet50": "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "inceptionv3": "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "resnet101v2": "resnet101v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "vgg16": "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
}


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


def unavailable_reason(model: str, init: str) -> str | None:
    """Why a cell cannot run on this machine (ImageNet weights absent), checked before any work."""
    if init not in ("imagenet", "finetune") or model not in IMAGENET_FILES:
        return None
    path = imagenet_weights_path(model)
    if path is None:
        return f"{model} has no ImageNet weights: the paper trains it from scratch only"
    if not path.exists():
        return (f"Keras' ImageNet file {path.name} is not in {path.parent}; copy it there "
                "(or set KERAS_HOME) and run `dvc repro` again")
    return None


def write_skipped_cell(out: Path, reason: str) -> None:
    """A skipped cell's files: DVC finds every output, the report shows the cell as skipped."""
    (out / MODEL_DIR).mkdir(parents=True, exist_ok=True)
    (out / MODEL_DIR / "SKIPPED.txt").write_text(reason + "\n")
    (out / "metrics.json").write_text(json.dumps({"status": "skipped", "reason": reason}, indent=2) + "\n")
    (out / "predictions.csv").write_text("actual,predicted\n")
    (out / "history.csv").write_text(",".join(["epoch", *EPOCH_METRICS]) + "\n")
