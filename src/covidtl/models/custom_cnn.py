"""The paper's small CNN (its Table 1), trained from scratch: 81,989 parameters on 200x200x3."""

from __future__ import annotations

from typing import Sequence

import keras
from keras import layers

INPUT_SIZE = 200
# The smallest input whose last pooling still has a 1x1 map (below it Keras fails mid-build).
MIN_INPUT_SIZE = 186


def build_custom_cnn(input_shape: tuple[int, int, int], dropout: float = 0.0, head: str = "paper",
                     front: Sequence[keras.layers.Layer] = ()) -> keras.Model:
    """Table 1 of the paper, layer by layer; the head is the same Flatten -> 1000 -> 2 (`paper`),
    or global average pooling -> 2 (`gap`: the same at 200 px, where the last map is 1 x 1).
    `front`: layers between the input and the first convolution (train.crop, train.normalize)."""
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    for layer in front:
        x = layer(x)
    x = layers.SeparableConv2D(16, 3, padding="valid", activation="relu")(x)  # 198², 91
    x = layers.MaxPooling2D(2)(x)  # 99²
    x = layers.SeparableConv2D(16, 3, padding="valid", activation="relu")(x)  # 97², 416
    x = layers.MaxPooling2D(2)(x)  # 48²
    x = layers.BatchNormalization()(x)  # 64
    x = layers.SeparableConv2D(32, 3, padding="same", activation="relu")(x)  # 48², 688
    x = layers.MaxPooling2D(3, strides=2)(x)  # 23²
    x = layers.BatchNormalization()(x)  # 128
    x = layers.SeparableConv2D(32, 3, padding="valid", activation="relu")(x)  # 21², 1344
    x = layers.MaxPooling2D(2)(x)  # 10²
    x = layers.BatchNormalization()(x)  # 128
    x = layers.Dropout(dropout)(x)
    x = layers.SeparableConv2D(64, 3, padding="valid", activation="relu")(x)  # 8², 2400
    x = layers.SeparableConv2D(64, 3, padding="same", activation="relu")(x)  # 8², 4736
    x = layers.MaxPooling2D(2)(x)  # 4²
    x = layers.SeparableConv2D(64, 3, padding="valid", activation="relu")(x)  # 2², 4736
    x = layers.MaxPooling2D(2)(x)  # 1²
    x = layers.BatchNormalization()(x)  # 256
    if head == "gap":
        x = layers.GlobalAveragePooling2D()(x)  # 64
    else:
        x = layers.Flatten()(x)  # 64
        x = layers.Dense(1000, activation="relu")(x)  # 65,000
    # float32 under mixed precision too: a float16 softmax saturates.
    outputs = layers.Dense(2, activation="softmax", name="probabilities", dtype="float32")(x)  # 2,002
    return keras.Model(inputs, outputs, name="custom_cnn")
