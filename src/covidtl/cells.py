"""A study cell's files (the `Cell` type), and skipping a cell that cannot run here.

Kept free of TensorFlow: a skipped cell of the DVC matrix costs a second, not an import of Keras.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from covidtl.errors import UserError
from covidtl.files import atomic_path, atomic_write_text, json_text
from covidtl.inits import Init, init_label

if TYPE_CHECKING:
    import pandas as pd

EPOCH_METRICS = ("loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc")
MODEL_DIR = "model"  # models/<cell>/model/: model.keras + card.json, or SKIPPED.txt
MODELS_ROOT = "models"
# predictions.csv, one row per scored image, written and read here only (`write_predictions`,
# `read_predictions`). Its columns where it lies:
#   models/<cell>/, external/<dataset>/<cell>/<set>/   PREDICTION_COLUMNS
#   cv/<dataset>/<cell>/                               CV_PREDICTION_COLUMNS: the fold that held the image out, first
#   `covidtl evaluate --out` and its MLflow run        SCORE_COLUMNS: no path or group
PREDICTION_COLUMNS = ("path", "group", "actual", "predicted", "p_covid")
CV_PREDICTION_COLUMNS = ("fold", *PREDICTION_COLUMNS)
SCORE_COLUMNS = ("actual", "predicted", "p_covid")
PAPER_PROFILE = "paper"  # params.yaml `profile`: the paper's protocol; cells of another are suffixed


# --------------------------------------------------------------------------- the cell's files


def cell_name(model: str, init: Init | str, dataset: str, profile: str = PAPER_PROFILE) -> str:
    """The study-matrix cell name, as in `train@densenet121-imagenet-ct`; a cell trained with
    another profile than the paper's carries its name: `custom_cnn-random-ct-best`."""
    name = f"{model}-{init_label(init)}-{dataset}"
    return name if profile == PAPER_PROFILE else f"{name}-{profile}"


@dataclass(frozen=True)
class Cell:
    """One study cell's folder: the only code that knows its files, writes them and reads them.

    models/<model>-<init>-<dataset>/
        model/model.keras, model/card.json   (or model/SKIPPED.txt)   the DVC output
        metrics.json    status, test metrics, epochs_used, run_id      written last: the record
        history.csv     one row per epoch
        predictions.csv path, group, actual, predicted (at 0.5), p_covid per test image
        gradcam.png     a seeded sample of test TP/FP/TN/FN with their Grad-CAM maps
        probe/          `covidtl probe`'s shortcut test (probe.json: the card's shortcut_risk)
        config.yaml     the complete params that ran (a params file: `covidtl --params` re-runs it)
        checkpoint/     while training: epoch-NNNN.keras (with the optimiser's state) + state.json, to resume
    """

    dir: Path

    @classmethod
    def of(cls, model: str, init: Init | str, dataset: str, root: str | Path = MODELS_ROOT,
           profile: str = PAPER_PROFILE) -> Cell:
        return cls(Path(root) / cell_name(model, init, dataset, profile))

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def model_dir(self) -> Path:
        return self.dir / MODEL_DIR

    @property
    def model_file(self) -> Path:
        return self.model_dir / "model.keras"

    @property
    def card_file(self) -> Path:
        return self.model_dir / "card.json"

    @property
    def metrics_file(self) -> Path:
        return self.dir / "metrics.json"

    @property
    def history_file(self) -> Path:
        return self.dir / "history.csv"

    @property
    def predictions_file(self) -> Path:
        return self.dir / "predictions.csv"

    @property
    def config_file(self) -> Path:
        return self.dir / "config.yaml"

    @property
    def gradcam_file(self) -> Path:
        return self.dir / "gradcam.png"

    @property
    def probe_dir(self) -> Path:
        return self.dir / "probe"

    @property
    def checkpoint_dir(self) -> Path:
        return self.dir / "checkpoint"

    @property
    def checkpoint_state_file(self) -> Path:
        return self.checkpoint_dir / "state.json"

    # ---- writing

    def begin(self) -> None:
        """Before a new result is written: drop the old record, so a crash never leaves a record
        that describes another model than the one on disk."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_file.unlink(missing_ok=True)
        self.gradcam_file.unlink(missing_ok=True)
        shutil.rmtree(self.probe_dir, ignore_errors=True)  # it judged the model being replaced
        (self.model_dir / "SKIPPED.txt").unlink(missing_ok=True)

    def save_model(self, save: Callable[[Path], None]) -> Path:
        """`save(path)` writes the model to a temporary name; it becomes model.keras only when whole."""
        self.model_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.model_file) as tmp:
            save(tmp)
        return self.model_file

    def write_results(
        self,
        *,
        metrics: dict[str, Any],
        history: dict[str, list[float]],
        predictions: pd.DataFrame | None,
        config_yaml: str,
        card: dict[str, Any],
    ) -> None:
        """Everything but the model; metrics.json last, as the record that the cell is complete."""
        self.model_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.card_file, json.dumps(card, indent=2) + "\n")
        atomic_write_text(self.config_file, config_yaml)
        epochs = len(history.get("loss", []))
        rows = [
            {"epoch": i + 1, **{k: history.get(k, [math.nan] * epochs)[i] for k in EPOCH_METRICS}}
            for i in range(epochs)
        ]
        atomic_write_text(self.history_file, _csv(("epoch", *EPOCH_METRICS), rows))
        # Header only when no test image was scored: an older run's rows never stay beside this
        # model, and DVC finds the plot it declares.
        write_predictions(self.predictions_file, predictions)
        atomic_write_text(self.metrics_file, json_text(metrics))

    def save_figure(self, figure, path: Path) -> Path:
        """A matplotlib figure as PNG, written whole or not at all."""
        with atomic_path(path) as tmp:
            figure.savefig(tmp, dpi=80)
        return path

    def write_failed(self, run_id: str, reason: str) -> None:
        """The record of a run that stopped with an error: the report shows it as failed."""
        record = {"status": "failed", "reason": reason, "run_id": run_id}
        try:
            atomic_write_text(self.metrics_file, json.dumps(record, indent=2) + "\n")
        except UserError:
            pass  # the disk that stopped the run refuses this too: the run's own error is the one to show

    def save_checkpoint(self, save: Callable[[Path], None] | None, state: dict[str, Any]) -> None:
        """One completed epoch: its model file, then state.json naming it, then the older file goes.
        A kill at any moment leaves a state.json that names a whole model file of the same epoch.
        `save` None: the run has begun, no epoch is done yet (state.json alone keeps its run id)."""
        name = f"epoch-{state['epochs_done']:04d}.keras" if save is not None else None
        if save is not None:
            with atomic_path(self.checkpoint_dir / name) as tmp:
                save(tmp)
        atomic_write_text(self.checkpoint_state_file, json_text({**state, "model_file": name}))
        keep = {name, state.get("best_file")}
        for old in (*self.checkpoint_dir.glob("epoch-*.keras"), *self.checkpoint_dir.glob(".epoch-*.tmp*"),
                    *self.checkpoint_dir.glob("best-epoch-*.weights.h5"), *self.checkpoint_dir.glob(".best-*")):
            if old.name not in keep:  # an older epoch, or a save a kill cut short
                old.unlink(missing_ok=True)

    def save_best(self, save_weights: Callable[[Path], None], epoch: int) -> str:
        """The weights of the best epoch so far (train.select), kept beside the checkpoint until the
        run ends; the next state.json names it (until then the previous best stays too)."""
        name = f"best-epoch-{epoch:04d}.weights.h5"
        with atomic_path(self.checkpoint_dir / name) as tmp:  # .best-epoch-NNNN.tmp<pid>.weights.h5
            save_weights(tmp)
        return name

    def remove_checkpoint(self) -> None:
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)

    def write_skipped(self, reason: str) -> None:
        """A skipped cell's files: DVC finds every output, the report shows the cell as skipped."""
        self.begin()
        self.model_dir.mkdir(parents=True, exist_ok=True)
        self.model_file.unlink(missing_ok=True)
        self.card_file.unlink(missing_ok=True)
        atomic_write_text(self.model_dir / "SKIPPED.txt", reason + "\n")
        write_predictions(self.predictions_file, None)
        atomic_write_text(self.history_file, _csv(("epoch", *EPOCH_METRICS), []))
        atomic_write_text(self.metrics_file, json.dumps({"status": "skipped", "reason": reason}, indent=2) + "\n")

    # ---- reading

    def read_metrics(self) -> dict[str, Any] | None:
        """metrics.json, or None when the cell has no complete result."""
        try:
            data = json.loads(self.metrics_file.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def read_predictions(self) -> pd.DataFrame:
        """predictions.csv as a table (paths as stored: relative to the dataset root)."""
        return read_predictions(self.predictions_file, "train the cell again")

    def read_checkpoint(self) -> tuple[dict[str, Any], Path | None] | None:
        """The last completed epoch's state and model file (None before the first epoch ends),
        or None when there is nothing to resume."""
        try:
            state = json.loads(self.checkpoint_state_file.read_text())
            model_file = self.checkpoint_dir / state["model_file"] if state["model_file"] else None
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{self.checkpoint_state_file}: unreadable ({exc}); delete "
                            f"{self.checkpoint_dir} or pass --restart to start over") from None
        if model_file is not None and not model_file.is_file():
            raise UserError(f"{model_file}: missing, though {self.checkpoint_state_file} names it; delete "
                            f"{self.checkpoint_dir} or pass --restart to start over")
        return state, model_file

    def read_card(self) -> dict[str, Any]:
        try:
            return json.loads(self.card_file.read_text())
        except (OSError, ValueError):
            return {}

    def run_id(self) -> str | None:
        """The MLflow run that produced this cell's result (None if skipped or missing)."""
        metrics = self.read_metrics() or {}
        return metrics.get("run_id") or None


def write_verdict(probe_dir: Path, summary: dict[str, Any]) -> Path:
    """probe.json, the shortcut probe's summary and verdict, in a cell's or a cv run's probe/ folder."""
    return atomic_write_text(probe_dir / "probe.json", json_text(summary))


def read_verdict(probe_dir: str | Path) -> dict[str, Any] | None:
    """probe.json's summary from a probe folder, or None where there is none (never probed)."""
    try:
        return json.loads((Path(probe_dir) / "probe.json").read_text())
    except (OSError, ValueError):
        return None


def predictions_csv(predictions: pd.DataFrame | None, columns: tuple[str, ...] = PREDICTION_COLUMNS) -> str:
    """predictions.csv's text: `columns` of the table (quoted where needed: file names hold commas
    and brackets; NaN as empty); None: the header alone (no image scored, a skipped cell)."""
    if predictions is None:
        return ",".join(columns) + "\n"
    return predictions[list(columns)].to_csv(index=False, lineterminator="\n")


def write_predictions(path: Path, predictions: pd.DataFrame | None,
                      columns: tuple[str, ...] = PREDICTION_COLUMNS) -> Path:
    """One predictions.csv, whole or not at all (the columns of its place: see PREDICTION_COLUMNS)."""
    return atomic_write_text(path, predictions_csv(predictions, columns))


def read_predictions(path: Path, fix: str) -> pd.DataFrame:
    """A predictions.csv of any place (path and group as text), or one line naming it and `fix`."""
    import pandas as pd  # here, not at the top: a skipped cell is written without pandas

    try:
        return pd.read_csv(path, dtype={"path": str, "group": str})
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable ({exc}); {fix}") from None


def _csv(columns: tuple[str, ...], rows: list[dict[str, Any]]) -> str:
    """CSV text (quoted where needed: file names hold commas and brackets); NaN as empty."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return out.getvalue()