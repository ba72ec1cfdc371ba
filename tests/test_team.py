"""Working as a team, with real processes: a dataset under DVC shared through a DVC remote, and a
shared MLflow tracking server (PostgreSQL + artifact store) that runs are read back from over HTTP.

Both build a tiny copy of the project (as tests/test_study.py does) on the synthetic data: one cell,
one epoch, small images.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
TINY = {
    "synth.images_per_class": 30,
    "synth.slices_per_patient": 5,
    "synth.size": 128,
    "synth.site2_images_per_class": 4,
    # One patient group per class at 4 slices of 5 per patient: each image its own group, so the
    # adapt_curve stage can halve the site (as tests/test_adapt_curve.py does).
    "adapt.series": False,
    "study.models": ["custom_cnn"],
    "study.inits": ["random"],
    "study.datasets": ["ct"],
    "train.max_epochs": 1,
    "train.batch_size": 16,
    "eval.bootstrap": 0,
}
CELL = "custom_cnn-random-ct"

pytestmark = pytest.mark.timeout(900)


def _set(params: dict, dotted: str, value) -> None:
    node = params
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[key]
    node[last] = value


def run(cwd: Path, *args: str, check: bool = True, **extra_env: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "KERAS_HOME", "DVC_"))}
    env.update(KERAS_HOME=str(cwd.parent / "keras-empty"), TF_CPP_MIN_LOG_LEVEL="2",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    env.update(extra_env)
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def make_project(dest: Path) -> Path:
    """The project's files (as `git ls-files` lists them) in a fresh git repo, with the tiny profile."""
    if shutil.which("git") is None:
        pytest.skip("needs git")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file() and not name.startswith(("data/", "models/", "reports/")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    from ruamel.yaml import YAML

    rt = YAML()  # round trip: params.yaml keeps its comments, as `covidtl data add` must too
    params = rt.load(dest / "params.yaml")
    for key, value in TINY.items():
        _set(params, key, value)
    del params["data"]["datasets"]["xray"], params["external"]["xray"]  # one dataset: the one under DVC
    # ... so no profile cells: the SimCLR profile's pretraining reads the X-ray training split too.
    params["study"]["profiles"]["cnn_simclr"]["models"] = []
    rt.dump(params, dest / "params.yaml")
    (dest / "dvc.lock").unlink(missing_ok=True)
    run(dest, "git", "init", "-q")
    run(dest, "git", "add", "-A")
    run(dest, "git", "commit", "-qm", "tiny project")
    return dest


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (or of the file itself), by relative path."""
    if folder.is_file():
        return {folder.name: hashlib.sha256(folder.read_bytes()).hexdigest()}
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- DVC remote


def test_second_clone_pulls_identical_files_and_an_older_commit_restores_its_images(tmp_path):
    one = make_project(tmp_path / "clone1")
    remote = tmp_path / "remote"
    run(one, "dvc", "remote", "add", "-d", "team", str(remote))
    # Two "downloads" of one dataset: the second is a newer release with other images.
    run(one, "covidtl", "synth", "--out", str(tmp_path / "download-v1"))
    run(one, "covidtl", "-S", "synth.seed=8", "synth", "--out", str(tmp_path / "download-v2"))

    added = run(one, "covidtl", "data", "add", "ct", str(tmp_path / "download-v1" / "ct"), "--series")
    assert "datasets/ct.dvc" in added.stdout
    assert yaml.safe_load((one / "params.yaml").read_text())["data"]["datasets"]["ct"]["path"] == "datasets/ct"
    assert "# The single source of defaults" in (one / "params.yaml").read_text()  # comments kept
    run(one, "git", "add", "-A")
    assert "datasets/ct.dvc" in run(one, "git", "ls-files").stdout.split()
    assert "datasets/ct/" not in run(one, "git", "ls-files").stdout  # the images stay out of git
    run(one, "git", "commit", "-qm", "data: ct v1")
    run(one, "dvc", "push")
    v1 = digests(one / "datasets/ct")
    assert v1 == digests(tmp_path / "download-v1" / "ct")

    run(one, "covidtl", "data", "add", "ct", str(tmp_path / "download-v2" / "ct"))
    v2 = digests(one / "datasets/ct")
    assert v2 == digests(tmp_path / "download-v2" / "ct") and v2 != v1
    run(one, "dvc", "repro")
    run(one, "git", "add", "-A")
    run(one, "git", "commit", "-qm", "data: ct v2; the study on it")
    run(one, "dvc", "push")
    assert run(one, "git", "status", "--porcelain").stdout == ""

    two = tmp_path / "clone2"
    run(tmp_path, "git", "clone", "-q", str(one), str(two))
    # The study's pipeline and the versioned datasets (augment/ and tune/ have never run here).
    run(two, "dvc", "pull", "-R", "dvc.yaml", "datasets")
    shared = ["datasets/ct", "data/ct/manifest.csv", "data/ct/split.csv", "data/ct/ingest.json",
              f"models/{CELL}/model", f"models/{CELL}/metrics.json", f"models/{CELL}/predictions.csv",
              "external/ct", "reports"]
    for path in shared:
        assert digests(two / path) == digests(one / path), path
    assert "up to date" in run(two, "dvc", "status", "-R", "dvc.yaml", "datasets").stdout
    again = run(two, "dvc", "repro")
    assert "Running stage" not in again.stdout and "Data and pipelines are up to date." in again.stdout

    run(two, "git", "checkout", "-q", "HEAD~1")  # new images, committed before the study ran on them
    run(two, "dvc", "checkout", "datasets/ct.dvc")
    assert digests(two / "datasets/ct") == v1
    run(two, "git", "checkout", "-q", "-")
    run(two, "dvc", "checkout", "-R", "dvc.yaml", "datasets")
    assert digests(two / "datasets/ct") == v2


def test_data_add_refuses_a_missing_folder_in_one_line(tmp_path):
    one = make_project(tmp_path / "clone1")
    result = run(one, "covidtl", "data", "add", "ct", str(tmp_path / "nowhere"), check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path / "nowhere") in lines[0] and "no such folder" in lines[0]
    assert not (one / "datasets/ct.dvc").exists()


def test_data_add_refuses_a_fifo_or_a_link_to_dev_zero_unopened_in_one_line(tmp_path):
    one = make_project(tmp_path / "clone1")
    params = (one / "params.yaml").read_text()
    for special in ("pipe.png", "zero.png"):
        download = tmp_path / f"download-{special}"
        (download / "COVID").mkdir(parents=True)
        (download / "COVID" / "a.png").write_bytes(b"an image")
        if special == "pipe.png":
            os.mkfifo(download / "COVID" / special)
            kind = "a named pipe (FIFO)"
        else:
            (download / "COVID" / special).symlink_to("/dev/zero")
            kind = "a link to /dev/zero, a character device"
        result = run(one, "covidtl", "data", "add", "ct", str(download), check=False)
        assert result.returncode == 2, result.stderr
        assert result.stderr == (f"Error: {download / 'COVID' / special}: not a regular file ({kind}); `data "
                                 "add` copies only regular files: remove it from the folder and run the command "
                                 "again\n")
    assert not (one / "datasets").exists() or not any((one / "datasets").iterdir())  # no copy left
    assert (one / "params.yaml").read_text() == params


# --------------------------------------------------------------------------- tracking server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server_store() -> str:
    """CI's PostgreSQL database for the tracking server (bash .ci/run creates covidtl_mlflow)."""
    url = os.environ.get("COVIDTL_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("no PostgreSQL: set COVIDTL_TEST_POSTGRES_URL (bash .ci/run starts one and sets it)")
    url = url.rsplit("/", 1)[0] + "/covidtl_mlflow"
    import psycopg2

    try:
        psycopg2.connect(url, connect_timeout=5).close()
    except psycopg2.Error as exc:
        pytest.skip(f"PostgreSQL database covidtl_mlflow not reachable (bash .ci/run creates it): {exc}".splitlines()[0])
    return url


def wait_until_up(process: subprocess.Popen, uri: str, log: Path, timeout_s: float = 240) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"covidtl server exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"covidtl server not up after {timeout_s} s:\n{log.read_text()[-3000:]}")


@pytest.mark.postgres
def test_a_cell_trained_against_the_tracking_server_is_read_back_over_http(tmp_path, server_store):
    import mlflow.artifacts
    import mlflow.keras
    import numpy as np
    from mlflow import MlflowClient

    project = make_project(tmp_path / "project")
    uri = f"http://127.0.0.1:{free_port()}"
    log = tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    with log.open("w") as out:
        # One worker: four would each import MLflow (a minute on a loaded 2-core machine).
        server = subprocess.Popen(
            ["covidtl", "server", "--backend-store-uri", server_store, "--artifacts-destination",
             str(tmp_path / "artifacts"), "--port", uri.rsplit(":", 1)[1], "--", "--workers", "1"],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_up(server, uri, log)
        # As the study runs a cell: --no-log-model; a remote store must get the model anyway.
        run(project, "covidtl", "train", "--model", "custom_cnn", "--init", "random", "--dataset", "ct",
            "--no-log-model", MLFLOW_TRACKING_URI=uri)
        cell = project / "models" / CELL
        run_id = json.loads((cell / "metrics.json").read_text())["run_id"]
        shutil.rmtree(project)  # nothing below may come from the client's disk

        client = MlflowClient(tracking_uri=uri)
        record = client.get_run(run_id)
        assert record.info.status == "FINISHED"
        assert client.get_experiment(record.info.experiment_id).name == "covidtl-ct"
        tags = record.data.tags
        assert tags["model_location"] == "artifacts" and tags["model_uri"].startswith("models:/")
        assert tags["model_path"] == f"models/{CELL}/model/model.keras"  # where the DVC output would be
        assert 0 <= record.data.metrics["test_accuracy"] <= 1
        assert len(client.get_metric_history(run_id, "val_loss")) == 1  # one epoch
        assert {"card.json", "config.yaml", "training_curves.png"} <= {a.path for a in client.list_artifacts(run_id)}

        # models:/ URIs resolve through the process-wide tracking URI (the argument is not used).
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(uri)
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=tags["model_uri"],
                                                        dst_path=str(tmp_path / "download"))
        finally:
            mlflow.set_tracking_uri(previous)
        model = mlflow.keras.load_model(local)
        size = model.input_shape[1]
        assert model.predict(np.zeros((2, size, size, 3), "float32"), verbose=0).shape[0] == 2
        # The server's artifact store holds the one copy.
        assert len(list((tmp_path / "artifacts").rglob("*.keras"))) == 1
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_server_refuses_an_unreachable_database_in_one_line(tmp_path):
    store = f"postgresql://covidtl:secret@127.0.0.1:{free_port()}/covidtl_mlflow"
    result = run(tmp_path, "covidtl", "server", "--backend-store-uri", store, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot connect" in lines[0] and "secret" not in lines[0]
    assert "127.0.0.1" in lines[0]


# --------------------------------------------------------------------------- queued experiments


def test_a_queued_experiment_logs_to_the_projects_store_and_its_cells_come_back_with_apply(tmp_path):
    project = make_project(tmp_path / "project")
    run(project, "dvc", "repro", "split@ct")  # the baseline every queued experiment starts from
    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-qm", "baseline: data stages done")
    run(project, "dvc", "exp", "run", "--queue", "-n", "slice-cnn", "-S", "study.models=[custom_cnn]",
        f"train@{CELL}")
    run(project, "dvc", "queue", "start", "--jobs", "1")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = run(project, "dvc", "queue", "status").stdout
        if not any(word in status for word in ("Queued", "Running")):
            break
        time.sleep(3)
    assert "Success" in status, run(project, "dvc", "queue", "logs", "slice-cnn", check=False).stdout[-3000:]
    assert not (project / "models").exists()  # the workspace is untouched until `dvc exp apply`

    # The run went to the project's store, though it ran in .dvc/tmp/exps/..., deleted since.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("covidtl-ct")
    (record,) = client.search_runs([experiment.experiment_id], "tags.dvc_experiment = 'slice-cnn'")
    assert record.info.status == "FINISHED"
    assert record.info.artifact_uri.startswith((project / "mlruns").as_uri())
    assert "training_curves.png" in {a.path for a in client.list_artifacts(record.info.run_id)}
    assert record.data.tags["model_path"] == f"models/{CELL}/model/model.keras"

    run(project, "covidtl", "report", "--no-log", "--with-experiment", "slice-cnn")
    import pandas as pd

    table = pd.read_csv(project / "reports" / "results.csv")
    assert table.loc[table["group"] == "slice-cnn", "run_id"].tolist() == [record.info.run_id]

    # apply then checks out every pipeline's outputs, and reports those that never ran here
    # (augment/, tune/, this experiment's untargeted stages) as missing, with a non-zero status.
    applied = run(project, "dvc", "exp", "apply", "slice-cnn", check=False)
    assert f"models/{CELL}/" not in applied.stdout + applied.stderr  # (the -best cell never ran here)
    metrics = json.loads((project / "models" / CELL / "metrics.json").read_text())
    assert metrics["run_id"] == record.info.run_id and (project / "models" / CELL / "model" / "model.keras").is_file()
