"""Honest model selection (train.select, train.stop.rule) and patient-grouped cross-validation."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from sklearn.metrics import roc_auc_score

from covidtl.cells import Cell
from covidtl.cli import main
from covidtl import cv
from covidtl.cv import fold_tables
from covidtl.train import CovidAUC, RunOptions, SelectBest, plan_run, train
from conftest import config
from helpers_train import make_workdir

ROOT = Path(__file__).parents[1]


@pytest.fixture(autouse=True)
def _track(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


# --------------------------------------------------------------------------- the metric


def test_covid_auc_is_the_roc_auc_of_the_covid_column():
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 2, 400)
    p_covid = np.clip(truth * 0.3 + rng.random(400) * 0.7, 0, 1)
    metric = CovidAUC()
    metric.update_state(np.eye(2)[truth], np.stack([1 - p_covid, p_covid], axis=1))
    assert float(metric.result()) == pytest.approx(roc_auc_score(truth, p_covid), abs=2e-3)


# --------------------------------------------------------------------------- best-epoch selection


def _tiny_model() -> keras.Model:
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    return model


@pytest.mark.parametrize("monitor, values, best", [
    ("val_auc", [0.70, 0.90, 0.80, 0.85], 2),
    ("val_loss", [0.50, 0.40, 0.45, 0.30], 4),
    ("val_auc", [float("nan"), 0.60, 0.60], 2),  # NaN never wins; a tie keeps the earlier epoch
])
def test_the_best_epoch_weights_come_back(monitor, values, best, tmp_path):
    model, cell = _tiny_model(), Cell(tmp_path / "cell")
    select = SelectBest(monitor, cell, resume=None)
    select.set_model(model)
    weights_by_epoch = []
    for epoch, value in enumerate(values):
        model.set_weights([w + epoch + 1 for w in model.get_weights()])  # each epoch moves them
        weights_by_epoch.append([np.array(w) for w in model.get_weights()])
        select.on_epoch_end(epoch, {monitor: value})
    assert select.best_epoch == best
    select.restore(model, epochs_used=len(values))
    for got, expected in zip(model.get_weights(), weights_by_epoch[best - 1]):
        np.testing.assert_array_equal(got, expected)


def test_patience_stops_after_that_many_epochs_without_improvement(tmp_path):
    model = _tiny_model()
    select = SelectBest("val_loss", Cell(tmp_path / "cell"), resume=None, patience=2)
    select.set_model(model)
    for epoch, loss in enumerate([0.5, 0.4, 0.45, 0.41]):
        model.stop_training = False
        select.on_epoch_end(epoch, {"val_loss": loss})
    assert model.stop_training and select.stopped_epoch == 4 and select.best_epoch == 2


def test_a_run_that_selects_by_val_loss_keeps_its_best_epoch(tmp_path):
    cfg, _ = make_workdir(tmp_path, **{
        "train.select": "val_loss", "train.stop.rule": "patience", "train.stop.patience": 2,
        "train.max_epochs": 4, "train.learning_rates.custom_cnn": 0.03,
    })
    result = train(plan_run(cfg, "custom_cnn", "random", "tiny", out_dir=tmp_path / "cell"),
                   RunOptions(log_model=False))
    losses = result.history["val_loss"]
    best = int(np.argmin(losses)) + 1
    record = json.loads((tmp_path / "cell" / "metrics.json").read_text())
    card = json.loads((tmp_path / "cell" / "model" / "card.json").read_text())
    assert record["best_epoch"] == card["best_epoch"] == best
    assert record["selected_by"] == card["selected_by"] == "val_loss"
    assert "val_auc" in result.history and len(result.history["val_auc"]) == result.epochs_used
    # The saved model is the best epoch's: its validation loss is that epoch's, not the last one's.
    assert _val_loss_of_saved_model(cfg, tmp_path / "cell") == pytest.approx(losses[best - 1], rel=1e-4)
    run = MlflowClient().get_run(result.run_id)
    assert run.data.tags["selected_by"] == "val_loss" and run.data.metrics["best_epoch"] == best
    assert not (tmp_path / "cell" / "checkpoint").exists()  # best weights go with the checkpoint


def test_a_fixed_budget_trains_every_epoch_and_keeps_the_last(tmp_path):
    """stop.rule none: the paper's thresholds, met by any epoch here, end nothing."""
    cfg, _ = make_workdir(tmp_path, **{
        "train.stop.rule": "none", "train.select": "last", "train.max_epochs": 2,
        "train.stop.val_accuracy": 0.0, "train.stop.val_loss": 1.0e9,
    })
    result = train(plan_run(cfg, "custom_cnn", "random", "tiny", out_dir=tmp_path / "cell"),
                   RunOptions(log_model=False))
    record = json.loads((tmp_path / "cell" / "metrics.json").read_text())
    assert result.epochs_used == 2 and len(result.history["val_loss"]) == 2
    assert (record["selected_by"], record["best_epoch"]) == ("last", 2)
    assert MlflowClient().get_run(result.run_id).data.tags["stopped_by"] == "max_epochs"


class _Killed(Exception):
    """Stands for a kill right after an epoch's checkpoint was written."""


class _KillAfterEpoch(keras.callbacks.Callback):
    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            raise _Killed()


def _val_loss_of_saved_model(cfg, cell_dir: Path) -> float:
    from covidtl.data.pipeline import make_dataset
    from covidtl.models.registry import get_spec

    model = keras.saving.load_model(cell_dir / "model" / "model.keras", compile=False)
    val = pd.read_csv(cfg.data.workdir + "/tiny/split.csv").query("split == 'val'")
    ds = make_dataset(val, get_spec("custom_cnn"), cfg, 200, training=False)
    losses = [keras.losses.categorical_crossentropy(y, model(x, training=False)) for x, y in ds]
    return float(np.mean(np.concatenate(losses)))


def test_a_resumed_run_still_knows_its_best_epoch(tmp_path):
    """Killed after epoch 2 of 3: the rerun continues, and the best epoch may be one before the kill."""
    cfg, _ = make_workdir(tmp_path, **{"train.select": "val_loss", "train.max_epochs": 3,
                                       "train.stop.rule": "patience", "train.stop.patience": 3,
                                       "train.learning_rates.custom_cnn": 0.03})
    cell = tmp_path / "cell"
    with pytest.raises(_Killed):
        train(plan_run(cfg, "custom_cnn", "random", "tiny", out_dir=cell),
              RunOptions(log_model=False, extra_callbacks=(_KillAfterEpoch(2),)))
    state = json.loads((cell / "checkpoint" / "state.json").read_text())
    assert state["epochs_done"] == 2 and (cell / "checkpoint" / state["best_file"]).is_file()
    assert len(list((cell / "checkpoint").glob("best-epoch-*.weights.h5"))) == 1

    result = train(plan_run(cfg, "custom_cnn", "random", "tiny", out_dir=cell), RunOptions(log_model=False))
    losses = result.history["val_loss"]
    assert len(losses) == 3 and losses[:2] == state["history"]["val_loss"]
    best = int(np.argmin(losses)) + 1
    assert json.loads((cell / "metrics.json").read_text())["best_epoch"] == best
    assert _val_loss_of_saved_model(cfg, cell) == pytest.approx(losses[best - 1], rel=1e-4)


def test_patience_without_a_metric_to_watch_is_refused(tmp_path):
    result = CliRunner().invoke(main, [
        "--params", str(ROOT / "params.yaml"), "-S", "train.stop.rule=patience", "-S", "train.select=last",
        "train", "--model", "custom_cnn", "--dataset", "ct", "--no-prepare",
    ])
    assert result.exit_code == 2
    assert "train.stop.rule: patience" in result.output and "val_auc or val_loss" in result.output


# --------------------------------------------------------------------------- cross-validation


def test_folds_test_every_real_patient_once_and_never_mix_groups(real_ct):
    cfg, ingested = real_ct
    manifest = ingested.manifest
    folds = fold_tables(manifest, folds=5, seed=0, val_share=1 / 9)
    tested = pd.concat([t[t["split"] == "test"] for t in folds])
    assert sorted(tested["path"]) == sorted(manifest["path"])  # every image tested exactly once
    for table in folds:
        splits_per_group = table.groupby("group")["split"].nunique()
        assert (splits_per_group == 1).all()  # a patient's slices never straddle splits
        for split in ("train", "val", "test"):
            assert set(table.loc[table["split"] == split, "label"]) == {"covid", "non_covid"}
    shares = [(t["split"] == "test").mean() for t in folds]
    assert max(shares) - min(shares) < 0.2  # groups differ in size, the folds roughly not


def test_more_folds_than_groups_of_a_class_is_refused(tmp_path):
    cfg, table = make_workdir(tmp_path)
    manifest = table.drop(columns="split")
    with pytest.raises(Exception, match=r"cv.folds: 9 folds need at least 9 groups"):
        fold_tables(manifest, folds=9, seed=0, val_share=0.1)


def test_cli_cv_trains_each_fold_and_summarises(synth_data, tmp_path):
    base = ["--params", str(ROOT / "params.yaml"), "-S", f"data.workdir={tmp_path / 'data'}",
            "-S", f"data.datasets.ct.path={synth_data / 'ct'}",
            "-S", "train.batch_size=8", "-S", "eval.bootstrap=200"]
    args = base + ["cv", "--model", "custom_cnn", "--dataset", "ct", "--folds", "3", "--epochs", "1",
                   "--out", str(tmp_path / "cv")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    out = tmp_path / "cv" / "ct" / "custom_cnn-random-ct"
    summary = json.loads((out / "summary.json").read_text())
    folds = pd.read_csv(out / "folds.csv")
    pooled = pd.read_csv(out / "predictions.csv")
    manifest = pd.read_csv(tmp_path / "data" / "ct" / "manifest.csv")
    assert list(folds["fold"]) == [1, 2, 3] and summary["folds"] == 3
    assert sorted(pooled["path"]) == sorted(manifest["path"])  # each image scored once, out of fold
    auc = summary["across_folds"]["roc_auc"]
    assert auc["mean"] == pytest.approx(folds["roc_auc"].mean())
    assert auc["ci_low"] <= auc["mean"] <= auc["ci_high"]
    assert summary["pooled"]["pooled_roc_auc"] == pytest.approx(
        roc_auc_score(pooled["actual"] == "covid", pooled["p_covid"]))
    assert "roc_auc: mean" in result.output and "pooled out-of-fold" in result.output
    # At the operating point, per patient, what it cost and what ran it.
    assert summary["across_folds"]["op_accuracy"]["mean"] == pytest.approx(folds["op_accuracy"].mean())
    by_group = pooled.groupby("group").agg(p=("p_covid", "mean"), covid=("actual", lambda a: (a == "covid").mean()))
    patient = summary["patient"]
    assert patient["patient_groups"] == manifest["group"].nunique() == len(by_group)
    assert patient["patient_roc_auc"] == pytest.approx(roc_auc_score(by_group["covid"] >= 0.5, by_group["p"]))
    assert patient["patient_roc_auc_ci_low"] <= patient["patient_roc_auc"] <= patient["patient_roc_auc_ci_high"]
    assert (folds["wall_seconds"] > 0).all() and (folds["cpu_seconds"] > 0).all()
    assert summary["compute"]["wall_seconds"] == pytest.approx(folds["wall_seconds"].sum())
    assert summary["compute"]["cpu_seconds"] == pytest.approx(folds["cpu_seconds"].sum())
    assert summary["command"] == shlex.join(["covidtl", *args])
    assert (summary["cell"], summary["profile"]) == ("custom_cnn-random-ct", "paper")
    client = MlflowClient()
    parent = client.get_run(summary["run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 3 and parent.data.tags["kind"] == "cv"
    assert parent.data.metrics["cv_roc_auc_mean"] == pytest.approx(auc["mean"])


def test_a_patient_scores_the_mean_of_its_slices_and_takes_their_majority_label():
    pooled = pd.DataFrame({
        "group": ["a", "a", "a", "b", "b", "c", "c"],
        "actual": ["covid", "covid", "non_covid", "covid", "non_covid", "non_covid", "non_covid"],
        "p_covid": [0.9, 0.6, 0.3, 0.2, 0.4, 0.1, 0.5],
    })
    scores, mixed = cv.patient_scores(pooled)
    assert mixed == 2  # a (2 of 3 COVID) and b (a tie)
    assert list(scores.y_true) == [1, 1, 0]  # CLASSES order: a and b count as COVID, c not
    assert scores.p_covid == pytest.approx([0.6, 0.3, 0.3])
    assert list(scores.groups) == ["a", "b", "c"]


def test_the_interval_of_a_fold_mean_stays_inside_0_1(tmp_path):
    # Five fold AUCs with a wide spread: the t interval of their mean would pass 1.
    per_fold = pd.DataFrame({name: [0.975, 0.687, 0.811, 0.947, 0.967] for name in cv.FOLD_METRICS})
    pooled = pd.DataFrame({"actual": ["covid", "non_covid"] * 4, "p_covid": [0.9, 0.2, 0.7, 0.4, 0.6, 0.1, 0.8, 0.3],
                           "group": ["a", "b", "c", "d", "e", "f", "g", "h"]})
    summary = cv.summarise(config(tmp_path), per_fold, pooled)
    auc = summary["across_folds"]["roc_auc"]
    assert auc["ci_high"] == 1.0 and 0.6 < auc["ci_low"] < auc["mean"]
    assert summary["pooled"]["pooled_roc_auc"] == 1.0  # every COVID scored above every non-COVID
