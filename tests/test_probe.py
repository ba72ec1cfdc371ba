"""The shortcut probe: masks hide what they say, a model that reads a border marker is flagged, and
its verdict reaches the files, the model's MLflow run and the model card."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from covidtl import probe as pr
from covidtl.cards import card_markdown, model_card, write_cards
from covidtl.cells import Cell
from covidtl.cli import main
from covidtl.paths import CLASSES
from covidtl.train import RunOptions, plan_run, train
from helpers_train import make_workdir

SIZE = 40  # the masks' pixel checks


def ramp(n: int = 2, size: int = SIZE) -> np.ndarray:
    """(n, size, size, 3) images where every pixel differs from its neighbours (1 + row*size + col)."""
    one = 1.0 + np.arange(size * size, dtype="float32").reshape(size, size)
    return np.repeat(np.repeat(one[None, ..., None], 3, axis=-1), n, axis=0)


# --------------------------------------------------------------------------- masks


def test_hiding_the_lungs_blacks_the_central_box_and_keeps_the_rest():
    images = ramp()
    hidden = pr.hide_lungs(images)
    inside = pr.lung_mask(SIZE)
    assert inside.mean() == pytest.approx(0.64, abs=0.01)
    assert (hidden[:, inside] == 0).all()
    assert np.array_equal(hidden[:, ~inside], images[:, ~inside])


def test_blurring_the_lungs_leaves_block_means_and_keeps_the_rest():
    images = ramp()
    blurred = pr.blur_lungs(images, blocks=4)
    inside = pr.lung_mask(SIZE)
    assert np.array_equal(blurred[:, ~inside], images[:, ~inside])
    values = np.unique(blurred[0, inside][:, 0])
    assert len(values) == 16  # 4 x 4 flat blocks: no structure left inside
    assert blurred[:, inside].mean() == pytest.approx(images[:, inside].mean(), rel=1e-5)


def test_border_only_keeps_the_outer_band_and_blacks_the_lungs():
    images = ramp()
    kept = pr.keep_border(images)
    band = pr.border_mask(SIZE)
    assert np.array_equal(kept[:, band], images[:, band])
    assert (kept[:, ~band] == 0).all()
    assert not (pr.lung_mask(SIZE) & band).any()  # the band shows nothing of the lung region


def test_centre_only_keeps_the_lungs_and_blacks_corners_and_edges():
    images = ramp()
    kept = pr.keep_centre(images)
    inside = pr.lung_mask(SIZE)
    assert np.array_equal(kept[:, inside], images[:, inside])
    assert (kept[:, ~inside] == 0).all()


def test_shrinking_keeps_the_centre_in_place_and_shifting_moves_every_pixel():
    images = np.zeros((1, SIZE, SIZE, 3), dtype="float32")
    images[0, SIZE // 2 - 2:SIZE // 2 + 2, SIZE // 2 - 2:SIZE // 2 + 2] = 255
    images[0, 0, 0] = 100  # a corner marker
    small = pr.shrink(images, 0.8)
    assert small[0, SIZE // 2, SIZE // 2, 0] == 255 and small[0, 0, 0, 0] == 0
    assert small[0, 4, 4, 0] == 100  # the corner moved in by (1 - 0.8) / 2 of the side
    moved = pr.shift(images, 0.1)
    assert moved[0, 4, 4, 0] == 100 and (moved[0, :4] == 0).all() and (moved[0, :, :4] == 0).all()


def test_grad_cam_weight_outside_the_lungs():
    maps = np.zeros((3, SIZE, SIZE))
    maps[0][pr.lung_mask(SIZE)] = 1.0  # all inside
    maps[1][~pr.lung_mask(SIZE)] = 1.0  # all outside
    maps[2] = 1.0  # even: the outside share of the area
    share = pr.outside_share(maps)
    assert share[0] == 0 and share[1] == 1 and share[2] == pytest.approx(1 - pr.lung_mask(SIZE).mean())
    assert np.isnan(pr.outside_share(np.zeros((1, SIZE, SIZE)))[0])


def test_a_two_by_two_map_always_puts_the_area_share_outside():
    """Why the probe ignores Grad-CAM weight for 2x2 feature maps (the custom CNN at 200 px)."""
    import tensorflow as tf

    coarse = np.random.default_rng(0).random((5, 2, 2, 1)).astype("float32")
    maps = tf.image.resize(coarse, (SIZE, SIZE), method="bilinear").numpy()[..., 0]
    expected = 1 - pr.lung_mask(SIZE).mean()
    assert np.allclose(pr.outside_share(maps), expected, atol=1e-3)


# --------------------------------------------------------------------------- the verdict rule


def table_of(**aucs) -> pd.DataFrame:
    """A variant table: name=(auc, ci_low, ci_high)."""
    what = {v.name: v.what for v in pr.VARIANTS}
    return pd.DataFrame([{"variant": n, "what": what[n], "roc_auc": a, "roc_auc_ci_low": lo,
                          "roc_auc_ci_high": hi} for n, (a, lo, hi) in aucs.items()])


def test_a_model_that_separates_with_the_lungs_hidden_is_flagged_with_its_figures():
    judged = pr.verdict(table_of(original=(0.99, 0.97, 1.0), lungs_black=(0.91, 0.80, 0.98),
                                 border_only=(0.60, 0.40, 0.80)), outside_mass=0.30)
    assert judged["shortcut_risk"] is True
    assert "would likely fail on X-rays from elsewhere" in judged["sentence"]
    assert "0.910 [0.800, 0.980]" in judged["sentence"] and "0.600" not in judged["sentence"]


def test_grad_cam_weight_mostly_outside_the_lungs_is_flagged_alone():
    judged = pr.verdict(table_of(lungs_black=(0.55, 0.35, 0.75)), outside_mass=0.62)
    assert judged["shortcut_risk"] is True and "62% of its Grad-CAM weight" in judged["sentence"]


@pytest.mark.parametrize("auc", [(0.80, 0.45, 0.98), (0.70, 0.55, 0.85)])
def test_an_auc_that_does_not_clear_both_bars_is_not_flagged(auc):
    judged = pr.verdict(table_of(lungs_black=auc), outside_mass=0.40)
    assert judged["shortcut_risk"] is False
    assert "does not show it works on X-rays from elsewhere" in judged["sentence"]


def test_class_table_shows_how_one_class_moves():
    y = np.array([0, 0, 1, 1])
    table = pr.class_table(y, {"original": np.array([0.1, 0.2, 0.9, 0.8]),
                               "lungs_black": np.array([0.9, 0.8, 0.9, 0.8])})
    row = table[(table["variant"] == "lungs_black") & (table["class"] == CLASSES[0])].iloc[0]
    assert row["mean_change"] == pytest.approx(0.7) and row["called_covid"] == 1.0
    assert row["images"] == 2


# --------------------------------------------------------------------------- a trained model


def write_xray_like(root: Path, per_class: int, marker: bool, seed: int, size: int = 64) -> list[Path]:
    """A grey body with two dark lung fields of noise; both classes' lungs alike. marker=True: COVID
    images also carry a bright square in the top-left corner (a collection's text marker);
    marker=False: COVID lungs hold a bright opacity instead, the only difference."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - size / 2) / (0.46 * size)) ** 2 + ((xx - size / 2) / (0.40 * size)) ** 2 <= 1
    files = []
    for label, folder in (("covid", "COVID"), ("non_covid", "non-COVID")):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.where(body, 150, 20).astype("float32") + rng.normal(0, 12, (size, size))
            for cx in (0.33 * size, 0.67 * size):
                lung = ((yy - size / 2) / (0.30 * size)) ** 2 + ((xx - cx) / (0.13 * size)) ** 2 <= 1
                img[lung] = 60 + rng.normal(0, 15, lung.sum())
            if label == "covid" and marker:
                img[1:6, 1:6] = 255
            if label == "covid" and not marker:
                img[size // 2 - 6:size // 2 + 6, int(0.33 * size) - 4:int(0.33 * size) + 4] = 230
            path = root / folder / f"{folder} ({i + 1}).png"
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
            files.append(path)
    return files


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the module: a fresh sqlite store costs ~20 s of migrations."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def trained(tmp: Path, marker: bool):
    cfg, table = make_workdir(tmp, files=write_xray_like(tmp / "images", 12, marker, seed=int(marker)), **{
        "train.max_epochs": 4, "train.stop.val_loss": -1.0, "train.head_units": 32,
        "train.bn_recalibration_batches": 2, "eval.bootstrap": 200,
        # The marker stays in its corner: no geometric augmentation.
        "augment.horizontal_flip": False, "augment.zoom": 0.0, "augment.rotation": 0,
    })
    result = train(plan_run(cfg, "custom_cnn", "random", "tiny", out_dir=tmp / "cell"), RunOptions(log_model=False))
    return cfg, table, result


def test_a_model_that_reads_a_border_marker_is_flagged_logged_and_carded(tmp_path, monkeypatch, store):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    cfg, _, result = trained(tmp_path, marker=True)
    assert result.metrics["test_roc_auc"] > 0.9, result.metrics  # it learnt the marker
    cell = Cell(tmp_path / "cell")
    # The cell's config.yaml is a params file: the probe reads the same dataset as training did.
    # Every image (--split all): a test split of a few images would leave the intervals wide.
    out = CliRunner().invoke(main, ["--params", str(cell.config_file), "probe", "--model-uri", str(cell.dir),
                                    "--data", "tiny", "--split", "all"])
    assert out.exit_code == 0, out.output
    assert "shortcut_risk: true" in out.output
    files = {p.name for p in cell.probe_dir.iterdir()}
    assert {"probe.csv", "probe_classes.csv", "probe.json", "probe.png"} <= files
    assert not any(name.startswith(".") or "tmp" in name for name in files)  # nothing half-written
    table = pd.read_csv(cell.probe_dir / "probe.csv").set_index("variant")
    assert table.loc["lungs_black", "roc_auc"] > 0.75 and table.loc["lungs_black", "roc_auc_ci_low"] > 0.5
    assert table.loc["border_only", "roc_auc"] > 0.75
    saved = json.loads((cell.probe_dir / "probe.json").read_text())
    assert saved["shortcut_risk"] is True and saved["images"] == table["images"].iloc[0]
    # The custom CNN's 2x2 feature map cannot place weight inside or outside the lungs.
    assert saved["gradcam_outside_lungs"] is None and "too coarse" in saved["gradcam_note"]

    run = mlflow.get_run(result.run_id)
    assert run.data.metrics["probe_auc_lungs_black"] == pytest.approx(table.loc["lungs_black", "roc_auc"])
    assert run.data.metrics["probe_shortcut_risk"] == 1.0 and run.data.tags["shortcut_risk"] == "true"
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id, "probe")}
    assert "probe/probe.png" in logged and "probe/probe.csv" in logged

    row = {"dataset": "tiny", "model": "custom_cnn", "init": "random", "split_strategy": "grouped",
           **result.metrics}
    card = model_card(cfg, cell, row, {})
    assert card["shortcut_risk"] is True
    assert any("would likely fail on X-rays from elsewhere" in f and "(figure: cell-probe.png)" in f
               for f in card["failure_modes"])
    written = write_cards([card], tmp_path / "reports", tmp_path)
    figure = tmp_path / "reports" / "cards" / card["shortcut_probe"]["figure"]
    assert figure in written and figure.read_bytes() == (cell.probe_dir / "probe.png").read_bytes()
    assert f"]({figure.name})" in card_markdown(card)


def test_a_model_that_reads_the_lungs_is_not_flagged(tmp_path, monkeypatch, store):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    cfg, _, result = trained(tmp_path, marker=False)
    assert result.metrics["test_roc_auc"] > 0.9, result.metrics
    probed = pr.probe(cfg, str(tmp_path / "cell"), "tiny", "all", out=tmp_path / "probe", log=False)
    table = probed.table.set_index("variant")
    assert table.loc["centre_only", "roc_auc"] > 0.9  # the opacity is what it reads
    assert probed.verdict["shortcut_risk"] is False, (probed.verdict, probed.table)
    card = model_card(cfg, Cell(tmp_path / "cell"), {"dataset": "tiny", "model": "custom_cnn",
                                                       "init": "random", **result.metrics}, {})
    assert card["shortcut_risk"] is None  # its probe went elsewhere: this cell was never probed


def test_a_model_outside_a_cell_needs_out_and_a_missing_one_is_named(tmp_path):
    missing = CliRunner().invoke(main, ["probe", "--model-uri", str(tmp_path / "cell"), "--data", "xray"])
    assert missing.exit_code == 2 and f"{tmp_path / 'cell'}: no such file" in missing.output
    (tmp_path / "model.keras").write_bytes(b"")  # the check happens before any model is read
    out = CliRunner().invoke(main, ["probe", "--model-uri", str(tmp_path / "model.keras"), "--data", "xray"])
    assert out.exit_code == 2 and "give --out" in out.output


# --------------------------------------------------------------------------- a cross-validated recipe


def test_pooled_grad_cam_weighs_each_fold_by_its_images():
    def part(value: float, labels: list[int], shares: list[float]):
        cams = pr.CamSummary(grid=(4, 4), shares=np.array(shares))
        for index in set(labels):
            cams.mean_map[CLASSES[index]] = np.full((2, 2), value)
            cams.samples[CLASSES[index]] = [(None, None, value)]
        return cams, np.array(labels)

    pooled = pr.pool_cams([part(1.0, [0, 1, 1], [0.2, 0.4, 0.6]), part(4.0, [1], [np.nan])], samples=3)
    assert pooled.mean_map[CLASSES[1]] == pytest.approx(np.full((2, 2), 2.0))  # (2 x 1 + 1 x 4) / 3
    assert pooled.mean_map[CLASSES[0]] == pytest.approx(np.full((2, 2), 1.0))
    assert pooled.outside_all == pytest.approx(0.4) and pooled.outside[CLASSES[1]] == pytest.approx(0.5)
    assert [p for _, _, p in pooled.samples[CLASSES[1]]] == [1.0, 4.0]
    coarse = pr.pool_cams([(pr.CamSummary(note="too coarse"), np.array([0]))], samples=3)
    assert coarse.outside_all is None and coarse.note == "too coarse"


def test_a_cross_validated_recipe_is_probed_fold_by_fold_and_judged_once(tmp_path, monkeypatch, store):
    from sklearn.metrics import roc_auc_score

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    files = write_xray_like(tmp_path / "images", 18, marker=True, seed=1)
    _, table = make_workdir(tmp_path, files=files)
    manifest = table.drop(columns="split").assign(dhash=table["sha256"].str[:16])
    manifest.to_csv(tmp_path / "data" / "tiny" / "manifest.csv", index=False)
    settings = ["--params", str(Path(__file__).parents[1] / "params.yaml"),
                "-S", f"data.workdir={tmp_path / 'data'}", "-S", f"data.datasets.tiny.path={tmp_path / 'images'}",
                "-S", f"cv.out={tmp_path / 'cv'}", "-S", "train.batch_size=8", "-S", "train.stop.val_loss=-1",
                "-S", "train.head_units=32", "-S", "train.bn_recalibration_batches=2", "-S", "eval.bootstrap=200",
                "-S", "augment.horizontal_flip=false", "-S", "augment.zoom=0", "-S", "augment.rotation=0"]
    ran = CliRunner().invoke(main, settings + ["cv", "--model", "custom_cnn", "--dataset", "tiny", "--folds", "3",
                                               "--epochs", "4", "--no-prepare"])
    assert ran.exit_code == 0, ran.output
    cv_dir = tmp_path / "cv" / "tiny" / "custom_cnn-random-tiny"

    out = CliRunner().invoke(main, settings + ["probe", "--cv", str(cv_dir)])
    assert out.exit_code == 0, out.output
    saved = json.loads((cv_dir / "probe" / "probe.json").read_text())
    tested = [int((pd.read_csv(cv_dir / f"fold-{k}" / "split.csv")["split"] == "test").sum()) for k in (1, 2, 3)]
    assert [f["images"] for f in saved["folds"]] == tested and saved["images"] == sum(tested) == len(files)
    variants = pd.read_csv(cv_dir / "probe" / "probe.csv")
    assert (variants["images"] == len(files)).all()  # every image once, by the fold that held it out
    # The original images score as the cv scored them out of fold.
    pooled = pd.read_csv(cv_dir / "predictions.csv")
    original = variants.set_index("variant").loc["original"]
    assert original["roc_auc"] == pytest.approx(roc_auc_score(pooled["actual"] == "covid", pooled["p_covid"]), abs=1e-3)
    judged = pr.verdict(variants, saved["gradcam_outside_lungs"])
    assert saved["shortcut_risk"] == judged["shortcut_risk"] and saved["sentence"] == judged["sentence"]
    assert f"shortcut_risk: {str(judged['shortcut_risk']).lower()}" in out.output
    parent = json.loads((cv_dir / "summary.json").read_text())["run_id"]
    assert mlflow.get_run(parent).data.metrics["probe_shortcut_risk"] == float(judged["shortcut_risk"])

    table = CliRunner().invoke(main, settings + ["results"])
    assert table.exit_code == 0, table.output
    row = next(line for line in table.output.splitlines() if line.startswith("| custom_cnn-random-tiny "))
    assert row.rstrip(" |").endswith("shortcut risk" if judged["shortcut_risk"] else "no sign found")

    both = CliRunner().invoke(main, settings + ["probe", "--cv", str(cv_dir), "--data", "tiny"])
    assert both.exit_code == 2 and "drop --model-uri, --data and --split" in both.output
    neither = CliRunner().invoke(main, settings + ["probe"])
    assert neither.exit_code == 2 and "give --model-uri and --data" in neither.output
