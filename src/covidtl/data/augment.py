"""The offline augmented training set: seeded copies of the training split, stored as uint8 arrays.

`covidtl augment DATASET` writes, for every input size the study needs, one ``<size>/images.npy``
(N x size x size x 3, uint8, memory-mapped when read) and one ``manifest.csv`` row per image
(source path, label, copy, size, shard, offset) under ``data/<dataset>/augmented/``. A few large
files instead of thousands of small ones is what DVC hashes quickly; same params, same bytes.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf
from tqdm import tqdm

from covidtl import catalog, paths
from covidtl.config import Config
from covidtl.data import tables
from covidtl.data.cache import cached_images
from covidtl.data.pipeline import augment_batch, intensity_on, preprocess_for, readable_rows
from covidtl.data.preprocess import NamedModel
from covidtl.errors import UserError

BATCH = 32


def sizes_needed(cfg: Config) -> list[int]:
    """Every distinct input size of the study's models (native, or train.image_size's override)."""
    return sorted({catalog.image_size(m, cfg.train.image_size) for m in cfg.study.models})


def training_rows(cfg: Config, dataset: str) -> pd.DataFrame:
    """The training split only: augmenting before splitting is the paper's leak we avoid."""
    table = tables.read_split(cfg, dataset)
    return table[table["split"] == "train"].reset_index(drop=True)


def augment(cfg: Config, dataset: str, sizes: list[int] | None = None) -> pd.DataFrame:
    """Write the augmented set of `dataset` for each size; returns its manifest."""
    rows = readable_rows(training_rows(cfg, dataset)).reset_index(drop=True)
    if rows.empty:
        raise UserError(f"{paths.split_path(cfg, dataset)}: no readable training images to augment")
    copies = cfg.augment.copies_per_image
    total = len(rows) * copies
    if cfg.augment.max_images:
        total = min(total, cfg.augment.max_images)

    out = paths.augmented_dir(cfg, dataset)
    if out.exists():
        shutil.rmtree(out)  # a stale size or a larger earlier set must not survive
    out.mkdir(parents=True)
    manifests = [_write_size(cfg, rows, size, total, out) for size in sizes or sizes_needed(cfg)]
    manifest = pd.concat(manifests, ignore_index=True)
    tables.write_augmented_manifest(cfg, dataset, manifest)
    return manifest


def _write_size(cfg: Config, rows: pd.DataFrame, size: int, total: int, out: Path) -> pd.DataFrame:
    """Copy-major order (every image once, then again...), so a cap keeps the copies balanced."""
    # The same decoded uint8 images training reads (built here if training has not yet).
    cached = cached_images(rows, size, cfg)
    originals = cached.images
    rows = rows[cached.kept].reset_index(drop=True)
    total = min(total, len(rows) * cfg.augment.copies_per_image)
    shard = f"{size}/images.npy"
    (out / str(size)).mkdir()
    images = np.lib.format.open_memmap(out / shard, mode="w+", dtype=np.uint8, shape=(total, size, size, 3))
    order = [(copy, i) for copy in range(cfg.augment.copies_per_image) for i in range(len(rows))][:total]
    for number, start in enumerate(tqdm(range(0, total, BATCH), desc=f"augment {size}px", unit="batch")):
        chunk = order[start : start + BATCH]
        # Seeded per batch number: every size gets the same draws, and the same params the same bytes.
        batch = tf.constant(originals[[i for _, i in chunk]])
        images[start : start + len(chunk)] = augment_batch(batch, cfg.augment, (cfg.augment.seed, number)).numpy()
    images.flush()
    del images
    return pd.DataFrame({
        "source_path": [rows["path"][i] for _, i in order],
        "label": [rows["label"][i] for _, i in order],
        "copy": [copy for copy, _ in order],
        "size": size,
        "shard": shard,
        "offset": range(total),
    })


def load_offline_dataset(cfg: Config, dataset: str, image_size: int):
    """The stored set at `image_size` as an unbatched, shuffled tf.data.Dataset of (uint8 image, label index)."""
    out = paths.augmented_dir(cfg, dataset)
    manifest = tables.read_augmented_manifest(cfg, dataset)
    rows = manifest[manifest["size"] == image_size]
    if rows.empty:
        have = ", ".join(map(str, sorted(manifest["size"].unique())))
        raise UserError(
            f"{tables.augmented_manifest_path(cfg, dataset)}: no images at {image_size} px (has {have}); run `covidtl augment {dataset}` "
            "with the same study.models and train.image_size as training"
        )
    labels = rows["label"].map({name: i for i, name in enumerate(paths.CLASSES)}).to_numpy("int32")
    offsets = rows["offset"].to_numpy()
    images = np.load(out / rows["shard"].iloc[0], mmap_mode="r")  # one shard per size

    def generate():
        for offset, label in zip(offsets, labels):
            yield images[offset], label

    signature = (
        tf.TensorSpec((image_size, image_size, 3), tf.uint8),
        tf.TensorSpec((), tf.int32),
    )
    ds = tf.data.Dataset.from_generator(generate, output_signature=signature)
    ds = ds.apply(tf.data.experimental.assert_cardinality(len(rows)))
    return ds.shuffle(min(len(rows), 4096), seed=cfg.train.seed, reshuffle_each_iteration=True)


def make_offline_dataset(cfg: Config, dataset: str, spec: NamedModel, image_size: int) -> tf.data.Dataset:
    """augment.mode=offline: the stored augmented training set (`covidtl augment`), batched."""
    if intensity_on(cfg.augment.intensity):
        logging.getLogger(__name__).warning("augment.intensity is applied online only: the offline set %s is read as stored", dataset)
    preprocess = preprocess_for(spec, cfg.train.preprocessing)
    ds = load_offline_dataset(cfg, dataset, image_size)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), tf.one_hot(y, len(paths.CLASSES))))
    ds = ds.batch(cfg.train.batch_size)
    ds = ds.map(lambda x, y: (preprocess(x), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
