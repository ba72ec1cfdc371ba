"""Methods that read K labelled site patients' images: recalibration, head-only and head +
BatchNorm fine-tuning, and the linear probe refitted on source and site features together."""

from __future__ import annotations

import keras
import numpy as np
from scipy.optimize import minimize

from covidtl import linear_probe
from covidtl.adapt.features import BodyFeatures
from covidtl.adapt.network import (batchnorm_layers, copy_of, head_layers, optimise, plain_network,
                                   population_statistics, shuffled, train_only, trainable_as)
from covidtl.adapt.settings import AdaptSettings
from covidtl.adapt.site import Labelled, SiteData
from covidtl.errors import UserError
from covidtl.paths import CLASSES, POSITIVE_INDEX as POS, p_covid


def _output_dense(network: keras.Model, method: str) -> keras.layers.Dense:
    last = network.layers[-1]
    if not (isinstance(last, keras.layers.Dense) and last.get_config().get("activation") == "softmax"):
        raise UserError(f"adapt --method {method}: {network.name} does not end in a softmax Dense layer; "
                        "adapt a model `covidtl train` wrote")
    return last


def _logit_gap(network: keras.Model, x: np.ndarray, batch_size: int, features: BodyFeatures | None) -> np.ndarray:
    """The output layer's COVID logit minus the other's (the log-odds of p(COVID)), per image."""
    dense = _output_dense(network, "recalibrate")
    if features is not None and features.fits(network):  # the base's output stored: only the head runs
        inputs, x = features.tail(network, upto=dense), features.of(x)
    else:
        inputs = keras.Model(network.input, dense.input)  # the logits from its weights: no softmax to undo
    kernel, bias = (np.asarray(w, np.float64) for w in dense.get_weights())
    z = np.concatenate([np.asarray(inputs(x[i:i + batch_size], training=False), np.float64) @ kernel + bias
                        for i in range(0, len(x), batch_size)])
    return p_covid(z) - p_covid(z[:, ::-1])  # reversed columns: the other class's logit


def platt_fit(gap: np.ndarray, positive: np.ndarray) -> tuple[float, float]:
    """(a, c) of p(COVID) = sigmoid(a * gap + c) by maximum likelihood with a > 0 (a = exp(log a)),
    so the map is increasing and no ranking changes: temperature 1/a and a bias."""
    def nll(params: np.ndarray) -> float:
        z = np.exp(params[0]) * gap + params[1]
        return float(np.sum(np.logaddexp(0.0, z) - positive * z))
    fitted = minimize(nll, np.zeros(2), method="L-BFGS-B", bounds=[(-10, 10), (-50, 50)])
    return float(np.exp(fitted.x[0])), float(fitted.x[1])


def recalibrate(model: keras.Model, site: SiteData, settings: AdaptSettings, seed: int) -> keras.Model:
    """Platt scaling with a positive slope (a temperature and a bias) of the log-odds, fitted on
    the labelled images and folded into the output Dense layer: the saved model gives calibrated
    probabilities and ranks every image as before. (The threshold is chosen after any labelled
    method, on the same images: `run.operating_point`.)"""
    network = plain_network(model, "recalibrate")
    a, c = platt_fit(_logit_gap(network, site.labelled.x, settings.batch_size, site.features),
                    site.labelled.y == POS)
    adapted = copy_of(network)
    dense = _output_dense(adapted, "recalibrate")
    kernel, bias = dense.get_weights()
    shift = np.zeros(len(CLASSES), np.float32)
    shift[POS] = c  # softmax of (a z_neg, a z_pos + c): sigmoid(a * gap + c) for COVID
    dense.set_weights([kernel * np.float32(a), bias * np.float32(a) + shift])
    return adapted


def _fine_tune(model: keras.Model, labelled: Labelled, settings: AdaptSettings, seed: int,
               trains, features: BodyFeatures | None = None) -> keras.Model:
    """A copy of `model` with the layers `trains` accepts fitted by Adam on the labelled images;
    where only head layers train and `features` holds the source's base, on its stored output."""
    adapted = copy_of(model)
    train_only(adapted, trains)
    net, x = (features.tail(adapted), features.of(labelled.x)) if features is not None else (adapted, labelled.x)
    keras.utils.set_random_seed(seed)
    targets = np.eye(len(CLASSES), dtype=np.float32)[labelled.y]
    loss = keras.losses.CategoricalCrossentropy()

    def batches():
        for epoch in range(settings.epochs):
            order = shuffled(len(x), seed + epoch)
            for start in range(0, len(order), settings.batch_size):
                rows = order[start:start + settings.batch_size]
                yield x[rows], targets[rows]
    optimise(net, lambda p, t: loss(t, p), batches(), settings.learning_rate)
    return adapted


def head(model: keras.Model, site: SiteData, settings: AdaptSettings, seed: int) -> keras.Model:
    """Fine-tune the head's Dense layers (network.head_layers) on the labelled images, cross-entropy
    with Adam; every other layer is frozen (BatchNorm in inference mode, its statistics kept)."""
    network = plain_network(model, "head")
    names = {layer.name for layer in head_layers(network)}
    stored = site.features if site.features is not None and site.features.fits(network) else None
    adapted = _fine_tune(network, site.labelled, settings, seed, lambda layer: layer.name in names, stored)
    trainable_as(adapted, network)
    return adapted


def head_bn(model: keras.Model, site: SiteData, settings: AdaptSettings, seed: int) -> keras.Model:
    """As `head`, with every BatchNorm layer's gamma and beta trained too, normalising with each
    batch's statistics; the moving statistics then become the site's population statistics
    (the labelled images and the unlabelled pool together, as AdaBN)."""
    network = plain_network(model, "head_bn")
    names = {layer.name for layer in head_layers(network)} | {bn.name for bn in batchnorm_layers(network)}
    adapted = _fine_tune(network, site.labelled, settings, seed, lambda layer: layer.name in names)
    population_statistics(adapted, np.concatenate([site.labelled.x, site.pool]), settings.batch_size, seed)
    trainable_as(adapted, network)
    return adapted


def check_probe_refit(network: keras.Model) -> keras.layers.Dense:
    """The output Dense layer of a pooled linear head; refused, before any image is read, without one."""
    dense = _output_dense(network, "probe_refit")
    pooled = [layer for layer in network.layers if isinstance(layer, keras.layers.GlobalAveragePooling2D)]
    if head_layers(network) != [dense] or not pooled:
        raise UserError(f"adapt --method probe_refit: {network.name} has no pooled linear head (train.head "
                        "linear_probe or gap); choose head or recalibrate")
    return dense


def probe_refit(model: keras.Model, site: SiteData, settings: AdaptSettings, seed: int) -> keras.Model:
    """For a frozen ImageNet cell with a pooled head (`linear_probe` or `gap`): the linear probe
    (covidtl.linear_probe: C by patient-grouped folds) refitted on the source training split's
    pooled features and the labelled site images' together, written into the output Dense(2)."""
    network = plain_network(model, "probe_refit")
    dense = check_probe_refit(network)
    if site.features is not None and site.features.fits(network):  # its base's output stored: read once
        pooled = site.features.tail(network, upto=dense)
        source_features, source_y = site.features.source(site.source, settings.batch_size)
        source_x, source_y = [np.asarray(pooled(source_features), np.float64)], [source_y]

        def read(x: np.ndarray) -> np.ndarray:
            return np.asarray(pooled(site.features.of(x)), np.float64)
    else:
        pooled = keras.Model(network.input, dense.input)

        def read(x: np.ndarray) -> np.ndarray:
            return np.asarray(pooled(x, training=False), np.float64)
        source_x, source_y = zip(*((read(x), y) for x, y in site.source.batches(settings.batch_size)))
    x = np.concatenate([*source_x, read(site.labelled.x)])
    y = np.concatenate([*source_y, site.labelled.y])
    groups = np.concatenate([site.source.groups, [f"site:{g}" for g in site.labelled.groups]])
    probe = linear_probe.fit(x, y, groups, list(settings.c_grid), settings.folds, seed)
    adapted = copy_of(network)
    _output_dense(adapted, "probe_refit").set_weights(list(linear_probe.weights_for_dense(probe)))
    return adapted
