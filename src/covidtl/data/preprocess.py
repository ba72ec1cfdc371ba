"""The pixel preprocessing a model's images get, by the name the catalog gives it.

In the data layer so the pipeline applies it without reading the models: a caller passes anything
with the model's `name` (a registry `ModelSpec`, say).
"""

from __future__ import annotations

from typing import Callable, Protocol

import keras

from covidtl.catalog import CATALOG


def rescale(images):
    """The paper's preprocessing: pixel values to [0, 1]."""
    return images / 255.0


# The catalog's preprocessing names: keras.applications' own preprocess_input, or the paper's.
PREPROCESS_INPUT: dict[str, Callable] = {
    "rescale": rescale,
    "densenet": keras.applications.densenet.preprocess_input,
    "resnet": keras.applications.resnet.preprocess_input,
    "inception_v3": keras.applications.inception_v3.preprocess_input,
    "resnet_v2": keras.applications.resnet_v2.preprocess_input,
    "vgg16": keras.applications.vgg16.preprocess_input,
}


class NamedModel(Protocol):
    """What the data layer needs of a model: its catalog name."""

    @property
    def name(self) -> str: ...


def own_preprocessing(model: str) -> Callable:
    """What the model's ImageNet weights were trained with; `rescale` for the custom CNN."""
    return PREPROCESS_INPUT[CATALOG[model].preprocessing]


def preprocess_for(spec: NamedModel, mode: str) -> Callable:
    """`model`: the backbone's own preprocess_input; `rescale`: the paper's [0, 1]."""
    return own_preprocessing(spec.name) if mode == "model" else rescale
