"""`covidtl external`: every trained cell of a dataset scored on its external test sets, in one process."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner

from covidtl import tracking
from covidtl.cells import Cell
from covidtl.cli import main
from covidtl.config import ExternalSet
from helpers_train import make_workdir, write_images

SET = "tiny-site2"


def files_under(root: Path) -> dict[str, float]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A tiny study in tmp: one trained cell, one skipped, one missing; a second-site folder with
    a corrupt file; params.yaml there naming them all. (tmp, train result, tracking URI)"""
    from covidtl.train import RunOptions, plan_run, train

    tmp = tmp_path_factory.mktemp("external")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    site2 = tmp / "site2"
    write_images(site2, per_class=6, size=40, seed=3)
    (site2 / "COVID" / "broken.png").write_bytes(b"not an image")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        cfg, _ = make_workdir(tmp, **{
            "study.models": ["custom_cnn", "vgg16", "resnet50"], "study.inits": ["random"],
            "study.datasets": ["tiny"],
            "external.tiny": [{"name": SET, "path": str(site2), "series": True}],
        })
        result = train(plan_run(cfg, "custom_cnn", "random", "tiny", out_dir=tmp / "models" / "custom_cnn-random-tiny"),
                       RunOptions(log_model=False))
    Cell(tmp / "models" / "vgg16-random-tiny").write_skipped("no weights here")
    (tmp / "params.yaml").write_text(tracking.config_yaml(cfg))  # a complete params file
    return tmp, result, uri


def test_cli_scores_trained_cells_quarantines_bad_files_and_lists_the_others(study, monkeypatch):
    tmp, trained, uri = study
    monkeypatch.chdir(tmp)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    before = files_under(tmp / "models")
    out = CliRunner().invoke(main, ["external", "tiny", "--quiet"])
    assert out.exit_code == 0, out.output
    assert files_under(tmp / "models") == before  # another stage's outputs are left alone
    assert "Quarantined (tiny-site2):" in out.stderr and "broken.png" in out.stderr
    assert "SKIPPED vgg16-random-tiny: no weights here" in out.stdout

    results = json.loads((tmp / "external" / "tiny" / "results.json").read_text())
    site = results["sets"][SET]
    assert (site["images"], site["quarantined"], site["classes"]) == (12, 1, {"non_covid": 6, "covid": 6})
    quarantine = pd.read_csv(tmp / "external" / "tiny" / "sets" / SET / "quarantine.csv")
    assert list(quarantine["path"]) == ["COVID/broken.png"]  # relative to the set's folder

    cells = results["cells"]
    assert cells["vgg16-random-tiny"] == {"model": "vgg16", "init": "random", "profile": "paper",
                                          "status": "skipped", "reason": "no weights here"}
    assert cells["resnet50-random-tiny"]["status"] == "missing"
    ok = cells["custom_cnn-random-tiny"]
    assert ok["status"] == "ok" and ok["run_id"] == trained.run_id
    score = ok["scores"][SET]
    assert score["images"] == 12 and 0 <= score["metrics"]["all_accuracy"] <= 1
    assert {"all_roc_auc", "all_recall_covid", "all_f1_macro"} <= set(score["metrics"])

    scored = tmp / "external" / "tiny" / "custom_cnn-random-tiny" / SET
    predictions = pd.read_csv(scored / "predictions.csv")
    assert list(predictions.columns) == ["path", "group", "actual", "predicted", "p_covid"]
    assert len(predictions) == 12 and predictions["path"].str.match(r"(non-)?COVID/").all()
    assert json.loads((scored / "metrics.json").read_text()) == pytest.approx(score["metrics"], nan_ok=True)

    mlflow.set_tracking_uri(uri)
    run = mlflow.get_run(score["evaluate_run_id"])
    assert run.data.tags["kind"] == "evaluate" and run.data.tags["external_set"] == SET
    assert run.data.tags["source_run_id"] == trained.run_id
    assert run.data.tags["cell"] == "custom_cnn-random-tiny"
    assert run.data.metrics["all_accuracy"] == pytest.approx(score["metrics"]["all_accuracy"])
    assert mlflow.get_experiment(run.info.experiment_id).name == "covidtl-tiny"


def test_a_missing_external_folder_is_one_line_naming_the_key(study, monkeypatch):
    tmp, _, _ = study
    monkeypatch.chdir(tmp)
    setting = "external.tiny=[{name: gone, path: data/nowhere}]"
    out = CliRunner().invoke(main, ["-S", setting, "external", "tiny", "--no-log"])
    assert out.exit_code == 2
    assert out.stderr.startswith("Error: external.tiny[0].path: folder data/nowhere does not exist")
    assert out.stderr.count("\n") == 1


@pytest.fixture(scope="module")
def ct_external(shared_data, tmp_path_factory):
    """../shared/data/ct-external through the external path (series: true), ingested once."""
    from conftest import config
    from covidtl.external import ingest_set

    tmp = tmp_path_factory.mktemp("ct-external")
    entry = ExternalSet(name="ct-external", path=str(shared_data / "ct-external"), series=True,
                        shared_frame=True)
    return tmp, ingest_set(config(tmp), "ct", 0, entry, tmp / "sets", progress=False)


def test_ct_external_is_ingested_whole_and_grouped(ct_external):
    """The real external CT set (test only): every image read, both classes, each in a group."""
    tmp, s = ct_external
    summary = s.summary()
    assert summary["images"] == 938 and summary["quarantined"] == 0
    assert summary["classes"] == {"non_covid": 254, "covid": 684}
    assert s.manifest["group"].notna().all() and summary["groups"] >= 2
    assert s.manifest.groupby("group")["label"].nunique().eq(1).all()  # a group never spans classes
    stored = pd.read_csv(tmp / "sets" / "ct-external" / "manifest.csv")
    assert stored["path"].str.match(r"(non-)?COVID/img\d+\.jpg$").all()  # portable: relative paths


def test_ct_external_groups_are_plausible_patients(ct_external):
    """Full-field slices share the scanner's circle and table, so every slice correlates with every
    other (without shared_frame: one group per class); with the frame removed, runs of slices."""
    _, s = ct_external
    sizes = s.manifest.groupby("group").size()
    assert s.manifest.groupby("label")["group"].nunique().min() >= 20
    assert sizes.median() >= 4  # runs of neighbouring slices, not single images
