"""The data commands as a user runs them: covidtl synth / ingest / split, and the DVC stages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from conftest import PARAMS, ROOT
from covidtl.cli import main


def covidtl(*args: str):
    return CliRunner().invoke(main, ["--params", str(PARAMS), *args])


def test_synth_ingest_split_from_a_fresh_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = covidtl("synth")
    assert result.exit_code == 0, result.output
    assert result.stdout == ("synth: 120 CT-like and 120 X-ray-like images in data/synth; "
                             "second site (external test sets): 40 and 40\n")

    result = covidtl("ingest", "ct", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ingest ct: 120 images (covid 60, non_covid 60) in 12 groups, 0 quarantined")
    assert (tmp_path / "data" / "ct" / "manifest.csv").exists()

    result = covidtl("split", "ct")
    assert result.exit_code == 0, result.output
    assert "split ct (grouped): train 80 (40 covid)" in result.stdout
    assert "crossing pairs: 0 same-group, 0 near-duplicate" in result.stdout

    result = covidtl("split", "ct", "--strategy", "random")
    report = json.loads((tmp_path / "data" / "ct" / "leakage.json").read_text())
    assert report["strategy"] == "random" and report["crossing_pairs"]["same_group_total"] > 0
    assert f"{report['crossing_pairs']['same_group_total']} same-group" in result.stdout


def test_ingest_path_option_reports_quarantine_and_empty_folders(tmp_path, monkeypatch, image_folder):
    monkeypatch.chdir(tmp_path)
    root = image_folder({"train/Covid": 2, "train/Normal": 2, "test/Covid": 1})
    (root / "test" / "Normal").mkdir()
    (root / "train" / "Covid" / "broken.png").write_bytes(b"")
    result = covidtl("ingest", "xray", "--path", str(root), "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ingest xray: 5 images (covid 3, non_covid 2)")
    assert f"Warning: class folder {root / 'test' / 'Normal'} is empty" in result.stderr
    assert f"Quarantined: {(root / 'train' / 'Covid' / 'broken.png').resolve()}: empty file (0 bytes)" in result.stderr
    quarantine = pd.read_csv(tmp_path / "data" / "xray" / "quarantine.csv")
    assert quarantine["reason"].tolist() == ["empty file (0 bytes)"]


def test_user_errors_are_one_line_exit_2(tmp_path, monkeypatch, image_folder):
    monkeypatch.chdir(tmp_path)
    result = covidtl("ingest", "ct")  # synth not run yet
    assert result.exit_code == 2
    assert result.stderr == (
        "Error: data.datasets.ct.path: folder data/synth/ct does not exist; run `covidtl synth` first, "
        "or point at it with -S data.datasets.ct.path=/path/to/ct (or `covidtl ingest ct --path ...`)\n"
    )
    single = image_folder({"COVID": 2})
    result = covidtl("ingest", "ct", "--path", str(single))
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "only covid folders found (COVID); a binary task needs both" in result.stderr
    two = image_folder({"COVID": 1, "non-COVID": 1}, tmp_path / "two")
    covidtl("ingest", "xray", "--path", str(two), "--quiet")
    result = covidtl("split", "xray")
    assert result.exit_code == 0
    assert "Warning: val has no non_covid images (too few groups" in result.stderr
    result = covidtl("-S", "data.workdir=elsewhere", "split", "xray")
    assert result.exit_code == 2
    assert result.stderr == "Error: elsewhere/xray/manifest.csv: no manifest yet; run `covidtl ingest xray` first\n"


def test_ingest_warns_about_each_folder_of_no_class_and_counts_it(tmp_path, monkeypatch, image_folder):
    monkeypatch.chdir(tmp_path)
    root = image_folder({"Covid-19": 2, "No_findings": 3, "Pneumonia": 2})
    result = covidtl("ingest", "xray", "--path", str(root), "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stderr == (
        "Warning: 3 images in No_findings/ have no class and are left out; "
        "map the folder with -S data.labels.no_findings=non_covid (or =covid)\n"
    )
    assert "0 non-image files skipped, 3 images in folders of no class -> " in result.stdout
    summary = json.loads((tmp_path / "data" / "xray" / "ingest.json").read_text())
    assert summary["root"] == str(root) and summary["unmapped_folders"] == {"No_findings": 3}


@pytest.mark.skipif(shutil.which("dvc") is None and not (Path(sys.executable).parent / "dvc").exists(),
                    reason="dvc is not installed")
def test_dvc_repro_runs_the_data_stages_then_has_nothing_to_do(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def dvc(*args: str) -> str:
        done = subprocess.run(["dvc", *args], cwd=project, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    dvc("init", "--no-scm", "-q")
    stages = ["synth", "ingest@ct", "split@ct"]
    first = dvc("repro", *stages)
    assert "Running stage 'split@ct'" in first
    assert (project / "data" / "ct" / "split.csv").exists()
    second = dvc("repro", *stages)
    assert "Running stage" not in second
    assert "Data and pipelines are up to date." in dvc("status", *stages)
