"""`covidtl weights`: finds Keras' ImageNet file and records which file, or why none and the fix."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from covidtl import weight_records
from covidtl.cli import main

VGG16 = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"


def run_weights(cwd: Path, *args: str, keras_home: Path) -> tuple[str, bool]:
    """`covidtl weights ARGS` in a fresh interpreter: its output, and whether it imported TensorFlow."""
    code = (
        "import sys; from click.testing import CliRunner; from covidtl.cli import main; "
        f"r = CliRunner().invoke(main, ['weights', *{list(args)!r}]); "
        "assert r.exit_code == 0, r.output; print(r.output); print('tensorflow' in sys.modules)"
    )
    env = {"KERAS_HOME": str(keras_home), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    *output, imported = done.stdout.strip().splitlines()
    return "\n".join(output), imported == "True"


def test_a_file_dropped_into_weights_is_recorded_with_its_hash_without_tensorflow(tmp_path):
    (tmp_path / "weights").mkdir()
    dropped = tmp_path / "weights" / VGG16
    dropped.write_bytes(b"the weights" * 1000)
    (tmp_path / "keras" / "models").mkdir(parents=True)
    (tmp_path / "keras" / "models" / VGG16).write_bytes(b"another copy")  # the project folder wins

    output, imported = run_weights(tmp_path, "vgg16", "--init", "imagenet", keras_home=tmp_path / "keras")
    assert not imported
    record = json.loads((tmp_path / "data" / "weights" / "vgg16-imagenet.json").read_text())
    assert record == {
        "model": "vgg16", "init": "imagenet", "status": "available", "file": VGG16,
        "path": f"weights/{VGG16}", "found_in": "project",
        "sha256": hashlib.sha256(dropped.read_bytes()).hexdigest(), "bytes": 11000,
    }
    assert f"weights/{VGG16}" in output

    # init=random needs no file: its record says so, the same bytes on every run.
    run_weights(tmp_path, "vgg16", "--init", "random", keras_home=tmp_path / "keras")
    first = (tmp_path / "data" / "weights" / "vgg16-random.json").read_bytes()
    _, imported = run_weights(tmp_path, "vgg16", "--init", "random", keras_home=tmp_path / "keras")
    assert (tmp_path / "data" / "weights" / "vgg16-random.json").read_bytes() == first
    assert json.loads(first)["status"] == "not_needed" and not imported


def test_keras_cache_is_the_second_place(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    cached = tmp_path / "keras" / "models" / VGG16
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"cached")
    record = weight_records.locate("vgg16", "finetune")
    assert record["found_in"] == "keras_cache" and record["path"] == str(cached)
    assert weight_records.locate("custom_cnn", "imagenet")["status"] == "unavailable"


def test_offline_record_names_the_watched_folder_and_the_skipped_cell_says_the_same(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # offline, whatever the network
    monkeypatch.delenv("no_proxy", raising=False)
    started = time.monotonic()
    result = CliRunner().invoke(main, ["weights", "vgg16", "--init", "imagenet"])
    assert result.exit_code == 0, result.output
    assert time.monotonic() - started < 60  # Keras' download was tried and failed fast
    record = json.loads((tmp_path / "data" / "weights" / "vgg16-imagenet.json").read_text())
    assert record["status"] == "unavailable"
    assert "could not download" in record["reason"] and str(tmp_path / "empty" / "models") in record["reason"]
    assert record["fix"] == (f"put {VGG16} in weights/ (the folder stage weights@vgg16-imagenet "
                             "watches) and run `dvc repro`")

    # The cell reads the record (no second download, no TensorFlow) and repeats its words.
    cell = tmp_path / "models" / "vgg16-imagenet-ct"
    skipped = CliRunner().invoke(main, ["train", "--model", "vgg16", "--init", "imagenet", "--dataset", "ct",
                                        "--skip-unavailable", "--out", str(cell)])
    assert skipped.exit_code == 0, skipped.output
    assert json.loads((cell / "metrics.json").read_text())["reason"] == weight_records.message(record)
