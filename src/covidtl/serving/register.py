"""`covidtl register`: a study cell's model into the MLflow Model Registry, under a name and alias.

The study trains with `--no-log-model` (the DVC output is the stored copy); registering logs the
model at that moment, in a `kind=register` run tied to the training run, as a pyfunc that takes
image files (`covidtl.serving.model`), so `mlflow models serve` needs nothing but this package.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import tensorflow as tf
from mlflow.tracking import MlflowClient

from covidtl import tracking
from covidtl.config import Config
from covidtl.errors import UserError
from covidtl.serving.model import SIGNATURE
from covidtl.trained import PYFUNC_CARD_KEY, PYFUNC_WRAPPER_KEY, load_model_files, model_files

MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
# Registered names and aliases as MLflow accepts them; an alias may not look like a version (v3).
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
ALIAS = re.compile(r"^(?!v\d+$)[A-Za-z_][A-Za-z0-9_-]*$")


@dataclass
class Registered:
    name: str
    alias: str
    version: str
    run_id: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}"


def register_model(cfg: Config, model_path: str | Path, name: str, alias: str = "champion") -> Registered:
    """Log `model_path` (a cell, its model/ folder or a .keras file) as a pyfunc, register, alias it."""
    if not NAME.match(name):
        raise UserError(f"--name {name!r}: use letters, digits, '.', '_' or '-' (e.g. covidtl-ct)")
    if not ALIAS.match(alias):
        raise UserError(f"--alias {alias!r}: use letters, digits, '_' or '-', starting with a letter "
                        "and not shaped like a version (v1); e.g. champion")
    tracking.tracking_uri()  # a tracking server that does not answer: refused before the model loads
    model_file, card_file = model_files(model_path, option="CELL_OR_MODEL_PATH")
    loaded = load_model_files(model_file, card_file, cfg)  # safe mode; a bad file fails here
    card = json.loads(card_file.read_text()) if card_file is not None else {}
    # A bare .keras file gets the card the server needs: its preprocessing and operating point.
    card = {"model": loaded.name, "init": loaded.init, "preprocessing": loaded.preprocessing,
            "operating_point": {"threshold": loaded.operating_threshold}, **card}
    dataset = card.get("dataset") or "registered"

    tracking.use_experiment(dataset)
    with tempfile.TemporaryDirectory(prefix="covidtl-register-") as tmp:
        staged = Path(tmp)
        shutil.copyfile(model_file, staged / "model.keras")
        (staged / "card.json").write_text(json.dumps(card, indent=2) + "\n")
        with mlflow.start_run(run_name=f"register-{name}") as run:
            mlflow.set_tags({
                "kind": "register", "source_run_id": loaded.source_run_id or "none",
                "model": loaded.name, "init": loaded.init, "dataset": dataset,
                "model_path": str(model_file.resolve()), "registered_model": name, "alias": alias,
                "git_commit": tracking.git_commit(), **tracking.experiment_tags(),
            })
            info = log_pyfunc(staged / "model.keras", staged / "card.json", name)
    version = str(info.registered_model_version)
    MlflowClient(tracking.tracking_uri()).set_registered_model_alias(name, alias, version)
    return Registered(name, alias, version, run.info.run_id)


def log_pyfunc(model_file: Path, card_file: Path, registered_name: str | None = None):
    """The image-file pyfunc (models-from-code) with the .keras file and card as its artifacts."""
    # Pinned requirements: MLflow would otherwise load the model in a subprocess to infer them.
    requirements = [f"keras=={keras.__version__}", f"tensorflow=={tf.__version__}",
                    f"mlflow=={mlflow.__version__}", "covidtl"]
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(MODEL_CODE),
        artifacts={PYFUNC_WRAPPER_KEY: str(model_file), PYFUNC_CARD_KEY: str(card_file)},
        signature=SIGNATURE,
        pip_requirements=requirements,
        registered_model_name=registered_name,
    )
