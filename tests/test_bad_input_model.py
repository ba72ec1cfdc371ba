"""Bad input to the model commands (train, evaluate, predict, tune), as a user hands it over the CLI.

One tiny trained model (the custom CNN after one epoch on 48 px PNGs) serves every case. Each case
checks the one line a user reads, the exit status, and that nothing else was lost: no cell folder
made by a refused run, the old model file intact, unreadable files listed while the rest are scored.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image
from mlflow.tracking import MlflowClient

from covidtl.cli import main
from covidtl.train import RunOptions, plan_run, train
from helpers_train import make_workdir
from test_bad_input import (BAD_FILES, NOT_REGULAR, as_user, shared_tmp,  # noqa: F401
                             _needs_a_user_without_rights)

ROOT = Path(__file__).parents[1]
COVIDTL = str(Path(sys.executable).parent / "covidtl")
CLOSED_PORT_URI = "http://127.0.0.1:9"  # the discard port: nothing listens there


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(tmp, tracking URI, cell): the custom CNN after one epoch on the tiny dataset `tiny`."""
    tmp = tmp_path_factory.mktemp("bad-model")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        cfg, _ = make_workdir(tmp)
        train(plan_run(cfg, "custom_cnn", "random", "tiny", out_dir=tmp / "cell"), RunOptions(log_model=False))
    return tmp, uri, tmp / "cell"


@pytest.fixture(autouse=True)
def _track(trained, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained[1])


def settings(tmp: Path) -> list[str]:
    return ["--params", str(ROOT / "params.yaml"), "-S", f"data.workdir={tmp / 'data'}",
            "-S", f"data.datasets.tiny.path={tmp / 'images'}", "-S", "train.batch_size=8"]


def cli(tmp: Path, *args: str):
    return CliRunner().invoke(main, [*settings(tmp), *args])


def one_line(result, status: int = 2) -> str:
    """The single line a refused command prints on stderr."""
    assert result.exit_code == status, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


# --------------------------------------------------------------------------- train


@pytest.mark.parametrize("options, message", [
    (["--model", "resnet9"], "Error: --model 'resnet9': unknown model; choose one of custom_cnn, densenet121, "
                             "resnet50, inceptionv3, resnet101v2, vgg16"),
    (["--model", "custom_cnn", "--init", "imagenett"],
     "Error: --init imagenett: no such weights file; give random, imagenet, finetune or an existing file "
     "saved with model.save_weights(...)"),
    (["--model", "custom_cnn", "--init", "imagenet"],
     "Error: --init imagenet: custom_cnn has no ImageNet weights; use --init random or a weights file "
     "saved from this model"),
    (["--model", "custom_cnn", "--lr", "0"], "Error: --lr 0: the learning rate must be > 0; give e.g. 1e-4, or auto"),
    (["--model", "custom_cnn", "--lr", "-1"], "Error: --lr -1: the learning rate must be > 0; give e.g. 1e-4, or auto"),
    (["--model", "custom_cnn", "--image-size", "64"],
     "Error: train.image_size.custom_cnn: 64 px is below custom_cnn's smallest input, 186 px; give "
     "--image-size 186 or more (its native size is 200)"),
    (["--model", "inceptionv3", "--image-size", "40"],
     "Error: train.image_size.inceptionv3: 40 px is below inceptionv3's smallest input, 75 px; give "
     "--image-size 75 or more (its native size is 299)"),
])
def test_train_refuses_what_cannot_train_in_one_line_and_makes_no_cell(trained, tmp_path, options, message):
    tmp = trained[0]
    result = cli(tmp, "train", "--dataset", "tiny", "--out", str(tmp_path / "cell"), "--no-log-model", *options)
    assert one_line(result) == message
    assert not (tmp_path / "cell").exists()


def test_a_weights_file_of_another_architecture_is_one_line(trained, tmp_path):
    import keras

    tmp, _, cell = trained
    donor = tmp_path / "custom_cnn.weights.h5"
    keras.models.load_model(cell / "model" / "model.keras", compile=False).save_weights(donor)
    result = cli(tmp, "-S", "train.image_size.vgg16=32", "train", "--model", "vgg16", "--init", str(donor),
                 "--dataset", "tiny", "--out", str(tmp_path / "cell"), "--no-log-model")
    line = one_line(result)
    assert line.startswith(f"Error: {donor}: this weights file does not fit vgg16 at input (32, 32, 3) (")
    assert line.endswith("); use a file saved from the same architecture")
    assert not (tmp_path / "cell").exists()


def test_an_unreachable_tracking_server_is_one_line_before_any_training(trained, tmp_path, monkeypatch):
    tmp = trained[0]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", CLOSED_PORT_URI)
    expected = (f"Error: MLFLOW_TRACKING_URI={CLOSED_PORT_URI}: no tracking server answers there (Connection "
                "refused); start it (mlflow server --host 127.0.0.1 --port 9) or unset MLFLOW_TRACKING_URI "
                "to log to ./mlflow.db")
    result = cli(tmp, "train", "--model", "custom_cnn", "--dataset", "tiny", "--out", str(tmp_path / "cell"))
    assert one_line(result) == expected
    assert not (tmp_path / "cell").exists()  # refused before the model was built
    tuned = cli(tmp, "tune", "--model", "custom_cnn", "--dataset", "tiny", "--trials", "1",
                "--storage", f"sqlite:///{tmp_path / 'optuna.db'}")
    assert one_line(tuned) == expected
    for args in (["evaluate", "--model-uri", "runs:/0123456789abcdef/model", "--data", "tiny"],
                 ["evaluate", "--model-uri", str(trained[2]), "--data", "tiny"],
                 ["register", str(trained[2]), "--name", "covidtl-tiny"]):
        assert one_line(cli(tmp, *args)) == expected, args


def test_a_server_that_is_not_mlflow_is_one_line(trained, tmp_path, monkeypatch):
    """Something answers on the port, but not MLflow's REST API (here Python's file server: 404)."""
    import functools
    import http.server
    import threading

    tmp = trained[0]
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # the server's own log is not the CLI's output
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{httpd.server_address[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    try:
        result = cli(tmp, "train", "--model", "custom_cnn", "--dataset", "tiny", "--out", str(tmp_path / "cell"),
                     "--no-log-model")
    finally:
        httpd.shutdown()
        httpd.server_close()
    line = one_line(result)
    assert line.startswith(f"Error: MLFLOW_TRACKING_URI={uri}: the server there does not answer as an MLflow "
                           "tracking server (API request to endpoint /api/2.0/mlflow/"), line
    assert line.endswith("check the URI and that `mlflow server` runs there, or unset MLFLOW_TRACKING_URI "
                         "to log to ./mlflow.db")
    assert not (tmp_path / "cell" / "metrics.json").exists()  # nothing trained, no record


def test_tune_refuses_a_custom_cnn_input_below_its_minimum(trained, tmp_path):
    tmp = trained[0]
    result = cli(tmp, "-S", "train.image_size.custom_cnn=100", "tune", "--model", "custom_cnn",
                 "--dataset", "tiny", "--trials", "1", "--storage", f"sqlite:///{tmp_path / 'optuna.db'}")
    assert one_line(result) == ("Error: train.image_size.custom_cnn: 100 px is below custom_cnn's smallest "
                                "input, 186 px; give --image-size 186 or more (its native size is 200)")
    assert not (tmp_path / "tuned").exists()


# --------------------------------------------------------------------------- a damaged model file


@pytest.fixture
def corrupt_models(trained, tmp_path) -> dict[str, Path]:
    whole = (trained[2] / "model" / "model.keras").read_bytes()
    truncated = tmp_path / "truncated" / "model.keras"
    truncated.parent.mkdir()
    truncated.write_bytes(whole[: len(whole) // 2])
    text = tmp_path / "text" / "model.keras"
    text.parent.mkdir()
    text.write_text("not a model\n")
    return {"truncated": truncated, "text": text}


@pytest.mark.parametrize("kind", ["truncated", "text"])
def test_a_corrupt_model_file_is_one_line_for_evaluate_and_predict(trained, corrupt_models, kind, tmp_path):
    tmp = trained[0]
    model = corrupt_models[kind]
    image = next((tmp / "images" / "COVID").glob("*.png"))
    for args in (["evaluate", "--model-uri", str(model), "--data", "tiny", "--out", str(tmp_path / "ev")],
                 ["predict", str(image), "--model-uri", str(model), "--out", str(tmp_path / "p.csv")]):
        line = one_line(cli(tmp, *args))
        assert line.startswith(f"Error: {model}: not a readable Keras model ("), line
    assert not (tmp_path / "ev").exists() and not (tmp_path / "p.csv").exists()


def test_an_evaluate_out_that_is_a_file_is_one_line(trained, tmp_path):
    tmp, _, cell = trained
    (tmp_path / "results").write_text("keep me\n")
    line = one_line(cli(tmp, "evaluate", "--model-uri", str(cell), "--data", "tiny",
                        "--out", str(tmp_path / "results")))
    assert line == (f"Error: {tmp_path / 'results'}: File exists; check the path: a file may stand where a "
                    "folder is needed (or the reverse), or a folder on it cannot be made")
    assert (tmp_path / "results").read_text() == "keep me\n"


# --------------------------------------------------------------------------- which data evaluate scores


def runs_in(uri: str, experiment: str):
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def test_a_dataset_name_means_the_dataset_even_beside_a_folder_of_that_name(trained, tmp_path, monkeypatch):
    tmp, uri, cell = trained
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tmp / "images", tmp_path / "tiny")  # ./tiny: a folder named like the dataset
    before = len(runs_in(uri, "covidtl-tiny"))
    result = cli(tmp, "evaluate", "--model-uri", str(cell), "--data", "tiny", "--split", "test")
    assert result.exit_code == 0, result.output
    assert (f"Note: --data tiny is the dataset tiny of params.yaml ({tmp / 'images'}); to score the folder "
            "./tiny instead, give --data ./tiny") in result.stderr
    test_rows = pd.read_csv(tmp / "data" / "tiny" / "split.csv").query("split == 'test'")
    assert f"on tiny: {len(test_rows)} images (the test split of dataset tiny);" in result.stdout
    runs = runs_in(uri, "covidtl-tiny")
    assert len(runs) == before + 1 and "test_accuracy" in runs[0].data.metrics


def test_a_folder_named_like_a_dataset_is_not_logged_as_its_test_split(trained, tmp_path):
    tmp, uri, cell = trained
    folder = tmp_path / "elsewhere" / "tiny"
    shutil.copytree(tmp / "images", folder)
    before = len(runs_in(uri, "covidtl-tiny"))
    result = cli(tmp, "evaluate", "--model-uri", str(cell), "--data", str(folder))
    assert result.exit_code == 0, result.output
    assert f"on {folder}: 24 images (a folder, every image);" in result.stdout
    assert len(runs_in(uri, "covidtl-tiny")) == before  # the dataset's experiment is untouched
    (run,) = runs_in(uri, "covidtl-folder-tiny")
    assert "all_accuracy" in run.data.metrics and not any(k.startswith("test_") for k in run.data.metrics)
    assert run.data.tags["data_kind"] == "folder"


# --------------------------------------------------------------------------- predict on bad files


def test_predict_lists_each_bad_file_with_its_reason_and_scores_the_rest(trained, tmp_path):
    tmp, _, cell = trained
    folder = tmp_path / "scans"
    folder.mkdir()
    for src in sorted((tmp / "images" / "COVID").glob("*.png"))[:2]:
        shutil.copy(src, folder / src.name)
    odd = folder / "Zoë [2], Łódź (final).png"
    shutil.copy(next((tmp / "images" / "non-COVID").glob("*.png")), odd)
    bad = {}
    for name in ("zero.png", "truncated.jpg", "text.png", "bomb.png", "loop.png"):
        make, reason = BAD_FILES[name]
        make(folder / name)
        bad[str(folder / name)] = reason
    out = tmp_path / "predictions.csv"
    result = cli(tmp, "predict", str(folder), "--model-uri", str(cell), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert "predict " in result.stdout and ": 3 images scored" in result.stdout
    assert "5 unreadable files" in result.stdout
    table = pd.read_csv(out).set_index("file")
    assert table.loc[str(odd), "label"] in ("covid", "non_covid") and 0 <= table.loc[str(odd), "p_covid"] <= 1
    for file, reason in bad.items():
        assert table.loc[file, "error"].startswith(reason), file
        assert pd.isna(table.loc[file, "p_covid"])


class StillRunning(BaseException):
    """Not an Exception: the CLI's last-resort handler lets it through."""


@contextlib.contextmanager
def at_most(seconds: int):
    """Fail, rather than hang, a command that blocks (a FIFO opened for reading never returns)."""
    def stop(signum, frame):
        raise StillRunning(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def not_regular_files(folder: Path) -> dict[Path, str]:
    """A FIFO, a socket, a link to /dev/zero and a link to a FIFO in `folder`: {path: reason}."""
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for name, (make, kind) in NOT_REGULAR.items():
        make(folder / f"a-{name}")  # before the images by name: today's main hangs on the pipe first
        made[folder / f"a-{name}"] = (f"not a regular file: {kind.format(folder=folder)}; only regular "
                                      "files are read, so it was not opened")
    return made


def test_predict_lists_fifos_sockets_and_devices_unopened_and_scores_the_rest(trained, tmp_path):
    tmp, _, cell = trained
    folder = tmp_path / "scans"
    special = not_regular_files(folder)
    good = shutil.copy(next((tmp / "images" / "COVID").glob("*.png")), folder / "scan.png")
    lone = tmp_path / "lone pipe.png"  # named on the command line, not found in a folder
    os.mkfifo(lone)
    special[lone] = ("not a regular file: a named pipe (FIFO); only regular files are read, so it was "
                     "not opened")
    out = tmp_path / "predictions.csv"
    with at_most(120):
        result = cli(tmp, "predict", str(folder), str(lone), "--model-uri", str(cell), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert ": 1 images scored" in result.stdout and "5 unreadable files" in result.stdout
    table = pd.read_csv(out).set_index("file")
    assert 0 <= table.loc[str(good), "p_covid"] <= 1
    for path, reason in special.items():
        assert table.loc[str(path), "error"] == reason
        assert f"{path}" in result.stdout and f"not scored: {reason}" in result.stdout


def test_explain_and_evaluate_of_a_folder_never_open_fifos_sockets_or_devices(trained, tmp_path):
    tmp, _, cell = trained
    folder = tmp_path / "ward"
    shutil.copytree(tmp / "images", folder)
    special = not_regular_files(folder / "COVID")
    with at_most(120):
        explained = cli(tmp, "explain", str(folder / "COVID"), "--model-uri", str(cell),
                        "--out", str(tmp_path / "cams"))
        evaluated = cli(tmp, "evaluate", "--model-uri", str(cell), "--data", str(folder))
    assert explained.exit_code == 0, explained.output
    assert evaluated.exit_code == 0, evaluated.output
    for path, reason in special.items():
        assert f"not explained: {reason}" in explained.stdout
        assert f"Quarantined: {path}: {reason}\n" in evaluated.stderr
    assert f"on {folder}: 24 images (a folder, every image);" in evaluated.stdout


def test_the_decompression_bomb_guard_setting_applies_to_predict(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # the CLI run here sets it
    tmp, _, cell = trained
    scan = next((tmp / "images" / "COVID").glob("*.png"))  # 48x48 px
    out = tmp_path / "predictions.csv"
    result = cli(tmp, "-S", "ingest.max_megapixels=0.001", "predict", str(scan), "--model-uri", str(cell),
                 "--out", str(out))
    assert result.exit_code == 0, result.output
    assert pd.read_csv(out)["error"].tolist() == [
        "too large to decode safely: 0.002304 megapixels is over twice ingest.max_megapixels 0.001, Pillow's "
        "guard against decompression bombs; if the file is trusted, raise it with -S ingest.max_megapixels=N"]


# --------------------------------------------------------------------------- outputs that cannot be written


def _mount_tmpfs(folder: Path, size_kb: int) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    return done.returncode == 0


def test_a_full_disk_during_a_re_run_keeps_the_old_model(trained, tmp_path):
    """The cell on a small tmpfs that holds the old model but not the new run's checkpoint."""
    tmp, uri, cell = trained
    disk = tmp_path / "disk"
    model_bytes = (cell / "model" / "model.keras").stat().st_size
    if shutil.which("mount") is None or not _mount_tmpfs(disk, size_kb=model_bytes // 1024 + 200):
        pytest.skip("cannot mount a small tmpfs here (needs root and a mount namespace that allows it); "
                    "the full-disk case of ingest runs with RLIMIT_FSIZE in test_bad_input.py")
    try:
        shutil.copytree(cell, disk / "cell")
        old = (disk / "cell" / "model" / "model.keras").read_bytes()
        done = subprocess.run(
            [COVIDTL, *settings(tmp), "train", "--model", "custom_cnn", "--dataset", "tiny", "--epochs", "1",
             "--out", str(disk / "cell"), "--no-log-model"],
            capture_output=True, text=True, timeout=600, env={**os.environ, "MLFLOW_TRACKING_URI": uri})
        assert done.returncode == 2, done.stderr[-3000:]
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith(f"Error: {disk / 'cell'}/") and "cannot write it (No space left on device); " \
            "free some disk space (or write to another disk) and run the same command again" in last, last
        assert "Traceback" not in done.stderr
        assert (disk / "cell" / "model" / "model.keras").read_bytes() == old  # the old model, whole
        assert not [p for p in (disk / "cell").rglob("*") if ".tmp" in p.name]  # nothing half-written
        metrics = json.loads((disk / "cell" / "metrics.json").read_text())
        assert metrics["status"] == "failed"  # no record that calls the cell complete
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_read_only_out_folder_for_train_is_one_line(trained, shared_tmp):
    _needs_a_user_without_rights()
    tmp = trained[0]
    project = shared_tmp / "project"
    shutil.copytree(tmp / "images", project / "images")
    shutil.copytree(tmp / "data", project / "data")
    shutil.copytree(trained[2], project / "cell")
    for path in shared_tmp.rglob("*"):
        path.chmod(0o777 if path.is_dir() else 0o666)
    (project / "cell").chmod(0o555)
    old = {p: p.read_bytes() for p in (project / "cell").rglob("*") if p.is_file()}
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", "HOME": str(project),
           "KERAS_HOME": str(project / "keras"), "MPLCONFIGDIR": str(project / "mpl")}
    args = [COVIDTL, *settings(project), "train", "--model", "custom_cnn", "--dataset", "tiny", "--epochs", "1",
            "--out", str(project / "cell"), "--no-log-model"]
    done = as_user(args, env=env)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"Error: {project / 'cell' / 'metrics.json'}: Permission denied; choose a folder you can write to, or "
        "fix its permissions, and run the command again")
    assert {p: p.read_bytes() for p in (project / "cell").rglob("*") if p.is_file()} == old
