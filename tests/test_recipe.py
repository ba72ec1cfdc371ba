"""A profile names its recipe whole (train.model, train.init): `covidtl -S profile=X train --dataset ct`
trains that model from that init, through the real CLI; explicit options still win."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from covidtl.cli import main
from helpers_train import make_workdir

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def tiny_ct(tmp_path_factory):
    """(tmp, tracking URI, weights file): a tiny `ct` split and a VGG16 base saved at 32 px."""
    from covidtl.models.registry import base_of, build_model, get_spec

    tmp = tmp_path_factory.mktemp("recipe")
    cfg, _ = make_workdir(tmp, dataset="ct", **{"train.head_units": 16})
    file = tmp / "vgg16-base.weights.h5"
    base_of(build_model(get_spec("vgg16"), "random", cfg.train, 32)).save_weights(file)
    return tmp, f"sqlite:///{tmp / 'mlflow.db'}", file


def covidtl(tmp: Path, *args: str):
    """The CLI on params.yaml with `ct` at the tiny split and a profile `recipe`: VGG16 from a file."""
    recipe = f"profiles.recipe={{train.model: vgg16, train.init: {tmp / 'vgg16-base.weights.h5'}}}"
    return CliRunner().invoke(main, [
        "--params", str(ROOT / "params.yaml"), "-S", f"data.workdir={tmp / 'data'}",
        "-S", f"data.datasets.ct.path={tmp / 'images'}", "-S", "train.batch_size=8",
        "-S", "train.head_units=16", "-S", "train.image_size.vgg16=32", "-S", "train.max_train_samples=12",
        "-S", "eval.bootstrap=0", "-S", recipe, *args])


def recorded(tmp: Path, uri: str, cell: str) -> tuple[dict, dict]:
    """The cell's MLflow params and its config.yaml (read as written: loading it re-applies the profile)."""
    run_id = json.loads((tmp / "models" / cell / "metrics.json").read_text())["run_id"]
    saved = yaml.safe_load((tmp / "models" / cell / "config.yaml").read_text())
    return MlflowClient(uri).get_run(run_id).data.params, saved["train"]


def test_a_profile_trains_its_model_from_its_init(tiny_ct, monkeypatch):
    tmp, uri, file = tiny_ct
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp)  # the cell folder: models/<cell>/ under the working directory
    result = covidtl(tmp, "-S", "profile=recipe", "train", "--dataset", "ct", "--epochs", "1", "--no-log-model")
    assert result.exit_code == 0, result.output
    cell = "vgg16-file-vgg16-base-ct-recipe"
    assert f"train vgg16-{file}-ct: 1 epochs" in result.stdout
    params, train = recorded(tmp, uri, cell)
    assert (params["model"], params["init"], params["init_file"]) == ("vgg16", str(file), str(file))
    assert (params["train.model"], params["train.init"]) == ("vgg16", str(file))
    assert (train["model"], train["init"]) == ("vgg16", str(file))


def test_explicit_model_and_init_still_win_over_the_profile(tiny_ct, monkeypatch):
    tmp, uri, _ = tiny_ct
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp)
    result = covidtl(tmp, "-S", "profile=recipe", "train", "--model", "custom_cnn", "--init", "random",
                     "--dataset", "ct", "--epochs", "1", "--no-log-model")
    assert result.exit_code == 0, result.output
    params, train = recorded(tmp, uri, "custom_cnn-random-ct-recipe")
    assert (params["model"], params["init"]) == ("custom_cnn", "random")
    # The record says what ran, not what the profile would have trained.
    assert (params["train.model"], params["train.init"]) == ("custom_cnn", "random")
    assert (train["model"], train["init"]) == ("custom_cnn", "random")


def test_a_study_cell_list_that_disagrees_with_the_profile_is_one_line(tiny_ct, tmp_path):
    tmp, _, _ = tiny_ct
    result = covidtl(tmp, "-S", "study.profiles.recipe={models: [custom_cnn], inits: [random]}",
                     "-S", "profile=recipe", "train", "--dataset", "ct", "--out", str(tmp_path / "cell"))
    assert result.exit_code == 2
    assert result.stderr == (
        "Error: study.profiles.recipe.models: ['custom_cnn'] disagrees with profiles.recipe.train.model "
        "('vgg16'); set study.profiles.recipe.models to [vgg16] (or [] for no cells), or change "
        "profiles.recipe.train.model\n")
    assert not (tmp_path / "cell").exists()


def test_the_simclr_profile_trains_its_cell_from_its_own_pretraining(tiny_ct, tmp_path):
    """`-S profile=cnn_simclr train --dataset ct` is train_cnn_simclr@custom_cnn-pretrained-ct: the custom CNN
    from the profile's SimCLR file, asked for by name when it has not been made yet."""
    tmp, _, _ = tiny_ct
    result = covidtl(tmp, "-S", "profile=cnn_simclr", "-S", f"pretrain.out={tmp_path / 'pretrain'}",
                     "train", "--dataset", "ct", "--out", str(tmp_path / "cell"))
    assert result.exit_code == 2
    assert result.stderr.startswith(f"Error: --init pretrained: {tmp_path / 'pretrain' / 'custom_cnn.weights.h5'} "
                                    "does not exist; run `covidtl pretrain --model custom_cnn`")
    assert not (tmp_path / "cell").exists()


def test_train_model_is_checked_against_the_registrys_names():
    """config.py checks train.model without TensorFlow, against weight_records.IMAGENET_FILES: the same names."""
    from covidtl.models.registry import MODELS
    from covidtl.weight_records import IMAGENET_FILES

    assert list(MODELS) == list(IMAGENET_FILES)
