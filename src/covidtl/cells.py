"""A study cell's file layout, and skipping a cell that cannot run here.

Kept free of TensorFlow: a skipped cell of the DVC matrix costs a second, not an import of Keras.
"""

from __future__ import annotations

import json
from pathlib import Path

EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")
MODEL_DIR = "model"  # models/<cell>/model/: model.keras + card.json, or SKIPPED.txt


def write_skipped_cell(out: Path, reason: str) -> None:
    """A skipped cell's files: DVC finds every output, the report shows the cell as skipped."""
    (out / MODEL_DIR).mkdir(parents=True, exist_ok=True)
    (out / MODEL_DIR / "SKIPPED.txt").write_text(reason + "\n")
    (out / "metrics.json").write_text(json.dumps({"status": "skipped", "reason": reason}, indent=2) + "\n")
    (out / "predictions.csv").write_text("actual,predicted\n")
    (out / "history.csv").write_text(",".join(["epoch", *EPOCH_METRICS]) + "\n")
