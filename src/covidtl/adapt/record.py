"""An adapted model's folder and its MLflow run: the one owner of that folder's files.

adapted/<method>/
    model.keras        the adapted network (loads with covidtl.trained.load_trained, like a cell's)
    card.json          what scores it, and what it was adapted from, on which images, how
    site_images.csv    path (relative to its folder), sha256, role, label, group of every site image used

Each file is written under a temporary name and renamed (covidtl.files), the card last: a folder
without card.json is no adapted model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np

from covidtl import paths, tracking
from covidtl.cards import INTENDED_USE
from covidtl.files import atomic_path, atomic_write_text, file_sha256, json_text
from covidtl.trained import LoadedModel

EXPERIMENT = "adapt"  # MLflow experiment covidtl-adapt: apart from the study's evaluations


@dataclass(frozen=True)
class AdaptedDir:
    dir: Path

    @property
    def model_file(self) -> Path:
        return self.dir / "model.keras"

    @property
    def card_file(self) -> Path:
        return self.dir / "card.json"

    @property
    def images_file(self) -> Path:
        return self.dir / "site_images.csv"

    def write(self, model: keras.Model, card: dict[str, Any], images) -> None:
        """The model, the image list and the card (with the list's sha256), in that order."""
        with atomic_path(self.model_file) as tmp:
            model.save(tmp)
        atomic_write_text(self.images_file, images.to_csv(index=False))
        atomic_write_text(self.card_file, json_text({**card, "site_images": {
            "file": self.images_file.name, "sha256": file_sha256(self.images_file), "count": len(images)}}))


def adapted_card(source: LoadedModel, source_uri: str, method: str, settings: dict[str, Any],
                 seed: int, site: dict[str, Any], operating: dict[str, Any], run_id: str | None) -> dict[str, Any]:
    """card.json: the fields every scorer reads (covidtl.trained), then what makes it this model."""
    return {
        "kind": "adapted", "model": source.name, "init": source.init, "dataset": source.dataset,
        "preprocessing": source.preprocessing, "image_size": int(source.model.input_shape[1]),
        "classes": list(paths.CLASSES), "positive": paths.POSITIVE,
        "operating_point": operating, "run_id": run_id,
        "adapted": {"source_model": source_uri, "source_run_id": source.source_run_id, "method": method,
                    "settings": settings, "seed": seed, "site": site},
        "git_commit": tracking.git_commit(), "intended_use": INTENDED_USE,
    }


def log_adapt_run(adapted: keras.Model, params: dict[str, Any], images_file: Path, log_model: bool,
                  example: np.ndarray) -> tuple[str, str | None]:
    """One MLflow run tagged kind=adapt: params, the image list, and the model; (run id, model URI)."""
    tracking.use_experiment(EXPERIMENT)
    with mlflow.start_run(run_name=f"adapt-{params['method']}") as run:
        mlflow.set_tags({"kind": "adapt", "method": params["method"], "git_commit": tracking.git_commit(),
                         **tracking.experiment_tags()})
        mlflow.log_params(params)
        mlflow.log_artifact(str(images_file))
        model_uri = tracking.log_keras_model(adapted, example) if log_model else None
    return run.info.run_id, model_uri
