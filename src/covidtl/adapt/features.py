"""The source network's output before its head, computed once per image and reused by every
method and score that leaves the network before the head as the source has it.

A frozen VGG16 reads about 10 images a second on this project's CPUs, and a learning curve scores
dozens of models whose base is the source's own (`head`, `recalibrate`, `probe_refit`, and the
inside-K tuning of `head`, which fits a grid of candidates per fold). Recomputing the same base
features for each would be most of the curve's time. A model whose weights before the head differ
from the source's (AdaBN, Tent, standardisation, head + BatchNorm) is run whole, as before.
"""

from __future__ import annotations

import hashlib

import keras
import numpy as np

from covidtl.adapt.network import head_layers
from covidtl.paths import p_covid


class BodyFeatures:
    """What the source model's first head layer receives, per image, keyed by the image's bytes:
    the same image drawn again (another seed, fold or method) is never run through the base twice."""

    def __init__(self, source: keras.Model, batch_size: int):
        head = head_layers(source)
        if not head:
            raise ValueError(f"{source.name} has no Dense head to cut before")
        self._at = next(i for i, layer in enumerate(source.layers) if layer is head[0])
        self._kinds = [type(layer) for layer in source.layers]
        self._body = keras.Model(source.input, head[0].input)
        self._weights = _body_weights(source, self._at)
        self._batch_size = batch_size
        self._memo: dict[bytes, np.ndarray] = {}
        self._sources: list[tuple[object, np.ndarray, np.ndarray]] = []
        self.computed = 0  # images run through the base: what the memo saved shows against the reads

    def fits(self, model: keras.Model) -> bool:
        """True where `model` is the source's network up to its head: same layers, same weights
        (BatchNorm statistics included, as weights)."""
        if [type(layer) for layer in model.layers] != self._kinds:
            return False
        theirs = _body_weights(model, self._at)
        return len(theirs) == len(self._weights) and all(
            a.shape == b.shape and np.array_equal(a, b) for a, b in zip(theirs, self._weights))

    def of(self, x: np.ndarray) -> np.ndarray:
        """The body's output for each image of x, computing only those not seen before."""
        keys = [hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest() for image in x]
        missing = [i for i, key in enumerate(keys) if key not in self._memo]
        for start in range(0, len(missing), self._batch_size):
            rows = missing[start:start + self._batch_size]
            for i, row in zip(rows, np.asarray(self._body(x[rows], training=False), np.float32)):
                self._memo[keys[i]] = row
        self.computed += len(missing)
        return np.stack([self._memo[key] for key in keys]) if keys else np.zeros((0, *self._body.output.shape[1:]))

    def source(self, split, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(features, class indices) of a streamed source split (`site.SourceSplit`), read once."""
        for known, features, y in self._sources:
            if known is split:
                return features, y
        xs, ys = zip(*((self.of(x), y) for x, y in split.batches(batch_size)))
        self._sources.append((split, np.concatenate(xs), np.concatenate(ys)))
        return self._sources[-1][1], self._sources[-1][2]

    def tail(self, model: keras.Model, upto: keras.layers.Layer | None = None) -> keras.Model:
        """`model`'s layers from the head on (the registry's networks are chains), as a model of the
        body's output; up to `upto`'s input where given. Its layers are `model`'s own: training
        the tail trains `model`."""
        features = keras.Input(self._body.output.shape[1:])
        x = features
        for layer in model.layers[self._at:]:
            if layer is upto:
                break
            x = layer(x)
        return keras.Model(features, x)


def _body_weights(model: keras.Model, at: int) -> list[np.ndarray]:
    return [np.asarray(w) for layer in model.layers[:at] for w in layer.get_weights()]


def model_p_covid(model: keras.Model, x: np.ndarray, batch_size: int, features: BodyFeatures | None = None) -> np.ndarray:
    """p(COVID) of each image by `model` in inference mode: on the stored body features where
    `model` is the source's network up to its head, else a whole forward pass."""
    if features is not None and features.fits(model):
        run, x = features.tail(model), features.of(x)
    else:
        run = model
    return np.concatenate([np.asarray(p_covid(run(x[i:i + batch_size], training=False)))
                           for i in range(0, len(x), batch_size)] or [np.zeros(0)]).astype(np.float64)
