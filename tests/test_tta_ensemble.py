"""Test-time augmentation and ensembles travel with the model: the saved .keras file averages
itself, so evaluate, predict, the served model and Grad-CAM apply it without being told."""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from covidtl.cli import main
from covidtl.data.pipeline import image_from_bytes
from covidtl.evaluate import PYFUNC_CARD_KEY, PYFUNC_WRAPPER_KEY, evaluate, load_trained
from covidtl.explain import GradCam, NetworkCam
from covidtl.paths import CLASSES, POSITIVE
from covidtl.models.wrappers import CentreZoom, is_ensemble, networks_of, tta_of, unwrap, with_tta
from covidtl.tracking import config_yaml, experiment_name
from covidtl.train import RunOptions, plan_run, train
from helpers_train import make_workdir

TOL = 1e-5
POSITIVE_INDEX = CLASSES.index(POSITIVE)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(tmp, cfg, tracking URI, plain TrainResult, flip TrainResult): two custom CNNs after one
    epoch on tiny PNGs, one saved plain, one with train.tta=flip (another seed)."""
    tmp = tmp_path_factory.mktemp("tta")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        # No bootstrap intervals and few BatchNorm batches: nothing here measures them, and they
        # cost most of each run's time.
        cfg, _ = make_workdir(tmp, **{"eval.bootstrap": 0, "train.bn_recalibration_batches": 2})
        plain = train(plan_run(cfg, "custom_cnn", "random", "tiny", out_dir=tmp / "plain"), RunOptions(log_model=False))
        flip_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, tta="flip", seed=1))
        flip = train(plan_run(flip_cfg, "custom_cnn", "random", "tiny", out_dir=tmp / "flip"),
                     RunOptions(log_model=False))
    # The resolved config as the CLI's params file: it names the tiny dataset.
    (tmp / "params.yaml").write_text(config_yaml(cfg))
    return tmp, cfg, uri, plain, flip


@pytest.fixture(autouse=True)
def _track(trained, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained[2])


def cli(tmp: Path, *args: str):
    return CliRunner().invoke(main, ["--params", str(tmp / "params.yaml"), *args])


def images(tmp: Path, n: int = 2) -> list[Path]:
    return sorted((tmp / "images" / "COVID").glob("*.png"))[:n] + sorted(
        (tmp / "images" / "non-COVID").glob("*.png"))[:n]


def model_inputs(files: list[Path]) -> np.ndarray:
    """As predict reads them: training's decode at 200 px, then the custom CNN's rescale."""
    return np.stack([image_from_bytes(f.read_bytes(), 200) for f in files]) / 255.0


def p_covid(model, x) -> np.ndarray:
    return np.asarray(model(np.asarray(x, dtype="float32"), training=False))[:, POSITIVE_INDEX]


def test_a_flip_tta_model_is_the_mean_of_its_network_on_the_image_and_its_mirror(trained):
    tmp, *_ = trained
    loaded = load_trained(str(tmp / "flip"))  # read back from model.keras: the wrapper was saved
    assert tta_of(loaded.model) == "flip" and not is_ensemble(loaded.model)
    assert json.loads((tmp / "flip" / "model" / "card.json").read_text())["tta"] == "flip"
    net = unwrap(loaded.model)
    assert networks_of(loaded.model) == [net] and net.name == "custom_cnn"
    x = model_inputs(images(tmp))
    expected = (p_covid(net, x) + p_covid(net, x[:, :, ::-1, :])) / 2
    np.testing.assert_allclose(p_covid(loaded.model, x), expected, atol=TOL)
    assert np.abs(p_covid(net, x) - expected).max() > TOL  # the mirror view changes the answer


def test_flip_zoom_averages_four_views_and_round_trips(trained, tmp_path):
    tmp, *_ = trained
    net = load_trained(str(tmp / "plain")).model
    wrapped = with_tta(net, "flip_zoom")
    wrapped.save(tmp_path / "fz.keras")
    back = keras.models.load_model(tmp_path / "fz.keras", safe_mode=True, compile=False)
    x = model_inputs(images(tmp, 1)).astype("float32")
    zoom = np.asarray(CentreZoom()(x))
    views = [x, x[:, :, ::-1], zoom, zoom[:, :, ::-1]]
    expected = np.mean([p_covid(net, v) for v in views], axis=0)
    np.testing.assert_allclose(p_covid(back, x), expected, atol=TOL)
    assert tta_of(back) == "flip_zoom"
    with pytest.raises(Exception, match="already averages over its flip_zoom views"):
        with_tta(back, "flip")


def test_train_scores_the_tta_model_it_saves(trained, tmp_path):
    tmp, cfg, _, _, flip = trained
    # evaluate's test predictions of the saved file are the ones training wrote for its run.
    evaluate(cfg, str(tmp / "flip"), "tiny", split="test", out_dir=tmp_path / "eval")
    scored = pd.read_csv(tmp_path / "eval" / "predictions.csv")["p_covid"].to_numpy()
    written = pd.read_csv(tmp / "flip" / "predictions.csv")["p_covid"].to_numpy()
    np.testing.assert_allclose(scored, written, atol=TOL)
    assert mlflow.get_run(flip.run_id).data.params["train.tta"] == "flip"


def test_predict_and_the_served_model_apply_tta_without_being_told(trained, tmp_path):
    from covidtl.serving.model import ImageModel

    tmp, *_ = trained
    files = images(tmp)
    net = unwrap(load_trained(str(tmp / "flip")).model)
    x = model_inputs(files)
    expected = (p_covid(net, x) + p_covid(net, x[:, :, ::-1, :])) / 2

    run = cli(tmp, "predict", *map(str, files), "--model-uri", str(tmp / "flip"), "--out", str(tmp_path / "p.csv"))
    assert run.exit_code == 0, run.output
    got = pd.read_csv(tmp_path / "p.csv").set_index("file").loc[list(map(str, files)), "p_covid"].to_numpy()
    np.testing.assert_allclose(got, expected, atol=TOL)

    served = ImageModel()  # what `mlflow models serve` runs, minus HTTP
    served.load_context(SimpleNamespace(artifacts={
        PYFUNC_WRAPPER_KEY: str(tmp / "flip" / "model" / "model.keras"),
        PYFUNC_CARD_KEY: str(tmp / "flip" / "model" / "card.json")}))
    answer = served.predict(None, pd.DataFrame({"image": [base64.b64encode(f.read_bytes()).decode() for f in files]}))
    np.testing.assert_allclose(answer["p_covid"].to_numpy(float), expected, atol=TOL)


def test_evaluate_tta_flip_on_a_plain_model_equals_the_tta_model(trained, tmp_path):
    tmp, cfg, *_ = trained
    # What train.tta=flip would have saved from the same weights.
    with_tta(load_trained(str(tmp / "plain")).model, "flip").save(tmp_path / "flip.keras")
    shutil.copy(tmp / "plain" / "model" / "card.json", tmp_path / "card.json")
    outs = {}
    for name, args in {"plain": [str(tmp / "plain")], "tta": [str(tmp / "plain"), "--tta", "flip"],
                       "saved": [str(tmp_path / "flip.keras")]}.items():
        run = cli(tmp, "evaluate", "--model-uri", args[0], "--data", "tiny", "--split", "all",
                  "--out", str(tmp_path / name), *args[1:])
        assert run.exit_code == 0, run.output
        outs[name] = pd.read_csv(tmp_path / name / "predictions.csv")["p_covid"].to_numpy()
    np.testing.assert_allclose(outs["tta"], outs["saved"], atol=TOL)
    assert np.abs(outs["tta"] - outs["plain"]).max() > TOL
    run_ids = mlflow.search_runs(experiment_names=[experiment_name("tiny")], filter_string="tags.kind = 'evaluate' "
                                 "and params.tta_added = 'flip'")
    assert len(run_ids) == 1 and run_ids["params.tta"].iloc[0] == "flip"

    twice = cli(tmp, "evaluate", "--model-uri", str(tmp / "flip"), "--data", "tiny", "--tta", "flip")
    assert twice.exit_code == 2
    assert twice.output.strip().splitlines()[-1].startswith("Error: model 'custom_cnn_tta_flip' already averages")


@pytest.fixture(scope="module")
def ensemble(trained):
    """The CLI's ensemble of the plain model (by run id) and the flip model (by folder), its model
    logged to MLflow too (the default)."""
    tmp, _, uri, plain, _ = trained
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        run = cli(tmp, "ensemble", plain.run_id, str(tmp / "flip"), "--out", str(tmp / "ens"))
    assert run.exit_code == 0, run.output
    assert "ensemble of 2: test accuracy" in run.output
    return tmp / "ens"


def test_an_ensemble_of_two_models_is_their_mean_and_is_taken_like_any_model(trained, ensemble, tmp_path):
    tmp, cfg, _, plain, flip = trained
    loaded = load_trained(str(ensemble))
    assert is_ensemble(loaded.model) and len(networks_of(loaded.model)) == 2
    x = model_inputs(images(tmp))
    members = [load_trained(str(tmp / "plain")).model, load_trained(str(tmp / "flip")).model]
    expected = (p_covid(members[0], x) + p_covid(members[1], x)) / 2
    np.testing.assert_allclose(p_covid(loaded.model, x), expected, atol=TOL)

    card = json.loads((ensemble / "model" / "card.json").read_text())
    assert card["kind"] == "ensemble" and card["dataset"] == "tiny"
    assert [m["run_id"] for m in card["members"]] == [plain.run_id, flip.run_id]
    assert [m["tta"] for m in card["members"]] == ["none", "flip"]
    assert card["operating_point"]["chosen_on"] == "validation"
    assert loaded.operating_threshold == card["operating_point"]["threshold"]
    run = mlflow.get_run(card["run_id"])
    assert run.data.tags["kind"] == "ensemble"
    assert run.data.metrics["operating_threshold"] == pytest.approx(card["operating_point"]["threshold"])
    assert "test_roc_auc" in run.data.metrics
    logged = load_trained(run.data.tags["model_uri"])  # MLflow's copy loads with its layers too
    np.testing.assert_allclose(p_covid(logged.model, x), expected, atol=TOL)

    files = images(tmp)
    done = cli(tmp, "predict", *map(str, files), "--model-uri", str(ensemble), "--out", str(tmp_path / "p.csv"))
    assert done.exit_code == 0, done.output
    got = pd.read_csv(tmp_path / "p.csv").set_index("file").loc[list(map(str, files)), "p_covid"].to_numpy()
    np.testing.assert_allclose(got, expected, atol=TOL)
    # Its test figures are what evaluate measures of the saved file.
    evaluate(cfg, str(ensemble), "tiny", out_dir=tmp_path / "eval")
    np.testing.assert_allclose(pd.read_csv(tmp_path / "eval" / "predictions.csv")["p_covid"],
                               pd.read_csv(ensemble / "predictions.csv")["p_covid"], atol=TOL)


def _member_copy(source: Path, dest: Path, **card_changes) -> Path:
    shutil.copytree(source, dest)
    card_file = dest / "model" / "card.json"
    card_file.write_text(json.dumps({**json.loads(card_file.read_text()), **card_changes}))
    return dest


def test_mismatched_members_are_refused_in_one_line(trained, tmp_path):
    tmp, *_ = trained
    other_data = _member_copy(tmp / "plain", tmp_path / "xray", dataset="xray")
    other_prep = _member_copy(tmp / "plain", tmp_path / "resnet", model="resnet50", preprocessing="model")
    small = tmp_path / "small"
    inputs = keras.Input((64, 64, 3))
    out = keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(inputs))
    (small / "model").mkdir(parents=True)
    keras.Model(inputs, out, name="custom_cnn").save(small / "model" / "model.keras")
    shutil.copy(tmp / "plain" / "model" / "card.json", small / "model" / "card.json")
    for member, says in ((other_data, "was trained on xray"), (small, "takes 64 px images"),
                         (other_prep, "preprocesses as resnet50/model")):
        run = cli(tmp, "ensemble", str(tmp / "plain"), str(member), "--out", str(tmp_path / "e"), "--no-log-model")
        assert run.exit_code == 2, run.output
        lines = run.output.strip().splitlines()
        assert lines[-1].startswith(f"Error: member {member} {says}"), lines
        assert not (tmp_path / "e" / "model" / "model.keras").exists()
    one = cli(tmp, "ensemble", str(tmp / "plain"), "--out", str(tmp_path / "e"))
    assert one.exit_code == 2 and "at least two members" in one.output


def test_grad_cam_works_on_tta_and_ensemble_models(trained, ensemble, tmp_path):
    tmp, *_ = trained
    x = model_inputs(images(tmp)).astype("float32")
    flip = load_trained(str(tmp / "flip")).model
    cam = GradCam(flip)(x)
    np.testing.assert_allclose(cam.probs[:, POSITIVE_INDEX], p_covid(flip, x), atol=TOL)  # the whole model's answer
    inner = NetworkCam(unwrap(flip))(x, cam.class_index)
    np.testing.assert_allclose(cam.heatmaps, inner.heatmaps, atol=TOL)
    assert cam.heatmaps.shape == (len(x), 200, 200)

    ens = load_trained(str(ensemble)).model
    cam = GradCam(ens)(x, class_index=0)
    maps = [NetworkCam(net)(x, np.zeros(len(x), "int32")).heatmaps for net in networks_of(ens)]
    np.testing.assert_allclose(cam.heatmaps, np.mean(maps, axis=0), atol=TOL)
    assert (cam.class_index == 0).all() and 0 <= cam.heatmaps.min() and cam.heatmaps.max() <= 1

    for model in (tmp / "flip", ensemble):
        run = cli(tmp, "explain", *map(str, images(tmp, 1)), "--model-uri", str(model),
                  "--out", str(tmp_path / model.name))
        assert run.exit_code == 0, run.output
        assert len(list((tmp_path / model.name).glob("*-gradcam.png"))) == 2


def test_the_fold_models_of_a_cv_run_make_an_ensemble(trained, tmp_path):
    tmp, *_ = trained
    # A finished cv run's layout (covidtl.cv), its two "folds" the two trained cells.
    cv_dir = tmp_path / "cv"
    for k, cell in ((1, "plain"), (2, "flip")):
        shutil.copytree(tmp / cell, cv_dir / f"fold-{k}" / "cell")
    pooled = pd.concat([pd.read_csv(tmp / cell / "predictions.csv") for cell in ("plain", "flip")])
    pooled.to_csv(cv_dir / "predictions.csv", index=False)
    (cv_dir / "summary.json").write_text("{}")
    run = cli(tmp, "ensemble", "--cv", str(cv_dir), "--out", str(tmp_path / "ens"), "--no-log-model")
    assert run.exit_code == 0, run.output
    assert "test not scored" in run.output  # every image was in some fold's training data
    card = json.loads((tmp_path / "ens" / "model" / "card.json").read_text())
    assert [m["source"] for m in card["members"]] == [str(cv_dir / f"fold-{k}" / "cell") for k in (1, 2)]
    assert card["operating_point"]["chosen_on"] == "the cv run's pooled out-of-fold predictions"
    assert len(networks_of(load_trained(str(tmp_path / "ens")).model)) == 2
    not_cv = cli(tmp, "ensemble", "--cv", str(tmp / "plain"), "--out", str(tmp_path / "e2"))
    assert not_cv.exit_code == 2 and "not a finished `covidtl cv` run" in not_cv.output
