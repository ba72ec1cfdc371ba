"""Resume: `covidtl train` killed (SIGKILL) or interrupted (Ctrl-C) and run again continues its run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from covidtl.cells import EPOCH_METRICS
from helpers_train import make_workdir

ROOT = Path(__file__).parents[1]
COVIDTL = str(Path(sys.executable).parent / "covidtl")
EPOCHS = 4


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Tiny synthetic images, their split, and a fresh SQLite tracking store for the subprocesses."""
    make_workdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return tmp_path, uri


def command(tmp: Path, out: Path, *extra: str) -> list[str]:
    """The custom CNN for 4 epochs, the stop rule disabled (val_accuracy can never reach 2)."""
    return [
        COVIDTL, "--params", str(ROOT / "params.yaml"), "-S", f"data.workdir={tmp / 'data'}",
        "-S", f"data.datasets.tiny.path={tmp / 'images'}", "-S", "train.stop.val_accuracy=2",
        "-S", "train.bn_recalibration_batches=2",
        "train", "--model", "custom_cnn", "--dataset", "tiny", "--epochs", str(EPOCHS),
        "--batch-size", "8", "--out", str(out), "--no-log-model", *extra,
    ]


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=os.environ.copy())


def state_of(cell: Path) -> dict:
    try:
        return json.loads((cell / "checkpoint" / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def start_and_stop_after_two_epochs(args: list[str], cell: Path, sig: int, epochs: int = 2
                                    ) -> subprocess.CompletedProcess:
    """Start training; once the checkpoint holds `epochs` epochs, send `sig`; wait for the process."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ.copy())
    deadline = time.monotonic() + 300
    while state_of(cell).get("epochs_done", -1) < epochs:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no checkpoint of {epochs} epochs within 300 s"
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def check_one_continued_run(uri: str, cell: Path, run_id: str) -> None:
    """One MLflow run, finished, each epoch's metrics at steps 1..4 once; the files say the same."""
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [run_id]
    assert runs[0].info.status == "FINISHED"
    for key in EPOCH_METRICS:
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(1, EPOCHS + 1)), key
    assert runs[0].data.metrics["epochs_used"] == EPOCHS
    metrics = json.loads((cell / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["run_id"] == run_id and metrics["epochs_used"] == EPOCHS
    history = pd.read_csv(cell / "history.csv")
    assert history["epoch"].tolist() == list(range(1, EPOCHS + 1))
    assert not history[list(EPOCH_METRICS)].isna().any().any()
    assert not (cell / "checkpoint").exists()


def test_a_killed_run_continues_from_its_last_epoch(workdir):
    tmp, uri = workdir
    cell = tmp / "cell"
    args = command(tmp, cell)
    killed = start_and_stop_after_two_epochs(args, cell, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    state = state_of(cell)
    done, run_id = state["epochs_done"], state["run_id"]
    assert 2 <= done < EPOCHS
    assert len(list((cell / "checkpoint").glob("epoch-*.keras"))) == 1  # only the last epoch's

    again = run(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"Resuming run {run_id} after epoch {done}" in again.stderr
    check_one_continued_run(uri, cell, run_id)
    assert MlflowClient(uri).get_run(run_id).data.tags["resumed_after_epoch"] == str(done)

    # The same files, keys and history as a run never stopped.
    whole = tmp / "whole"
    plain = run(command(tmp, whole))
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "Resuming" not in plain.stderr
    for name in ("metrics.json", "model/card.json"):
        resumed, uninterrupted = (json.loads((c / name).read_text()) for c in (cell, whole))
        assert resumed.keys() == uninterrupted.keys(), name
    assert (cell / "config.yaml").read_text() == (whole / "config.yaml").read_text()
    assert list(pd.read_csv(cell / "history.csv").columns) == list(pd.read_csv(whole / "history.csv").columns)
    assert sorted(p.name for p in cell.rglob("*")) == sorted(p.name for p in whole.rglob("*"))


def test_ctrl_c_stops_keeps_the_checkpoint_and_says_how_to_continue(workdir):
    tmp, uri = workdir
    cell = tmp / "cell"
    args = command(tmp, cell)
    stopped = start_and_stop_after_two_epochs(args, cell, signal.SIGINT)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    state = state_of(cell)
    done, run_id = state["epochs_done"], state["run_id"]
    assert 2 <= done < EPOCHS
    last = stopped.stderr.strip().splitlines()[-1]
    assert last == (f"Interrupted after epoch {done} (checkpoint {cell / 'checkpoint'}): run the same "
                    f"command to continue from epoch {done + 1}, or add --restart to start over.")
    assert "Traceback" not in stopped.stderr
    assert json.loads((cell / "metrics.json").read_text())["status"] == "failed"
    assert MlflowClient(uri).get_run(run_id).info.status == "KILLED"

    changed = run(command(tmp, cell, "--lr", "5e-4"))
    assert changed.returncode == 2
    assert changed.stderr.strip().splitlines()[-1] == (
        f"Error: {cell / 'checkpoint'}: the settings or data changed since this checkpoint (epoch {done} "
        f"of run {run_id}); delete it or pass --restart")
    assert state_of(cell)["epochs_done"] == done  # refused, the checkpoint untouched

    again = run(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"Resuming run {run_id} after epoch {done}" in again.stderr
    check_one_continued_run(uri, cell, run_id)


def test_a_run_killed_in_its_first_epoch_continues_the_same_run(workdir):
    tmp, uri = workdir
    cell = tmp / "cell"
    args = command(tmp, cell)
    start_and_stop_after_two_epochs(args, cell, signal.SIGKILL, epochs=0)
    state = state_of(cell)
    assert state["epochs_done"] == 0 and state["model_file"] is None  # the run's id, no epoch yet
    again = run(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"Resuming run {state['run_id']}" in again.stderr
    check_one_continued_run(uri, cell, state["run_id"])


def test_restart_drops_the_checkpoint_and_starts_a_new_run(workdir):
    tmp, uri = workdir
    cell = tmp / "cell"
    args = command(tmp, cell)
    start_and_stop_after_two_epochs(args, cell, signal.SIGKILL)
    old = state_of(cell)["run_id"]
    fresh = run(args + ["--restart"])
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "Resuming" not in fresh.stderr
    new = json.loads((cell / "metrics.json").read_text())["run_id"]
    assert new != old
    steps = sorted(m.step for m in MlflowClient(uri).get_metric_history(new, "loss"))
    assert steps == list(range(1, EPOCHS + 1))


def test_resume_restores_the_weights_and_adams_state(tmp_path):
    """What `fit` continues from: the checkpoint's weights, Adam's moments and step count, its history."""
    import keras
    import numpy as np

    from covidtl.models.registry import build_model
    from covidtl.train import Resume, fit, plan_run

    cfg, _ = make_workdir(tmp_path, **{"train.max_epochs": 2})
    plan = plan_run(cfg, "custom_cnn", "random", "tiny", out_dir=tmp_path / "cell")
    donor = build_model(plan.spec, "random", cfg.train, plan.image_size)
    donor.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy", metrics=["accuracy"])
    x = np.random.default_rng(0).random((4, plan.image_size, plan.image_size, 3), dtype="float32")
    for _ in range(3):
        donor.train_on_batch(x, keras.utils.to_categorical([0, 1, 0, 1], 2))
    donor.save(tmp_path / "epoch-0002.keras")
    history = {"loss": [0.7, 0.6], "val_loss": [0.8, 0.7]}
    resume = Resume(run_id="r", epochs_done=2, history=history, stopped_epoch=None, seconds=5.0,
                    model_file=tmp_path / "epoch-0002.keras")

    net = build_model(plan.spec, "random", cfg.train, plan.image_size)
    fitted = fit(plan, net, None, None, run_id="r", resume=resume)  # all epochs done: nothing to train
    assert int(net.optimizer.iterations) == 3
    assert len(net.optimizer.variables) == len(donor.optimizer.variables) > 2  # the moments, not just counters
    for restored, saved in zip(net.optimizer.variables + net.weights, donor.optimizer.variables + donor.weights):
        np.testing.assert_array_equal(np.asarray(restored), np.asarray(saved))
    assert fitted.history == history and fitted.epochs_used == 2 and fitted.seconds >= 5.0


def test_epochs_a_kill_cut_off_from_mlflow_are_logged_once(tmp_path):
    """Killed between an epoch's checkpoint and its MLflow log: the resume logs that step, once."""
    import mlflow

    from covidtl.train import log_missing_epochs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    history = {key: [0.5, 0.4, 0.3] for key in EPOCH_METRICS}
    with mlflow.start_run() as run:
        mlflow.log_metrics({key: 0.5 for key in EPOCH_METRICS}, step=1)
        mlflow.log_metrics({key: 0.4 for key in EPOCH_METRICS}, step=2)
        log_missing_epochs(run.info.run_id, history)
    client = MlflowClient(uri)
    for key in EPOCH_METRICS:
        points = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert points == [(1, 0.5), (2, 0.4), (3, 0.3)], key
