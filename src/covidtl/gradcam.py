"""Grad-CAM (Selvaraju et al. 2017): where in an image the model looked for its answer.

One definition for the six architectures: the feature map is the output of the last layer that
holds convolutions (the custom CNN's last conv layer, or a backbone's whole nested base, i.e. its
last conv block), the head is what follows it. `covidtl explain` writes one overlay per image, the
shortcut probe averages the maps, and `sample_figure` shows a run's true/false
positives/negatives with theirs (drawn by training).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from matplotlib import colormaps
from matplotlib.figure import Figure  # no pyplot: no GUI backend, nothing global to close

from covidtl.data.pipeline import decode_image
from covidtl.models.input_layers import BodyCrop
from covidtl.models.wrappers import networks_of
from covidtl.paths import POSITIVE_INDEX
from covidtl.stats import covid_probability

CONV_LAYERS = (keras.layers.Conv2D, keras.layers.SeparableConv2D, keras.layers.DepthwiseConv2D)
# The sample figure's rows: (short name, title, true class is covid, predicted covid).
KINDS = (
    ("TP", "true positives", True, True),
    ("FP", "false positives", False, True),
    ("TN", "true negatives", False, False),
    ("FN", "false negatives", True, False),
)


def feature_split(model: keras.Model) -> tuple[list[keras.layers.Layer], list[keras.layers.Layer]]:
    """(layers up to the feature layer, head layers after it) of a chain-shaped model.

    The feature layer is the last one holding convolutions: a nested base (keras.Model) or a
    conv layer. Every registry model is a chain (each layer feeds the next), so running the two
    lists in order is the model's own forward pass.
    """
    chain = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    convolutional = [i for i, layer in enumerate(chain) if isinstance(layer, (keras.Model, *CONV_LAYERS))]
    if not convolutional:
        raise ValueError(f"model {model.name!r} has no convolutional layer for Grad-CAM")
    cut = convolutional[-1] + 1
    return chain[:cut], chain[cut:]


@dataclass
class CamResult:
    heatmaps: np.ndarray  # (n, h, w) float32 in [0, 1], at the model's input size
    probs: np.ndarray  # (n, classes) softmax outputs of the same forward pass
    class_index: np.ndarray  # (n,) the class each map explains


class GradCam:
    """Grad-CAM for one model; the rebuilt forward pass is made once and reused per batch.

    A TTA or ensemble wrapper (covidtl.models.wrappers) has no single chain of layers: the map is
    that of the network(s) inside, for the class the whole model predicts. A TTA model's is its
    network's on the image as given (what the mirror view adds is the same evidence mirrored); an
    ensemble's is the mean of its members' maps. The probabilities are the whole model's.
    """

    def __init__(self, model: keras.Model):
        self.model = model
        networks = networks_of(model)
        self.networks = [NetworkCam(net) for net in networks] if networks != [model] else []
        self.single = None if self.networks else NetworkCam(model)
        self.size = tuple(int(d) for d in model.input_shape[1:3])

    def __call__(self, images, class_index: int | None = None) -> CamResult:
        """Maps for `images` (preprocessed model inputs): the predicted class, or `class_index`."""
        if self.single is not None:
            return self.single(images, class_index)
        x = np.asarray(images, dtype="float32")
        probs = np.asarray(self.model(x, training=False))
        chosen = (probs.argmax(axis=1) if class_index is None
                  else np.full(len(x), int(class_index))).astype("int32")
        maps = [cam(x, chosen).heatmaps for cam in self.networks]
        return CamResult(heatmaps=np.mean(maps, axis=0).astype("float32"), probs=probs, class_index=chosen)

    @property
    def forward(self) -> keras.Model:
        """The (first) network's pass to its feature map and head."""
        return (self.single or self.networks[0]).forward

    @property
    def crop(self):
        """The (first) network's BodyCrop layer (train.crop), None without one."""
        return (self.single or self.networks[0]).crop


class NetworkCam:
    """Grad-CAM of one plain (chain-shaped) network."""

    def __init__(self, model: keras.Model):
        body, head = feature_split(model)
        last = head[-1] if head else None
        # Gradients of the pre-softmax score, as in the paper: a saturated softmax (p = 1.0 in
        # float32) has no gradient left, and its map would be all zeros.
        softmax_dense = (isinstance(last, keras.layers.Dense)
                         and last.get_config().get("activation") == "softmax")
        self.score_layer = last if softmax_dense else None
        inputs = keras.Input(shape=model.input_shape[1:])
        x = inputs
        for layer in body:
            x = layer(x, training=False)
        features = x
        for layer in head[:-1] if softmax_dense else head:
            x = layer(x, training=False)
        self.forward = keras.Model(inputs, [features, x], name=f"{model.name}_gradcam")
        self.size = tuple(int(d) for d in model.input_shape[1:3])
        # train.crop: the maps are made in the cropped frame; they go back onto the body's box.
        self.crop = next((layer for layer in body if isinstance(layer, BodyCrop)), None)

    def __call__(self, images, class_index: int | np.ndarray | None = None) -> CamResult:
        """Maps for `images`: the predicted class, `class_index`, or one class per image (an array)."""
        x = tf.convert_to_tensor(np.asarray(images, dtype="float32"))
        with tf.GradientTape() as tape:
            features, out = self.forward(x, training=False)
            if self.score_layer is not None:
                scores = tf.matmul(out, self.score_layer.kernel) + self.score_layer.bias
                probs = tf.nn.softmax(scores)
            else:
                scores = probs = out
            if class_index is None:
                chosen = tf.argmax(probs, axis=1, output_type=tf.int32)
            elif np.ndim(class_index):
                chosen = tf.constant(np.asarray(class_index, dtype="int32"))
            else:
                chosen = tf.fill([tf.shape(x)[0]], tf.constant(int(class_index), tf.int32))
            # Each image's score only depends on its own features: one gradient call for the batch.
            target = tf.reduce_sum(tf.gather(scores, chosen, axis=1, batch_dims=1))
        grads = tape.gradient(target, features)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)  # alpha_k: pooled gradients
        cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))  # (n, h', w')
        peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
        cam = tf.math.divide_no_nan(cam, peak)
        cam = tf.image.resize(cam[..., None], self.size, method="bilinear")[..., 0].numpy()
        if self.crop is not None:
            cam = uncrop(cam, keras.ops.convert_to_numpy(self.crop.boxes(x)))
        return CamResult(
            heatmaps=np.clip(cam, 0.0, 1.0).astype("float32"),
            probs=probs.numpy(),
            class_index=chosen.numpy(),
        )


def uncrop(maps: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Maps of the cropped frames (n, h, w) put back on their boxes (top, bottom, left, right) of
    the input frame, zero outside: where `BodyCrop` read them from."""
    out = np.zeros_like(maps)
    for i, (top, bottom, left, right) in enumerate(np.round(boxes).astype(int)):
        height, width = bottom - top + 1, right - left + 1
        out[i, top:bottom + 1, left:right + 1] = tf.image.resize(maps[i][..., None], (height, width))[..., 0]
    return out


def grad_cam(model: keras.Model, images, class_index: int | None = None) -> np.ndarray:
    """(n, h, w) maps in [0, 1] at the input size, for the predicted class or `class_index`."""
    return GradCam(model)(images, class_index).heatmaps


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4, cmap: str = "jet") -> np.ndarray:
    """The map in a colormap blended on the image: uint8 RGB of the image's size."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    image = image[..., :3].astype("float32")
    heat = np.asarray(heatmap, dtype="float32")
    if heat.shape != image.shape[:2]:
        heat = tf.image.resize(heat[..., None], image.shape[:2], method="bilinear").numpy()[..., 0]
    colours = colormaps[cmap](np.clip(heat, 0.0, 1.0))[..., :3] * 255.0
    return np.clip((1 - alpha) * image + alpha * colours, 0, 255).round().astype("uint8")


def load_image(path: str | Path, size: int) -> np.ndarray:
    """The image as training reads it: `pipeline.decode_image`, float32 RGB [0, 255] at size."""
    return decode_image(tf.constant(os.fspath(path)), size).numpy()


# --------------------------------------------------------------------------- a run's sample


def sample_indices(
    y_true, prob, n_per_kind: int = 2, seed: int = 0
) -> dict[str, np.ndarray]:
    """Up to n row indices per kind (TP, FP, TN, FN), drawn with a fixed seed."""
    y_true, p = covid_probability(y_true, prob)
    is_covid = y_true == POSITIVE_INDEX
    said_covid = p >= 0.5
    rng = np.random.default_rng(seed)
    chosen = {}
    for short, _, truth, said in KINDS:
        rows = np.flatnonzero((is_covid == truth) & (said_covid == said))
        k = min(n_per_kind, len(rows))
        chosen[short] = np.sort(rng.choice(rows, size=k, replace=False)) if k else rows[:0]
    return chosen


def sample_figure(
    model: keras.Model,
    preprocess: Callable,
    rows: pd.DataFrame,
    y_true,
    prob,
    n_per_kind: int = 2,
    seed: int = 0,
):
    """One figure: a seeded sample of true/false positives/negatives, each with its Grad-CAM.

    `rows` (a `path` column), `y_true` (class indices) and `prob` are aligned, one per test image;
    a kind with no image gets a row that says so.
    """
    if not (len(rows) == len(y_true) == len(prob)):
        raise ValueError(f"rows ({len(rows)}), y_true ({len(y_true)}) and prob ({len(prob)}) "
                         "must describe the same images")
    chosen = sample_indices(y_true, prob, n_per_kind, seed)
    _, p = covid_probability(y_true, prob)
    cam = GradCam(model)
    cols = max(1, n_per_kind)
    fig = Figure(figsize=(2.6 * cols, 2.8 * len(KINDS)), layout="constrained")
    axes = fig.subplots(len(KINDS), cols, squeeze=False)
    paths = rows["path"].astype(str).to_numpy()
    for r, (short, title, _, _) in enumerate(KINDS):
        picked = chosen[short]
        images = [load_image(paths[i], cam.size[0]) for i in picked]
        # The map of the class the model predicted: what it looked at to say what it said.
        heat = cam(preprocess(np.stack(images).copy())).heatmaps if images else []
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(images):
                ax.imshow(overlay(images[c].round().astype("uint8"), heat[c]))
                i = picked[c]
                ax.set_title(f"{short} · p_covid {p[i]:.2f}\n{Path(paths[i]).name[:28]}",
                             fontsize=8)
            elif c == 0:
                ax.text(0.5, 0.5, f"no {title}", ha="center", va="center", fontsize=9)
                ax.set_title(f"{short} · none", fontsize=8)
            else:
                ax.set_axis_off()
        axes[r][0].set_ylabel(f"{title} ({len(picked)})", fontsize=9)
    fig.suptitle("Grad-CAM of the predicted class (red: most weight)", fontsize=10)
    return fig
