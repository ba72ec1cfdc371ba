"""Models that average probabilities: test-time augmentation (one network over fixed views of the
image) and ensembles (several networks over the same image), each saved as one ordinary .keras file.

Why an outer Keras model (input -> views -> shared network -> mean) rather than a setting that each
scorer reads: evaluate, predict, explain, the server and MLflow all load a .keras file and call it,
so a wrapper saved as that file is applied by every one of them without being told, and a model
copied elsewhere cannot lose it. The price: code that looks *inside* a model (Grad-CAM, the
registry's `base_of`, BatchNorm handling) unwraps it first with `networks_of` / `unwrap`.

Only Keras layers here (keras.ops inside them), no Lambda: the files load in Keras' safe mode, and
this module, like the registry, imports no TensorFlow of its own.
"""

from __future__ import annotations

import keras

from covidtl.errors import UserError

PACKAGE = "covidtl"
ZOOM_FRACTION = 0.9  # flip_zoom's zoomed views keep the central 90% of each side


@keras.saving.register_keras_serializable(package=PACKAGE)
class Mirror(keras.layers.Layer):
    """The image mirrored left to right (NHWC's width axis)."""

    def call(self, images):
        return keras.ops.flip(images, axis=2)


@keras.saving.register_keras_serializable(package=PACKAGE)
class CentreZoom(keras.layers.Layer):
    """The central `fraction` of the image, resized back to its size: a mild, fixed zoom-in."""

    def __init__(self, fraction: float = ZOOM_FRACTION, **kwargs):
        super().__init__(**kwargs)
        self.fraction = float(fraction)

    def call(self, images):
        height, width = int(images.shape[1]), int(images.shape[2])
        top = int(round(height * (1 - self.fraction) / 2))
        left = int(round(width * (1 - self.fraction) / 2))
        centre = images[:, top : height - top, left : width - left, :]
        return keras.ops.image.resize(centre, (height, width), interpolation="bilinear")

    def get_config(self):
        return {**super().get_config(), "fraction": self.fraction}


@keras.saving.register_keras_serializable(package=PACKAGE)
class MeanProbabilities(keras.layers.Average):
    """The mean of several softmax outputs; `kind` says what is averaged (`tta:<views>` or
    `ensemble`), so a loaded model can tell what it is without a card."""

    def __init__(self, kind: str = "ensemble", **kwargs):
        super().__init__(**kwargs)
        self.kind = kind

    def get_config(self):
        return {**super().get_config(), "kind": self.kind}


# Each view is the chain of layers applied to the image before the shared network; () = as given.
# Every view is deterministic: the same image always gets the same probability.
VIEWS: dict[str, tuple[tuple[type, ...], ...]] = {
    "none": ((),),
    "flip": ((), (Mirror,)),
    "flip_zoom": ((), (Mirror,), (CentreZoom,), (CentreZoom, Mirror)),
}


def _mean_layer(kind: str) -> MeanProbabilities:
    # float32 under mixed precision too, as the networks' own softmax layers (covidtl.distribute).
    return MeanProbabilities(kind=kind, name="probabilities", dtype="float32")


def with_tta(net: keras.Model, tta: str) -> keras.Model:
    """`net` averaged over the views `tta` names (`none`: `net` itself); refused on a model that
    already averages views, where a second wrap would silently change what was measured."""
    if tta not in VIEWS:
        raise UserError(f"tta {tta!r}: unknown view set; choose one of {', '.join(VIEWS)}")
    if tta == "none":
        return net
    if tta_of(net) != "none":
        raise UserError(f"model {net.name!r} already averages over its {tta_of(net)} views; "
                        "give --tta none, or the model saved without TTA")
    inputs = keras.Input(shape=net.input_shape[1:], name="image")
    outputs = []
    for view in VIEWS[tta]:
        x = inputs
        for layer in view:
            x = layer(dtype="float32")(x)
        outputs.append(net(x))
    # The wrapper keeps the network's name first, so its architecture is still read from the name.
    return keras.Model(inputs, _mean_layer(f"tta:{tta}")(outputs), name=f"{net.name}_tta_{tta}")


def ensemble_of(members: list[keras.Model], name: str) -> keras.Model:
    """One model whose probability is the mean of `members`' on the same input."""
    if len(members) < 2:
        raise UserError(f"an ensemble needs at least two members, got {len(members)}")
    inputs = keras.Input(shape=members[0].input_shape[1:], name="image")
    outputs = []
    for i, member in enumerate(members, start=1):
        # Nested layers of one functional model need distinct names; two runs of one architecture
        # share theirs (`custom_cnn`), so each member is named by its place.
        member.name = f"member_{i}_{member.name}"
        outputs.append(member(inputs))
    return keras.Model(inputs, _mean_layer("ensemble")(outputs), name=name)


def mean_layer(model: keras.Model) -> MeanProbabilities | None:
    """The averaging layer of a wrapper (its output layer), None for a plain network."""
    last = model.layers[-1] if model.layers else None
    return last if isinstance(last, MeanProbabilities) else None


def tta_of(model: keras.Model) -> str:
    """The view set a TTA wrapper averages over; `none` for anything else."""
    layer = mean_layer(model)
    return layer.kind.removeprefix("tta:") if layer is not None and layer.kind.startswith("tta:") else "none"


def is_ensemble(model: keras.Model) -> bool:
    layer = mean_layer(model)
    return layer is not None and layer.kind == "ensemble"


def networks_of(model: keras.Model) -> list[keras.Model]:
    """The plain networks inside a wrapper (a TTA wrapper's one, an ensemble's each, unwrapped in
    turn); `[model]` for a plain network."""
    if mean_layer(model) is None:
        return [model]
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.extend(networks_of(layer))
    return found


def unwrap(model: keras.Model) -> keras.Model:
    """The (first) plain network inside `model`: what code that reads layers should look at."""
    return networks_of(model)[0]
