"""Grad-CAM: the map points at what the model uses, works for every architecture, and as a command."""

from __future__ import annotations

import io
import re
from pathlib import Path

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from covidtl.cli import main
from covidtl.config import load_config
from covidtl.evaluate import load_trained
from covidtl.explain import (
    GradCam,
    feature_split,
    grad_cam,
    load_image,
    overlay,
    sample_figure,
    write_png,
)
from covidtl.models.registry import MODELS, base_of, build_model, preprocess_for
from covidtl.paths import CLASSES
from covidtl.train import RunOptions, plan_run, train
from helpers_train import make_workdir

ROOT = Path(__file__).parents[1]
BACKGROUND = 30  # mean grey of the noise every synthetic image is made of
# The smallest inputs whose feature map is at least 2x2 (at 32 px a backbone's is 1x1, and a 1x1
# map is one flat value over the whole image: nothing spatial to check).
SPATIAL = {"custom_cnn": 200, "inceptionv3": 107}


def write_blob_images(root: Path, per_class: int, size: int = 64, seed: int = 0) -> list[Path]:
    """Noise for both classes; COVID images also hold a bright disc, always in the upper-left quadrant."""
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[:size, :size]
    files = []
    for label, folder in (("covid", "COVID"), ("non_covid", "non-COVID")):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 2 * BACKGROUND + 1, (size, size)).astype(np.uint8)
            if label == "covid":
                cy, cx = rng.integers(size // 8, size * 3 // 8, 2)
                img[(yy - cy) ** 2 + (xx - cx) ** 2 <= (size // 10) ** 2] = 220
            path = root / folder / f"{folder} ({i + 1}).png"
            Image.fromarray(img).save(path)
            files.append(path)
    return files


@pytest.fixture(scope="module")
def blob_model(tmp_path_factory):
    """(tmp, cfg, split table, LoadedModel): the custom CNN trained 8 epochs on the blob images."""
    tmp = tmp_path_factory.mktemp("explain")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        cfg, table = make_workdir(
            tmp, files=write_blob_images(tmp / "images", per_class=30), **{
                "train.max_epochs": 8, "train.stop.val_loss": -1.0,  # no early stop: a sure fit
                "train.head_units": 64, "train.bn_recalibration_batches": 4,
                # No flips: the disc stays in its one place (upper left).
                "augment.horizontal_flip": False, "augment.zoom": 0.0, "augment.rotation": 10,
            })
        result = train(plan_run(cfg, "custom_cnn", "random", "tiny", out_dir=tmp / "cell"), RunOptions(log_model=False))
    assert result.metrics["test_accuracy"] == 1.0, result.metrics
    return tmp, cfg, table, load_trained(str(tmp / "cell"), cfg)


def decoded(rows, size: int) -> np.ndarray:
    return np.stack([load_image(p, size) for p in rows["path"]])


def test_masking_the_top_of_the_map_lowers_the_probability_more_than_a_random_region(blob_model):
    _, _, table, loaded = blob_model
    cam = GradCam(loaded.model)
    size = cam.size[0]
    covid = table[(table["split"] != "train") & (table["label"] == "covid")]
    images = decoded(covid, size)  # float32 [0, 255], as training reads them
    first = cam(images / 255.0)
    assert (first.class_index == CLASSES.index("covid")).all()
    area = int(0.1 * size * size)
    side = int(round(area ** 0.5))
    rng = np.random.default_rng(0)
    top_drops, random_drops = [], []
    for image, heat, prob, c in zip(images, first.heatmaps, first.probs, first.class_index):
        top = heat >= np.sort(heat.ravel())[-area]  # the map's top 10% of pixels
        masked = [np.where(top[..., None], BACKGROUND, image)]
        for _ in range(5):  # squares of the same area, anywhere
            y, x = rng.integers(0, size - side + 1, 2)
            square = image.copy()
            square[y : y + side, x : x + side] = BACKGROUND
            masked.append(square)
        after = cam(np.stack(masked) / 255.0, class_index=int(c)).probs[:, c]
        top_drops.append(prob[c] - after[0])
        random_drops.append(prob[c] - after[1:].mean())
    top_mean, random_mean = float(np.mean(top_drops)), float(np.mean(random_drops))
    assert top_mean > random_mean + 0.25 and top_mean > 2 * random_mean, (top_drops, random_drops)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_grad_cam_works_for_every_architecture(name):
    """Untrained nets (random init): maps of the input size in [0, 1], finite, from the model's own
    forward pass; at least one of 4 images x 2 classes varies over the image (a random net may give
    a flat or all-zero map for a class)."""
    train_cfg = load_config(ROOT / "params.yaml", {"train.head_units": 16}).train
    size = SPATIAL.get(name, 64)
    keras.utils.set_random_seed(0)
    spec = MODELS[name]
    model = build_model(spec, "random", train_cfg, image_size=size)
    body, head = feature_split(model)
    expected = base_of(model) or [layer for layer in model.layers
                                  if isinstance(layer, keras.layers.SeparableConv2D)][-1]
    assert body[-1] is expected and head[-1] is model.layers[-1]
    assert any(isinstance(layer, keras.layers.Flatten) for layer in head)

    x = spec.preprocess_input(np.random.default_rng(0).uniform(0, 255, (4, size, size, 3)).astype("float32"))
    cam = GradCam(model)
    assert cam.forward.outputs[0].shape[1] >= 2  # a spatial feature map, not a single value
    results = [cam(x, class_index=c) for c in range(len(CLASSES))]
    np.testing.assert_allclose(results[0].probs, np.asarray(model(x, training=False)), atol=1e-5)
    maps = np.stack([r.heatmaps for r in results])
    assert maps.shape == (2, 4, size, size) and np.isfinite(maps).all()
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    assert (maps.std(axis=(2, 3)) > 1e-3).any()
    predicted = grad_cam(model, x)  # the default explains each image's predicted class
    chosen = results[0].probs.argmax(axis=1)
    np.testing.assert_allclose(predicted, maps[chosen, np.arange(4)], atol=1e-5)


def test_overlay_and_png(tmp_path):
    image = np.full((20, 30, 3), 100, np.uint8)
    heat = np.zeros((10, 15), np.float32)
    heat[:5, :5] = 1.0  # a smaller map is resized to the image
    rgb = overlay(image, heat)
    assert rgb.shape == (20, 30, 3) and rgb.dtype == np.uint8
    assert not np.array_equal(rgb[0, 0], rgb[-1, -1])  # hot and cold corners differ
    out = write_png(tmp_path / "deep" / "overlay.png", rgb)
    assert np.array_equal(np.asarray(Image.open(out)), rgb)
    assert [p.name for p in out.parent.iterdir()] == ["overlay.png"]  # no temporary name left


def cli_args(tmp: Path) -> list[str]:
    return ["--params", str(ROOT / "params.yaml"), "-S", f"data.workdir={tmp / 'data'}"]


def test_cli_explains_a_folder_and_lists_the_file_it_cannot_read(blob_model, tmp_path):
    tmp, _, table, _ = blob_model
    folder = tmp_path / "scans"
    (folder / "sub").mkdir(parents=True)
    picked = table[table["split"] == "test"].groupby("label").head(2)["path"]
    for path in picked:
        (folder / "sub" / Path(path).name).write_bytes(Path(path).read_bytes())
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("not an image file: ignored")
    out = tmp_path / "cams"
    result = CliRunner().invoke(main, cli_args(tmp) + [
        "explain", str(folder), "--model-uri", str(tmp / "cell"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in out.glob("*.png"))
    assert written == sorted(f"{Path(p).stem}-gradcam.png" for p in picked)
    for png in out.glob("*.png"):
        with Image.open(png) as im:
            assert im.size == (200, 200) and im.mode == "RGB"
    assert "broken.png" in result.output and "not an image: Pillow cannot identify" in result.output
    assert "notes.txt" not in result.output
    for path in picked:  # the model is right about every one, and says so in the table
        line = next(line for line in result.output.splitlines() if Path(path).name in line)
        p_covid, predicted = re.search(r"\s(\d\.\d{3})\s+(covid|non_covid)\s", line).groups()
        assert predicted == ("non_covid" if "non" in Path(path).parent.name else "covid")
        assert (float(p_covid) > 0.5) == (predicted == "covid")
    assert "4 overlays" in result.output and "1 unreadable file" in result.output

    again = CliRunner().invoke(main, cli_args(tmp) + [
        "explain", str(next(iter(picked))), "--model-uri", str(tmp / "cell"), "--out", str(out),
        "--class", "non_covid"])
    assert again.exit_code == 0 and "explaining class non_covid" in again.output


def test_cli_missing_model_or_no_images_is_one_line(blob_model, tmp_path):
    tmp, _, table, _ = blob_model
    image = table["path"].iloc[0]
    (tmp_path / "empty").mkdir()
    for args, words in (
        ([image, "--model-uri", str(tmp_path / "none.keras")], "no such file"),
        ([str(tmp_path / "empty"), "--model-uri", str(tmp / "cell")], "no image files"),
        ([str(tmp_path / "nowhere.png"), "--model-uri", str(tmp / "cell")], "no such file or folder"),
    ):
        bad = CliRunner().invoke(main, cli_args(tmp) + ["explain", *args, "--out", str(tmp_path / "o")])
        assert bad.exit_code == 2, bad.output
        assert bad.stderr.count("\n") == 1 and words in bad.stderr and "Traceback" not in bad.output
    assert not (tmp_path / "o").exists()


def panel_titles(fig) -> list[list[str]]:
    """Titles of the figure's panels, one list per row (TP, FP, TN, FN)."""
    titles = [ax.get_title() for ax in fig.axes]
    cols = len(titles) // 4
    return [titles[r * cols : (r + 1) * cols] for r in range(4)]


def test_sample_figure_shows_each_kind_present_and_says_which_are_absent(blob_model):
    _, _, table, loaded = blob_model
    rows = table[table["split"] == "test"].reset_index(drop=True)
    preprocess = preprocess_for(MODELS[loaded.name], loaded.preprocessing)
    prob = np.asarray(loaded.model(preprocess(decoded(rows, 200)), training=False))
    y_true = rows["label"].map(CLASSES.index).to_numpy()
    assert (prob.argmax(axis=1) == y_true).all()  # a perfect model: no false answers

    fig = sample_figure(loaded.model, preprocess, rows, y_true, prob, n_per_kind=2, seed=0)
    titles = panel_titles(fig)
    assert [sum("p_covid" in t for t in row) for row in titles] == [2, 0, 2, 0]
    assert titles[1][0] == "FP · none" and titles[3][0] == "FN · none"
    assert all(t.startswith("TP · p_covid") for t in titles[0])
    fig.savefig(io.BytesIO(), format="png")  # it renders

    # Two wrong labels make one false positive and one false negative.
    flipped = y_true.copy()
    wrong = [int(np.flatnonzero(y_true == 1)[0]), int(np.flatnonzero(y_true == 0)[0])]
    flipped[wrong] = 1 - flipped[wrong]
    fig = sample_figure(loaded.model, preprocess, rows, flipped, prob, n_per_kind=2, seed=0)
    titles = panel_titles(fig)
    assert [sum("p_covid" in t for t in row) for row in titles] == [2, 1, 2, 1]
    assert Path(rows["path"][wrong[0]]).name in titles[1][0]  # the covid image called non-covid
    assert Path(rows["path"][wrong[1]]).name in titles[3][0]
    same = panel_titles(sample_figure(loaded.model, preprocess, rows, flipped, prob, n_per_kind=2, seed=0))
    assert same == titles  # a fixed, seeded sample
