"""`covidtl predict`: new images scored as training reads them; bad files listed, the rest scored."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from covidtl.cli import main
from covidtl.evaluate import evaluate
from covidtl.train import RunOptions, plan_run, train
from helpers_train import make_workdir

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(tmp, cfg, TrainResult, tracking URI): the custom CNN after one epoch on tiny PNGs."""
    tmp = tmp_path_factory.mktemp("predict")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        cfg, table = make_workdir(tmp)
        result = train(plan_run(cfg, "custom_cnn", "random", "tiny", out_dir=tmp / "cell"), RunOptions(log_model=False))
    return tmp, cfg, result, uri, table


@pytest.fixture(autouse=True)
def _track(trained, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained[3])


def cli(tmp: Path, *args: str):
    return CliRunner().invoke(main, ["--params", str(ROOT / "params.yaml"),
                                     "-S", f"data.workdir={tmp / 'data'}", *args])


@pytest.fixture
def folder(trained, tmp_path) -> Path:
    """Four real PNGs, one in a subfolder, one named with spaces and brackets, and a corrupt file."""
    tmp = trained[0]
    out = tmp_path / "new scans"
    (out / "ward b").mkdir(parents=True)
    images = sorted((tmp / "images" / "COVID").glob("*.png"))[:2] + sorted(
        (tmp / "images" / "non-COVID").glob("*.png"))[:2]
    for i, src in enumerate(images):
        shutil.copy(src, (out / "ward b" if i == 3 else out) / src.name)
    (out / "broken.png").write_bytes(b"this is not a PNG")
    return out


def test_folder_with_a_corrupt_file_scores_the_rest_as_csv_and_json(trained, folder, tmp_path):
    tmp, _, result, _, _ = trained
    card = json.loads((tmp / "cell" / "model" / "card.json").read_text())
    threshold = card["operating_point"]["threshold"]
    for out in (tmp_path / "p.csv", tmp_path / "p.json"):
        run = cli(tmp, "predict", str(folder), "--model-uri", str(tmp / "cell"), "--out", str(out))
        assert run.exit_code == 0, run.output
        assert "broken.png" in run.output and "not an image" in run.output
        assert "4 images scored" in run.output and "1 unreadable file" in run.output
    table = pd.read_csv(tmp_path / "p.csv")
    assert list(table.columns) == ["file", "p_covid", "label", "error"]
    assert len(table) == 5
    bad = table[table["file"].str.endswith("broken.png")]
    assert bad["p_covid"].isna().all() and bad["error"].str.contains("not an image").all()
    good = table.drop(bad.index)
    assert good["error"].isna().all() and good["p_covid"].between(0, 1).all()
    assert (good["label"] == np.where(good["p_covid"] >= threshold, "covid", "non_covid")).all()
    assert any("ward b" in f for f in good["file"])  # subfolders are read too
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["threshold"] == pytest.approx(threshold)
    rows = {r["file"]: r for r in data["predictions"]}
    assert set(rows) == set(table["file"])
    for row in good.itertuples():
        assert rows[row.file]["p_covid"] == pytest.approx(row.p_covid, abs=1e-6)
    assert rows[bad["file"].iloc[0]]["p_covid"] is None


def test_predict_gives_evaluates_probabilities_for_the_same_files(trained, tmp_path):
    tmp, cfg, result, _, table = trained
    evaluate(cfg, str(result.model_path), "tiny", split="all", out_dir=tmp_path / "eval")
    # evaluate scores the split table's rows in order: its predictions.csv is aligned with them.
    expected = pd.read_csv(tmp_path / "eval" / "predictions.csv")["p_covid"].to_numpy()
    files = table["path"].tolist()
    run = cli(tmp, "predict", *files, "--model-uri", str(result.model_path),
              "--out", str(tmp_path / "p.csv"))
    assert run.exit_code == 0, run.output
    got = pd.read_csv(tmp_path / "p.csv").set_index("file").loc[files, "p_covid"].to_numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_bad_arguments_are_one_line(trained, folder, tmp_path):
    tmp = trained[0]
    missing = cli(tmp, "predict", str(tmp_path / "nowhere"), "--model-uri", str(tmp / "cell"))
    wrong_out = cli(tmp, "predict", str(folder), "--model-uri", str(tmp / "cell"),
                    "--out", str(tmp_path / "p.txt"))
    no_model = cli(tmp, "predict", str(folder), "--model-uri", str(tmp_path / "none.keras"))
    for run, words in ((missing, "no such file or folder"), (wrong_out, ".csv or a .json"),
                       (no_model, "no such file")):
        assert run.exit_code == 2, run.output
        assert words in run.output and "Traceback" not in run.output
    assert not (tmp_path / "p.txt").exists()


def test_a_model_holding_python_code_is_refused_in_safe_mode(trained, folder, tmp_path):
    """Keras' safe mode: a Lambda layer's code never runs on load; one clear line instead."""
    tmp = trained[0]
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs), name="custom_cnn_random")
    model.save(tmp_path / "lambda.keras")
    run = cli(tmp, "predict", str(folder), "--model-uri", str(tmp_path / "lambda.keras"))
    assert run.exit_code == 2
    lines = run.output.strip().splitlines()
    assert len(lines) == 1 and "refused" in lines[0] and "Lambda" in lines[0], run.output


def test_an_unwritable_out_is_one_line(trained, folder, tmp_path):
    """--out under a plain file (as root, the one unwritable place without dropping privileges)."""
    tmp = trained[0]
    (tmp_path / "a-file").write_text("not a folder")
    run = cli(tmp, "predict", str(folder), "--model-uri", str(tmp / "cell"),
              "--out", str(tmp_path / "a-file" / "p.csv"))
    assert run.exit_code == 2 and "cannot write" in run.output and "Traceback" not in run.output
    assert (tmp_path / "a-file").read_text() == "not a folder"
