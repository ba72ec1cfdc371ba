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


def has_row(md: str, *cells: str) -> bool:
    """Whether a markdown table row of `md` starts with these cells (to_markdown pads them)."""
    rows = ([c.strip() for c in line.strip().strip("|").split("|")]
            for line in md.splitlines() if line.startswith("|"))
    return any(row[: len(cells)] == list(cells) for row in rows)


def _log_run(model: str, init: str, accuracy: float, *, strategy: str = "grouped", fail: bool = False,
             experiment: str | None = None) -> str:
    """A run shaped like covidtl.train's: the contract's tags and test_ metrics; returns its id."""
    mlflow.set_experiment("covidtl-ct")
    tags = {
        "model": model, "init": init, "dataset": "ct", "split_strategy": strategy,
        "kind": "train", "cell": f"{model}-{init}-ct",
    }
    if experiment:
        tags["dvc_experiment"] = experiment
    with mlflow.start_run(tags=tags) as run:
        if fail:
            mlflow.end_run(status="FAILED")
            return run.info.run_id
        metrics = {"test_accuracy": accuracy, "test_roc_auc": accuracy, "epochs_used": 3}
        for m in ("recall", "precision", "f1"):
            for a in ("covid", "non_covid", "micro", "macro"):
                metrics[f"test_{m}_{a}"] = accuracy
        mlflow.log_metrics(metrics)
    return run.info.run_id


def _write_cell(root: Path, cell: str, record: dict, rows: list[tuple[str, str]] | None = None) -> None:
    """A cell folder as covidtl.train (or a skipped or failed cell) leaves it."""
    d = root / cell
    d.mkdir(parents=True)
    if rows is not None:
        pd.DataFrame(rows, columns=["actual", "predicted"]).to_csv(d / "predictions.csv", index=False)
    (d / "metrics.json").write_text(json.dumps(record))


@pytest.fixture
def study(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    cell_run = _log_run("custom_cnn", "random", 0.75)
    failed_run = _log_run("vgg16", "random", 0.0, fail=True)
    models = tmp_path / "models"
    _write_cell(models, "custom_cnn-random-ct", {"status": "ok", "test_accuracy": 0.75, "run_id": cell_run},
                rows=[("covid", "covid"), ("covid", "non_covid"), ("non_covid", "non_covid")])
    _write_cell(models, "vgg16-random-ct", {"status": "failed", "reason": "ValueError: boom", "run_id": failed_run})
    _write_cell(models, "vgg16-imagenet-ct", {"status": "skipped", "reason": "ImageNet weights not available offline"})
    # Later ad-hoc runs of a study cell (`covidtl train --max-train-samples 12 --out elsewhere`)
    # must not replace the cell's own run.
    _log_run("custom_cnn", "random", 0.10)
    _log_run("custom_cnn", "imagenet", 0.99)
    # The custom CNN's SimCLR recipe's cell (profile cnn_simclr) beside the paper's custom CNN cell.
    best_run = _log_run("custom_cnn", "pretrained", 0.875)
    _write_cell(models, "custom_cnn-pretrained-ct-cnn_simclr", {"status": "ok", "test_accuracy": 0.875, "run_id": best_run},
                rows=[("covid", "covid"), ("non_covid", "non_covid")])
    return tmp_path


def _run_report(*extra: str):
    args = ["--params", str(PARAMS), "-S", "study.models=[custom_cnn, vgg16]",
            "-S", "study.inits=[random, imagenet]", "-S", "study.datasets=[ct]", *extra, "report"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_report_tables_figures_and_missing_cells(study):
    # Two scores were taken on the CT second site's folder (the default external set): counted.
    for _ in range(2):
        with mlflow.start_run(tags={"kind": "evaluate", "data_folder": str((study / "data/synth/ct-site2").resolve())}):
            pass
    result = _run_report()
    assert "Logged as MLflow run" in result.output

    both = pd.read_csv(study / "reports" / "results.csv")
    assert len(both) == 6 and set(both["group"]) == {"workspace"}
    chosen = both[both["profile"] == "best"]  # the chosen recipe's cell, never trained here
    assert (chosen["model"].tolist(), chosen["init"].tolist()) == (["vgg16"], ["imagenet"])
    best = both[both["profile"] == "cnn_simclr"].iloc[0]
    assert (best["model"], best["init"], best["status"]) == ("custom_cnn", "pretrained", "ok")
    assert best["test_accuracy"] == pytest.approx(0.875)  # its own run, not the paper cell's
    assert json.loads((study / "reports" / "cards" / "custom_cnn-pretrained-ct-cnn_simclr.json").read_text())["cell"] == (
        "custom_cnn-pretrained-ct-cnn_simclr")
    table = both[both["profile"] == "paper"].set_index(["model", "init"])
    assert len(table) == 4
    cell_run = json.loads((study / "models/custom_cnn-random-ct/metrics.json").read_text())["run_id"]
    assert table.loc[("custom_cnn", "random"), "run_id"] == cell_run
    assert table.loc[("custom_cnn", "random"), "test_accuracy"] == pytest.approx(0.75)  # not the newer 0.10
    assert table.loc[("custom_cnn", "random"), "status"] == "ok"
    assert table.loc[("vgg16", "random"), "status"] == "failed"
    assert table.loc[("vgg16", "imagenet"), "status"] == "skipped"
    assert table.loc[("custom_cnn", "imagenet"), "status"] == "missing"  # its ad-hoc run is not a cell
    # Failed, skipped and missing cells have no numbers at all, not zeros.
    assert table.drop(index=("custom_cnn", "random"))["test_accuracy"].isna().all()

    md = (study / "reports" / "results.md").read_text()
    assert has_row(md, "custom_cnn", "random", "paper", "ok", "0.750 [n/a]")  # the fixture logs no interval
    assert has_row(md, "custom_cnn", "pretrained", "cnn_simclr", "ok", "0.875 [n/a]")
    assert has_row(md, "vgg16", "random", "paper", "failed", "—")
    assert "Scores taken so far on each external set" in md and "ct-site2 2" in md and "ValueError: boom" in md
    assert "ImageNet weights not available offline" in md
    for name in ("fig5_6-ct.png", "fig7-epochs.png", "confusion-ct.png"):
        assert (study / "reports" / name).read_bytes()[:4] == b"\x89PNG"
    assert not (study / "reports" / "split_strategies.png").exists()

    runs = mlflow.search_runs(experiment_names=["covidtl-report"])
    assert list(runs["tags.kind"]) == ["report"]
    assert runs["metrics.cells_ok"].iloc[0] == 2
    artifacts = mlflow.artifacts.list_artifacts(run_id=runs["run_id"].iloc[0], artifact_path="report")
    assert {Path(a.path).name for a in artifacts} >= {"results.csv", "results.md", "fig5_6-ct.png"}


def test_named_experiments_appear_as_their_own_groups(study):
    _log_run("custom_cnn", "random", 0.95, strategy="random", experiment="leaky-split")
    _log_run("custom_cnn", "random", 0.85, strategy="random")  # no experiment: never shown
    base = ["--params", str(PARAMS), "-S", "study.models=[custom_cnn]", "-S", "study.inits=[random]",
            "-S", "study.datasets=[ct]", "-S", "study.profiles={}"]
    CliRunner().invoke(main, base + ["report", "--no-log"], catch_exceptions=False)
    assert set(pd.read_csv(study / "reports" / "results.csv")["group"]) == {"workspace"}
    assert not (study / "reports" / "split_strategies.png").exists()

    result = CliRunner().invoke(main, base + ["report", "--no-log", "--with-experiment", "leaky-split"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(study / "reports" / "results.csv").set_index("group")
    assert table.loc["workspace", "test_accuracy"] == pytest.approx(0.75)
    assert table.loc["leaky-split", "test_accuracy"] == pytest.approx(0.95)
    assert table.loc["leaky-split", "split_strategy"] == "random"
    assert (study / "reports" / "split_strategies.png").exists()
    md = (study / "reports" / "results.md").read_text()
    assert "## workspace: ct — split grouped" in md and "## leaky-split: ct — split random" in md

    unknown = CliRunner().invoke(main, base + ["report", "--no-log", "--with-experiment", "nope"])
    assert unknown.exit_code == 2 and "dvc_experiment=nope" in unknown.output


def test_a_cell_whose_run_is_not_in_the_store_says_so(study, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    CliRunner().invoke(main, ["--params", str(PARAMS), "-S", "study.models=[custom_cnn]",
                              "-S", "study.inits=[random]", "-S", "study.datasets=[ct]",
                              "report", "--no-log"], catch_exceptions=False)
    row = pd.read_csv(study / "reports" / "results.csv").iloc[0]
    assert row["status"] == "missing" and "is not in" in row["note"] and pd.isna(row["test_accuracy"])


def test_cross_dataset_table_puts_external_sets_beside_the_test_split(study):
    scored = study / "external" / "ct" / "custom_cnn-random-ct" / "ct-site2"
    scored.mkdir(parents=True)
    (scored / "metrics.json").write_text(json.dumps({
        "all_accuracy": 0.55, "all_accuracy_ci_low": 0.41, "all_accuracy_ci_high": 0.69,
        "all_roc_auc": 0.60, "all_images": 40}))
    CliRunner().invoke(main, ["--params", str(PARAMS), "-S", "study.models=[custom_cnn]",
                              "-S", "study.inits=[random]", "-S", "study.datasets=[ct]",
                              "-S", "study.profiles={}", "report", "--no-log"], catch_exceptions=False)
    cross = pd.read_csv(study / "reports" / "cross_dataset.csv").set_index("scored_on")
    assert cross.loc["test split", "accuracy"] == pytest.approx(0.75)
    assert cross.loc["ct-site2", "accuracy"] == pytest.approx(0.55) and cross.loc["ct-site2", "images"] == 40
    md = (study / "reports" / "results.md").read_text()
    assert has_row(md, "ct", "custom_cnn-random-ct", "ct-site2", "40", "0.550 [0.410, 0.690]")
    card = (study / "reports" / "cards" / "custom_cnn-random-ct.md").read_text()
    assert "| ct-site2 | 40 | 0.550 [0.410, 0.690] |" in card  # images as a whole number
