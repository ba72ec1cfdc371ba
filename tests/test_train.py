"""Training end to end: every init mode, the paper's stop rule, the cell's files and its MLflow run."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile
from pathlib import Path

import h5py
import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from keras.src.legacy.saving import legacy_h5_format
from mlflow.tracking import MlflowClient

from covidtl.cli import main
from covidtl.inits import Init
from covidtl.models.registry import base_of, build_model, get_spec
from covidtl.train import PaperStopRule, RecalibrateBatchNorm, RunOptions, plan_run, train
from helpers_train import make_workdir

ROOT = Path(__file__).parents[1]
TEST_METRICS = [
    f"test_{m}_{c}" for m in ("recall", "precision", "f1") for c in ("covid", "non_covid", "micro", "macro")
] + ["test_accuracy", "test_roc_auc"]
SMALL_BACKBONE = {"train.head_units": 16, "train.max_train_samples": 12}


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    """One SQLite store for the module: creating one costs seconds, runs are found by id."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def _track(tracking_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)


def tracked(uri: str) -> MlflowClient:
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


# --------------------------------------------------------------------------- the stop rule


class _Model:
    stop_training = False


@pytest.mark.parametrize(
    "history, stopped_at",
    [
        ([(0.70, 0.60), (0.88, 0.25), (0.89, 0.31), (0.89, 0.29), (0.95, 0.1)], 4),
        ([(0.95, 0.35), (0.80, 0.20), (0.90, 0.30)], None),  # one condition at a time never stops
        ([(0.891, 0.299)], 1),
    ],
)
def test_paper_stop_rule_fires_at_first_epoch_meeting_both(history, stopped_at):
    rule = PaperStopRule(val_accuracy=0.89, val_loss=0.3)
    rule.set_model(_Model())
    epochs_run = 0
    for epoch, (acc, loss) in enumerate(history):
        rule.on_epoch_end(epoch, {"val_accuracy": acc, "val_loss": loss, "accuracy": 1.0, "loss": 0.0})
        epochs_run += 1
        if rule.model.stop_training:
            break
    assert rule.stopped_epoch == stopped_at
    assert epochs_run == (stopped_at or len(history))


def test_batchnorm_recalibration_sets_moving_stats_to_the_training_batches_average():
    import tensorflow as tf

    inputs = keras.Input(shape=(3,))
    frozen = keras.Sequential([keras.Input(shape=(3,)), keras.layers.BatchNormalization()])
    frozen.trainable = False
    outputs = keras.layers.BatchNormalization()(frozen(inputs, training=False))
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    batches = [rng.normal(loc=[5.0, -2.0, 0.5], scale=[1.0, 3.0, 0.1], size=(16, 3)) for _ in range(4)]
    ds = tf.data.Dataset.from_tensor_slices((np.stack(batches).astype("float32"), np.zeros(4)))
    callback = RecalibrateBatchNorm(ds, batches=4)
    callback.set_model(model)
    callback.on_test_begin()

    trained_bn = model.layers[-1]
    seen = [np.asarray(frozen(b.astype("float32"), training=False)) for b in batches]
    expected_mean = np.mean([b.mean(axis=0) for b in seen], axis=0)
    expected_var = np.mean([b.var(axis=0) for b in seen], axis=0)
    np.testing.assert_allclose(trained_bn.moving_mean.numpy(), expected_mean, rtol=1e-4)
    np.testing.assert_allclose(trained_bn.moving_variance.numpy(), expected_var, rtol=1e-3)
    assert trained_bn.momentum == 0.99  # restored for training
    # The frozen base keeps its (initial) statistics.
    np.testing.assert_allclose(frozen.layers[0].moving_mean.numpy(), np.zeros(3))


# --------------------------------------------------------------------------- custom CNN, synthetic


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tracking_uri):
    """The custom CNN on tiny synthetic PNGs, max 3 epochs, stop rule met by any first epoch."""
    tmp = tmp_path_factory.mktemp("train")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        cfg, table = make_workdir(tmp, **{
            "train.max_epochs": 3, "train.stop.val_accuracy": 0.0, "train.stop.val_loss": 1.0e9,
        })
        result = train(plan_run(cfg, "custom_cnn", "random", "tiny", out_dir=tmp / "cell"))
    return tmp, cfg, result


def test_cell_outputs_are_written(trained):
    tmp, cfg, result = trained
    cell = tmp / "cell"
    assert result.model_path == cell / "model" / "model.keras"
    assert result.epochs_used == 1  # the paper's rule ended it before max_epochs=3
    model = keras.models.load_model(cell / "model" / "model.keras")
    assert model.count_params() == 81_989
    with zipfile.ZipFile(cell / "model" / "model.keras") as z, h5py.File(z.open("model.weights.h5")) as f:
        assert "optimizer" not in f  # saved without Adam's state
    metrics = json.loads((cell / "metrics.json").read_text())
    assert metrics.pop("status") == "ok"
    assert metrics.pop("run_id") == result.run_id  # the one run the report reads for this cell
    assert metrics.pop("epochs_used") == 1
    threshold = metrics.pop("operating_threshold")
    assert (metrics.pop("selected_by"), metrics.pop("best_epoch")) == ("last", 1)  # the paper keeps the last
    assert len(metrics.pop("digest")) == 64  # the settings it ran with: what cv's resume compares
    # JSON has no NaN: an undefined value (an interval on 4 test images) is null.
    assert metrics == pytest.approx({k: None if np.isnan(v) else v for k, v in result.metrics.items()})
    for key in TEST_METRICS + ["test_balanced_accuracy", "test_brier"]:  # every metric has its interval
        low, high = metrics[f"{key}_ci_low"], metrics[f"{key}_ci_high"]
        assert low is None or 0 <= low <= high <= 1, key
    for key in ("accuracy", "balanced_accuracy", "recall_covid", "recall_non_covid"):
        assert 0 <= metrics[f"test_op_{key}"] <= 1  # the same test images at the operating point
    card = json.loads((cell / "model" / "card.json").read_text())
    assert card["operating_point"]["threshold"] == threshold and card["operating_point"]["rule"] == "youden"
    assert card["operating_point"]["chosen_on"] == "validation"
    predictions = pd.read_csv(cell / "predictions.csv")
    assert list(predictions.columns) == ["path", "group", "actual", "predicted", "p_covid"]
    assert not predictions["path"].str.startswith("/").any()  # relative to the dataset root
    assert len(predictions) == metrics["test_images"]
    assert (cell / "gradcam.png").read_bytes()[:4] == b"\x89PNG"  # the seeded TP/FP/TN/FN sample
    history = pd.read_csv(cell / "history.csv")
    assert list(history.columns) == ["epoch", "loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc"]
    assert history["epoch"].tolist() == [1]
    assert yaml.safe_load((cell / "config.yaml").read_text()) == cfg.to_dict()
    assert not (cell / "checkpoint").exists()  # the per-epoch checkpoint is pruned at the end


def test_mlflow_run_holds_params_metrics_artifacts_and_model(trained, tracking_uri):
    tmp, cfg, result = trained
    client = tracked(tracking_uri)
    run = client.get_run(result.run_id)
    assert client.get_experiment(run.info.experiment_id).name == "covidtl-tiny"
    params = run.data.params
    for key, value in cfg.flat().items():
        assert key in params, key
    assert params["train.batch_size"] == "8" and params["model"] == "custom_cnn"
    assert float(params["learning_rate"]) == cfg.train.learning_rates["custom_cnn"]
    for key in TEST_METRICS + ["epochs_used", "train_seconds", "operating_threshold", "test_brier"]:
        assert key in run.data.metrics, key
    assert "test_accuracy_ci_low" in run.data.metrics and "test_op_accuracy" in run.data.metrics
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        steps = [m.step for m in client.get_metric_history(result.run_id, key)]
        assert steps == [1], key
    tags = run.data.tags
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # UI opens on runs
    inputs = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset
              for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["test", "training", "validation"]
    manifest = tmp / "data" / "tiny" / "manifest.csv"
    for context, split in (("training", "train"), ("validation", "val"), ("test", "test")):
        assert inputs[context].name == f"tiny-{split}"
        assert json.loads(inputs[context].profile)["num_rows"] == int(params[f"{split}_images"])
    input_tags = {t.key: t.value for t in run.inputs.dataset_inputs[0].tags}
    assert input_tags["manifest_sha256"] == tags["manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert tags["kind"] == "train" and tags["cell"] == "custom_cnn-random-tiny"
    assert tags["split_strategy"] == "grouped" and tags["stopped_by"] == "paper_rule"
    assert len(tags["manifest_sha256"]) == 64 and tags["git_commit"]
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {
        "config.yaml", "card.json", "training_curves.png", "test_confusion_matrix.png",
        "test_roc_pr_calibration.png", "test_gradcam_samples.png",
        "test_confusion_matrix.json", "test_classification_report.txt",
    } <= artifacts
    matrix = json.loads(Path(client.download_artifacts(result.run_id, "test_confusion_matrix.json", str(tmp))).read_text())
    assert matrix["labels"] == ["non_covid", "covid"] and np.sum(matrix["matrix"]) > 0

    info = mlflow.models.get_model_info(f"runs:/{result.run_id}/model")
    assert info.signature is not None and info.saved_input_example_info is not None
    loaded = mlflow.keras.load_model(f"runs:/{result.run_id}/model")
    x = np.zeros((1, 200, 200, 3), dtype="float32")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), keras.models.load_model(result.model_path).predict(x, verbose=0), atol=1e-5)


# --------------------------------------------------------------------------- every init mode


def fake_imagenet_cache(keras_home: Path, cfg) -> Path:
    """VGG16 base weights saved (legacy .h5) under the exact file name Keras caches ImageNet in."""
    spec = get_spec("vgg16")
    donor = base_of(build_model(spec, "random", cfg.train, image_size=32))
    path = keras_home / "models" / spec.imagenet_file
    path.parent.mkdir(parents=True)
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, donor)
    return path


@pytest.mark.parametrize("init", ["imagenet", "finetune", "weights-file"])
def test_every_init_mode_trains_end_to_end(init, tmp_path, monkeypatch, tracking_uri):
    """random is the custom CNN above; here VGG16 (the quickest backbone) from pre-trained bases."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    cfg, _ = make_workdir(tmp_path, **SMALL_BACKBONE)
    fake_imagenet_cache(tmp_path / "keras", cfg)
    start = base_of(build_model(get_spec("vgg16"), "imagenet", cfg.train, 32)).get_weights()
    if init == "weights-file":
        file = tmp_path / "base.weights.h5"
        base_of(build_model(get_spec("vgg16"), "imagenet", cfg.train, 32)).save_weights(file)
        init = str(file)
    result = train(plan_run(cfg, "vgg16", init, "tiny", out_dir=tmp_path / "cell"))
    assert result.epochs_used == 1 and 0 <= result.metrics["test_accuracy"] <= 1
    run = tracked(tracking_uri).get_run(result.run_id)
    rate = cfg.train.learning_rates["vgg16"]
    expected = rate * cfg.train.finetune_lr_factor if init == "finetune" else rate
    # One name, one meaning: learning_rate is Adam's rate in MLflow and in the card alike.
    assert float(run.data.params["learning_rate"]) == pytest.approx(expected)
    assert json.loads((tmp_path / "cell" / "model" / "card.json").read_text())["learning_rate"] == pytest.approx(expected)
    assert float(run.data.params["train.learning_rates.vgg16"]) == rate
    saved = base_of(keras.models.load_model(result.model_path)).get_weights()
    moved = any(not np.allclose(a, b) for a, b in zip(saved, start))
    assert moved == (init == "finetune")  # frozen bases keep the loaded weights


class RecordOptimizerRate(keras.callbacks.Callback):
    """Spy: the rate the optimiser starts with."""

    def on_train_begin(self, logs=None) -> None:
        self.rate = float(np.asarray(self.model.optimizer.learning_rate))


def test_the_learning_rate_is_settled_once_with_its_source(tmp_path, tracking_uri):
    """--lr with a fine-tuned start: the factor applies once; config.yaml keeps the base rate, the
    optimiser runs the plan's rate, and MLflow and the card record that same rate and its source."""
    cfg, _ = make_workdir(tmp_path)
    donor = tmp_path / "cnn.weights.h5"
    plan = plan_run(cfg, "custom_cnn", f"finetune:{donor}", "tiny", lr=2e-3, out_dir=tmp_path / "cell")
    factor = cfg.train.finetune_lr_factor
    assert factor != 1
    assert (plan.lr.base, plan.learning_rate, plan.lr_source) == (2e-3, pytest.approx(2e-3 * factor), "--lr")
    assert plan.cfg.train.learning_rates["custom_cnn"] == 2e-3
    build_model(get_spec("custom_cnn"), "random", cfg.train, plan.image_size).save_weights(donor)
    spy = RecordOptimizerRate()
    result = train(plan, RunOptions(log_model=False, extra_callbacks=(spy,)))
    params = tracked(tracking_uri).get_run(result.run_id).data.params
    assert spy.rate == pytest.approx(plan.learning_rate, rel=1e-6)
    assert (float(params["learning_rate"]), params["lr_source"]) == (plan.learning_rate, "--lr")
    assert float(params["train.learning_rates.custom_cnn"]) == 2e-3
    card = json.loads((tmp_path / "cell" / "model" / "card.json").read_text())
    assert (card["learning_rate"], card["lr_source"]) == (plan.learning_rate, "--lr")


def test_the_replicas_scale_the_settled_rate_once():
    """train.lr_scaling: distribute's rule scales the rate fine-tuning settled, in the same step."""
    from types import SimpleNamespace

    from covidtl.config import load_config
    from covidtl.distribute import scaled_rate
    from covidtl.train.plan import settle_learning_rate

    cfg = load_config(ROOT / "params.yaml")
    four = SimpleNamespace(learning_rate=lambda rate: scaled_rate(rate, 4, "linear"))
    _, rate = settle_learning_rate(cfg, get_spec("vgg16"), Init.parse("finetune"), four,
                                   lr=1e-3, lr_source="tuned/x.yaml")
    expected = pytest.approx(4e-3 * cfg.train.finetune_lr_factor)
    assert (rate.base, rate.rate, rate.source) == (1e-3, expected, "tuned/x.yaml")


# --------------------------------------------------------------------------- real images, data stages


def real_ct_files(shared_data: Path, per_class: int = 12) -> list[Path]:
    ct = shared_data / "sarscov2-ct"
    return sorted(ct.glob("COVID/*.png"))[:per_class] + sorted(ct.glob("non-COVID/*.png"))[:per_class]


@pytest.mark.parametrize("model, init", [("custom_cnn", "random"), ("vgg16", "imagenet")])
def test_trains_on_real_ct_images(model, init, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    cfg, table = make_workdir(tmp_path, files=real_ct_files(shared_data), **SMALL_BACKBONE)
    if init == "imagenet":
        fake_imagenet_cache(tmp_path / "keras", cfg)
    assert table["path"].str.startswith(str(shared_data)).all()
    result = train(plan_run(cfg, model, init, "tiny", out_dir=tmp_path / "cell"))
    assert result.epochs_used == 1
    assert set(TEST_METRICS) <= set(result.metrics)


def test_cli_trains_on_ingested_and_split_synthetic_ct(synth_data, tmp_path, tracking_uri):
    """`covidtl ingest`, `covidtl split`, then `covidtl train`: the stages as a user runs them."""
    base = ["--params", str(ROOT / "params.yaml"), "-S", f"data.workdir={tmp_path / 'data'}",
            "-S", f"data.datasets.ct.path={synth_data / 'ct'}"]
    runner = CliRunner()
    for args in (["ingest", "ct", "--quiet"], ["split", "ct"]):
        assert runner.invoke(main, base + args).exit_code == 0
    result = runner.invoke(main, base + [
        "train", "--model", "custom_cnn", "--init", "random", "--dataset", "ct", "--epochs", "1",
        "--batch-size", "16", "--max-train-samples", "32", "--out", str(tmp_path / "cell"),
    ])
    assert result.exit_code == 0, result.output
    assert "train custom_cnn-random-ct: 1 epochs" in result.output
    assert (tmp_path / "cell" / "model" / "model.keras").is_file()
    client = tracked(tracking_uri)
    run_id = result.output.split(" run ")[1].split(";")[0]
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == "covidtl-ct"
    assert run.data.params["train.max_train_samples"] == "32" and run.data.params["train_images"] == "32"


def test_cli_train_on_a_fresh_clone_makes_the_missing_split_first(tmp_path, tracking_uri):
    """No synth, ingest or split yet (a fresh clone): train makes them, as `dvc repro split@ct`."""
    synth = tmp_path / "synth"
    base = ["--params", str(ROOT / "params.yaml"), "-S", f"data.workdir={tmp_path / 'data'}",
            "-S", f"synth.out={synth}", "-S", f"data.datasets.ct.path={synth / 'ct'}",
            "-S", "synth.images_per_class=40"]
    result = CliRunner().invoke(main, base + [
        "train", "--model", "custom_cnn", "--dataset", "ct", "--epochs", "1", "--batch-size", "8",
        "--max-train-samples", "16", "--out", str(tmp_path / "cell"), "--no-log-model",
    ])
    assert result.exit_code == 0, result.output
    assert (synth / "ct" / "COVID").is_dir()
    table = pd.read_csv(tmp_path / "data" / "ct" / "split.csv")
    assert set(table["split"]) == {"train", "val", "test"} and len(table) == 80
    assert "covidtl synth" in result.output and "covidtl split ct" in result.output
    assert (tmp_path / "cell" / "model" / "model.keras").is_file()

    elsewhere = ["--params", str(ROOT / "params.yaml"), "-S", f"data.workdir={tmp_path / 'empty'}"]
    refused = CliRunner().invoke(main, elsewhere + [
        "train", "--model", "custom_cnn", "--dataset", "ct", "--no-prepare",
    ])
    assert refused.exit_code == 2
    assert "no split table" in refused.output and "covidtl split ct" in refused.output


@pytest.mark.parametrize("init, factor", [("random", 1.0), ("finetune", 0.1)])
def test_the_rate_given_on_the_command_line_is_the_rate_recorded(init, factor, tmp_path, monkeypatch, tracking_uri):
    """Issue 8.4: --lr reaches config.yaml, MLflow and the card; config.yaml re-creates the run."""
    from covidtl.config import load_config

    model = "custom_cnn" if init == "random" else "vgg16"
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    cfg, _ = make_workdir(tmp_path)
    if init == "finetune":
        fake_imagenet_cache(tmp_path / "keras", cfg)
    args = ["--params", str(ROOT / "params.yaml"), "-S", f"data.workdir={tmp_path / 'data'}",
            "-S", f"data.datasets.tiny.path={tmp_path / 'images'}", "-S", "train.head_units=16",
            "-S", "train.image_size.vgg16=32", "-S", "train.max_train_samples=12"]
    result = CliRunner().invoke(main, args + [
        "train", "--model", model, "--init", init, "--dataset", "tiny", "--epochs", "1",
        "--batch-size", "8", "--lr", "5e-4", "--out", str(tmp_path / "cell"), "--no-log-model",
    ])
    assert result.exit_code == 0, result.output
    saved = load_config(tmp_path / "cell" / "config.yaml")  # a complete params file
    assert saved.train.learning_rates[model] == 5e-4
    assert saved.train.max_epochs == 1 and saved.train.batch_size == 8
    run_id = json.loads((tmp_path / "cell" / "metrics.json").read_text())["run_id"]
    params = tracked(tracking_uri).get_run(run_id).data.params
    assert float(params[f"train.learning_rates.{model}"]) == 5e-4
    assert float(params["learning_rate"]) == pytest.approx(5e-4 * factor)
    assert params["lr_source"] == "--lr"
    card = json.loads((tmp_path / "cell" / "model" / "card.json").read_text())
    assert card["learning_rate"] == pytest.approx(5e-4 * factor) and card["run_id"] == run_id

    # Re-running from the saved config alone gives the same settings, the rate included.
    again = CliRunner().invoke(main, ["--params", str(tmp_path / "cell" / "config.yaml"), "train",
                                      "--model", model, "--init", init, "--dataset", "tiny",
                                      "--out", str(tmp_path / "again"), "--no-log-model"])
    assert again.exit_code == 0, again.output
    assert (tmp_path / "again" / "config.yaml").read_text() == (tmp_path / "cell" / "config.yaml").read_text()


@pytest.mark.parametrize("rate", ["0", "-1"])
def test_a_rate_that_cannot_train_is_refused(rate, tmp_path):
    make_workdir(tmp_path)
    result = CliRunner().invoke(main, [
        "--params", str(ROOT / "params.yaml"), "-S", f"data.workdir={tmp_path / 'data'}",
        "-S", f"data.datasets.tiny.path={tmp_path / 'images'}",
        "train", "--model", "custom_cnn", "--dataset", "tiny", "--lr", rate, "--out", str(tmp_path / "cell"),
    ])
    assert result.exit_code == 2 and "must be > 0" in result.output
    assert not (tmp_path / "cell" / "metrics.json").exists()


def test_a_run_is_identified_by_its_settings_not_by_the_other_profiles(tmp_path):
    from covidtl.train import run_digest

    cfg, _ = make_workdir(tmp_path)
    with_another, _ = make_workdir(tmp_path, **{"profiles.unused": {"train.head": "gap"}})
    assert run_digest(plan_run(with_another, "custom_cnn", "random", "tiny")) == \
        run_digest(plan_run(cfg, "custom_cnn", "random", "tiny"))
    changed, _ = make_workdir(tmp_path, **{"train.head": "gap"})
    assert run_digest(plan_run(changed, "custom_cnn", "random", "tiny")) != \
        run_digest(plan_run(cfg, "custom_cnn", "random", "tiny"))


# --------------------------------------------------------------------------- eager or graphs


class RecordRunMode(keras.callbacks.Callback):
    """Spy: whether the model fit trains ran eagerly."""

    def on_train_begin(self, logs=None) -> None:
        self.run_eagerly = self.model.run_eagerly


def with_run_eagerly(cfg, setting):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_eagerly=setting))


def test_auto_runs_eagerly_for_a_few_batches_and_in_graphs_for_more(tmp_path):
    """train.run_eagerly auto: eager up to EAGER_MAX_BATCHES training batches an epoch; true and
    false win over the count."""
    from covidtl.distribute import EAGER_MAX_BATCHES, eager_for
    from helpers_train import write_images

    assert [eager_for("auto", n) for n in (1, EAGER_MAX_BATCHES, EAGER_MAX_BATCHES + 1)] == [True, True, False]
    assert eager_for(True, 10 * EAGER_MAX_BATCHES) and not eager_for(False, 1)

    tiny, _ = make_workdir(tmp_path / "tiny")
    more, table = make_workdir(tmp_path / "more", files=write_images(tmp_path / "more" / "images", per_class=60, size=32))
    assert (table["split"] == "train").sum() > EAGER_MAX_BATCHES * more.train.batch_size
    decided = {
        (name, setting): plan_run(with_run_eagerly(cfg, setting), "custom_cnn", "random", "tiny").run_eagerly
        for name, cfg in (("tiny", tiny), ("more", more)) for setting in ("auto", True, False)
    }
    assert decided == {("tiny", "auto"): True, ("more", "auto"): False, ("tiny", True): True,
                       ("more", True): True, ("tiny", False): False, ("more", False): False}
    # The plan asks distribute where it runs: here one replica, so the global batch is the batch.
    plan = plan_run(more, "custom_cnn", "random", "tiny")
    assert plan.run_eagerly is False and plan.run_on["global_batch_size"] == more.train.batch_size


def test_a_larger_split_trains_in_graphs_and_the_run_records_it(tmp_path, tracking_uri):
    from helpers_train import write_images

    cfg, _ = make_workdir(tmp_path, files=write_images(tmp_path / "images", per_class=60, size=32))
    assert cfg.train.run_eagerly == "auto"  # params.yaml's default
    spy = RecordRunMode()
    result = train(plan_run(cfg, "custom_cnn", "random", "tiny", out_dir=tmp_path / "cell"),
                   RunOptions(log_model=False, extra_callbacks=(spy,)))
    assert spy.run_eagerly is False
    assert tracked(tracking_uri).get_run(result.run_id).data.params["run_eagerly_used"] == "False"
    assert json.loads((tmp_path / "cell" / "model" / "card.json").read_text())["run_eagerly_used"] is False
    assert yaml.safe_load((tmp_path / "cell" / "config.yaml").read_text())["train"]["run_eagerly"] == "auto"


def test_the_tiny_demo_split_trains_eagerly_and_the_run_records_it(trained, tracking_uri):
    tmp, cfg, result = trained  # 14 training images, batches of 8, under params.yaml's auto
    assert cfg.train.run_eagerly == "auto"
    assert tracked(tracking_uri).get_run(result.run_id).data.params["run_eagerly_used"] == "True"
    assert json.loads((tmp / "cell" / "model" / "card.json").read_text())["run_eagerly_used"] is True
