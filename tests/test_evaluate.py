"""`covidtl evaluate`: a trained model scored on a dataset split or on any folder, as its own run."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from covidtl.cli import main
from covidtl.evaluate import evaluate
from covidtl.train import plan_run, train
from helpers_train import make_workdir

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(tmp, cfg, TrainResult, tracking URI): the custom CNN after one epoch on tiny PNGs."""
    tmp = tmp_path_factory.mktemp("evaluate")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        cfg, _ = make_workdir(tmp)
        result = train(plan_run(cfg, "custom_cnn", "random", "tiny", out_dir=tmp / "cell"))
    return tmp, cfg, result, uri


@pytest.fixture(autouse=True)
def _track(trained, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained[3])


def client(uri: str) -> MlflowClient:
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


def test_model_file_on_the_test_split_reproduces_the_training_scores(trained):
    tmp, cfg, result, uri = trained
    scored = evaluate(cfg, str(result.model_path), "tiny", split="test", out_dir=tmp / "eval")
    assert scored.metrics == pytest.approx(result.metrics, nan_ok=True)
    run = client(uri).get_run(scored.run_id)
    assert run.data.tags["kind"] == "evaluate"
    assert run.data.tags["source_run_id"] == result.run_id  # read from card.json beside the model
    assert (tmp / "eval" / "metrics.json").is_file() and (tmp / "eval" / "predictions.csv").is_file()


def test_run_uri_on_all_splits_logs_the_same_artifacts(trained):
    tmp, cfg, result, uri = trained
    scored = evaluate(cfg, f"runs:/{result.run_id}/model", "tiny", split="all")
    c = client(uri)
    run = c.get_run(scored.run_id)
    assert scored.images == 24
    assert {"all_accuracy", "all_roc_auc", "all_recall_covid", "all_f1_macro"} <= set(run.data.metrics)
    assert run.data.tags["model"] == "custom_cnn" and run.data.tags["cell"] == "custom_cnn-random-tiny"
    assert run.data.params["model_uri"] == f"runs:/{result.run_id}/model"
    artifacts = {a.path for a in c.list_artifacts(scored.run_id)}
    assert {"all_confusion_matrix.png", "all_confusion_matrix.json", "all_classification_report.txt",
            "predictions.csv", "config.yaml"} <= artifacts


def test_any_folder_is_ingested_on_the_fly(trained, shared_data, tmp_path):
    """Another hospital's data: a folder of class folders, here a few real CT slices."""
    tmp, cfg, result, uri = trained
    folder = tmp_path / "hospital-b"
    for name in ("COVID", "non-COVID"):
        (folder / name).mkdir(parents=True)
        for src in sorted((shared_data / "sarscov2-ct" / name).glob("*.png"))[:4]:
            shutil.copy(src, folder / name / src.name)
    (folder / "COVID" / "broken.png").write_bytes(b"not an image")
    scored = evaluate(cfg, str(tmp / "cell"), str(folder))
    assert scored.images == 8  # the broken file is quarantined by ingest, not scored
    run = client(uri).get_run(scored.run_id)
    assert client(uri).get_experiment(run.info.experiment_id).name == "covidtl-hospital-b"
    assert "all_accuracy" in run.data.metrics and run.data.params["split"] == "all"


def test_cli_evaluate_and_its_errors(trained, tmp_path):
    tmp, cfg, result, uri = trained
    base = ["--params", str(ROOT / "params.yaml"), "-S", f"data.workdir={tmp / 'data'}",
            "-S", f"data.datasets.tiny={{path: {tmp / 'images'}}}"]
    runner = CliRunner()
    ok = runner.invoke(main, base + ["evaluate", "--model-uri", str(result.model_path), "--data", "tiny",
                                     "--split", "val"])
    assert ok.exit_code == 0, ok.output
    assert "val_accuracy" in ok.output
    for args, words in (
        (["--model-uri", str(tmp_path / "none.keras"), "--data", "tiny"], "no such file"),
        (["--model-uri", "runs:/0123456789abcdef0123456789abcdef/model", "--data", "tiny"], "cannot load"),
        (["--model-uri", str(result.model_path), "--data", str(tmp_path / "nowhere")], "neither a dataset"),
    ):
        bad = runner.invoke(main, base + ["evaluate", *args])
        assert bad.exit_code == 2, bad.output
        assert words in bad.output and "Traceback" not in bad.output


def test_cli_evaluate_refuses_a_folder_with_class_folders_it_cannot_map(trained, tmp_path):
    """Scoring 4 of 7 images would be a wrong score: name the folder, its count and the fix."""
    tmp, cfg, result, uri = trained
    folder = tmp_path / "hospital-c"
    for name, n in (("Covid-19", 2), ("No_findings", 3), ("Pneumonia", 2)):
        write_images_to(folder / name, n)
    args = ["--params", str(ROOT / "params.yaml"), "evaluate", "--model-uri", str(result.model_path),
            "--data", str(folder)]
    bad = CliRunner().invoke(main, args)
    assert bad.exit_code == 2, bad.output
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.output
    assert f"{folder}: 3 images are in folders of no class (No_findings/ 3)" in bad.stderr
    assert "-S data.labels.no_findings=non_covid (or =covid)" in bad.stderr
    ok = CliRunner().invoke(main, ["-S", "data.labels.no_findings=non_covid", *args])
    assert ok.exit_code == 0, ok.output
    assert f"on {folder}: 7 images (a folder, every image);" in ok.stdout  # mapped, every image is scored


def write_images_to(folder: Path, n: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("L", (40, 40), 40 * i).save(folder / f"img{i}.png")
