"""The user flow 'compare the study's runs in the MLflow UI', driven in headless Chromium.

Starts `mlflow server` on 127.0.0.1 against a SQLite store holding study runs (the contract's tags
and test metrics, as `covidtl report` reads them), opens the experiment's runs table, shows the
metrics and tags columns, and checks every run is listed with its model, init and accuracy.
Set COVIDTL_UPDATE_SCREENSHOT=1 to refresh docs/mlflow-compare.png from the compare view.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
DOCS_SCREENSHOT = Path(__file__).parents[1] / "docs" / "mlflow-compare.png"
RUNS = [  # model, init, test accuracy (values the UI prints exactly)
    ("custom_cnn", "random", 0.75),
    ("densenet121", "random", 0.625),
    ("vgg16", "random", 0.5),
    ("vgg16", "imagenet", 0.875),
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (/usr/bin/chromium); `bash .ci/run` installs it"),
    pytest.mark.timeout(300),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_study(uri: str, root: Path) -> tuple[str, list[str]]:
    """Runs shaped like covidtl.train's: run name = cell, contract tags, params, per-epoch and test metrics."""
    from covidtl import tracking

    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("covidtl-ct", artifact_location=(root / "artifacts").as_uri())
    tracking.set_experiment("covidtl-ct")  # what training does: tags the experiment's kind
    experiment_id = mlflow.get_experiment_by_name("covidtl-ct").experiment_id
    assert mlflow.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    split_file = root / "split.csv"
    split_file.write_text("path,label,split\na.png,covid,train\nb.png,non_covid,val\nc.png,covid,test\n")
    table = pd.read_csv(split_file)
    splits = {name: table[table["split"] == name] for name in ("train", "val", "test")}
    ids = []
    for model, init, accuracy in RUNS:
        cell = f"{model}-{init}-ct"
        tags = {"model": model, "init": init, "dataset": "ct", "split_strategy": "grouped", "kind": "train", "cell": cell}
        with mlflow.start_run(experiment_id=experiment_id, run_name=cell, tags=tags) as run:
            mlflow.log_params({"model": model, "init": init, "dataset": "ct"})
            tracking.log_split_inputs("ct", split_file, split_file, splits)
            for epoch in (1, 2):
                mlflow.log_metrics({"loss": 1.0 / epoch, "val_accuracy": accuracy - 0.1 / epoch}, step=epoch)
            mlflow.log_metrics({"test_accuracy": accuracy, "test_f1_macro": accuracy, "epochs_used": 2})
            ids.append(run.info.run_id)
    return experiment_id, ids


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on a free local port; yields (base URL, experiment id, run ids)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id, run_ids = _log_study(uri, tmp_path)
    port = _free_port()
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if urllib.request.urlopen(f"{base}/health", timeout=2).read() == b"OK":
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
            time.sleep(1)
        yield base, experiment_id, run_ids
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


def test_runs_table_lists_model_init_and_accuracy(mlflow_server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    base, experiment_id, run_ids = mlflow_server
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 2400, "height": 900})
        # As a user: the home page, then the experiment by its name. MLflow 3 opens an untagged
        # experiment on a GenAI traces overview; a model-development one on its training runs.
        page.goto(base, timeout=90_000)
        # MLflow 3.17's sidebar switch (GenAI | Model training, remembered by the browser) picks
        # the experiment's landing page; a first-time user is on GenAI and picks Model training.
        page.get_by_text("Model training", exact=True).first.click(timeout=90_000)
        page.get_by_role("link", name="covidtl-ct").first.click(timeout=90_000)
        for model, init, _ in RUNS:
            page.get_by_text(f"{model}-{init}-ct").first.wait_for(timeout=90_000)
        assert re.search(rf"/experiments/{experiment_id}/runs", page.url), page.url
        # The Dataset column names the data that trained each run (its MLflow dataset inputs).
        page.get_by_text("ct-train").first.wait_for(timeout=30_000)

        # What a user does: Columns -> tick the metrics and the tags groups.
        page.get_by_role("button", name="Columns", exact=True).click()
        for group in ("Metrics", "Tags"):
            page.get_by_text(re.compile(rf"^{group} \(\d+\)$")).click()
        page.keyboard.press("Escape")
        page.get_by_role("columnheader", name="test_accuracy").first.wait_for(timeout=30_000)

        # The grid renders a pinned (run name) and a scrolling part per row; join them by row index.
        rows: dict[str, str] = {}
        for row in page.locator("[role=row][row-index]").all():
            index = row.get_attribute("row-index")
            rows[index] = rows.get(index, "") + " | " + row.inner_text().replace("\n", " | ")
        cells = {}
        for text in rows.values():
            fields = [f.strip() for f in text.split("|")]
            name = next(f for f in fields if f.endswith("-ct"))
            cells[name] = fields
        assert sorted(cells) == sorted(f"{m}-{i}-ct" for m, i, _ in RUNS)
        for model, init, accuracy in RUNS:
            fields = cells[f"{model}-{init}-ct"]
            assert model in fields and init in fields and str(accuracy) in fields, fields

        # The compare view of the same runs, as docs/study-and-report.md shows it.
        page.set_viewport_size({"width": 1400, "height": 1000})
        query = urllib.parse.urlencode({"runs": json.dumps(run_ids), "experiments": json.dumps([experiment_id])})
        page.goto(f"{base}/#/compare-runs?{query}", timeout=90_000)
        page.get_by_text("test_accuracy").first.wait_for(timeout=90_000)
        page.wait_for_timeout(1500)  # let the parallel-coordinates plot draw
        shot = tmp_path / "mlflow-compare.png"
        page.screenshot(path=str(shot))
        browser.close()
    assert shot.read_bytes()[:4] == b"\x89PNG"
    if os.environ.get("COVIDTL_UPDATE_SCREENSHOT"):
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copy(shot, DOCS_SCREENSHOT)
