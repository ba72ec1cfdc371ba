"""One entry per architecture: builder, native input size, preprocessing, learning-rate key.

Adding a seventh model is one entry in `covidtl.catalog` (its input size, preprocessing and
ImageNet file), one `ModelSpec` in `MODELS` (its network) and one line in params.yaml's
`train.learning_rates`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import keras
from keras import layers

from covidtl import catalog
from covidtl.inits import Init
from covidtl.config import TrainConfig
from covidtl.data.preprocess import own_preprocessing, preprocess_for  # noqa: F401 - preprocess_for: re-exported
from covidtl.errors import UserError
from covidtl.models import weights
from covidtl.models.input_layers import input_layers
from covidtl.models.custom_cnn import MIN_INPUT_SIZE, build_custom_cnn
from covidtl.models.wrappers import unwrap


@dataclass(frozen=True)
class ModelSpec:
    name: str  # a key of covidtl.catalog, which holds its input size, preprocessing and ImageNet file
    # keras.applications constructor (include_top=False) for backbones; None for the custom CNN.
    backbone: Callable[..., keras.Model] | None
    # The smallest input the network accepts (keras.applications: 32, InceptionV3 75).
    min_input_size: int = 32
    # The base's layer before its last block (`train.unfreeze_after: top_block`): a single tensor
    # through which everything flows, so the layers after it can train on its stored output.
    top_block_cut: str | None = None

    @property
    def input_size(self) -> int:
        return catalog.CATALOG[self.name].input_size

    @property
    def preprocess_input(self) -> Callable:
        """What the backbone's ImageNet weights were trained with; `rescale` for the custom CNN."""
        return own_preprocessing(self.name)

    @property
    def lr_key(self) -> str:
        return self.name

    @property
    def imagenet_file(self) -> str | None:
        """Keras' cache file of the ImageNet weights without the top ($KERAS_HOME/models)."""
        return catalog.CATALOG[self.name].imagenet_file


_SPECS = (
    ModelSpec("custom_cnn", None, min_input_size=MIN_INPUT_SIZE),
    ModelSpec("densenet121", keras.applications.DenseNet121, top_block_cut="pool4_pool"),
    ModelSpec("resnet50", keras.applications.ResNet50, top_block_cut="conv4_block6_out"),
    ModelSpec("inceptionv3", keras.applications.InceptionV3, min_input_size=75, top_block_cut="mixed8"),
    ModelSpec("resnet101v2", keras.applications.ResNet101V2, top_block_cut="conv4_block23_out"),
    ModelSpec("vgg16", keras.applications.VGG16, top_block_cut="block4_pool"),
)
MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}


def get_spec(name: str) -> ModelSpec:
    """The registry entry, or one line listing the known names."""
    catalog.facts(name)  # an unknown name: the catalog's one line
    return MODELS[name]


def image_size_for(spec: ModelSpec, train_cfg: TrainConfig) -> int:
    """Native input size unless params override it (train.image_size.<model>)."""
    return catalog.image_size(spec.name, train_cfg.image_size)


def trainable_image_size(spec: ModelSpec, train_cfg: TrainConfig) -> int:
    """`image_size_for`, refused before anything is built when the network cannot take it."""
    size = image_size_for(spec, train_cfg)
    if size < spec.min_input_size:
        raise UserError(
            f"train.image_size.{spec.name}: {size} px is below {spec.name}'s smallest input, "
            f"{spec.min_input_size} px; give --image-size {spec.min_input_size} or more "
            f"(its native size is {spec.input_size})"
        )
    return size


def learning_rate_for(spec: ModelSpec, train_cfg: TrainConfig) -> float:
    try:
        return float(train_cfg.learning_rates[spec.lr_key])
    except KeyError:
        raise UserError(
            f"train.learning_rates.{spec.lr_key}: missing in params.yaml; add the model's rate"
        ) from None


def base_of(model: keras.Model) -> keras.Model | None:
    """The pre-trained backbone inside a built model (None for the custom CNN); a TTA or ensemble
    wrapper is looked into (its first network)."""
    for layer in unwrap(model).layers:
        if isinstance(layer, keras.Model):
            return layer
    return None


def freeze_batchnorm(base: keras.Model) -> None:
    """Keep a pre-trained base's BatchNorm statistics: its BatchNormalization layers stop training.

    Keras 3 ignores `base(x, training=False)` inside a functional model during `fit` while the base
    is trainable (fine-tuning moved the ImageNet moving means); a non-trainable BatchNormalization
    layer always runs in inference mode and keeps its gamma, beta and moving statistics.
    """
    for layer in base.layers:
        if isinstance(layer, keras.Model):
            freeze_batchnorm(layer)
        elif isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False


# Heads on globally pooled features: `gap` trains Dense(2) with the run's optimizer (covidtl.optim),
# `linear_probe` fits it as an L2-regularised logistic regression (covidtl.linear_probe).
POOLED_HEADS = ("gap", "linear_probe")
FROZEN_INITS = "imagenet or a weights file (its base frozen)"


def has_frozen_base(spec: ModelSpec, init: Init | str) -> bool:
    """Whether `init` leaves a pre-trained base frozen: imagenet, or a weights file (not finetune)."""
    return spec.backbone is not None and Init.of(init).frozen_base


def check_frozen_recipe(spec: ModelSpec, init: Init, train_cfg: TrainConfig) -> None:
    """A linear probe and `train.unfreeze_after` need a frozen pre-trained base; refuse the rest."""
    wants = [f"train.head {train_cfg.head}"] if train_cfg.head == "linear_probe" else []
    if train_cfg.unfreeze_after != "none":
        wants.append(f"train.unfreeze_after {train_cfg.unfreeze_after}")
    if wants and not has_frozen_base(spec, init):
        what = (f"{spec.name} has no pre-trained base" if spec.backbone is None
                else f"--init {init} trains every layer")
        raise UserError(f"{' and '.join(wants)}: needs a frozen pre-trained base, but {what}; use a "
                        f"keras.applications model with --init {FROZEN_INITS}")
    if train_cfg.head == "linear_probe" and train_cfg.unfreeze_after != "none":
        raise UserError("train.head linear_probe fits the head alone on frozen features; set "
                        "train.unfreeze_after to none, or use train.head gap to train the top block too")


def unfreeze_cut(spec: ModelSpec, setting: str) -> str | None:
    """The layer after which the base trains (`train.unfreeze_after`): `top_block` is the
    registry's cut before the last block, a layer name is itself; None for `none`."""
    if setting == "none":
        return None
    if setting == "top_block":
        return spec.top_block_cut
    return setting


def unfreeze_after(base: keras.Model, cut: str) -> None:
    """Every layer of `base` after `cut` (in its topological order) trains; `cut` and the ones
    before it stay frozen, so their output can be stored once (covidtl.frozen)."""
    names = [layer.name for layer in base.layers]
    if cut not in names:
        raise UserError(f"train.unfreeze_after {cut}: not a layer of {base.name}; give top_block or one "
                        f"of its layers (e.g. {', '.join(names[-12:-8])})")
    base.trainable = True
    for layer in base.layers[: names.index(cut) + 1]:
        layer.trainable = False


def build_model(
    spec: ModelSpec, init: Init | str, train_cfg: TrainConfig, image_size: int | None = None
) -> keras.Model:
    """The paper's network: backbone (or Table 1's CNN) -> Flatten -> Dense(1000) -> Dense(2);
    with `train.head: gap`, backbone -> GlobalAveragePooling -> Dense(2)."""
    size = image_size or image_size_for(spec, train_cfg)
    shape = (size, size, 3)
    # train.crop / train.normalize: layers of the model, so every saved file applies them.
    front = input_layers(train_cfg.crop, train_cfg.normalize)
    init = Init.of(init)
    weights_file = init.file  # PATH or finetune:PATH; None for random, imagenet, finetune
    if weights_file is not None:  # a `covidtl pretrain` file made for another model, head or size
        weights.check_fits(weights_file, spec.name, train_cfg.head, size)
    check_frozen_recipe(spec, init, train_cfg)
    if spec.backbone is None:
        model = build_custom_cnn(shape, dropout=train_cfg.dropout, head=train_cfg.head, front=front)
        if init.source == "imagenet":
            raise UserError(
                f"--init {init}: {spec.name} has no ImageNet weights; use --init random "
                "or a weights file saved from this model"
            )
        if weights_file is not None:
            # PATH and finetune:PATH are both warm starts: every layer trains (finetune: at the
            # lower rate). A file from `covidtl pretrain` holds the whole classifier, its head untrained.
            weights.load_weights_file(model, weights_file)
        return model

    base = spec.backbone(include_top=False, weights=None, input_shape=shape)
    if init.source == "random":
        base.trainable = True
    elif init.source == "imagenet":
        weights.load_imagenet(base, spec)
        base.trainable = init.finetune
    else:  # PATH: the file's base frozen, like imagenet; finetune:PATH: fine-tuned, like finetune
        weights.load_weights_file(base, weights_file)
        base.trainable = init.finetune

    cut = unfreeze_cut(spec, train_cfg.unfreeze_after)
    if cut is not None:  # the frozen base's last layers train: the ones after `cut`
        unfreeze_after(base, cut)
    if init.source != "random":
        freeze_batchnorm(base)
    inputs = keras.Input(shape=shape, name="image")
    x = inputs
    for layer in front:
        x = layer(x)
    # training=False documents the intent; it is freeze_batchnorm that keeps the statistics.
    x = base(x, training=False) if init.source != "random" else base(x)
    x = layers.GlobalAveragePooling2D()(x) if train_cfg.head in POOLED_HEADS else layers.Flatten()(x)
    if train_cfg.dropout:
        x = layers.Dropout(train_cfg.dropout)(x)
    if train_cfg.head == "paper":
        x = layers.Dense(train_cfg.head_units, activation="relu")(x)
    # float32 under mixed precision too: a float16 softmax saturates (covidtl.distribute).
    outputs = layers.Dense(2, activation="softmax", name="probabilities", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=f"{spec.name}_{init.label}")
