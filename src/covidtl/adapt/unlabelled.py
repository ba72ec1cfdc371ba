"""Methods that read the site's unlabelled images only: AdaBN, input standardisation, Tent."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from covidtl.adapt.network import (batches_of, copy_of, optimise, plain_network, population_statistics,
                                   train_only, trainable_as)
from covidtl.adapt.settings import AdaptSettings
from covidtl.adapt.site import SiteData
from covidtl.errors import UserError
from covidtl.models.input_layers import Normalize
from covidtl.models.site_layers import ChannelAffine


def adabn(model: keras.Model, site: SiteData, settings: AdaptSettings, seed: int) -> keras.Model:
    """AdaBN (Li et al. 2016): every BatchNorm layer's moving mean and variance become the site
    pool's population statistics of that layer's input; no other weight moves.

    The literature's warning is that statistics estimated batch by batch from one-class batches
    fail badly: here the pool is shuffled with the seed and the statistics are exact sums over
    the whole pool, so no batch's make-up matters. They are the pool's mixture statistics: as its
    class balance shifts, they move towards the majority class's, which a model whose features
    differ by class reads as a shift of every image; keep the pool's balance near the site's.
    """
    adapted = copy_of(plain_network(model, "adabn"))
    population_statistics(adapted, site.pool, settings.batch_size, seed)
    return adapted


def channel_statistics(batches) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation over every pixel of every image in the batches."""
    total = squares = 0.0
    count = 0
    for x in batches:
        x = np.asarray(x, dtype=np.float64)
        total, squares = total + x.sum(axis=(0, 1, 2)), squares + (x ** 2).sum(axis=(0, 1, 2))
        count += x.shape[0] * x.shape[1] * x.shape[2]
    mean = total / count
    return mean, np.sqrt(np.maximum(squares / count - mean ** 2, 1e-12))


def check_standardize(network: keras.Model) -> None:
    """Refused before any image is read: a network that normalises each image itself undoes the map."""
    if any(isinstance(layer, Normalize) for layer in network.layers):
        raise UserError(f"adapt --method standardize: {network.name} normalises each image itself "
                        "(train.normalize), which undoes any site-wide intensity map; choose adabn, tent, "
                        "recalibrate, head or head_bn")


def standardize(model: keras.Model, site: SiteData, settings: AdaptSettings, seed: int) -> keras.Model:
    """A per-channel affine map before the network: the site pool's preprocessed inputs, per
    channel over all pixels, get the mean and standard deviation of the source model's training
    split (computed the same way), so the network sees the site at the intensity level it was
    trained on. The source statistics are not stored with a model: they are measured again from
    the source's training split (its card's dataset)."""
    network = plain_network(model, "standardize")
    check_standardize(network)
    site_mean, site_sd = channel_statistics(batches_of(site.pool, settings.batch_size, np.arange(len(site.pool))))
    source_mean, source_sd = channel_statistics(x for x, _ in site.source.batches(settings.batch_size))
    scale = source_sd / site_sd
    affine = ChannelAffine(scale.tolist(), (source_mean - site_mean * scale).tolist(), name="site_standardize")
    copy = copy_of(network)
    image = keras.Input(shape=copy.input_shape[1:], name="image")
    x = affine(image)
    for layer in copy.layers[1:]:  # the registry's networks are chains (covidtl.frozen cuts them so too)
        x = layer(x)
    return keras.Model(image, x, name=copy.name)


def entropy(probabilities: tf.Tensor, _unused=None) -> tf.Tensor:
    p = tf.clip_by_value(tf.cast(probabilities, tf.float32), 1e-7, 1.0)
    return tf.reduce_mean(-tf.reduce_sum(p * tf.math.log(p), axis=-1))


def tent(model: keras.Model, site: SiteData, settings: AdaptSettings, seed: int) -> keras.Model:
    """Tent (Wang et al. 2021): only the BatchNorm layers' gamma and beta move, to minimise the
    entropy of the predictions on the unlabelled pool, normalising with each (shuffled, mixed)
    batch's statistics. A saved model scores one image at a time, so its moving statistics then
    become the pool's population statistics (AdaBN): the statistics Tent normalised with."""
    adapted = copy_of(plain_network(model, "tent"))
    train_only(adapted, lambda layer: isinstance(layer, keras.layers.BatchNormalization))
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    steps = [site.pool[rng.choice(len(site.pool), min(settings.batch_size, len(site.pool)), replace=False)]
             for _ in range(settings.tent_steps)]
    optimise(adapted, entropy, ((x, None) for x in steps), settings.tent_learning_rate)
    population_statistics(adapted, site.pool, settings.batch_size, seed)
    trainable_as(adapted, model)
    return adapted
