"""What a trained model says about new images: p_covid and the label at its operating point.

`covidtl predict` and the served model (`covidtl.serving`) both score through `Predictor`: image
file bytes -> `pipeline.image_from_bytes` (training's decode) -> the model's own preprocessing.
"""

from __future__ import annotations

import io
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from covidtl.data.images import checked_bytes, image_files
from covidtl.data.pipeline import image_from_bytes
from covidtl.errors import UserError
from covidtl.files import atomic_write_text, json_text
from covidtl.models.registry import get_spec, preprocess_for
from covidtl.paths import CLASSES, POSITIVE, p_covid
from covidtl.scores import DEFAULT_THRESHOLD
from covidtl.trained import LoadedModel

log = logging.getLogger(__name__)
NEGATIVE = next(c for c in CLASSES if c != POSITIVE)
OUT_SUFFIXES = (".csv", ".json")
COLUMNS = ("file", "p_covid", "label", "error")


@dataclass
class Prediction:
    file: str
    p_covid: float | None = None
    label: str | None = None  # at the model's operating point
    error: str | None = None  # why the image was not scored


class Predictor:
    """A loaded model with its input size, preprocessing and operating point."""

    def __init__(self, loaded: LoadedModel, batch_size: int = 32):
        self.model = loaded.model
        self.size = int(loaded.model.input_shape[1])
        self.preprocess = preprocess_for(get_spec(loaded.name), loaded.preprocessing)
        self.threshold = (DEFAULT_THRESHOLD if loaded.operating_threshold is None
                          else float(loaded.operating_threshold))
        self.batch_size = batch_size

    def label(self, p_covid: float) -> str:
        return POSITIVE if p_covid >= self.threshold else NEGATIVE

    def score(self, images: dict[str, bytes | str]) -> list[Prediction]:
        """{name: file bytes, or the reason they are unusable} -> one Prediction per name, in order.

        A file that cannot be decoded gets its error; the others are scored all the same.
        """
        results = [Prediction(name) for name in images]
        decoded: list[tuple[Prediction, np.ndarray]] = []
        for result, data in zip(results, images.values()):
            if isinstance(data, str):
                result.error = data
                continue
            try:
                decoded.append((result, image_from_bytes(data, self.size)))
            except Exception as exc:  # noqa: BLE001 - any undecodable input is that row's error
                first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
                result.error = f"cannot be decoded as an image: {first}"
        for start in range(0, len(decoded), self.batch_size):
            batch = decoded[start : start + self.batch_size]
            x = self.preprocess(np.stack([image for _, image in batch]))
            probs = np.asarray(self.model(x, training=False))
            for (result, _), prob in zip(batch, probs):
                result.p_covid = float(p_covid(prob))
                result.label = self.label(result.p_covid)
        return results


def read_files(files: Iterable[Path]) -> dict[str, bytes | str]:
    """{file: its bytes} for usable images, {file: reason} for the rest (ingest's checks: a FIFO,
    socket or device is never opened)."""
    out: dict[str, bytes | str] = {}
    for path in files:
        checked = checked_bytes(path)
        if isinstance(checked, str):
            out[str(path)] = checked
            continue
        data, measured = checked
        if measured.note:
            log.warning("Warning: %s: %s", path, measured.note)
        out[str(path)] = data
    return out


def predict_files(loaded: LoadedModel, inputs: Iterable[str | Path]) -> list[Prediction]:
    """A Prediction per image file given or found in the folders given (their subfolders too)."""
    files = image_files(list(inputs), purpose="to predict")
    predictor = Predictor(loaded)
    results: list[Prediction] = []
    # A batch at a time: a folder of thousands of scans never sits in memory whole.
    for start in range(0, len(files), predictor.batch_size):
        results.extend(predictor.score(read_files(files[start : start + predictor.batch_size])))
    return results


def check_out(out: str | Path) -> Path:
    """The --out file, or one line saying which suffixes are understood."""
    out = Path(out)
    if out.suffix.lower() not in OUT_SUFFIXES:
        raise UserError(f"--out {out}: give a .csv or a .json file name")
    return out


def frame(predictions: list[Prediction]) -> pd.DataFrame:
    return pd.DataFrame([asdict(p) for p in predictions], columns=list(COLUMNS))


def write_predictions(predictions: list[Prediction], out: str | Path, threshold: float) -> Path:
    """CSV (one row per file) or JSON (the threshold and a list of rows), by the file's suffix."""
    out = check_out(out)
    if out.suffix.lower() == ".csv":
        buffer = io.StringIO()
        frame(predictions).to_csv(buffer, index=False)
        text = buffer.getvalue()
    else:
        text = json_text({"threshold": threshold, "predictions": [asdict(p) for p in predictions]})
    try:
        return atomic_write_text(out, text)
    except OSError as exc:  # read-only folder, full disk: nothing half-written is left
        raise UserError(f"--out {out}: cannot write it ({exc.strerror or exc}); "
                        "choose a writable folder with free space") from None
