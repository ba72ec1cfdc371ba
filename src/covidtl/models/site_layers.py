"""Layers an adapted model carries (`covidtl adapt`), registered here so that every loader of a
model file (covidtl.trained) reads them in Keras' safe mode."""

from __future__ import annotations

import keras
from keras import ops

PACKAGE = "covidtl"


@keras.saving.register_keras_serializable(package=PACKAGE)
class ChannelAffine(keras.layers.Layer):
    """x * scale + shift per channel: `adapt --method standardize` maps the site's input
    statistics onto the source training split's."""

    def __init__(self, scale=(1.0, 1.0, 1.0), shift=(0.0, 0.0, 0.0), **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.scale = [float(v) for v in scale]
        self.shift = [float(v) for v in shift]

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "shift": self.shift}

    def compute_output_shape(self, input_shape):
        return input_shape

    def call(self, images):
        images = ops.cast(images, "float32")
        return images * ops.convert_to_tensor(self.scale) + ops.convert_to_tensor(self.shift)
