"""Skipping a study cell that cannot run here: decided without TensorFlow, files DVC expects."""

from __future__ import annotations

import json
import subprocess
import sys

from covidtl.cells import Cell
from covidtl.weight_records import IMAGENET_FILES, unavailable_reason


def test_imagenet_cell_is_unavailable_without_the_cached_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no weights stage has run here: a look on disk decides
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    reason = unavailable_reason("vgg16", "imagenet")
    assert reason and IMAGENET_FILES["vgg16"] in reason and str(tmp_path / "keras" / "models") in reason
    assert "in weights/ (the folder stage weights@vgg16-imagenet watches) and run `dvc repro`" in reason
    assert unavailable_reason("vgg16", "random") is None
    assert "from scratch" in unavailable_reason("custom_cnn", "finetune")

    (tmp_path / "keras" / "models").mkdir(parents=True)
    (tmp_path / "keras" / "models" / IMAGENET_FILES["vgg16"]).write_bytes(b"weights")
    assert unavailable_reason("vgg16", "imagenet") is None


def test_skipped_cell_files_and_no_tensorflow_import(tmp_path, monkeypatch):
    Cell(tmp_path / "cell").write_skipped("no weights here")
    assert json.loads((tmp_path / "cell" / "metrics.json").read_text()) == {
        "status": "skipped", "reason": "no weights here"}
    assert (tmp_path / "cell" / "model" / "SKIPPED.txt").read_text().strip() == "no weights here"
    assert (tmp_path / "cell" / "predictions.csv").read_text() == "path,group,actual,predicted,p_covid\n"

    # The CLI path of a skipped cell must not pay for importing TensorFlow.
    code = (
        "import sys; from click.testing import CliRunner; from covidtl.cli import main; "
        f"r = CliRunner().invoke(main, ['train', '--model', 'resnet50', '--init', 'imagenet', "
        f"'--dataset', 'ct', '--skip-unavailable', '--out', {str(tmp_path / 'cli')!r}]); "
        "assert r.exit_code == 0, r.output; print('tensorflow' in sys.modules)"
    )
    env = {"KERAS_HOME": str(tmp_path / "empty"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    assert json.loads((tmp_path / "cli" / "metrics.json").read_text())["status"] == "skipped"
