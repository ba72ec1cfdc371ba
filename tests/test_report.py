"""`covidtl report` on a real MLflow store: the table, the figures, missing cells kept empty."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner

from covidtl.cli import main

PARAMS = Path(__file__).parents[1] / "params.yaml"


def _log_run(model: str, init: str, accuracy: float, *, strategy: str = "grouped", fail: bool = False):
    """A run shaped like covidtl.train's: the contract's tags and test_ metrics."""
    mlflow.set_experiment("covidtl-ct")
    tags = {
        "model": model, "init": init, "dataset": "ct", "split_strategy": strategy,
        "kind": "train", "cell": f"{model}-{init}-ct",
    }
    with mlflow.start_run(tags=tags):
        if fail:
            mlflow.end_run(status="FAILED")
            return
        metrics = {"test_accuracy": accuracy, "test_roc_auc": accuracy, "epochs_used": 3}
        for m in ("recall", "precision", "f1"):
            for a in ("covid", "non_covid", "micro", "macro"):
                metrics[f"test_{m}_{a}"] = accuracy
        mlflow.log_metrics(metrics)


def _write_cell(root: Path, cell: str, rows: list[tuple[str, str]] | None, skipped: str = "") -> None:
    d = root / cell
    d.mkdir(parents=True)
    if rows is not None:
        pd.DataFrame(rows, columns=["actual", "predicted"]).to_csv(d / "predictions.csv", index=False)
    if skipped:
        (d / "metrics.json").write_text(json.dumps({"status": "skipped", "reason": skipped}))


@pytest.fixture
def study(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    _log_run("custom_cnn", "random", 0.50)  # an older run of the same cell: the newer one wins
    _log_run("custom_cnn", "random", 0.75)
    _log_run("vgg16", "random", 0.0, fail=True)
    models = tmp_path / "models"
    _write_cell(models, "custom_cnn-random-ct", [("covid", "covid"), ("covid", "non_covid"), ("non_covid", "non_covid")])
    _write_cell(models, "vgg16-imagenet-ct", None, skipped="ImageNet weights not available offline")
    return tmp_path


def _run_report(*extra: str):
    args = ["--params", str(PARAMS), "-S", "study.models=[custom_cnn, vgg16]",
            "-S", "study.inits=[random, imagenet]", "-S", "study.datasets=[ct]", *extra, "report"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_report_tables_figures_and_missing_cells(study):
    result = _run_report()
    assert "Logged as MLflow run" in result.output

    table = pd.read_csv(study / "reports" / "results.csv").set_index(["model", "init"])
    assert len(table) == 4
    assert table.loc[("custom_cnn", "random"), "test_accuracy"] == pytest.approx(0.75)
    assert table.loc[("custom_cnn", "random"), "status"] == "ok"
    assert table.loc[("vgg16", "random"), "status"] == "failed"
    assert table.loc[("vgg16", "imagenet"), "status"] == "skipped"
    assert table.loc[("custom_cnn", "imagenet"), "status"] == "missing"
    # Failed, skipped and missing cells have no numbers at all, not zeros.
    assert table.drop(index=("custom_cnn", "random"))["test_accuracy"].isna().all()

    md = (study / "reports" / "results.md").read_text()
    assert "| custom_cnn | random | ok | 0.750 |" in md
    assert "| vgg16 | random | failed | — |" in md
    assert "ImageNet weights not available offline" in md
    for name in ("fig5_6-ct.png", "fig7-epochs.png", "confusion-ct.png"):
        assert (study / "reports" / name).read_bytes()[:4] == b"\x89PNG"
    assert not (study / "reports" / "split_strategies.png").exists()

    runs = mlflow.search_runs(experiment_names=["covidtl-report"])
    assert list(runs["tags.kind"]) == ["report"]
    assert runs["metrics.cells_ok"].iloc[0] == 1
    artifacts = mlflow.artifacts.list_artifacts(run_id=runs["run_id"].iloc[0], artifact_path="report")
    assert {Path(a.path).name for a in artifacts} >= {"results.csv", "results.md", "fig5_6-ct.png"}


def test_report_shows_split_strategies_side_by_side(study):
    _log_run("custom_cnn", "random", 0.95, strategy="random")
    CliRunner().invoke(main, ["--params", str(PARAMS), "-S", "study.models=[custom_cnn]",
                              "-S", "study.inits=[random]", "-S", "study.datasets=[ct]",
                              "report", "--no-log"], catch_exceptions=False)
    table = pd.read_csv(study / "reports" / "results.csv")
    by_strategy = table.set_index("split_strategy")["test_accuracy"]
    assert by_strategy["grouped"] == pytest.approx(0.75)
    assert by_strategy["random"] == pytest.approx(0.95)
    assert (study / "reports" / "split_strategies.png").exists()
    assert "## ct — split random" in (study / "reports" / "results.md").read_text()
