"""`covidtl register` and `mlflow models serve`: a cell's model answers image files over HTTP."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from covidtl.cli import main
from covidtl.evaluate import load_trained
from covidtl.predict import predict_files
from covidtl.train import RunOptions, plan_run, train
from helpers_train import make_workdir

ROOT = Path(__file__).parents[1]
NAME = "covidtl-tiny"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """(tmp, tracking URI, cell): the custom CNN after one epoch, registered as NAME@champion."""
    tmp = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        cfg, _ = make_workdir(tmp)
        train(plan_run(cfg, "custom_cnn", "random", "tiny", out_dir=tmp / "cell"), RunOptions(log_model=False))
        run = CliRunner().invoke(main, ["--params", str(ROOT / "params.yaml"), "-S",
                                        f"data.workdir={tmp / 'data'}", "register", str(tmp / "cell"),
                                        "--name", NAME, "--alias", "champion"])
    assert run.exit_code == 0, run.output
    assert f"models:/{NAME}@champion" in run.output
    return tmp, uri, tmp / "cell"


@pytest.fixture(autouse=True)
def _track(registered, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered[1])


def images(tmp: Path) -> list[Path]:
    return sorted((tmp / "images" / "COVID").glob("*.png"))[:3] + sorted(
        (tmp / "images" / "non-COVID").glob("*.png"))[:3]


def test_register_sets_the_alias_and_the_one_loader_reads_it(registered):
    tmp, uri, cell = registered
    client = MlflowClient(uri)
    version = client.get_model_version_by_alias(NAME, "champion")
    run = client.get_run(version.run_id)
    card = json.loads((cell / "model" / "card.json").read_text())
    assert run.data.tags["kind"] == "register"
    assert run.data.tags["source_run_id"] == card["run_id"]  # the cell's training run
    pyfunc = mlflow.models.get_model_info(f"models:/{NAME}@champion").flavors["python_function"]
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model"  # models-from-code, no pickle
    assert set(pyfunc["artifacts"]) == {"keras_model", "card"}

    served = load_trained(f"models:/{NAME}@champion")
    local = load_trained(str(cell))
    assert served.name == "custom_cnn" and served.source_run_id == card["run_id"]
    assert served.operating_threshold == pytest.approx(card["operating_point"]["threshold"])
    assert served.preprocessing == card["preprocessing"]
    by_version = load_trained(f"models:/{NAME}/{version.version}")
    x = np.random.default_rng(0).random((2, *local.model.input_shape[1:]), dtype=np.float32)
    for other in (served, by_version):
        np.testing.assert_allclose(np.asarray(other.model(x)), np.asarray(local.model(x)), atol=1e-6)


def test_register_refuses_a_bad_alias_in_one_line(registered):
    tmp, _, cell = registered
    run = CliRunner().invoke(main, ["--params", str(ROOT / "params.yaml"), "register", str(cell),
                                    "--name", NAME, "--alias", "v2"])
    assert run.exit_code == 2 and "--alias" in run.output and "Traceback" not in run.output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: bytes) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture(scope="module")
def server(registered, tmp_path_factory):
    """`mlflow models serve` of NAME@champion on a free port of 127.0.0.1, as a real process."""
    tmp, uri, _ = registered
    tmp_path = tmp_path_factory.mktemp("server")
    port = free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    log = open(tmp_path / "server.log", "w")
    process = subprocess.Popen(
        [str(mlflow_cli), "models", "serve", "-m", f"models:/{NAME}@champion",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        # The test's venv as if activated: the server's own uvicorn is found on PATH.
        env={**os.environ, "MLFLOW_TRACKING_URI": uri,
             "PATH": f"{mlflow_cli.parent}{os.pathsep}{os.environ.get('PATH', '')}"}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited ({process.returncode}): "
                            f"{(tmp_path / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no answer on {base}/ping: {(tmp_path / 'server.log').read_text()[-2000:]}")
            time.sleep(1)
        yield base
    finally:
        stop(process)
        log.close()


def stop(process: subprocess.Popen) -> None:
    """The server and its uvicorn worker: they run in their own process group."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, 15)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait()


def test_the_server_answers_image_files_as_predict_does(registered, server):
    tmp, _, cell = registered
    files = images(tmp)
    rows = [[base64.b64encode(f.read_bytes()).decode("ascii")] for f in files]
    rows.insert(2, ["not base64 at all!"])  # one bad row never fails the batch
    rows.insert(4, [base64.b64encode(b"plain text, not an image").decode("ascii")])
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()
    status, text = post(f"{server}/invocations", body)
    assert status == 200, text
    answer = json.loads(text)["predictions"]
    assert len(answer) == len(rows)
    assert "not base64" in answer[2]["error"] and answer[2]["p_covid"] is None
    assert "not an image" in answer[4]["error"] and answer[4]["p_covid"] is None
    scored = [a for i, a in enumerate(answer) if i not in (2, 4)]

    expected = predict_files(load_trained(str(cell)), files)
    np.testing.assert_allclose([a["p_covid"] for a in scored], [p.p_covid for p in expected], atol=1e-5)
    assert [a["label"] for a in scored] == [p.label for p in expected]
    assert all(a["error"] is None for a in scored)


@pytest.mark.parametrize("body", [
    b"{not json",
    json.dumps({"dataframe_split": {"columns": ["picture"], "data": [["abc"]]}}).encode(),
    json.dumps({"something": []}).encode(),
])
def test_a_malformed_request_gets_a_4xx_with_a_message(server, body):
    status, text = post(f"{server}/invocations", body)
    assert 400 <= status < 500, (status, text)
    assert json.loads(text)["message"]
    with urllib.request.urlopen(f"{server}/ping", timeout=10) as response:  # still serving
        assert response.status == 200


def test_bad_image_rows_get_their_reason_and_the_server_keeps_serving(registered, server):
    """A decompression bomb, a truncated JPEG, an empty file: each row says why; the rest are scored."""
    from test_bad_input import BAD_FILES

    tmp, _, cell = registered
    good = images(tmp)[:2]
    rows, reasons = [[base64.b64encode(f.read_bytes()).decode("ascii")] for f in good], {}
    for name in ("bomb.png", "truncated.jpg", "zero.png", "one-pixel.png"):
        make, reason = BAD_FILES[name]
        make(tmp / name)
        reasons[len(rows)] = reason
        rows.append([base64.b64encode((tmp / name).read_bytes()).decode("ascii")])
        (tmp / name).unlink()
    status, text = post(f"{server}/invocations",
                        json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode())
    assert status == 200, text
    answer = json.loads(text)["predictions"]
    for i, reason in reasons.items():
        expected = "no image: the row's value must be a base64-encoded PNG or JPEG file" if reason.startswith(
            "empty file") else reason  # an empty file is an empty base64 string
        assert answer[i]["error"].startswith(expected) and answer[i]["p_covid"] is None, answer[i]
    expected = predict_files(load_trained(str(cell)), good)
    np.testing.assert_allclose([a["p_covid"] for a in answer[:2]], [p.p_covid for p in expected], atol=1e-5)
    with urllib.request.urlopen(f"{server}/ping", timeout=10) as response:  # still serving
        assert response.status == 200
