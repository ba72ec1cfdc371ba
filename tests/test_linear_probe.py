"""The linear probe cell: C chosen inside the training rows only, a Keras model like any other's."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from covidtl import linear_probe
from covidtl.cli import main
from covidtl.evaluate import evaluate, load_trained
from covidtl.frozen import FrozenTraining
from covidtl.predict import predict_files
from covidtl.train import plan_run, train
from helpers_train import make_workdir
from test_frozen import donor_file
from test_serve import free_port, post, stop

ROOT = Path(__file__).parents[1]
PROBE = {"train.head": "linear_probe", "train.image_size.vgg16": 32, "train.linear_probe.folds": 3}


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """(tmp, cfg, TrainResult, tracking URI, the rows C selection saw): a VGG16 probe on tiny PNGs,
    its frozen base a weights file the test saved."""
    tmp = tmp_path_factory.mktemp("probe")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    seen: list[np.ndarray] = []
    real_select = linear_probe.select_c

    def spy(x, y, groups, *args, **kwargs):  # every row C selection is shown, by patient group
        seen.append(np.asarray(groups))
        return real_select(x, y, groups, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setattr(linear_probe, "select_c", spy)
        cfg, _ = make_workdir(tmp, **PROBE)
        init = str(donor_file(tmp, size=32))
        result = train(plan_run(cfg, "vgg16", init, "tiny", out_dir=tmp / "cell"))
    return tmp, cfg, result, uri, seen, init


@pytest.fixture(autouse=True)
def _track(probed, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", probed[3])


def test_c_is_chosen_on_training_rows_only(probed):
    tmp, cfg, result, _, seen, _ = probed
    table = pd.read_csv(tmp / "data" / "tiny" / "split.csv")
    train_groups = set(table.loc[table["split"] == "train", "group"])
    held_out = set(table.loc[table["split"] != "train", "group"])
    assert len(seen) == 1
    assert set(seen[0]) == train_groups and not set(seen[0]) & held_out
    assert len(seen[0]) == int((table["split"] == "train").sum())
    card = json.loads((tmp / "cell" / "model" / "card.json").read_text())
    assert card["head"] == "linear_probe" and card["linear_probe"]["c"] in cfg.train.linear_probe.c_grid
    assert len(card["linear_probe"]["search"]) == len(cfg.train.linear_probe.c_grid)
    assert result.epochs_used == 0 and card["selected_by"] == "linear_probe_grouped_cv"


def test_the_model_is_the_fitted_regression(probed):
    """The Dense(2) of the saved model gives the logistic regression's p(COVID), scaler folded in."""
    tmp, cfg, result, _, _, init = probed
    plan = plan_run(cfg, "vgg16", init, "tiny")
    loaded = load_trained(str(tmp / "cell"))
    frozen = FrozenTraining(plan, loaded.model, "base")
    rows = plan.rows("test")
    features = frozen.features(rows)
    _, _, prob = frozen.predict(rows)
    card = json.loads((tmp / "cell" / "model" / "card.json").read_text())
    train_rows = plan.train_rows
    fitted = linear_probe.fit(frozen.features(train_rows), (train_rows["label"] == "covid").astype(int),
                              train_rows["group"], [card["linear_probe"]["c"]], 3, cfg.train.seed)
    np.testing.assert_allclose(prob[:, 1], fitted.p_covid(features), atol=1e-5)
    predictions = pd.read_csv(tmp / "cell" / "predictions.csv")
    np.testing.assert_allclose(predictions["p_covid"], prob[:, 1], atol=1e-5)


def test_evaluate_and_predict_read_the_probe_like_any_model(probed):
    tmp, cfg, result, uri, _, _ = probed
    scored = evaluate(cfg, str(tmp / "cell"), "tiny", split="test", out_dir=tmp / "eval")
    assert scored.metrics == pytest.approx(result.metrics, nan_ok=True, abs=1e-6)
    files = sorted((tmp / "images" / "COVID").glob("*.png"))[:2]
    out = tmp / "predicted.csv"
    answer = CliRunner().invoke(main, ["--params", str(ROOT / "params.yaml"), "predict", *map(str, files),
                                       "--model-uri", str(tmp / "cell"), "--out", str(out)])
    assert answer.exit_code == 0, answer.output
    written = pd.read_csv(out)
    # The same images through the stored features: what the cell's predictions.csv is made of.
    _, _, prob = FrozenTraining(plan_run(cfg, "vgg16", probed[5], "tiny"), load_trained(str(tmp / "cell")).model,
                                "base").predict(pd.DataFrame({"path": list(map(str, files)), "label": "covid"}))
    np.testing.assert_allclose(written["p_covid"], prob[:, 1], atol=1e-5)


def test_the_served_probe_answers_as_predict_does(probed, tmp_path):
    tmp, _, result, uri, _, _ = probed
    name = "covidtl-probe"
    run = CliRunner().invoke(main, ["--params", str(ROOT / "params.yaml"), "-S", f"data.workdir={tmp / 'data'}",
                                    "register", str(tmp / "cell"), "--name", name, "--alias", "champion"])
    assert run.exit_code == 0, run.output
    port = free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    log = open(tmp_path / "server.log", "w")
    process = subprocess.Popen(
        [str(mlflow_cli), "models", "serve", "-m", f"models:/{name}@champion", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env={**os.environ, "MLFLOW_TRACKING_URI": uri,
             "PATH": f"{mlflow_cli.parent}{os.pathsep}{os.environ.get('PATH', '')}"},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-2000:]
            time.sleep(1)
        files = sorted((tmp / "images" / "non-COVID").glob("*.png"))[:3]
        rows = [[base64.b64encode(f.read_bytes()).decode("ascii")] for f in files]
        status, text = post(f"http://127.0.0.1:{port}/invocations",
                            json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode())
        assert status == 200, text
        served = [a["p_covid"] for a in json.loads(text)["predictions"]]
        expected = predict_files(load_trained(str(tmp / "cell")), files)
        np.testing.assert_allclose(served, [p.p_covid for p in expected], atol=1e-5)
    finally:
        stop(process)
        log.close()
    assert MlflowClient(uri).get_run(result.run_id).data.params["linear_probe_c"]


@pytest.mark.parametrize("model, init, needs", [
    ("custom_cnn", "random", "custom_cnn has no pre-trained base"),
    ("vgg16", "random", "--init random trains every layer"),
    ("vgg16", "finetune", "--init finetune trains every layer"),
])
def test_a_probe_without_frozen_pretrained_weights_is_one_line(probed, model, init, needs):
    tmp = probed[0]
    answer = CliRunner().invoke(main, [
        "--params", str(ROOT / "params.yaml"), "-S", f"data.workdir={tmp / 'data'}",
        "-S", f"data.datasets.tiny={{path: '{tmp / 'images'}', series: true}}",
        *[arg for key, value in PROBE.items() for arg in ("-S", f"{key}={value}")],
        "train", "--model", model, "--init", init, "--dataset", "tiny", "--out", str(tmp / "refused")])
    assert answer.exit_code != 0
    lines = [line for line in answer.output.strip().splitlines() if line]
    assert len(lines) == 1 and "train.head linear_probe: needs a frozen pre-trained base" in lines[0]
    assert needs in lines[0] and "Traceback" not in answer.output
    assert not (tmp / "refused" / "metrics.json").exists()
