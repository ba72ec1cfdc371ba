"""The model registry: every architecture builds, Table 1's CNN is exact, weights load or fail clearly."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from covidtl.cli import main
from covidtl.config import load_config
from covidtl.errors import UserError
from covidtl.models import weights
from covidtl.inits import init_label
from covidtl.models.registry import MODELS, base_of, build_model, get_spec
from helpers_train import save_keras_cache_file

ROOT = Path(__file__).parents[1]
SMALL = {"custom_cnn": 200, "inceptionv3": 75}  # the smallest inputs each accepts; others 32


@pytest.fixture(scope="module")
def train_cfg():
    return load_config(ROOT / "params.yaml").train


def small(name: str) -> int:
    return SMALL.get(name, 32)


def test_custom_cnn_is_table_1_exactly(train_cfg):
    model = build_model(get_spec("custom_cnn"), "random", train_cfg)
    assert model.input_shape == (None, 200, 200, 3)
    assert model.count_params() == 81_989
    kinds = [type(layer).__name__ for layer in model.layers[1:]]
    assert kinds == [
        "SeparableConv2D", "MaxPooling2D", "SeparableConv2D", "MaxPooling2D", "BatchNormalization",
        "SeparableConv2D", "MaxPooling2D", "BatchNormalization", "SeparableConv2D", "MaxPooling2D",
        "BatchNormalization", "Dropout", "SeparableConv2D", "SeparableConv2D", "MaxPooling2D",
        "SeparableConv2D", "MaxPooling2D", "BatchNormalization", "Flatten", "Dense", "Dense",
    ]
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.SeparableConv2D)]
    assert [c.output.shape[1] for c in convs] == [198, 97, 48, 21, 8, 8, 2]
    assert [c.count_params() for c in convs] == [91, 416, 688, 1344, 2400, 4736, 4736]
    assert model.layers[-3].output.shape[-1] == 64  # Flatten of a 1x1x64 map


@pytest.mark.parametrize("name", ["custom_cnn", "resnet50"])
def test_the_gap_head_pools_the_features_into_the_two_outputs(name, train_cfg):
    import dataclasses

    spec = MODELS[name]
    model = build_model(spec, "random", dataclasses.replace(train_cfg, head="gap"), image_size=small(name))
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert [d.units for d in dense] == [2]  # no Dense(head_units)
    assert isinstance(model.layers[model.layers.index(dense[0]) - 1], keras.layers.GlobalAveragePooling2D)
    assert not any(isinstance(layer, keras.layers.Flatten) for layer in model.layers)
    paper = build_model(spec, "random", train_cfg, image_size=small(name))
    assert model.count_params() < paper.count_params()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_architecture_builds_with_the_papers_head(name, train_cfg):
    spec = MODELS[name]
    model = build_model(spec, "random", train_cfg, image_size=small(name))
    assert model.input_shape == (None, small(name), small(name), 3)
    assert model.output_shape == (None, 2)
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert [d.units for d in dense] == [train_cfg.head_units, 2]
    assert dense[-1].get_config()["activation"] == "softmax"
    assert isinstance(model.layers[model.layers.index(dense[0]) - 1], keras.layers.Flatten)
    if spec.backbone is None:
        assert base_of(model) is None
    else:
        assert base_of(model).trainable  # random init trains the whole network
    # An eager call (no predict() tracing, which costs deep nets most of a minute on 2 cores).
    x = np.random.default_rng(0).uniform(0, 255, (2, small(name), small(name), 3)).astype("float32")
    probs = np.asarray(model(spec.preprocess_input(x), training=False))
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)


def test_native_sizes_and_learning_rates(train_cfg):
    assert {n: s.input_size for n, s in MODELS.items()} == {
        "custom_cnn": 200, "densenet121": 224, "resnet50": 224, "inceptionv3": 299,
        "resnet101v2": 224, "vgg16": 224,
    }
    assert set(train_cfg.learning_rates) >= set(MODELS)


def test_weights_file_is_loaded_into_a_frozen_base(tmp_path, train_cfg):
    spec = get_spec("vgg16")
    donor = base_of(build_model(spec, "random", train_cfg, image_size=32))
    file = tmp_path / "vgg16-donor.weights.h5"
    donor.save_weights(file)

    model = build_model(spec, str(file), train_cfg, image_size=32)
    base = base_of(model)
    assert not base.trainable
    for got, want in zip(base.get_weights(), donor.get_weights()):
        np.testing.assert_array_equal(got, want)
    assert init_label(str(file)) == "file-vgg16-donor"


def test_weights_file_of_another_architecture_is_one_clear_error(tmp_path, train_cfg):
    other = base_of(build_model(get_spec("vgg16"), "random", train_cfg, image_size=32))
    file = tmp_path / "vgg.weights.h5"
    other.save_weights(file)
    with pytest.raises(UserError, match=r"vgg\.weights\.h5: this weights file does not fit"):
        build_model(get_spec("resnet50"), str(file), train_cfg, image_size=32)
    with pytest.raises(UserError, match="no such weights file"):
        build_model(get_spec("vgg16"), str(tmp_path / "absent.weights.h5"), train_cfg, image_size=32)


def test_imagenet_and_finetune_read_keras_cache(tmp_path, monkeypatch, train_cfg):
    """A weights file saved under the exact name keras.applications caches is what init=imagenet loads."""
    spec = get_spec("vgg16")
    monkeypatch.chdir(tmp_path)  # no weights stage has recorded a file here
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    donor = base_of(build_model(spec, "random", train_cfg, image_size=32))
    cached = tmp_path / "keras" / "models" / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert weights.imagenet_weights_path(spec) == cached
    save_keras_cache_file(donor, cached)

    frozen = build_model(spec, "imagenet", train_cfg, image_size=32)
    tuned = build_model(spec, "finetune", train_cfg, image_size=32)
    assert not base_of(frozen).trainable
    assert base_of(tuned).trainable
    for model in (frozen, tuned):
        for got, want in zip(base_of(model).get_weights(), donor.get_weights()):
            np.testing.assert_array_equal(got, want)


def test_training_loads_the_recorded_file_and_refuses_a_changed_one(tmp_path, monkeypatch, train_cfg):
    """The file `covidtl weights` recorded is what init=imagenet loads, if its sha256 still matches."""
    spec = get_spec("vgg16")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    donor, other = (base_of(build_model(spec, "random", train_cfg, image_size=32)) for _ in range(2))
    save_keras_cache_file(other, tmp_path / "keras" / "models" / spec.imagenet_file)  # not this one
    dropped = tmp_path / "weights" / spec.imagenet_file
    save_keras_cache_file(donor, dropped)
    assert CliRunner().invoke(main, ["weights", "vgg16", "--init", "imagenet"]).exit_code == 0

    for got, want in zip(base_of(build_model(spec, "finetune", train_cfg, image_size=32)).get_weights(),
                         donor.get_weights()):
        np.testing.assert_array_equal(got, want)

    save_keras_cache_file(other, dropped)  # replaced after the stage ran
    with pytest.raises(UserError) as err:
        build_model(spec, "imagenet", train_cfg, image_size=32)
    message = str(err.value)
    assert "\n" not in message and str(Path("weights") / spec.imagenet_file) in message
    assert "changed since stage weights@vgg16-imagenet recorded it" in message
    assert message.endswith("run `dvc repro`")


def refuse_connections(monkeypatch):
    """This machine offline, whatever the network: every connection attempt fails at once."""

    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket.socket, "connect", offline)
    monkeypatch.setattr(socket, "getaddrinfo", offline)


def test_imagenet_offline_and_uncached_fails_fast_naming_the_file(tmp_path, monkeypatch, train_cfg):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty"))
    refuse_connections(monkeypatch)
    started = time.monotonic()
    with pytest.raises(UserError) as err:
        build_model(get_spec("vgg16"), "imagenet", train_cfg, image_size=32)
    assert time.monotonic() - started < 30
    message = str(err.value)
    assert "\n" not in message
    assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert str(tmp_path / "empty" / "models") in message


def test_cli_imagenet_offline_is_one_error_line(tmp_path, monkeypatch):
    """`covidtl train --init imagenet` offline: exit 2 and one `Error:` line, no traceback."""
    from helpers_train import make_workdir

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    refuse_connections(monkeypatch)
    make_workdir(tmp_path)
    result = CliRunner().invoke(main, [
        "--params", str(ROOT / "params.yaml"), "-S", f"data.workdir={tmp_path / 'data'}",
        "-S", f"data.datasets.tiny.path={tmp_path / 'images'}",
        "-S", "train.image_size.resnet50=32", "train", "--model", "resnet50", "--init", "imagenet",
        "--dataset", "tiny", "--out", str(tmp_path / "out"),
    ])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in lines[0]
    assert "Traceback" not in result.output


def test_bad_model_and_init_are_user_errors(train_cfg):
    with pytest.raises(UserError, match="unknown model; choose one of custom_cnn"):
        get_spec("alexnet")
    with pytest.raises(UserError, match="custom_cnn has no ImageNet weights"):
        build_model(get_spec("custom_cnn"), "imagenet", train_cfg)


def test_finetune_keeps_the_pretrained_batchnorm_statistics(tmp_path, monkeypatch, train_cfg):
    """Issue 8.1: fine-tuning moves the convolutions, never the ImageNet BatchNorm statistics."""
    from covidtl.train import trainable_batchnorms

    spec = get_spec("resnet50")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    donor = base_of(build_model(spec, "random", train_cfg, image_size=32))
    save_keras_cache_file(donor, weights.imagenet_weights_path(spec))

    model = build_model(spec, "finetune", train_cfg, image_size=32)
    base = base_of(model)
    norms = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    convs = [layer for layer in base.layers if isinstance(layer, keras.layers.Conv2D)]
    assert base.trainable and norms and convs
    assert not set(map(id, trainable_batchnorms(model))) & set(map(id, norms))  # precise BN skips them
    loaded_norms = [[np.array(w) for w in layer.weights] for layer in norms]
    loaded_kernels = [np.array(layer.kernel) for layer in convs]

    rng = np.random.default_rng(0)
    x = rng.normal(120, 60, (8, 32, 32, 3)).astype("float32")  # far from the loaded statistics
    y = keras.utils.to_categorical(rng.integers(0, 2, 8), 2)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy")
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)

    for layer, loaded in zip(norms, loaded_norms):  # gamma, beta, moving mean, moving variance
        for got, want in zip(layer.weights, loaded):
            np.testing.assert_array_equal(np.array(got), want, err_msg=layer.name)
    assert any(not np.allclose(np.array(c.kernel), k) for c, k in zip(convs, loaded_kernels))


@pytest.mark.parametrize("damage", ["truncated", "not hdf5"])
def test_a_damaged_imagenet_file_is_one_line_naming_it(tmp_path, monkeypatch, train_cfg, damage):
    spec = get_spec("vgg16")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    dropped = save_keras_cache_file(base_of(build_model(spec, "random", train_cfg, image_size=32)),
                                    tmp_path / "weights" / spec.imagenet_file)
    whole = dropped.read_bytes()
    dropped.write_bytes(whole[: len(whole) // 2] if damage == "truncated" else b"not an HDF5 file")
    with pytest.raises(UserError) as err:
        build_model(spec, "imagenet", train_cfg, image_size=32)
    message = str(err.value)
    assert "\n" not in message and spec.imagenet_file in message
    assert "truncated or damaged: replace it with a complete copy" in message
