"""The served model: a pyfunc whose input is image files, base64-encoded, one per row.

Request rows hold the bytes of a PNG or JPEG file; the response rows hold p_covid, the label at the
model's operating point, and an error for a row that could not be decoded (the rest are scored).
Scoring is `covidtl.predict.Predictor`, so the server answers what `covidtl predict` says.
"""

from __future__ import annotations

import base64
import binascii

import mlflow.pyfunc
import pandas as pd
from mlflow.models.signature import ModelSignature
from mlflow.types import ColSpec, Schema

from covidtl.data.images import bytes_reason
from covidtl.predict import Predictor
from covidtl.trained import PYFUNC_CARD_KEY, PYFUNC_WRAPPER_KEY, load_model_files

IMAGE_COLUMN = "image"
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", IMAGE_COLUMN)]),
    outputs=Schema([ColSpec("double", "p_covid"), ColSpec("string", "label"),
                    ColSpec("string", "error")]),
)


class ImageModel(mlflow.pyfunc.PythonModel):
    """Loads the .keras file and card logged beside it (`covidtl register`) with the one loader."""

    def load_context(self, context) -> None:
        loaded = load_model_files(context.artifacts[PYFUNC_WRAPPER_KEY],
                                  context.artifacts[PYFUNC_CARD_KEY])
        self.predictor = Predictor(loaded)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if IMAGE_COLUMN not in model_input.columns:
            raise ValueError(f"the request needs a column {IMAGE_COLUMN!r} of base64-encoded image files")
        images = {str(i): file_bytes(value) for i, value in enumerate(model_input[IMAGE_COLUMN])}
        results = self.predictor.score(images)
        # object columns: a missing value is JSON null (pandas' own string dtype would send NaN).
        return pd.DataFrame({
            "p_covid": pd.Series([r.p_covid for r in results], dtype=object),
            "label": pd.Series([r.label for r in results], dtype=object),
            "error": pd.Series([r.error for r in results], dtype=object),
        })


def file_bytes(value) -> bytes | str:
    """A row's base64 text -> the image file's bytes, or the reason they cannot be scored."""
    if not isinstance(value, str) or not value:
        return "no image: the row's value must be a base64-encoded PNG or JPEG file"
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        return f"not base64: {exc}; send the file's bytes base64-encoded"
    return bytes_reason(data) or data
