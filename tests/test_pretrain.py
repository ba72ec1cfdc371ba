"""`covidtl pretrain`: SimCLR on the training split only, a weights file that `train --init` loads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from covidtl.inits import init_label
from covidtl.errors import UserError
from helpers_train import make_workdir

ROOT = Path(__file__).parents[1]
TINY = {"pretrain.datasets": ["tiny"], "pretrain.epochs": 2, "pretrain.batch_size": 4,
        "train.batch_size": 4, "eval.bootstrap": 0}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """The custom CNN pretrained on a tiny split; which tables the image cache was asked for."""
    from covidtl.data import cache
    from covidtl.pretrain import pretrain

    tmp = tmp_path_factory.mktemp("pretrain")
    cfg, table = make_workdir(tmp, **TINY)
    asked: list[str] = []
    real = cache.cached_images

    def spy(rows, size, root):
        asked.extend(map(str, rows["path"]))
        return real(rows, size, root)

    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
    mp.setattr(cache, "cached_images", spy)
    try:
        result = pretrain(cfg, "custom_cnn", out=tmp / "out" / "custom_cnn.weights.h5")
    finally:
        mp.undo()
    return cfg, table, result, asked, tmp


def test_pretraining_reads_only_the_training_split(pretrained):
    cfg, table, result, asked, _ = pretrained
    train_paths = set(table.loc[table["split"] == "train", "path"])
    assert set(asked) == train_paths  # no val or test image was even decoded
    record = json.loads(result.record_file.read_text())
    files = record["datasets"]["tiny"]["files"]
    assert record["images"] == len(files) == len(train_paths) == result.images
    assert {Path(f).name for f in files} == {Path(p).name for p in train_paths}
    assert record["datasets"]["tiny"]["split"] == "train"


def test_a_few_batches_pretrain_eagerly_and_the_run_says_so(pretrained):
    from mlflow.tracking import MlflowClient

    cfg, table, result, _, tmp = pretrained  # 14 training images in batches of 4, under auto
    assert cfg.train.run_eagerly == "auto"
    params = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}").get_run(result.run_id).data.params
    assert params["run_eagerly_used"] == "True"


def test_loss_is_finite_and_the_body_moves_while_the_head_stays_fresh(pretrained):
    import keras

    from covidtl.models.registry import build_model, get_spec

    cfg, _, result, _, _ = pretrained
    assert len(result.losses) == 2 and all(math.isfinite(v) for v in result.losses)
    record = json.loads(result.record_file.read_text())
    assert record["final_loss"] == result.losses[-1] and record["epochs"] == 2
    keras.utils.set_random_seed(cfg.pretrain.seed)  # the initial weights pretraining started from
    fresh = build_model(get_spec("custom_cnn"), "random", cfg.train, 200)
    loaded = build_model(get_spec("custom_cnn"), str(result.weights_file), cfg.train, 200)
    conv = [i for i, layer in enumerate(fresh.layers) if isinstance(layer, keras.layers.SeparableConv2D)]
    moved = [not np.allclose(fresh.layers[i].get_weights()[0], loaded.layers[i].get_weights()[0]) for i in conv]
    assert all(moved)
    head = fresh.get_layer("probabilities").get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(head, loaded.get_layer("probabilities").get_weights()))


@pytest.mark.parametrize("how", ["file", "finetune"])
def test_train_loads_the_file_as_a_warm_start(how, pretrained, monkeypatch):
    from covidtl.train import RunOptions, plan_run, train

    cfg, _, result, _, tmp = pretrained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
    init = str(result.weights_file) if how == "file" else f"finetune:{result.weights_file}"
    run = train(plan_run(cfg, "custom_cnn", init, "tiny", out_dir=tmp / f"cell-{how}"), RunOptions(log_model=False))
    card = json.loads((tmp / f"cell-{how}" / "model" / "card.json").read_text())
    rate = cfg.train.learning_rates["custom_cnn"]
    assert card["learning_rate"] == pytest.approx(rate * (cfg.train.finetune_lr_factor if how == "finetune" else 1))
    assert run.epochs_used == 1 and math.isfinite(run.metrics["test_roc_auc"])
    assert init_label(init) == ("file-custom_cnn" if how == "file" else "finetune-file-custom_cnn")


def test_init_pretrained_is_the_file_pretrain_wrote_with_these_params(pretrained, monkeypatch):
    import dataclasses

    from mlflow.tracking import MlflowClient

    from covidtl.cv import cross_validate
    from covidtl.files import file_sha256
    from covidtl.train import RunOptions, plan_run, train

    cfg, _, result, _, tmp = pretrained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")

    def with_out(folder):
        return dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, out=str(folder)))

    run = train(plan_run(with_out(tmp / "out"), "custom_cnn", "pretrained", "tiny", out_dir=tmp / "cell-named"),
                RunOptions(log_model=False))
    params = MlflowClient().get_run(run.run_id).data.params
    assert params["init"] == "pretrained" and params["init_file"] == str(result.weights_file)
    assert params["init_sha256"] == file_sha256(result.weights_file)
    assert (init_label("pretrained"), init_label("finetune:pretrained")) == ("pretrained", "finetune-pretrained")
    with pytest.raises(UserError, match="pretrain inside each fold"):  # the file's own leak check
        cross_validate(with_out(tmp / "out"), "custom_cnn", "pretrained", "tiny", out_root=tmp / "cv-named")
    with pytest.raises(UserError, match=r"none/custom_cnn.weights.h5 does not exist; run `covidtl pretrain "
                                        r"--model custom_cnn` with the same -S options"):
        train(plan_run(with_out(tmp / "none"), "custom_cnn", "finetune:pretrained", "tiny",
                       out_dir=tmp / "cell-missing"), RunOptions(log_model=False))
    assert not (tmp / "cell-missing").exists()  # refused before anything was written


def test_a_backbone_file_loads_frozen_or_fine_tuned(tmp_path, monkeypatch):
    from covidtl.models.registry import base_of, build_model, get_spec
    from covidtl.pretrain import pretrain

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg, _ = make_workdir(tmp_path, **{**TINY, "pretrain.epochs": 1})
    result = pretrain(cfg, "resnet50", out=tmp_path / "resnet50.weights.h5")
    record = json.loads(result.record_file.read_text())
    assert record["holds"] == "base"
    frozen = build_model(get_spec("resnet50"), str(result.weights_file), cfg.train, 32)
    tuned = build_model(get_spec("resnet50"), f"finetune:{result.weights_file}", cfg.train, 32)
    assert not base_of(frozen).trainable and base_of(tuned).trainable
    # Fine-tuning keeps the pretrained BatchNorm statistics, as the ImageNet finetune path does.
    assert not any(layer.trainable for layer in base_of(tuned).layers if "bn" in layer.name)
    for a, b in zip(base_of(frozen).get_weights(), base_of(tuned).get_weights()):
        np.testing.assert_array_equal(a, b)


def test_cv_refuses_a_file_pretrained_on_the_datasets_own_split(pretrained):
    from covidtl.cv import cross_validate

    cfg, _, result, _, tmp = pretrained
    with pytest.raises(UserError, match="pretrain inside each fold"):
        cross_validate(cfg, "custom_cnn", str(result.weights_file), "tiny", out_root=tmp / "cv")


def test_a_file_pretrained_with_another_head_is_one_line(pretrained):
    import dataclasses

    from covidtl.models.registry import build_model, get_spec

    cfg, _, result, _, _ = pretrained
    other = "gap" if cfg.train.head == "paper" else "paper"
    with pytest.raises(UserError, match=f"pretrained with head {cfg.train.head}.*-S train.head={cfg.train.head}"):
        build_model(get_spec("custom_cnn"), str(result.weights_file), dataclasses.replace(cfg.train, head=other), 200)


def test_bad_pretrain_settings_are_one_line(tmp_path):
    from covidtl.config import ConfigError
    from covidtl.pretrain import pretrain

    with pytest.raises(ConfigError, match="pretrain.batch_size"):
        make_workdir(tmp_path, **{**TINY, "pretrain.batch_size": 1})
    cfg, _ = make_workdir(tmp_path, **TINY)
    with pytest.raises(UserError, match=r"\.weights\.h5"):
        pretrain(cfg, "custom_cnn", out=tmp_path / "x.h5")


def test_dvc_stage_and_mlproject_entry_point():
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        stages = {s.addressing: s for s in repo.index.stages}
    stage = stages["pretrain/dvc.yaml:pretrain@custom_cnn"]
    params = [key for dep in stage.deps if hasattr(dep, "params") for key in dep.params]
    paths = [d.def_path for d in stage.deps if not hasattr(d, "params")]
    assert "pretrain" in params and "data/ct/split.csv" in paths and "data/xray/split.csv" in paths
    assert {o.def_path for o in stage.outs} == {"data/pretrain/custom_cnn.weights.h5",
                                                "data/pretrain/custom_cnn.json"}
    assert "covidtl pretrain --model custom_cnn" in stage.cmd
    # Kept out of the default `dvc repro`: the root pipeline has no pretrain stage.
    assert not any(name.startswith("pretrain@") for name in stages)
    point = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["pretrain"]
    assert point["command"].startswith("covidtl ") and point["parameters"]["epochs"]["default"] == "auto"


def test_cv_pretrain_fits_each_folds_file_on_that_folds_training_rows(synth_data, tmp_path, monkeypatch):
    import pandas as pd
    from click.testing import CliRunner

    from covidtl.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    settings = [
        "--params", str(ROOT / "params.yaml"), "-S", f"data.workdir={tmp_path / 'data'}",
        "-S", f"data.datasets.ct.path={synth_data / 'ct'}", "-S", "train.batch_size=8",
        "-S", "eval.bootstrap=0", "-S", "pretrain.datasets=[ct]", "-S", "pretrain.batch_size=16",
    ]
    command = ["cv", "--model", "custom_cnn", "--dataset", "ct", "--folds", "2", "--epochs", "1", "--pretrain",
               "--out", str(tmp_path / "cv")]
    result = CliRunner().invoke(main, settings + command)
    assert result.exit_code == 0, result.output
    out = tmp_path / "cv" / "ct" / "custom_cnn-file-pretrain-ct"
    assert len(pd.read_csv(out / "folds.csv")) == 2
    for k in (1, 2):
        fold = out / f"fold-{k}"
        record = json.loads((fold / "pretrain.json").read_text())
        split = pd.read_csv(fold / "split.csv")
        train_names = {Path(p).name for p in split.loc[split["split"] == "train", "path"]}
        assert {Path(f).name for f in record["datasets"]["ct"]["files"]} == train_names
        assert record["datasets"]["ct"]["split_file"].endswith(f"fold-{k}/split.csv")
        card = json.loads((fold / "cell" / "model" / "card.json").read_text())
        assert card["init"].endswith(f"fold-{k}/pretrain.weights.h5")

    # Another training seed: each fold trains again, from the file its split and params made.
    files = {k: (out / f"fold-{k}" / "pretrain.weights.h5").stat() for k in (1, 2)}
    runs = list(pd.read_csv(out / "folds.csv")["run_id"])
    again = CliRunner().invoke(main, settings + ["-S", "train.seed=1"] + command)
    assert again.exit_code == 0, again.output
    assert again.output.count("pretrain.weights.h5 made from this split and these params before, reused") == 2
    assert "pretrain epoch" not in again.output
    for k in (1, 2):
        now = (out / f"fold-{k}" / "pretrain.weights.h5").stat()
        assert (now.st_ino, now.st_mtime_ns) == (files[k].st_ino, files[k].st_mtime_ns)
    assert not set(pd.read_csv(out / "folds.csv")["run_id"]) & set(runs)


def test_a_pretrained_file_is_reused_only_for_its_own_split_and_params(pretrained):
    import dataclasses

    from covidtl.pretrain import reuse_problem

    cfg, table, result, _, tmp = pretrained
    assert reuse_problem(cfg, "custom_cnn", result.weights_file) is None
    reseeded = dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, seed=cfg.pretrain.seed + 1))
    assert reuse_problem(reseeded, "custom_cnn", result.weights_file) == "custom_cnn.json: seed was 0, now 1"
    other_split = tmp / "other-split.csv"
    table.assign(split="train").to_csv(other_split, index=False)
    assert "not the one it was made from" in reuse_problem(cfg, "custom_cnn", result.weights_file, {"tiny": other_split})
    assert "missing" in reuse_problem(cfg, "custom_cnn", tmp / "none.weights.h5")
