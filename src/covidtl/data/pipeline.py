"""tf.data input pipeline from the split table: decode, RGB, resize, augment (train only), preprocess.

`augmentation_layers` is the one definition of the paper's augmentation: used online here and
offline by `covidtl augment`.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from PIL import Image

from covidtl.config import AugmentConfig, Config
from covidtl.data.images import load_rgb
from covidtl.paths import CLASSES

if TYPE_CHECKING:
    from covidtl.models.registry import ModelSpec

log = logging.getLogger(__name__)


def augmentation_layers(aug: AugmentConfig) -> keras.Sequential:
    """The paper's augmentation: rotation +/-25 degrees, horizontal flip, zoom 0.2."""
    # fill_mode="nearest" is what the paper's ImageDataGenerator filled new pixels with.
    steps: list[keras.layers.Layer] = []
    if aug.rotation:
        steps.append(
            keras.layers.RandomRotation(aug.rotation / 360.0, fill_mode="nearest", seed=aug.seed)
        )
    if aug.horizontal_flip:
        steps.append(keras.layers.RandomFlip("horizontal", seed=aug.seed + 1))
    if aug.zoom:
        steps.append(keras.layers.RandomZoom(aug.zoom, fill_mode="nearest", seed=aug.seed + 2))
    return keras.Sequential(steps, name="augmentation")


def readable_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Rows whose file exists and passes PIL's structural check; each other one is reported."""
    keep = []
    for path in table["path"]:
        try:
            with Image.open(path) as im:
                im.verify()
            keep.append(True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped the same way
            log.warning("skipping %s: cannot be decoded (%s)", path, exc)
            keep.append(False)
    return table[np.array(keep, dtype=bool)] if len(table) else table


def label_indices(table: pd.DataFrame) -> np.ndarray:
    """Class names -> softmax indices in CLASSES order (non_covid=0, covid=1)."""
    return table["label"].map({name: i for i, name in enumerate(CLASSES)}).to_numpy("int32")


def decode_image(path: tf.Tensor, image_size: int) -> tf.Tensor:
    """PNG/JPEG/BMP/GIF, any mode (greyscale, RGBA, 16-bit) -> float32 RGB in [0, 255]."""
    # Pillow through `load_rgb`, not tf.io.decode_image: ingest, training, evaluation and the
    # offline set must turn a 16-bit scan into 8 bits the same way (stretched by its own range).
    image = tf.numpy_function(_load_rgb_array, [path], tf.uint8, stateful=False)
    return resize_rgb(image, image_size)


def resize_rgb(image, image_size: int) -> tf.Tensor:
    """uint8 RGB (h, w, 3) -> float32 RGB in [0, 255] at image_size x image_size (bilinear)."""
    image = tf.image.resize(tf.ensure_shape(image, (None, None, 3)), (image_size, image_size))
    image.set_shape((image_size, image_size, 3))
    return image


def image_from_bytes(data: bytes, image_size: int) -> np.ndarray:
    """An image file's bytes -> what `decode_image` makes of the same file: the model's raw input.

    `covidtl predict` and the served model read images through this; the preprocessing of the
    model's registry entry is applied to the batch afterwards, as in `make_dataset`.
    """
    return resize_rgb(tf.constant(np.asarray(load_rgb(data), dtype=np.uint8)), image_size).numpy()


def _load_rgb_array(path: bytes | np.ndarray) -> np.ndarray:
    # Graph mode hands numpy_function bytes, eager mode (`covidtl augment`) a 0-d array of them.
    return np.asarray(load_rgb(os.fsdecode(np.asarray(path).item())), dtype=np.uint8)


def make_dataset(
    table: pd.DataFrame, spec: ModelSpec, cfg: Config, image_size: int, training: bool
) -> tf.data.Dataset:
    """Batches of (preprocessed float32 images, one-hot labels); shuffled and augmented if training."""
    from covidtl.models.registry import preprocess_for

    table = readable_rows(table)
    paths = table["path"].astype(str).to_numpy()
    labels = label_indices(table)
    ds = tf.data.Dataset.from_tensor_slices((paths, labels))
    if training:
        ds = ds.shuffle(max(len(paths), 1), seed=cfg.train.seed, reshuffle_each_iteration=True)
    ds = ds.map(
        lambda p, y: (decode_image(p, image_size), tf.one_hot(y, len(CLASSES))),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    # A file that passed the check but still fails to decode is logged by TF and dropped,
    # so one bad image never stops a run.
    ds = ds.ignore_errors(log_warning=True)
    ds = ds.batch(cfg.train.batch_size)
    if training:
        augment = augmentation_layers(cfg.augment)
        ds = ds.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    preprocess = preprocess_for(spec, cfg.train.preprocessing)
    ds = ds.map(lambda x, y: (preprocess(x), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def make_offline_dataset(cfg: Config, dataset: str, spec: ModelSpec, image_size: int) -> tf.data.Dataset:
    """augment.mode=offline: the stored augmented training set (`covidtl augment`), batched."""
    from covidtl.data.augment import load_offline_dataset
    from covidtl.models.registry import preprocess_for

    preprocess = preprocess_for(spec, cfg.train.preprocessing)
    ds = load_offline_dataset(cfg, dataset, image_size)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), tf.one_hot(y, len(CLASSES))))
    ds = ds.batch(cfg.train.batch_size)
    ds = ds.map(lambda x, y: (preprocess(x), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
