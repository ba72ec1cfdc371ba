"""The study's models as facts, free of TensorFlow: per name, its input size, its own
preprocessing and its ImageNet file.

The one place these facts live: `models/registry.py` adds each network's builder, `weight_records.py`
finds the ImageNet files, `data/preprocess.py` maps the preprocessing names to functions, and
`config.py` checks `train.model` against the names, all from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from covidtl.errors import UserError

@dataclass(frozen=True)
class ModelFacts:
    input_size: int  # the native side, in pixels (train.image_size.<model> overrides it)
    # Its own preprocessing (train.preprocessing: model): keras.applications.<this>.preprocess_input,
    # what its ImageNet weights were trained with; `rescale` (the paper's [0, 1]) for the custom CNN.
    preprocessing: str
    # The file keras.applications downloads (no top) into $KERAS_HOME/models; None: no ImageNet
    # weights exist for that model.
    imagenet_file: str | None


CATALOG: dict[str, ModelFacts] = {
    "custom_cnn": ModelFacts(200, "rescale", None),
    "densenet121": ModelFacts(224, "densenet", "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "resnet50": ModelFacts(224, "resnet", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "inceptionv3": ModelFacts(299, "inception_v3", "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "resnet101v2": ModelFacts(224, "resnet_v2", "resnet101v2_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "vgg16": ModelFacts(224, "vgg16", "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
}
MODEL_NAMES = tuple(CATALOG)


def facts(model: str) -> ModelFacts:
    """The catalog's entry, or one line listing the known names."""
    try:
        return CATALOG[model]
    except KeyError:
        raise UserError(f"--model {model!r}: unknown model; choose one of {', '.join(CATALOG)}") from None


def image_size(model: str, overrides: Mapping[str, int]) -> int:
    """The model's native input size unless params override it (`train.image_size`: `overrides`)."""
    return int(overrides.get(model, facts(model).input_size))
