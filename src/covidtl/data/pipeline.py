"""tf.data input pipeline from the split table: decode, RGB, resize, augment (train only), preprocess.

`augment_batch` is the one definition of the paper's augmentation: used online here and
offline by `covidtl augment`. Training reads decoded images from the uint8 cache (`cache=True`);
evaluation decodes each file, as `covidtl predict` does.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf
from PIL import Image

from covidtl.config import AugmentConfig, Config, IntensityConfig
from covidtl.data.cache import cache_dir, cached_images, resize_rgb  # noqa: F401 - cache_dir: re-exported
from covidtl.data.images import load_rgb, open_regular
from covidtl.data.preprocess import NamedModel, preprocess_for
from covidtl.paths import CLASSES

log = logging.getLogger(__name__)


def augment_batch(images: tf.Tensor, aug: AugmentConfig, seed: tf.Tensor) -> tf.Tensor:
    """The paper's augmentation on a whole batch: rotation +/-25 degrees, zoom 0.2, horizontal flip.

    As ImageDataGenerator draws them (an angle, a zoom per axis in [1 - zoom, 1 + zoom], a coin for
    the flip, per image; new pixels filled from the nearest edge), composed into one affine map
    and sampled at the nearest pixel: one gather per batch. Keras' RandomRotation and RandomZoom
    resample twice with bilinear weights, ~6x the CPU time, which made augmentation slower than the
    custom CNN's own step. `seed` (two integers) fixes the draws: same seed, same batch.
    """
    shape = tf.shape(images)
    n, h, w = shape[0], shape[1], shape[2]
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 4)

    def uniform(i, low, high):
        return tf.random.stateless_uniform((n,), seeds[i], low, high)

    angle = uniform(0, -float(aug.rotation), float(aug.rotation)) * (np.pi / 180.0)
    zoom_x = uniform(1, 1.0 - aug.zoom, 1.0 + aug.zoom)
    zoom_y = uniform(2, 1.0 - aug.zoom, 1.0 + aug.zoom)
    flip = tf.where(uniform(3, 0.0, 1.0) < 0.5, -1.0, 1.0) if aug.horizontal_flip else tf.ones((n,))
    cos, sin = tf.cos(angle)[:, None, None], tf.sin(angle)[:, None, None]
    zoom_x, zoom_y, flip = zoom_x[:, None, None], zoom_y[:, None, None], flip[:, None, None]
    # Output pixel (x, y) around the centre reads input rotation . zoom . flip (x, y).
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    cy, cx = (hf - 1.0) / 2.0, (wf - 1.0) / 2.0
    ys, xs = tf.meshgrid(tf.range(hf) - cy, tf.range(wf) - cx, indexing="ij")
    src_x = cos * zoom_x * flip * xs - sin * zoom_y * ys + cx
    src_y = sin * zoom_x * flip * xs + cos * zoom_y * ys + cy
    # Clipping to the border is fill_mode="nearest".
    col = tf.cast(tf.round(tf.clip_by_value(src_x, 0.0, wf - 1.0)), tf.int32)
    row = tf.cast(tf.round(tf.clip_by_value(src_y, 0.0, hf - 1.0)), tf.int32)
    index = (tf.range(n) * h * w)[:, None, None] + row * w + col
    return tf.gather(tf.reshape(images, (-1, shape[3])), index)


def intensity_on(intensity: IntensityConfig) -> bool:
    return any((intensity.brightness, intensity.contrast, intensity.gamma, intensity.noise, intensity.blur))


def augment_intensity(images: tf.Tensor, intensity: IntensityConfig, seed: tf.Tensor) -> tf.Tensor:
    """Photometric augmentation (augment.intensity) on a whole batch of [0, 255] images -> float32 [0, 255].

    Per image, on values in [0, 1]: a brightness offset, a contrast factor about the image's mean,
    a gamma, Gaussian noise (one value per pixel, the same on every channel: a grey scan stays grey)
    and, with probability `blur`, a 3x3 Gaussian blur; clipped to [0, 1] after each step, so the
    model's preprocessing sees the range it expects. `seed` (two integers) fixes the draws.
    """
    x = tf.cast(images, tf.float32) / 255.0
    n = tf.shape(x)[0]
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 5)

    def per_image(i, low, high):
        return tf.random.stateless_uniform((n, 1, 1, 1), seeds[i], low, high)

    if intensity.brightness:
        x = tf.clip_by_value(x + per_image(0, -intensity.brightness, intensity.brightness), 0.0, 1.0)
    if intensity.contrast:
        mean = tf.reduce_mean(x, axis=(1, 2, 3), keepdims=True)
        factor = per_image(1, 1.0 - intensity.contrast, 1.0 + intensity.contrast)
        x = tf.clip_by_value((x - mean) * factor + mean, 0.0, 1.0)
    if intensity.gamma:
        x = tf.pow(x, per_image(2, 1.0 - intensity.gamma, 1.0 + intensity.gamma))
    if intensity.noise:
        noise = tf.random.stateless_normal(tf.concat([tf.shape(x)[:3], [1]], 0), seeds[3], stddev=intensity.noise)
        x = tf.clip_by_value(x + noise, 0.0, 1.0)
    if intensity.blur:
        kernel = tf.constant([1.0, 2.0, 1.0]) / 4.0
        kernel = (kernel[:, None] * kernel[None, :])[:, :, None, None]
        channels = x.shape[-1] or 3
        blurred = tf.nn.depthwise_conv2d(
            tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="SYMMETRIC"),
            tf.tile(kernel, [1, 1, channels, 1]), strides=[1, 1, 1, 1], padding="VALID",
        )
        x = tf.where(per_image(4, 0.0, 1.0) < intensity.blur, blurred, x)
    return x * 255.0


def augmented(ds: tf.data.Dataset, aug: AugmentConfig) -> tf.data.Dataset:
    """`augment_batch` (and `augment_intensity` when augment.intensity is set) on each (images,
    labels) batch, with seeds drawn from augment.seed (new each epoch)."""
    seeds = tf.data.Dataset.random(seed=aug.seed, rerandomize_each_iteration=True)
    photometric = intensity_on(aug.intensity)

    def augment(xy, s):
        images = augment_batch(xy[0], aug, tf.stack([s, tf.constant(0, tf.int64)]))
        if photometric:  # its own draws: the geometric ones stay those of the same seed without it
            images = augment_intensity(images, aug.intensity, tf.stack([s, tf.constant(1, tf.int64)]))
        return images, xy[1]

    return tf.data.Dataset.zip(ds, seeds).map(augment, num_parallel_calls=tf.data.AUTOTUNE)


def copy_seed(seed: int, sha256: str, copy: int) -> int:
    """The seed of one augmented copy of one image: its own draws, whatever batch it lands in, so a
    stored copy (`covidtl.features`) is the same copy in every run and fold."""
    digest = hashlib.sha256(f"{seed}:{copy}:{sha256}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def augment_image(image: tf.Tensor, aug: AugmentConfig, seed: tf.Tensor) -> tf.Tensor:
    """`augmented`'s augmentation of one [0, 255] image from its own seed (`copy_seed`)."""
    images = augment_batch(image[None], aug, tf.stack([seed, tf.constant(0, tf.int64)]))
    if intensity_on(aug.intensity):
        images = augment_intensity(images, aug.intensity, tf.stack([seed, tf.constant(1, tf.int64)]))
    return images[0]


def readable_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Rows whose file exists and passes PIL's structural check; each other one is reported."""
    keep = []
    for path in table["path"]:
        try:
            with open_regular(path) as fh, Image.open(fh) as im:  # never a FIFO or a device
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
    table: pd.DataFrame, spec: NamedModel, cfg: Config, image_size: int, training: bool,
    *, cache: bool = False, batch_size: int | None = None,
) -> tf.data.Dataset:
    """Batches of (preprocessed float32 images, one-hot labels); shuffled and augmented if training.

    `cache`: read the images from the decoded uint8 cache (`covidtl.data.cache`), built on first
    use, instead of decoding every file each epoch; the pixels are the decode's, rounded to uint8.
    """
    table = readable_rows(table)
    batch_size = batch_size or cfg.train.batch_size
    if cache:
        ds = _cached_batches(table, cfg, image_size, training, batch_size)
    else:
        ds = _decoded_batches(table, cfg, image_size, training, batch_size)
    if training:
        ds = augmented(ds, cfg.augment)
    preprocess = preprocess_for(spec, cfg.train.preprocessing)
    ds = ds.map(lambda x, y: (preprocess(tf.cast(x, tf.float32)), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def _decoded_batches(table, cfg: Config, image_size: int, training: bool, batch_size: int) -> tf.data.Dataset:
    """Each file decoded and resized as it is read: float32 [0, 255], exactly what evaluation scores."""
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
    return ds.batch(batch_size)


def _cached_batches(table, cfg: Config, image_size: int, training: bool, batch_size: int) -> tf.data.Dataset:
    """Batches gathered from the memory-mapped cache by index: no decoding after the first build."""
    cached = cached_images(table, image_size, cfg)
    images = cached.images
    labels = tf.one_hot(label_indices(table)[cached.kept], len(CLASSES))

    def gather(index):
        batch = tf.numpy_function(lambda i: images[i], [index], tf.uint8, stateful=False)
        batch.set_shape((None, image_size, image_size, 3))
        return batch, tf.gather(labels, index)  # uint8 until after augmentation: 1/4 of the bytes to move

    ds = tf.data.Dataset.range(len(images))
    if training:
        ds = ds.shuffle(max(len(images), 1), seed=cfg.train.seed, reshuffle_each_iteration=True)
    # Batch the indices, then gather: one copy of 32 images instead of 32 small reads.
    return ds.batch(batch_size).map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
