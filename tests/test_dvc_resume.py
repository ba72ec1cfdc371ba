"""`dvc repro` after a killed study cell re-runs just that cell, and the cell resumes its run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from covidtl.cells import EPOCH_METRICS

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
CELL = "custom_cnn-random-ct"
STAGE = f"train@{CELL}"
EPOCHS = 3

pytestmark = pytest.mark.skipif(shutil.which("dvc") is None and not (BIN / "dvc").exists(),
                                reason="dvc is not installed")


@pytest.fixture
def project(tmp_path):
    """The repository's pipeline and code in a fresh DVC project; small synthetic data, 3 epochs
    with the stop rule off (val_accuracy can never reach 2)."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (root / "weights").mkdir()
    shutil.copy(ROOT / "weights" / "README.md", root / "weights" / "README.md")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["synth"].update(images_per_class=40, site2_images_per_class=4, size=64)
    params["train"].update(max_epochs=EPOCHS, batch_size=8, bn_recalibration_batches=2)
    params["train"]["stop"]["val_accuracy"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    done = subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return root, env


def training_process(root: Path) -> int | None:
    """The pid of the cell's `covidtl ... train` process that DVC started in `root`, if running."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv]
        if cwd == str(root) and any(w.endswith("covidtl") for w in words) and "train" in words:
            return int(entry.name)
    return None


def epochs_done(root: Path) -> int:
    try:
        state = json.loads((root / "models" / CELL / "checkpoint" / "state.json").read_text())
    except (OSError, ValueError):
        return -1
    return int(state.get("epochs_done", -1))


def test_dvc_repro_after_a_killed_cell_reruns_only_it_and_it_resumes(project):
    root, env = project
    repro = subprocess.Popen(["dvc", "repro", STAGE], cwd=root, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 400
    while epochs_done(root) < 1:  # the first epoch's checkpoint is on disk
        assert repro.poll() is None, repro.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no checkpoint of epoch 1 within 400 s"
        time.sleep(0.1)
    pid = training_process(root)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    first = repro.communicate(timeout=120)[0]
    assert repro.returncode != 0, first[-3000:]
    done = epochs_done(root)
    assert 1 <= done < EPOCHS
    state = json.loads((root / "models" / CELL / "checkpoint" / "state.json").read_text())
    run_id = state["run_id"]

    again = subprocess.run(["dvc", "repro", STAGE], cwd=root, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    ran = [line for line in again.stdout.splitlines() if line.startswith("Running stage")]
    assert ran == [f"Running stage '{STAGE}':"], again.stdout[-3000:]  # synth, ingest, split are cached
    assert f"Resuming run {run_id} after epoch {done}" in again.stdout + again.stderr

    metrics = json.loads((root / "models" / CELL / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["run_id"] == run_id and metrics["epochs_used"] == EPOCHS
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [run_id]  # the same run continued, no second one
    assert runs[0].info.status == "FINISHED"
    for key in EPOCH_METRICS:  # no epoch lost or logged twice
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(1, EPOCHS + 1)), key
    assert not (root / "models" / CELL / "checkpoint").exists()
    status = subprocess.run(["dvc", "status", STAGE], cwd=root, env=env, capture_output=True, text=True)
    assert "Data and pipelines are up to date." in status.stdout, status.stdout
