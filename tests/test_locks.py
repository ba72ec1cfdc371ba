"""One process at a time on a folder of results: a second is refused in one line naming the first,
a lock left by a killed holder is taken over, and DVC never sees the lock file."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from covidtl.cells import EPOCH_METRICS
from covidtl.cli import main
from covidtl.paths import CLASSES
from helpers_train import make_workdir

ROOT = Path(__file__).parents[1]
COVIDTL = str(Path(sys.executable).parent / "covidtl")
HOST = socket.gethostname()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Tiny synthetic images, their split, and a fresh SQLite tracking store for the subprocesses."""
    make_workdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return tmp_path, uri


def settings(tmp: Path) -> list[str]:
    return ["--params", str(ROOT / "params.yaml"), "-S", f"data.workdir={tmp / 'data'}",
            "-S", f"data.datasets.tiny.path={tmp / 'images'}", "-S", "train.bn_recalibration_batches=2"]


def train_command(tmp: Path, cell: Path) -> list[str]:
    return [COVIDTL, *settings(tmp), "train", "--model", "custom_cnn", "--dataset", "tiny", "--epochs", "1",
            "--batch-size", "8", "--out", str(cell), "--no-log-model"]


def lock_file(target: Path) -> Path:
    """Beside the folder, hidden: removing the folder keeps it, and .dvcignore names it."""
    return target.parent / f".{target.name}.covidtl.lock"


def holder_of(target: Path) -> dict:
    try:
        return json.loads(lock_file(target).read_text())
    except (OSError, ValueError):
        return {}


def start_holding(args: list[str], target: Path) -> tuple[subprocess.Popen, dict]:
    """Start `args`; return once the process holds `target`'s lock, with the holder's record."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while holder_of(target).get("pid") != proc.pid:
        assert proc.poll() is None, f"it ended without ever holding the lock: {proc.communicate()}"
        assert time.monotonic() < deadline, "no lock within 300 s"
        time.sleep(0.05)
    return proc, holder_of(target)


def refusal(target: Path, holder: dict) -> str:
    return (f"Error: {target}: in use by {holder['what']} (pid {holder['pid']} on {HOST}, started "
            f"{holder['started']}: {holder['command']}); two at once would mix their files: wait for it to "
            "end (or stop it) and run this again")


def test_a_second_training_of_a_cell_is_refused_and_the_cell_is_the_first_ones_run(workdir):
    tmp, uri = workdir
    cell = tmp / "cell"
    args = train_command(tmp, cell)
    first, holder = start_holding(args, cell)
    first.send_signal(signal.SIGSTOP)  # it keeps the lock, and stays put until the second has answered
    try:
        second = subprocess.run(args, capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    _, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err[-3000:]

    assert second.returncode == 2, second.stderr[-3000:]
    errors = [line for line in second.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [refusal(cell, holder)]
    assert holder["what"] == "covidtl train" and holder["command"].startswith("covidtl --params ")
    assert "Traceback" not in second.stderr
    assert not lock_file(cell).exists()  # removed by the first as it ended
    check_cell_is_its_run(uri, cell, tmp / "images")


def check_cell_is_its_run(uri: str, cell: Path, images: Path) -> None:
    """The only MLflow run is the one metrics.json names, and the cell's model, predictions and
    history are that run's: its logged metrics, card and confusion matrix say the same."""
    client = MlflowClient(uri)
    record = json.loads((cell / "metrics.json").read_text())
    run_id = record["run_id"]
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [run_id]  # the refused process started none
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and record["status"] == "ok"
    figures = {k: v for k, v in record.items() if k.startswith("test_") and isinstance(v, float)}
    assert "test_roc_auc" in figures
    for key, value in figures.items():
        if math.isfinite(value):
            assert run.data.metrics[key] == pytest.approx(value), key
    assert run.data.metrics["epochs_used"] == record["epochs_used"] == 1

    history = pd.read_csv(cell / "history.csv")
    for key in EPOCH_METRICS:
        logged = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        np.testing.assert_allclose(history[key], [m.value for m in logged], rtol=1e-6, err_msg=key)

    card = json.loads((cell / "model" / "card.json").read_text())
    assert card["run_id"] == run_id
    assert json.loads(Path(client.download_artifacts(run_id, "card.json", str(cell.parent))).read_text()) == card

    predictions = pd.read_csv(cell / "predictions.csv")
    matrix = json.loads(Path(client.download_artifacts(
        run_id, "test_confusion_matrix.json", str(cell.parent))).read_text())["matrix"]
    counted = [[int(((predictions["actual"] == a) & (predictions["predicted"] == p)).sum()) for p in CLASSES]
               for a in CLASSES]
    assert counted == matrix
    assert run.data.metrics["test_accuracy"] == pytest.approx(
        (predictions["actual"] == predictions["predicted"]).mean())
    # The model on disk makes exactly these predictions.
    from covidtl.evaluate import load_trained
    from covidtl.predict import Predictor, read_files

    files = [images / path for path in predictions["path"]]
    scored = Predictor(load_trained(str(cell))).score(read_files(files))
    np.testing.assert_allclose([s.p_covid for s in scored], predictions["p_covid"], atol=1e-5)


def test_a_lock_whose_holder_was_killed_is_taken_over_with_a_line_saying_so(workdir):
    tmp, _ = workdir
    cell = tmp / "cell"
    args = train_command(tmp, cell)
    killed, holder = start_holding(args, cell)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    assert holder_of(cell) == holder  # left behind by the killed holder

    again = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    notes = [line for line in again.stderr.splitlines() if "took over the lock" in line]
    assert notes == [f"Note: {cell}: took over the lock of covidtl train (pid {killed.pid} on {HOST}, started "
                     f"{holder['started']}: {holder['command']}), a process that is gone (killed?)"]
    assert json.loads((cell / "metrics.json").read_text())["status"] == "ok"
    assert not lock_file(cell).exists()


@pytest.mark.parametrize("command, target", [
    (["train", "--model", "custom_cnn", "--dataset", "tiny", "--out", "{out}"], "{out}"),
    (["evaluate", "--model-uri", "{tmp}/cell", "--data", "tiny", "--out", "{out}"], "{out}"),
    (["cv", "--model", "custom_cnn", "--init", "random", "--dataset", "tiny", "--out", "{out}", "--no-prepare"],
     "{out}/tiny/custom_cnn-random-tiny"),
    (["external", "ct", "--out", "{out}"], "{out}/ct"),
    (["pretrain", "--model", "custom_cnn", "--datasets", "tiny", "--out", "{out}/custom_cnn.weights.h5",
      "--no-prepare"], "{out}/custom_cnn.weights.h5"),
], ids=["train", "evaluate", "cv", "external", "pretrain"])
def test_every_command_that_writes_a_folder_of_results_refuses_one_in_use(workdir, command, target):
    from covidtl import locks

    tmp, _ = workdir
    out = tmp / "results"
    target = Path(target.format(out=out, tmp=tmp))
    assert CliRunner().invoke(main, [*settings(tmp), "ingest", "tiny", "--quiet"]).exit_code == 0  # cv reads it
    with locks.hold(target, "a test") as lock:
        result = CliRunner().invoke(main, [*settings(tmp), *(c.format(out=out, tmp=tmp) for c in command)])
        holder = json.loads(lock.read_text())
        assert lock == lock_file(target)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1] == refusal(target, holder)
    assert holder["pid"] == os.getpid()
    assert not target.exists()  # refused before anything was written


def test_a_cache_build_waits_for_the_process_building_it(tmp_path, caplog):
    """Caches are locked only while an entry is built: a second builder waits, saying for whom."""
    from covidtl import locks

    target, built = tmp_path / "cache" / "entry.npy", tmp_path / "built"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import pathlib, sys, time\nfrom covidtl import locks\n"
         "with locks.hold(sys.argv[1], 'a decode-cache build'):\n    print('held', flush=True)\n"
         "    time.sleep(1.5)\n    pathlib.Path(sys.argv[2]).touch()\n", str(target), str(built)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    caplog.set_level(logging.INFO, logger="covidtl")
    with locks.hold(target, "a second build", wait=True):
        assert built.exists()  # the lock came only once the first had finished
    assert holder.wait(timeout=60) == 0
    said = caplog.messages
    assert len(said) == 1 and said[0].startswith(f"{target}: waiting for a decode-cache build (pid {holder.pid} ")
    assert not lock_file(target).exists()


def test_dvc_ignores_the_lock_files():
    from dvc.repo import Repo

    ignore = Repo(str(ROOT)).dvcignore
    for target in ("models/custom_cnn-random-ct", "external/ct", "cv/ct/custom_cnn-random-ct",
                   "data/pretrain/custom_cnn.weights.h5", "data/cache/0123abcd.npy"):
        assert ignore.is_ignored_file(str(lock_file(ROOT / target)))
    assert not ignore.is_ignored_file(str(ROOT / "models" / "custom_cnn-random-ct" / "metrics.json"))
