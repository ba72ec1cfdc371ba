"""The README's main command end to end: `dvc repro` of a tiny study in a copy of the repository.

Tiny profile: custom CNN and VGG16 x random and ImageNet weights on the synthetic CT-like set; the
ImageNet cells are skipped (custom CNN: none exist; VGG16: Keras' file in neither weights/ nor Keras'
cache, and no network). Also failure isolation: a failing cell leaves the others' results, and the
next `dvc repro` re-runs only it; and a weights file dropped into weights/ trains exactly its cell.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
TINY = {
    "synth.images_per_class": 30,
    "synth.slices_per_patient": 5,
    "synth.site2_images_per_class": 10,
    "study.models": ["custom_cnn", "vgg16"],
    "study.inits": ["random", "imagenet"],
    "study.datasets": ["ct"],
    "train.max_epochs": 2,
    "train.batch_size": 16,
    "augment.copies_per_image": 1,
}
CELLS = ["custom_cnn-random-ct", "vgg16-random-ct", "vgg16-imagenet-ct", "custom_cnn-imagenet-ct"]
WEIGHTS = {f"weights@{m}-{i}" for m in TINY["study.models"] for i in TINY["study.inits"]}
# The cells that start from VGG16's ImageNet file: the paper's frozen cell and the chosen recipe's.
IMAGENET_CELLS = {"train@vgg16-imagenet-ct", "train_best@vgg16-imagenet-ct"}
VGG16_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
TINY_VGG16_SIZE = 32  # params.yaml's quick defaults

pytestmark = pytest.mark.timeout(1800)  # per test; the whole file: 3.4 min on 2 cores (8 min at load 9)


def _set(params: dict, dotted: str, value) -> None:
    node = params
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[key]
    node[last] = value


def _run(cwd: Path, *args: str, check: bool = True, **extra_env: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "KERAS_HOME")) and k.lower() != "no_proxy"}
    # Offline whatever the network: an empty Keras cache, and Keras' download through a closed port.
    env.update(KERAS_HOME=str(cwd.parent / "keras-empty"), https_proxy="http://127.0.0.1:9",
               HTTPS_PROXY="http://127.0.0.1:9")
    env.update(extra_env)
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The project's files (tracked and new, as `git ls-files` lists them) in a fresh git repo."""
    if shutil.which("git") is None:
        pytest.skip("needs git")
    dest = tmp_path_factory.mktemp("study") / "repo"
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file() and not name.startswith(("data/", "models/", "reports/")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    for key, value in TINY.items():
        _set(params, key, value)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (dest / "dvc.lock").unlink(missing_ok=True)
    _run(dest, "git", "init", "-q")
    _run(dest, "git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    _run(dest, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny study")
    return dest


def ran_stages(result: subprocess.CompletedProcess) -> set[str]:
    return {line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage")}


def test_one_failing_cell_leaves_the_others_and_repro_reruns_only_it(repo):
    # A corrupt ImageNet weights file in weights/: VGG16-imagenet fails, the rest finish.
    corrupt = repo / "weights" / VGG16_FILE
    corrupt.write_bytes(b"not an HDF5 file")
    first = _run(repo, "dvc", "repro", "--keep-going", check=False)
    assert first.returncode != 0
    assert json.loads((repo / "models/custom_cnn-random-ct/metrics.json").read_text())["status"] == "ok"
    assert json.loads((repo / "models/vgg16-random-ct/metrics.json").read_text())["status"] == "ok"
    assert "Running stage 'report'" not in first.stdout  # it waits for every cell
    assert "Running stage 'external@ct'" not in first.stdout  # so does the external scoring

    # Weights gone: the cell is now skipped (not failed), and only it and the report train again
    # (every weights@ stage watches weights/; only VGG16-imagenet's record changed).
    corrupt.unlink()
    second = _run(repo, "dvc", "repro")
    assert ran_stages(second) == WEIGHTS | IMAGENET_CELLS | {"external@ct", "report"}, second.stdout


def test_study_outputs_metrics_plots_and_report(repo):
    if not (repo / "reports").exists():
        pytest.skip("needs the study run by the previous test")
    # The study's pipeline (dvc.yaml) is clean: a second `dvc repro` does nothing.
    assert "up to date" in _run(repo, "dvc", "status", "dvc.yaml").stdout
    again = _run(repo, "dvc", "repro")
    assert "Running stage" not in again.stdout and "up to date" in again.stdout

    # The default study augments online: no stored augmented set, and its size is no dependency.
    assert not (repo / "data" / "ct" / "augmented").exists()
    params = (repo / "params.yaml").read_text()
    changed = params.replace("copies_per_image: 1", "copies_per_image: 3")
    assert changed != params
    (repo / "params.yaml").write_text(changed)
    try:
        assert "up to date" in _run(repo, "dvc", "status", "dvc.yaml").stdout
    finally:
        (repo / "params.yaml").write_text(params)

    metrics = json.loads(_run(repo, "dvc", "metrics", "show", "--json").stdout)
    shown = json.dumps(metrics)
    for cell in ("custom_cnn-random-ct", "vgg16-random-ct"):
        data = json.loads((repo / "models" / cell / "metrics.json").read_text())
        assert data["status"] == "ok" and 0 <= data["test_accuracy"] <= 1
        assert f"models/{cell}/metrics.json" in shown
    for cell in ("vgg16-imagenet-ct", "custom_cnn-imagenet-ct"):
        data = json.loads((repo / "models" / cell / "metrics.json").read_text())
        assert data["status"] == "skipped" and data["reason"]

    plots = _run(repo, "dvc", "plots", "show", "--json")
    assert "models/custom_cnn-random-ct/predictions.csv" in plots.stdout
    assert "models/vgg16-random-ct/history.csv" in plots.stdout

    both = pd.read_csv(repo / "reports" / "results.csv")
    # The chosen recipe's cell (profile best, stage train_best@...) waits for its ImageNet file, as the
    # paper's ImageNet cells do.
    chosen = both[both["profile"] == "best"]
    assert list(chosen["model"]) == ["vgg16"] and list(chosen["status"]) == ["skipped"]
    # The custom CNN's SimCLR recipe (profile cnn_simclr, stage train_cnn_simclr@...) ran beside the paper's.
    best = both[both["profile"] == "cnn_simclr"]
    assert list(best["model"]) == ["custom_cnn"] and list(best["status"]) == ["ok"]
    best_record = json.loads((repo / "models/custom_cnn-pretrained-ct-cnn_simclr/metrics.json").read_text())
    assert best["run_id"].iloc[0] == best_record["run_id"]
    # The profile's fixed budget (train.max_epochs 10, over TINY's 2), its last epoch kept.
    assert (best_record["epochs_used"], best_record["selected_by"], best_record["best_epoch"]) == (10, "last", 10)
    # ... from the profile's SimCLR file (stage pretrain_cnn_simclr@custom_cnn), learnt from training rows only.
    card = json.loads((repo / "models/custom_cnn-pretrained-ct-cnn_simclr/model/card.json").read_text())
    pretrained = json.loads((repo / "data/pretrain/cnn_simclr/custom_cnn.json").read_text())
    assert card["init"] == "pretrained" and pretrained["epochs"] == 5
    assert {d["split"] for d in pretrained["datasets"].values()} == {"train"}
    split = pd.read_csv(repo / "data/ct/split.csv")
    def tail(path):  # class folder / file name: the same image, however its path is rooted
        return Path(path).parts[-2:]

    held_out = {tail(p) for p in split.loc[split["split"] != "train", "path"]}
    assert held_out and not held_out & {tail(f) for f in pretrained["datasets"]["ct"]["files"]}
    table = both[both["profile"] == "paper"].set_index(["model", "init"])
    assert table.loc[("custom_cnn", "random"), "status"] == "ok"
    assert table.loc[("vgg16", "random"), "test_accuracy"] == pytest.approx(
        json.loads((repo / "models/vgg16-random-ct/metrics.json").read_text())["test_accuracy"]
    )
    assert table.loc[("vgg16", "imagenet"), "status"] == "skipped"
    assert pd.isna(table.loc[("vgg16", "imagenet"), "test_accuracy"])
    for name in ("results.md", "fig5_6-ct.png", "fig7-epochs.png", "confusion-ct.png"):
        assert (repo / "reports" / name).stat().st_size > 0

    # The external stage: every trained cell scored on the default second site, the others listed.
    external = json.loads((repo / "external" / "ct" / "results.json").read_text())
    assert external["sets"]["ct-site2"]["images"] == 20 and external["sets"]["ct-site2"]["quarantined"] == 0
    for cell in ("custom_cnn-random-ct", "vgg16-random-ct", "custom_cnn-pretrained-ct-cnn_simclr"):
        record = external["cells"][cell]
        assert record["status"] == "ok" and record["run_id"] == json.loads(
            (repo / "models" / cell / "metrics.json").read_text())["run_id"]
        assert 0 <= record["scores"]["ct-site2"]["metrics"]["all_accuracy"] <= 1
        assert (repo / "external" / "ct" / cell / "ct-site2" / "predictions.csv").is_file()
    assert external["cells"]["vgg16-imagenet-ct"]["status"] == "skipped"


def test_weights_dropped_where_the_skip_message_says_train_exactly_their_cell(repo):
    if not (repo / "reports").exists():
        pytest.skip("needs the study run by the previous tests")
    reason = json.loads((repo / "models/vgg16-imagenet-ct/metrics.json").read_text())["reason"]
    assert f"put {VGG16_FILE} in weights/ (the folder stage weights@vgg16-imagenet watches)" in reason
    assert reason.endswith("and run `dvc repro`")

    # A valid VGG16 file (random weights saved as Keras' download: no ImageNet file offline).
    code = (
        "import sys, h5py, keras; from keras.src.legacy.saving import legacy_h5_format; "
        "base = keras.applications.VGG16(include_top=False, weights=None); "
        "f = h5py.File(sys.argv[1], 'w'); legacy_h5_format.save_weights_to_hdf5_group(f, base); f.close()"
    )
    _run(repo, sys.executable, "-c", code, str(repo / "weights" / VGG16_FILE))
    again = _run(repo, "dvc", "repro")
    assert ran_stages(again) == WEIGHTS | IMAGENET_CELLS | {"external@ct", "report"}, again.stdout
    assert json.loads((repo / "models/vgg16-imagenet-ct/metrics.json").read_text())["status"] == "ok"
    record = json.loads((repo / "data/weights/vgg16-imagenet.json").read_text())
    assert (record["status"], record["path"]) == ("available", f"weights/{VGG16_FILE}")
    assert "up to date" in _run(repo, "dvc", "status", "dvc.yaml").stdout
    both = pd.read_csv(repo / "reports" / "results.csv")
    table = both[both["profile"] == "paper"].set_index(["model", "init"])
    assert table.loc[("vgg16", "imagenet"), "status"] == "ok"
    # The chosen recipe's cell trained too, at the profile's own size (the paper's 224 px).
    chosen = json.loads((repo / "models/vgg16-imagenet-ct-best/model/card.json").read_text())
    assert both.loc[both["profile"] == "best", "status"].tolist() == ["ok"]
    assert chosen["image_size"] == 224 and chosen["init_weights"]["sha256"] == record["sha256"]
    # Trained through the feature cache, at the size the params name, from the file it recorded.
    card = json.loads((repo / "models/vgg16-imagenet-ct/model/card.json").read_text())
    assert card["frozen_part"]["cut"] == "base" and card["image_size"] == TINY_VGG16_SIZE
    assert card["init_weights"]["sha256"] == record["sha256"]
    unit = repo / "data" / "cache" / "features" / card["frozen_part"]["feature_view"]
    split = pd.read_csv(repo / "data/ct/split.csv")
    assert len(list(unit.glob("*.feat"))) == split.loc[split["split"] != "train", "sha256"].nunique()


def test_each_cell_declares_every_training_setting_it_reads():
    # A setting missing from a cell's params would change results without DVC re-running it: every
    # training stage of every pipeline (the paper's cells, the profiles', the offline study's).
    from dataclasses import fields

    from dvc.repo import Repo

    from covidtl.config import TrainConfig

    with Repo(str(ROOT)) as repo:
        cells = [stage for stage in repo.index.stages if " train --model " in stage.cmd]
    assert {c.addressing.split("@")[0] for c in cells} == {
        "train", "train_best", "train_cnn_simclr", "augment/dvc.yaml:train"}
    per_model = {"learning_rates", "image_size"}  # declared per cell: train.<key>.<its model>
    for cell in cells:
        declared = {key for dep in cell.deps if hasattr(dep, "params") for key in dep.params}
        model = cell.cmd.split("--model ")[1].split()[0]
        profile = cell.cmd.split("-S profile=")[1].split()[0]
        assert f"profiles.{profile}" in declared, cell.addressing  # the profile's overrides
        for field in fields(TrainConfig):
            key = f"train.{field.name}"
            if field.name in ("model", "init"):
                # Never read: each cell names its own on the command line, so a new default re-runs none.
                assert f"--{field.name} " in cell.cmd and key not in declared, cell.addressing
            elif field.name in per_model:
                # Its own model's only: changing VGG16's rate re-runs only VGG16's cells.
                assert f"{key}.{model}" in declared and key not in declared, cell.addressing
            else:
                assert key in declared, f"{key} missing from {cell.addressing}"
        assert "train" not in declared and "eval" in declared, cell.addressing
