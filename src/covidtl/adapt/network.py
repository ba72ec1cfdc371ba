"""What the adaptation methods share about a network: which layers are its head and its
BatchNorm, copies that never touch the source model, and the small training loop they run."""

from __future__ import annotations

from typing import Callable, Iterable

import keras
import numpy as np
import tensorflow as tf

from covidtl.errors import UserError
from covidtl.models.wrappers import mean_layer

# Layers without weights that may sit between the feature extractor and the head's Dense layers.
_PASS_THROUGH = (keras.layers.Flatten, keras.layers.GlobalAveragePooling2D, keras.layers.Dropout)


def plain_network(model: keras.Model, method: str) -> keras.Model:
    """`model` itself, refused where it averages views or members (a TTA or ensemble wrapper):
    a monotone change of each member's output is not one of their mean, so ranks could move."""
    if mean_layer(model) is not None:
        raise UserError(f"adapt --method {method}: model {model.name!r} averages several outputs "
                        f"({mean_layer(model).kind}); adapt the network saved without TTA or ensembling")
    return model


def copy_of(model: keras.Model) -> keras.Model:
    """A new model with the same architecture and weights: what a method changes."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    copy.trainable = model.trainable
    return copy


def batchnorm_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    """Every BatchNormalization layer, nested bases included, in the order the input reaches them."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.extend(batchnorm_layers(layer))
        elif isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
    return found


def head_layers(model: keras.Model) -> list[keras.layers.Dense]:
    """The head: the Dense layers after the last layer that holds other weights (the custom CNN's
    last BatchNorm, a backbone's base), i.e. Dense(1000) -> Dense(2) of the paper's head, or the
    Dense(2) of a `gap` / `linear_probe` head. Flatten, pooling and dropout may sit between them."""
    head = []
    for layer in reversed(model.layers):
        if isinstance(layer, keras.layers.Dense):
            head.insert(0, layer)
        elif not isinstance(layer, _PASS_THROUGH) and layer.weights:
            break
    return head


def train_only(model: keras.Model, variables_of: Callable[[keras.layers.Layer], bool]) -> None:
    """Every layer frozen except those `variables_of` accepts (nested bases looked into); a
    frozen BatchNormalization layer runs in inference mode, so its statistics stay."""
    model.trainable = True
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            train_only(layer, variables_of)
        else:
            layer.trainable = bool(variables_of(layer))


def trainable_as(adapted: keras.Model, source: keras.Model) -> None:
    """The source's trainable flags back on the copy: a later fine-tune starts from the same recipe."""
    adapted.trainable = source.trainable
    for mine, theirs in zip(adapted.layers, source.layers):
        if isinstance(mine, keras.Model):
            trainable_as(mine, theirs)
        else:
            mine.trainable = theirs.trainable


def shuffled(n: int, seed: int) -> np.ndarray:
    """A seeded order of n items: batches drawn from it mix whatever classes the pool holds."""
    return np.random.default_rng(seed).permutation(n)


def batches_of(x: np.ndarray, batch_size: int, order: np.ndarray) -> Iterable[np.ndarray]:
    for start in range(0, len(order), batch_size):
        yield x[order[start:start + batch_size]]


def optimise(model: keras.Model, loss: Callable[[tf.Tensor, np.ndarray], tf.Tensor],
             batches: Iterable[tuple[np.ndarray, np.ndarray]], learning_rate: float) -> None:
    """Adam on the model's trainable variables, one step per (x, target) batch; the model runs in
    training mode, so its trainable BatchNorm layers normalise with each batch's statistics."""
    optimizer = keras.optimizers.Adam(learning_rate)
    variables = model.trainable_variables
    for x, target in batches:
        with tf.GradientTape() as tape:
            value = loss(model(x, training=True), target)
        optimizer.apply(tape.gradient(value, variables), variables)


def layer_reader(model: keras.Model, layer: keras.layers.Layer) -> Callable[[np.ndarray], np.ndarray]:
    """x -> what `layer` receives when `model` runs on x in inference mode (nested bases looked
    into: the layers before a nested model run in turn, as the registry's networks are chains)."""
    if any(item is layer for item in model.layers):
        sub = keras.Model(model.input, layer.input)
        return lambda x: np.asarray(sub(x, training=False))
    for at, nested in enumerate(model.layers):
        if isinstance(nested, keras.Model) and any(b is layer for b in batchnorm_layers(nested)):
            inner, before = layer_reader(nested, layer), model.layers[1:at]

            def read(x: np.ndarray) -> np.ndarray:
                for step in before:
                    x = step(x, training=False)
                return inner(np.asarray(x))
            return read
    raise ValueError(f"{layer.name} is not a layer of {model.name}")


def population_statistics(model: keras.Model, x: np.ndarray, batch_size: int, seed: int) -> None:
    """Each BatchNorm layer's moving mean and variance set to the exact mean and (biased) variance
    of its inputs over all of x, layer after layer in input order, so a layer's statistics are
    measured with the earlier layers already normalised by theirs (AdaBN)."""
    order = shuffled(len(x), seed)
    for bn in batchnorm_layers(model):
        axes = tuple(i for i in range(len(bn.input.shape)) if i != bn.axis % len(bn.input.shape))
        total = squares = None
        count, read = 0, layer_reader(model, bn)
        for batch in batches_of(x, batch_size, order):
            h = read(batch).astype(np.float64)
            total = h.sum(axis=axes) + (0 if total is None else total)
            squares = (h ** 2).sum(axis=axes) + (0 if squares is None else squares)
            count += h.size // h.shape[bn.axis]
        mean = total / count
        bn.moving_mean.assign(mean.astype("float32"))
        bn.moving_variance.assign(np.maximum(squares / count - mean ** 2, 0.0).astype("float32"))
