"""`covidtl cv` killed and run again: finished folds are reused, the cut one continues, one parent run."""

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
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from covidtl.cli import main
from helpers_train import make_workdir

ROOT = Path(__file__).parents[1]
COVIDTL = str(Path(sys.executable).parent / "covidtl")
CELL = "custom_cnn-random-tiny"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Tiny synthetic images (6 groups per class), their manifest, a fresh tracking store."""
    _, table = make_workdir(tmp_path)
    manifest = table.drop(columns="split").assign(dhash=table["sha256"].str[:16])  # as ingest has it
    manifest.to_csv(tmp_path / "data" / "tiny" / "manifest.csv", index=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return tmp_path, uri


def cv_args(tmp: Path, folds: int, epochs: int, *settings: str) -> list[str]:
    """`covidtl cv` of the custom CNN on the tiny set; the stop rule off (val_accuracy never reaches 2)."""
    return [
        "--params", str(ROOT / "params.yaml"), "-S", f"data.workdir={tmp / 'data'}",
        "-S", f"data.datasets.tiny.path={tmp / 'images'}", "-S", "train.stop.val_accuracy=2",
        "-S", "train.bn_recalibration_batches=2", "-S", "train.batch_size=8", "-S", "eval.bootstrap=100",
        *settings,
        "cv", "--model", "custom_cnn", "--dataset", "tiny", "--folds", str(folds), "--epochs", str(epochs),
        "--out", str(tmp / "cv"), "--no-prepare",
    ]


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def kill_when(args: list[str], ready, log: Path) -> None:
    """Start the command (its output to `log`: a full pipe would stall it); SIGKILL it as soon as
    `ready()` holds."""
    with log.open("w") as sink:
        proc = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, env=os.environ.copy())
        deadline = time.monotonic() + 400
        while not ready():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the moment to kill never came within 400 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_a_killed_cv_reuses_finished_folds_and_continues_the_cut_one(workdir):
    tmp, uri = workdir
    out = tmp / "cv" / "tiny" / CELL
    args = [COVIDTL, *cv_args(tmp, folds=3, epochs=2)]
    fold1, fold2 = out / "fold-1" / "cell", out / "fold-2" / "cell"
    # Fold 1 finished, fold 2 one epoch into its two.
    # (The epoch's cost is written by a callback after its checkpoint's: wait for both.)
    kill_when(args, lambda: read_json(fold1 / "metrics.json").get("status") == "ok"
              and read_json(fold2 / "checkpoint" / "state.json").get("epochs_done", 0) >= 1
              and (read_json(out / "fold-2" / "cost.json").get("wall_seconds") or 0) > 0, tmp / "killed.log")
    run1 = read_json(fold1 / "metrics.json")["run_id"]
    cut = read_json(fold2 / "checkpoint" / "state.json")
    model = (fold1 / "model" / "model.keras").stat()
    cost1, cost2 = (read_json(out / f"fold-{k}" / "cost.json") for k in (1, 2))
    assert cost1["complete"] and not cost2["complete"] and cost2["wall_seconds"] > 0
    parent = read_json(out / "cv_state.json")["run_id"]
    assert not (out / "summary.json").exists()

    again = subprocess.run(args, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"fold 1/3: done before (run {run1}), reused" in again.stderr
    assert f"Resuming run {cut['run_id']} after epoch {cut['epochs_done']}" in again.stderr
    assert f"cv: continuing run {parent}" in again.stderr
    assert "reused" not in again.stderr.split("fold 2/3")[1]  # folds 2 and 3 trained
    now = (fold1 / "model" / "model.keras").stat()
    assert (now.st_ino, now.st_mtime_ns) == (model.st_ino, model.st_mtime_ns)  # fold 1 not retrained

    summary = json.loads((out / "summary.json").read_text())
    folds = pd.read_csv(out / "folds.csv")
    assert summary["run_id"] == parent
    assert list(folds["run_id"][:2]) == [run1, cut["run_id"]]
    # The cost across both runs: fold 1's as recorded, fold 2's from before the kill and after.
    assert folds.loc[0, "wall_seconds"] == cost1["wall_seconds"]
    assert folds.loc[1, "cpu_seconds"] > cost2["cpu_seconds"]
    assert summary["compute"]["wall_seconds"] == pytest.approx(folds["wall_seconds"].sum())
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert len(runs) == 4 and sorted(r.info.run_id for r in children) == sorted(folds["run_id"])
    assert all(r.info.status == "FINISHED" for r in runs)
    assert sorted(m.step for m in client.get_metric_history(cut["run_id"], "loss")) == [1, 2]
    pooled = pd.read_csv(out / "predictions.csv")
    manifest = pd.read_csv(tmp / "data" / "tiny" / "manifest.csv")
    assert sorted(pooled["path"]) == sorted(Path(p).relative_to(tmp / "images").as_posix()
                                            for p in manifest["path"])  # every image once
    assert summary["images"] == len(manifest)


def test_other_settings_retrain_every_fold_and_the_same_ones_reuse_them(workdir):
    tmp, _ = workdir
    out = tmp / "cv" / "tiny" / CELL
    runner = CliRunner()

    def cv(*settings: str):
        result = runner.invoke(main, cv_args(tmp, 2, 1, *settings))
        assert result.exit_code == 0, result.output
        return result.output, pd.read_csv(out / "folds.csv"), json.loads((out / "summary.json").read_text())

    def probed() -> None:  # what `covidtl probe --cv` leaves
        (out / "probe").mkdir(exist_ok=True)
        (out / "probe" / "probe.json").write_text('{"shortcut_risk": false}')

    _, first, first_summary = cv()
    probed()
    output, seeded, seeded_summary = cv("-S", "train.seed=1")
    assert not (out / "probe").exists()  # it judged the models retrained
    assert "reused" not in output and "continuing run" not in output
    assert not set(seeded["run_id"]) & set(first["run_id"])  # each fold a new run
    assert seeded_summary["run_id"] != first_summary["run_id"]  # and a new parent

    probed()
    output, again, again_summary = cv("-S", "train.seed=1")
    assert (out / "probe" / "probe.json").is_file()  # the same models: their verdict stands
    assert "fold 1/2: done before" in output and "fold 2/2: done before" in output
    assert list(again["run_id"]) == list(seeded["run_id"])
    assert again_summary["run_id"] == seeded_summary["run_id"]
    pd.testing.assert_frame_equal(again, seeded)
