"""Issue 12's input levers: the body crop and per-image normalisation travel inside the saved model;
photometric augmentation draws like the geometric one (same seed, same batch)."""

from __future__ import annotations

import random
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from click.testing import CliRunner

from covidtl.cli import main
from covidtl.config import IntensityConfig
from covidtl.data.pipeline import augment_intensity, image_from_bytes
from covidtl.explain import GradCam
from covidtl.models.input_layers import BodyCrop, Normalize

ROOT = Path(__file__).parents[1]
SIZE = 200
# The synthetic scan's body: rows 50-129, columns 40-159 (a filled ellipse).
BODY = (50, 129, 40, 159)


def synthetic_scan() -> np.ndarray:
    """A scanner's full field of view at model size, in [0, 1]: black outside a grey circle, a body
    (ellipse, dark lungs), a thin table line under it and a block of text in a corner."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype("float32")
    image = np.where((y - 99.5) ** 2 + (x - 99.5) ** 2 < 98 ** 2, 0.35, 0.0)
    top, bottom, left, right = BODY
    cy, cx, ry, rx = (top + bottom) / 2, (left + right) / 2, (bottom - top + 1) / 2, (right - left + 1) / 2
    image[((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0] = 0.75
    for lung_x in (cx - rx / 2.2, cx + rx / 2.2):
        image[((y - cy) / (ry * 0.6)) ** 2 + ((x - lung_x) / (rx * 0.3)) ** 2 <= 1.0] = 0.3
    image[150:152, 15:185] = 0.9  # the table's edge
    image[8:16, 150:180] = np.where(np.arange(30) % 3 == 0, 1.0, 0.0)  # text: vertical strokes
    return np.repeat(image[..., None], 3, axis=-1)


def box_share(images: np.ndarray) -> np.ndarray:
    box = keras.ops.convert_to_numpy(BodyCrop().boxes(images))
    return (box[:, 1] - box[:, 0] + 1) * (box[:, 3] - box[:, 2] + 1) / (SIZE * SIZE)


def test_the_crop_finds_the_body_not_the_table_or_the_text():
    image = synthetic_scan()[None]
    box = keras.ops.convert_to_numpy(BodyCrop().boxes(image))[0]
    assert np.abs(box - np.array(BODY)).max() <= 4, box  # the margin is 2% of the box
    cropped = keras.ops.convert_to_numpy(BodyCrop()(image))[0]
    # The body now fills the frame: no black on the middle row and column, most of it body.
    assert cropped[SIZE // 2].min() > 0.25 and cropped[:, SIZE // 2].min() > 0.25
    assert (cropped > 0.7).mean() > 3 * (image > 0.7).mean()  # the box was a quarter of the frame
    assert cropped.min() >= 0.0 and cropped.max() <= 1.0


def test_the_crop_keeps_a_frame_with_no_body_and_an_image_already_cropped():
    blank = np.full((1, SIZE, SIZE, 3), 0.2, dtype="float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(BodyCrop()(blank)), blank, atol=1e-5)
    body_only = synthetic_scan()[BODY[0]:BODY[1] + 1, BODY[2]:BODY[3] + 1]
    body_only = tf.image.resize(body_only, (SIZE, SIZE)).numpy()[None]
    assert box_share(body_only)[0] > 0.95


def real_files(root: Path, count: int) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    random.Random(0).shuffle(files)
    return files[:count]


def test_the_crop_enlarges_the_external_scans_and_keeps_the_training_set(shared_data):
    """ct-external keeps the scanner's field of view, sarscov2-ct is cut to the body already."""
    shares = {}
    for name in ("ct-external", "sarscov2-ct"):
        images = np.stack([image_from_bytes(f.read_bytes(), SIZE) for f in real_files(shared_data / name, 12)])
        images = (images / 255.0).astype("float32")
        cropped = keras.ops.convert_to_numpy(BodyCrop()(images))
        shares[name] = (np.median(box_share(images)), np.median(box_share(cropped)))
    assert shares["ct-external"][0] < 0.9 < shares["ct-external"][1], shares
    assert shares["sarscov2-ct"][0] > 0.95 and shares["sarscov2-ct"][1] > 0.95, shares


def test_the_layers_round_trip_through_a_saved_model(tmp_path):
    inputs = keras.Input((SIZE, SIZE, 3))
    x = Normalize("equalize", name="normalize")(BodyCrop(name="body_crop")(inputs))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")  # safe mode: registered classes only
    image = synthetic_scan()[None]
    assert [layer.name for layer in loaded.layers[1:3]] == ["body_crop", "normalize"]
    np.testing.assert_allclose(loaded.predict(image, verbose=0), model.predict(image, verbose=0), atol=1e-6)


def test_standardize_gives_each_image_mean_0_and_sd_1():
    images = np.stack([synthetic_scan(), synthetic_scan() * 40.0 + 7.0]).astype("float32")
    out = keras.ops.convert_to_numpy(Normalize("standardize")(images))
    np.testing.assert_allclose(out.mean(axis=(1, 2)), 0.0, atol=1e-3)  # float32 sums
    np.testing.assert_allclose(out.std(axis=(1, 2)), 1.0, atol=1e-3)


def test_equalize_does_not_see_a_monotone_intensity_change():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (2, 64, 64, 1)).repeat(3, axis=-1).astype("float32")
    windowed = np.sqrt(image) * 3.0 - 100.0  # increasing: a scanner's other window or gamma
    out = keras.ops.convert_to_numpy(Normalize("equalize")(image))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(Normalize("equalize")(windowed)), out, atol=1e-6)
    assert 0.0 < out.min() and out.max() < 1.0
    assert abs(np.median(out) - 0.5) < 0.02  # flat histogram: half the pixels below the middle
    with pytest.raises(ValueError, match="choose one of"):
        Normalize("clahe")


def test_equalize_gives_each_pixel_its_mid_rank_on_an_8_bit_scan():
    from scipy.stats import rankdata

    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (3, 40, 50, 1)).repeat(3, axis=-1).astype("float32")
    out = keras.ops.convert_to_numpy(Normalize("equalize")(image))
    for got, grey in zip(out, image[..., 0]):
        expected = (rankdata(grey.ravel(), method="average") - 0.5) / grey.size  # ties counted half
        np.testing.assert_allclose(got[..., 0].ravel(), expected, atol=1e-6)
        np.testing.assert_array_equal(got[..., 0], got[..., 2])


def intensity(**values) -> IntensityConfig:
    return IntensityConfig(**{"brightness": 0.0, "contrast": 0.0, "gamma": 0.0, "noise": 0.0, "blur": 0.0,
                              **values})


def test_intensity_augmentation_is_seeded_changes_pixels_and_keeps_the_range():
    batch = tf.constant((synthetic_scan()[None].repeat(4, axis=0) * 255).astype("uint8"))
    strong = intensity(brightness=0.2, contrast=0.3, gamma=0.3, noise=0.05, blur=0.5)
    seed = tf.constant([7, 1], tf.int64)
    first = augment_intensity(batch, strong, seed).numpy()
    np.testing.assert_array_equal(augment_intensity(batch, strong, seed).numpy(), first)
    other = augment_intensity(batch, strong, tf.constant([8, 1], tf.int64)).numpy()
    assert np.abs(other - first).mean() > 1.0
    assert np.abs(first - batch.numpy()).mean() > 1.0
    assert first.min() >= 0.0 and first.max() <= 255.0
    # A grey scan stays grey: the noise is the same on every channel.
    np.testing.assert_allclose(first[..., 0], first[..., 2], atol=1e-3)
    off = augment_intensity(batch, intensity(), seed).numpy()
    np.testing.assert_allclose(off, batch.numpy().astype("float32"), atol=1e-3)


def test_train_with_crop_and_normalize_then_predict_applies_them_without_flags(synth_data, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    base = ["--params", str(ROOT / "params.yaml"), "-S", f"data.workdir={tmp_path / 'data'}",
            "-S", f"data.datasets.ct.path={synth_data / 'ct'}"]
    levers = ["-S", "train.crop=body", "-S", "train.normalize=equalize", "-S", "augment.intensity.brightness=0.1",
              "-S", "augment.intensity.gamma=0.2", "-S", "augment.intensity.noise=0.02"]
    runner = CliRunner()
    for args in (["ingest", "ct", "--quiet"], ["split", "ct"]):
        assert runner.invoke(main, base + args).exit_code == 0
    trained = runner.invoke(main, base + levers + [
        "train", "--model", "custom_cnn", "--init", "random", "--dataset", "ct", "--epochs", "1",
        "--batch-size", "16", "--max-train-samples", "32", "--out", str(tmp_path / "cell"), "--no-log-model",
    ])
    assert trained.exit_code == 0, trained.output
    model_file = tmp_path / "cell" / "model" / "model.keras"
    image = sorted((synth_data / "ct" / "COVID").glob("*.png"))[0]
    # predict and explain are given no lever: the model file carries them.
    predicted = runner.invoke(main, base + ["predict", str(image), "--model-uri", str(model_file),
                                            "--out", str(tmp_path / "p.csv")])
    assert predicted.exit_code == 0, predicted.output
    explained = runner.invoke(main, base + ["explain", str(image), "--model-uri", str(model_file),
                                            "--out", str(tmp_path / "cams")])
    assert explained.exit_code == 0, explained.output
    assert list((tmp_path / "cams").glob("*.png"))

    model = keras.saving.load_model(model_file)
    assert [layer.name for layer in model.layers[1:3]] == ["body_crop", "normalize"]
    x = image_from_bytes(image.read_bytes(), model.input_shape[1])[None] / 255.0  # custom CNN: rescale
    direct = float(model.predict(x, verbose=0)[0, 1])
    got = float(pd.read_csv(tmp_path / "p.csv")["p_covid"].iloc[0])
    assert got == pytest.approx(direct, abs=1e-5)
    cam = GradCam(model)(x)
    assert cam.heatmaps.shape == (1, *model.input_shape[1:3]) and np.isfinite(cam.heatmaps).all()


def test_resume_restores_a_model_with_crop_and_normalize(tmp_path):
    """The levers hold no weights: a checkpoint's weights and Adam's state go back into the rebuilt model."""
    from covidtl.models.registry import build_model
    from covidtl.train import Resume, fit, plan_run
    from helpers_train import make_workdir

    cfg, _ = make_workdir(tmp_path, **{"train.max_epochs": 1, "train.crop": "body", "train.normalize": "standardize"})
    plan = plan_run(cfg, "custom_cnn", "random", "tiny", out_dir=tmp_path / "cell")
    donor = build_model(plan.spec, "random", cfg.train, plan.image_size)
    assert [layer.name for layer in donor.layers[1:3]] == ["body_crop", "normalize"]
    donor.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy")
    x = synthetic_scan()[None].repeat(2, axis=0)
    donor.train_on_batch(x, keras.utils.to_categorical([0, 1], 2))
    donor.save(tmp_path / "epoch-0001.keras")
    resume = Resume(run_id="r", epochs_done=1, history={"loss": [0.7]}, stopped_epoch=None, seconds=1.0,
                    model_file=tmp_path / "epoch-0001.keras")
    net = build_model(plan.spec, "random", cfg.train, plan.image_size)
    fit(plan, net, None, None, run_id="r", resume=resume)
    np.testing.assert_allclose(net.predict(x, verbose=0), donor.predict(x, verbose=0), atol=1e-6)


def test_grad_cam_maps_go_back_onto_the_body_box():
    """With train.crop the map is made in the cropped frame; explain overlays it where the body is."""
    from covidtl.config import load_config
    from covidtl.explain import uncrop
    from covidtl.models.registry import build_model, get_spec

    cfg = load_config(ROOT / "params.yaml", {"train.crop": "body"})
    model = build_model(get_spec("custom_cnn"), "random", cfg.train, SIZE)
    gradcam = GradCam(model)
    assert gradcam.crop is model.get_layer("body_crop")
    box = keras.ops.convert_to_numpy(gradcam.crop.boxes(synthetic_scan()[None]))
    heat = uncrop(np.ones((1, SIZE, SIZE), dtype="float32"), box)[0]
    top, bottom, left, right = np.round(box[0]).astype(int)
    assert heat[top:bottom + 1, left:right + 1].min() == pytest.approx(1.0)
    assert heat.sum() == pytest.approx((bottom - top + 1) * (right - left + 1), rel=1e-4)
    assert gradcam(synthetic_scan()[None]).heatmaps.shape == (1, SIZE, SIZE)
