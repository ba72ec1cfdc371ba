"""Training only what is not frozen, on stored features of what is (`covidtl.features`).

A network whose pre-trained base is frozen (init imagenet, or a weights file) is cut where its
frozen part ends: the *extractor* (image -> in-model crop/normalize -> the base, or its layers up to
`train.unfreeze_after`) and the *top* (that tensor -> the base's layers after the cut -> the head).
Both are built from the network's own layers, so training the top trains the network, and the
model that is saved is still the whole network: evaluate, predict, serve, probe and Grad-CAM read
it unchanged. The frozen part runs once per image (per augmented copy), not once per epoch.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from tqdm import tqdm

from covidtl.data.cache import DECODE_RULES, enforce_budget
from covidtl.data.pipeline import augment_image, cache_dir, copy_seed, decode_image, label_indices, readable_rows
from covidtl.features import CLEAN, FEATURES_DIR, FeatureCache, View, values_sha256
from covidtl.files import file_sha256
from covidtl.models.registry import base_of, has_frozen_base, preprocess_for, unfreeze_cut
from covidtl.paths import CLASSES

log = logging.getLogger(__name__)

BASE = "base"  # View.cut when the whole base is frozen
EXTRACT_BATCH = 32
# How a copy's pixels are made: the image as `covidtl evaluate` decodes it (validation, test, the
# linear probe), or as online training reads it (rounded to uint8 like the decode cache) and augmented.
CLEAN_DECODE = f"{DECODE_RULES}; float32, not rounded"
AUGMENTED_DECODE = f"{DECODE_RULES}; then augment_image with the copy's seed"


def cache_cut(plan) -> str | None:
    """Where `plan`'s network stops being frozen: `base`, or the layer `train.unfreeze_after` names;
    None when nothing is frozen or the cache is off. One replica only: the features are one
    process's, and a distributed run splits its batches across workers."""
    train = plan.cfg.train
    if train.feature_cache == "none" or not has_frozen_base(plan.spec, plan.build_init):
        return None
    if int(plan.run_on.get("replicas", 1) or 1) > 1:
        return None
    if plan.cfg.augment.mode == "offline" and train.feature_copies:
        return None  # the stored augmented set is its own augmentation: trained through the network
    return unfreeze_cut(plan.spec, train.unfreeze_after) or BASE


class Parts:
    """`net` as extractor (image -> features at the cut) and top (features -> probabilities)."""

    def __init__(self, net: keras.Model, cut: str):
        base = base_of(net)
        if base is None:
            raise ValueError(f"{net.name} has no pre-trained base to cut")
        at = next(i for i, layer in enumerate(net.layers) if layer is base)
        front, head = net.layers[1:at], net.layers[at + 1:]
        if cut == BASE:
            frozen, upper = base, None
        else:
            inner = base.get_layer(cut).output
            frozen = keras.Model(base.input, inner, name=f"{base.name}_to_{cut}")
            upper = keras.Model(inner, base.output, name=f"{base.name}_after_{cut}")
        image = keras.Input(shape=net.input_shape[1:], name="image")
        x = image
        for layer in front:
            x = layer(x)
        self.extractor = keras.Model(image, frozen(x, training=False), name=f"{net.name}_frozen")
        stored = keras.Input(shape=self.extractor.output_shape[1:], name="features")
        x = upper(stored) if upper is not None else stored
        for layer in head:
            x = layer(x)
        self.top = keras.Model(stored, x, name=f"{net.name}_top")
        self.cut = cut
        self.feature_shape = tuple(self.extractor.output_shape[1:])


def feature_root(cfg) -> Path:
    """Beside the decoded-image cache, sharing its budget and pruning."""
    return cache_dir(cfg) / FEATURES_DIR


class FrozenTraining:
    """One run's features: its training copies, its validation and test images, through one cache."""

    def __init__(self, plan, net: keras.Model, cut: str, cache: FeatureCache | None = None):
        self.plan = plan
        self.parts = Parts(net, cut)
        self.cache = cache or FeatureCache(feature_root(plan.cfg))
        cfg = plan.cfg
        self.preprocess = preprocess_for(plan.spec, cfg.train.preprocessing)
        self.clean_view = View(
            model=plan.model, cut=cut, weights_sha256=values_sha256(self.parts.extractor.get_weights()),
            image_size=plan.image_size, preprocessing=cfg.train.preprocessing, crop=cfg.train.crop,
            normalize=cfg.train.normalize, decode=CLEAN_DECODE,
        )
        self._forward: Callable | None = None
        self.units: set[Path] = set()  # the views this run reads: never pruned under it

    # ---- views and features

    def view(self, copy: int) -> View:
        """The clean view, or augmented copy `copy` (the augmentation settings and seed decide it)."""
        if copy == CLEAN:
            return self.clean_view
        augment = dataclasses.asdict(self.plan.cfg.augment)
        for key in ("mode", "copies_per_image", "max_images"):  # the stored offline set's keys
            augment.pop(key)
        return dataclasses.replace(self.clean_view, decode=AUGMENTED_DECODE, copy=copy, augment=augment)

    def features(self, rows: pd.DataFrame, copy: int = CLEAN) -> np.ndarray:
        """`rows`' features for one copy, from the cache or computed into it."""
        if rows.empty:
            return np.zeros((0, *self.parts.feature_shape), np.float32)
        view = self.view(copy)
        self.units.add(self.cache.unit(view))
        computed = self.cache.counts.computed
        features = self.cache.features(view, _with_sha256(rows), self._compute)
        if self.cache.counts.computed > computed:  # new entries: the shared budget, this run's views kept
            enforce_budget(self.plan.cfg, protect=self.units)
        return features

    def _compute(self, rows: pd.DataFrame, view: View) -> np.ndarray:
        """The extractor on each row's image (augmented with the copy's own seed), in row order."""
        size, aug = view.image_size, self.plan.cfg.augment
        seeds = np.array([copy_seed(aug.seed, sha, view.copy) if view.copy else 0
                          for sha in rows["sha256"].astype(str)], dtype=np.int64)

        def load(path, seed):
            image = decode_image(path, size)
            if view.copy != CLEAN:
                image = augment_image(tf.clip_by_value(tf.round(image), 0.0, 255.0), aug, seed)
            return self.preprocess(tf.cast(image, tf.float32))

        ds = (tf.data.Dataset.from_tensor_slices((rows["path"].astype(str).to_numpy(), seeds))
              .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
              .batch(EXTRACT_BATCH).prefetch(2))
        if self._forward is None:
            self._forward = tf.function(lambda x: self.parts.extractor(x, training=False), reduce_retracing=True)
        what = "images" if view.copy == CLEAN else f"augmented copy {view.copy}"
        out = []
        with tqdm(total=len(rows), desc=f"features ({self.plan.model} to {view.cut}, {what})", unit="img",
                  disable=None, leave=False) as bar:
            for batch in ds:
                out.append(np.asarray(self._forward(batch), dtype=np.float32))
                bar.update(len(out[-1]))
        log.info("computed %d feature entries for %s (%s)", len(rows), self.plan.model, what)
        return np.concatenate(out) if out else np.zeros((0, *self.parts.feature_shape), np.float32)

    # ---- what fit reads

    def datasets(self, batch_size: int, val_batch_size: int) -> tuple[tf.data.Dataset, tf.data.Dataset]:
        """(features, one-hot) batches: each training image as one of its stored copies, drawn anew
        each epoch; the validation images as decoded."""
        cfg = self.plan.cfg
        train_rows = readable_rows(self.plan.train_rows)
        copies = [self.features(train_rows, k) for k in range(1, cfg.train.feature_copies + 1)] \
            or [self.features(train_rows, CLEAN)]
        labels = tf.one_hot(label_indices(train_rows), len(CLASSES))
        n, k = len(train_rows), len(copies)

        def gather(index, draw):
            def pick(i, d):
                return np.stack([copies[int(c) % k][int(j)] for j, c in zip(i, d)])

            batch = tf.numpy_function(pick, [index, draw], tf.float32, stateful=False)
            batch.set_shape((None, *self.parts.feature_shape))
            return batch, tf.gather(labels, index)

        order = tf.data.Dataset.range(n).shuffle(max(n, 1), seed=cfg.train.seed, reshuffle_each_iteration=True)
        draws = tf.data.Dataset.random(seed=cfg.augment.seed, rerandomize_each_iteration=True)
        train_ds = (tf.data.Dataset.zip(order, draws).batch(batch_size)
                    .map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(2))
        val_rows = readable_rows(self.plan.rows("val"))
        val_ds = tf.data.Dataset.from_tensor_slices(
            (self.features(val_rows), tf.one_hot(label_indices(val_rows), len(CLASSES)))).batch(val_batch_size)
        return train_ds, val_ds

    def predict(self, rows: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
        """(the readable rows, their class indices, the top's softmax on their stored features):
        what the whole network gives on the same images, without running the frozen part again."""
        rows = readable_rows(rows)
        if rows.empty:
            return rows, np.zeros(0, dtype=int), np.zeros((0, len(CLASSES)))
        features = self.features(rows)
        # Plain calls, not Keras' predict: its traced function would be traced anew for each fold's top.
        probs = np.concatenate([np.asarray(self.parts.top(features[i:i + 4 * EXTRACT_BATCH], training=False))
                                for i in range(0, len(features), 4 * EXTRACT_BATCH)])
        return rows, label_indices(rows), probs.astype(float)


def _with_sha256(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows keyed by content: the manifest's sha256, or the file's own for a table made by hand."""
    if "sha256" in rows and rows["sha256"].notna().all():
        return rows
    return rows.assign(sha256=[file_sha256(p) for p in rows["path"]])
