"""The tf.data input pipeline on tiny synthetic PNGs and on a few real CT/X-ray files."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidtl.config import load_config
from covidtl.data.pipeline import make_dataset
from covidtl.models.registry import get_spec
from covidtl.paths import CLASSES
from helpers_train import split_table, write_images

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    return split_table(write_images(tmp_path_factory.mktemp("img"), per_class=6, size=40))


def config(**overrides):
    return load_config(ROOT / "params.yaml", {"train.batch_size": 4, **overrides})


def collect(ds):
    xs, ys = zip(*[(np.asarray(x), np.asarray(y)) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)


def test_eval_batches_are_rgb_preprocessed_and_labelled_in_table_order(table):
    cfg = config(**{"train.preprocessing": "rescale"})
    x, y = collect(make_dataset(table, get_spec("vgg16"), cfg, 36, training=False))
    assert x.shape == (len(table), 36, 36, 3) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0  # the paper's rescale
    expected = table["label"].map(CLASSES.index).to_numpy()
    np.testing.assert_array_equal(y.argmax(axis=1), expected)
    assert set(table["mode"]) == {"L", "RGB", "RGBA"}  # all three became 3-channel RGB
    greyscale = x[(table["mode"] == "L").to_numpy()]
    np.testing.assert_allclose(greyscale[..., 0], greyscale[..., 2], atol=1e-6)


def test_model_preprocessing_is_the_backbones_own(table):
    spec = get_spec("resnet50")
    raw, _ = collect(make_dataset(table, spec, config(**{"train.preprocessing": "rescale"}), 32, False))
    own, _ = collect(make_dataset(table, spec, config(**{"train.preprocessing": "model"}), 32, False))
    np.testing.assert_allclose(own, np.asarray(spec.preprocess_input(raw * 255.0)), atol=1e-3)


def test_training_split_is_shuffled_with_the_seed_and_augmented(table):
    spec = get_spec("custom_cnn")
    cfg = config(**{"train.preprocessing": "rescale"})
    first = collect(make_dataset(table, spec, cfg, 32, training=True))
    again = collect(make_dataset(table, spec, cfg, 32, training=True))
    plain = collect(make_dataset(table, spec, cfg, 32, training=False))
    np.testing.assert_array_equal(first[1], again[1])  # same seed, same order
    assert not np.array_equal(first[1], plain[1])  # ... which is not the table's order
    # Augmentation changed pixels: no training image equals any untouched one.
    distances = np.abs(first[0][:, None] - plain[0][None]).mean(axis=(2, 3, 4))
    assert distances.min(axis=1).max() > 1e-3


def test_a_file_that_fails_to_decode_is_reported_and_skipped(table, tmp_path, caplog):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    missing = tmp_path / "gone.png"
    rows = pd.concat([table, table.iloc[:2].assign(path=[str(broken), str(missing)])], ignore_index=True)
    with caplog.at_level(logging.WARNING, logger="covidtl.data.pipeline"):
        x, _ = collect(make_dataset(rows, get_spec("custom_cnn"), config(), 32, training=True))
    assert len(x) == len(table)
    assert str(broken) in caplog.text and str(missing) in caplog.text


def test_real_ct_and_xray_files_decode(shared_data):
    files = sorted((shared_data / "sarscov2-ct" / "COVID").glob("*.png"))[:2]
    files += sorted((shared_data / "sarscov2-ct" / "non-COVID").glob("*.png"))[:2]
    xray = shared_data / "covid19-xray" / "train"
    files += sorted((xray / "Covid").iterdir())[:2] + sorted((xray / "Normal").iterdir())[:2]
    rows = pd.DataFrame({
        "path": [str(f) for f in files],
        "label": ["covid", "covid", "non_covid", "non_covid"] * 2,
    })
    x, y = collect(make_dataset(rows, get_spec("densenet121"), config(), 64, training=True))
    assert x.shape == (8, 64, 64, 3) and np.isfinite(x).all()
    assert y.sum(axis=0).tolist() == [4, 4]


def test_a_12_bit_png_trains_as_ingest_reads_it_not_near_black(tmp_path):
    """A 16-bit PNG holding 12-bit data is stretched by its own range, as ingest's `load_rgb` does."""
    import tensorflow as tf
    from PIL import Image

    from covidtl.data.images import load_rgb

    values = (np.arange(40 * 48, dtype=np.uint32).reshape(40, 48) * 4095 // (40 * 48 - 1)).astype(np.uint16)
    path = tmp_path / "twelve-bit.png"
    Image.fromarray(values).save(path)
    rows = pd.DataFrame({"path": [str(path)], "label": ["covid"]})
    cfg = config(**{"train.preprocessing": "rescale"})
    x, _ = collect(make_dataset(rows, get_spec("custom_cnn"), cfg, 32, training=False))
    expected = tf.image.resize(np.asarray(load_rgb(path)), (32, 32)).numpy() / 255.0
    np.testing.assert_allclose(x[0], expected, atol=1e-6)
    assert x.max() > 0.9  # 1/257 scaling would leave 12-bit data below 16/255
