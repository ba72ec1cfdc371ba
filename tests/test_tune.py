"""The learning-rate search: real `covidtl tune` runs on tiny synthetic images.

Trials train the custom CNN for one or two epochs; pruning is forced by queueing an absurd rate
(50) after the paper's (1e-3): its validation loss explodes, so the median pruner must prune it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import signal
import subprocess
import sys
import time
import typing
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from covidtl.cli import main
from covidtl.config import load_config, parse_override
from covidtl.errors import UserError
from covidtl.tune import lr_bounds, tuned_learning_rate
from helpers_train import split_table, write_images

ROOT = Path(__file__).parents[1]
PARAMS = ROOT / "params.yaml"
COVIDTL = [str(Path(sys.executable).parent / "covidtl")]  # the console script of this venv


# --------------------------------------------------------------------------- helpers


def make_project(root: Path) -> Path:
    """Tiny labelled images and their split table under root (data/tiny/split.csv)."""
    files = write_images(root / "images", per_class=12, size=48)
    table = split_table(files)
    (root / "data" / "tiny").mkdir(parents=True, exist_ok=True)
    table.to_csv(root / "data" / "tiny" / "split.csv", index=False)
    table.drop(columns="split").to_csv(root / "data" / "tiny" / "manifest.csv", index=False)
    return root


def overrides(root: Path, *extra: str, wide: bool = True) -> list[str]:
    """The tiny dataset, small batches, pruning from the first epoch.

    wide: search [1e-4, 100] so that the absurd rate 50 can be queued.
    """
    return [
        f"data.workdir={root / 'data'}",
        f"data.datasets.tiny={{path: {root / 'images'}, series: true}}",
        "train.batch_size=8",
        f"tune.out={root / 'tuned'}",
        "tune.min_epochs=1",
        "tune.prune_after=1",
        "tune.stale_after=2",
        *(["tune.bounds.custom_cnn=[1.0e-4, 100.0]"] if wide else []),
        *extra,
    ]


def settings(root: Path, *extra: str, wide: bool = True) -> list[str]:
    """Global options: params.yaml and `overrides` as -S values."""
    return ["--params", str(PARAMS), *[a for s in overrides(root, *extra, wide=wide) for a in ("-S", s)]]


def config(root: Path, *extra: str, wide: bool = True):
    """The Config that `covidtl` builds from `settings(root, *extra)`."""
    return load_config(PARAMS, dict(parse_override(s) for s in overrides(root, *extra, wide=wide)))


def sqlite_url(root: Path) -> str:
    return f"sqlite:///{root / 'optuna.db'}"


def only_study(url: str) -> optuna.Study:
    """The one study in the storage (its name carries the settings' digest)."""
    return optuna.load_study(study_name=None, storage=url)


def env_for(root: Path) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}


def invoke(args: list[str]):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def one_error_line(result) -> str:
    text = result.output  # stdout and stderr, as a terminal shows them
    lines = [line for line in text.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 2, text
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def trial_runs(client: MlflowClient, parent_id: str):
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}'")


# --------------------------------------------------------------------------- one search, several checks


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One `covidtl tune` of 3 trials: the paper's 1e-3, a forced 50 (pruned), one TPE draw."""
    root = make_project(tmp_path_factory.mktemp("tune"))
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.chdir(root)
    result = invoke(settings(root) + [
        "tune", "--model", "custom_cnn", "--dataset", "tiny", "--trials", "3", "--epochs", "2",
        "--enqueue", "50", "--storage", sqlite_url(root),
    ])
    yield root, result
    mp.undo()


def test_search_runs_prunes_and_writes_the_best_rate(searched):
    root, result = searched
    assert result.exit_code == 0, result.output
    study = only_study(sqlite_url(root))
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2]
    assert trials[0].params["lr"] == pytest.approx(1e-3)  # the paper's rate, queued first
    assert trials[1].params["lr"] == pytest.approx(50.0)
    assert trials[1].state == TrialState.PRUNED
    assert list(trials[1].intermediate_values) == [1]  # stopped after its first epoch
    assert trials[0].state == TrialState.COMPLETE and len(trials[0].intermediate_values) == 2
    assert all(1e-4 <= t.params["lr"] <= 100 for t in trials)

    record = yaml.safe_load((root / "tuned" / "custom_cnn-random-tiny.yaml").read_text())
    assert record["learning_rate"] == pytest.approx(study.best_params["lr"])
    assert record["value"] == pytest.approx(study.best_value)
    assert record["metric"] == "val_loss" and record["trial"] == study.best_trial.number
    assert record["paper_value"] == pytest.approx(trials[0].value)
    assert record["trials"]["pruned"] >= 1
    assert f"best lr {record['learning_rate']:.3g}" in result.output


def test_each_trial_is_a_nested_mlflow_run(searched):
    root, _ = searched
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("covidtl-tiny")
    (parent,) = client.search_runs([exp.experiment_id], "tags.kind = 'tune'")
    study = only_study(sqlite_url(root))
    assert parent.data.tags["optuna_study"] == study.study_name
    assert parent.data.metrics["best_val_loss"] == pytest.approx(study.best_value)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "optuna")}
    for plot in ("optimization_history", "slice_lr", "intermediate_values"):
        assert f"optuna/{plot}.png" in artifacts
    # Importances need two completed trials with different rates; otherwise the reason is kept.
    assert {"optuna/param_importances.png", "optuna/skipped_plots.json"} & artifacts

    children = trial_runs(client, parent.info.run_id)
    by_number = {int(r.data.tags["optuna_trial"]): r for r in children}
    assert sorted(by_number) == [0, 1, 2]
    states = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}
    for trial in study.get_trials():
        run = by_number[trial.number]
        assert run.data.tags["kind"] == "tune-trial"
        assert run.data.tags["trial_state"] == states[trial.state]
        assert float(run.data.params["trial.lr"]) == pytest.approx(trial.params["lr"])
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert len(history) == len(trial.intermediate_values)
        assert not [k for k in run.data.metrics if k.startswith("test_")]  # never the test split


def test_train_reads_the_tuned_rate(searched):
    root, _ = searched
    # The search ran with --epochs 2: the same settings, so that the tuned file is for them.
    cfg = config(root, "tune.epochs=2")
    rate = tuned_learning_rate(cfg, "custom_cnn", "tiny")
    study = only_study(sqlite_url(root))
    assert rate == pytest.approx(study.best_params["lr"])

    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.chdir(root)
    try:
        result = invoke(settings(root, "tune.epochs=2", "train.max_epochs=1") + [
            "train", "--model", "custom_cnn", "--init", "random", "--dataset", "tiny", "--lr", "tuned",
        ])
    finally:
        mp.undo()
    assert result.exit_code == 0, result.output
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("covidtl-tiny")
    (run,) = client.search_runs([exp.experiment_id], "tags.kind = 'train'")
    assert float(run.data.params["learning_rate"]) == pytest.approx(rate)


def test_tuned_rate_missing_is_one_clear_error(tmp_path):
    cfg = load_config(PARAMS, {"tune.out": str(tmp_path / "tuned")})
    with pytest.raises(UserError, match=r"custom_cnn-random-ct\.yaml: no tuned learning rate yet; run `covidtl tune"):
        tuned_learning_rate(cfg, "custom_cnn", "ct")


# --------------------------------------------------------------------------- resume


def _done_then_training(url: str) -> bool:
    """At least one trial complete and the newest one inside fit (its MLflow run exists)."""
    try:
        trials = only_study(url).get_trials(deepcopy=False)
    except (KeyError, ValueError):  # not created yet
        return False
    return (
        len(trials) >= 2 and all(t.state == TrialState.COMPLETE for t in trials[:-1])
        and trials[-1].state == TrialState.RUNNING and "mlflow_run_id" in trials[-1].user_attrs
    )


def test_interrupted_study_resumes(tmp_path):
    """SIGKILL mid-trial, run again: completed trials stay, the dead trial is failed, one more runs."""
    root = make_project(tmp_path)
    url = sqlite_url(root)
    # Two epochs per trial and six trials queued: the poll catches a trial inside fit even on a
    # loaded machine (with one epoch and three trials it once missed every window).
    args = settings(root, "tune.pruner=none") + [
        "tune", "--model", "custom_cnn", "--dataset", "tiny", "--epochs", "2", "--storage", url,
    ]
    worker = subprocess.Popen(
        COVIDTL + args + ["--trials", "6"], cwd=root, env=env_for(root),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and worker.poll() is None:
            if _done_then_training(url):
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"no completed trial then a training one within 300 s (rc {worker.poll()})")
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
    before = only_study(url).get_trials()
    done = len(before) - 1
    assert [t.state for t in before] == [TrialState.COMPLETE] * done + [TrialState.RUNNING]

    time.sleep(3)  # past tune.stale_after=2 s without the dead worker's heartbeat
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    try:
        result = invoke(args + ["--trials", "1"])
    finally:
        mp.undo()
    assert result.exit_code == 0, result.output
    after = only_study(url).get_trials()
    assert [t.state for t in after] == [TrialState.COMPLETE] * done + [TrialState.FAIL, TrialState.COMPLETE]
    assert after[0].value == before[0].value and after[0].params == before[0].params
    assert after[-1].params["lr"] != after[0].params["lr"]  # a new draw, not a replay

    # The killed trial's MLflow run no longer claims to be running.
    run = MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_run(after[done].user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["trial_state"] == "failed"


# --------------------------------------------------------------------------- many workers


@pytest.fixture
def postgres_url() -> str:
    url = os.environ.get("COVIDTL_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("no PostgreSQL: set COVIDTL_TEST_POSTGRES_URL (bash .ci/run starts one and sets it)")
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(url.replace("postgresql://", "postgresql+psycopg2://", 1))
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"PostgreSQL at COVIDTL_TEST_POSTGRES_URL not reachable: {exc}".splitlines()[0])
    return url


@pytest.mark.postgres
def test_two_workers_share_one_postgres_study(tmp_path, postgres_url):
    from covidtl.tune import study_identity

    root = make_project(tmp_path)
    dataset = f"tiny{uuid.uuid4().hex[:8]}"  # a fresh study in a database that outlives the test
    (root / "data" / "tiny").rename(root / "data" / dataset)
    # A live worker's heartbeat can lag a few seconds on a loaded machine: the default
    # stale_after, not the resume test's 2 s, or one worker would fail the other's trials.
    sets = ("tune.pruner=none", "tune.stale_after=120",
            f"data.datasets.{dataset}={{path: {root / 'images'}}}")
    name = study_identity(config(root, *sets, "tune.epochs=1"), "custom_cnn", "random", dataset).name
    args = settings(root, *sets) + [
        "tune", "--model", "custom_cnn", "--dataset", dataset, "--epochs", "1", "--trials", "2",
        "--storage", postgres_url,
    ]
    workers = [
        subprocess.Popen(COVIDTL + args, cwd=root, env=env_for(root), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [w.communicate(timeout=540)[0] for w in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-3000:]

    study = optuna.load_study(study_name=name, storage=postgres_url.replace(
        "postgresql://", "postgresql+psycopg2://", 1))
    try:
        trials = study.get_trials()
        assert sorted(t.number for t in trials) == [0, 1, 2, 3]  # 2 + 2, each exactly once
        assert all(t.state == TrialState.COMPLETE for t in trials)
        rates = [t.params["lr"] for t in trials]
        assert len(set(rates)) == 4 and sum(math.isclose(r, 1e-3) for r in rates) == 1
        best = min(trials, key=lambda t: t.value)
        assert study.best_trial.number == best.number
        record = yaml.safe_load((root / "tuned" / f"custom_cnn-random-{dataset}.yaml").read_text())
        assert record["study"] == name
        # The worker that finished last saw all four trials.
        assert record["learning_rate"] == pytest.approx(best.params["lr"])

        client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
        exp = client.get_experiment_by_name(f"covidtl-{dataset}")
        parents = client.search_runs([exp.experiment_id], "tags.kind = 'tune'")
        assert len(parents) == 2
        numbers = [int(r.data.tags["optuna_trial"]) for p in parents
                   for r in trial_runs(client, p.info.run_id)]
        assert sorted(numbers) == [0, 1, 2, 3]
    finally:
        optuna.delete_study(study_name=name, storage=study._storage)


# --------------------------------------------------------------------------- study identity


def test_settings_that_change_the_objective_name_a_new_study(tmp_path):
    from covidtl.tune import load_study, study_identity

    root = make_project(tmp_path)

    def identity(*extra: str):
        return study_identity(config(root, *extra), "custom_cnn", "random", "tiny")

    same = identity()
    assert same == identity() and same.name == f"lr-custom_cnn-random-tiny-{same.digest}"
    # How the search runs is not what a trial measures: resume and shared workers keep one study.
    for setting in ("tune.trials=3", "tune.storage=sqlite:///other.db", "tune.pruner=none",
                    "tune.sampler_seed=9", "tune.stale_after=5", "tune.min_epochs=3",
                    "tune.prune_after=1", "train.max_epochs=50", "train.run_eagerly=false"):
        assert identity(setting).digest == same.digest, setting
    changed = {
        setting: identity(setting)
        for setting in ("tune.epochs=2", "tune.metric=val_accuracy",
                        "tune.bounds.custom_cnn=[1.0e-3, 1.0e-2]", "train.batch_size=16",
                        "train.image_size.custom_cnn=224", "split.seed=7", "augment.rotation=10",
                        "tune.search_dropout=true", "train.max_train_samples=6")
    }
    for setting, other in changed.items():
        assert other.digest != same.digest, setting
    assert changed["tune.bounds.custom_cnn=[1.0e-3, 1.0e-2]"].bounds == (1e-3, 1e-2)

    # The data: the same settings over another split table (one image moved) are another study.
    split = root / "data" / "tiny" / "split.csv"
    table = split.read_text().splitlines()
    table[1] = table[1].rsplit(",", 1)[0] + ("," + ("val" if table[1].endswith("train") else "train"))
    split.write_text("\n".join(table) + "\n")
    resplit = identity()
    assert resplit.digest != same.digest
    assert resplit.settings["split"]["table_sha256"] != same.settings["split"]["table_sha256"]

    url = sqlite_url(root)
    first, created_first = load_study(config(root), resplit, url)
    epochs, created_epochs = load_study(config(root, "tune.epochs=2"), identity("tune.epochs=2"), url)
    again, created_again = load_study(config(root), identity(), url)
    assert (created_first, created_epochs, created_again) == (True, True, False)
    assert first._study_id == again._study_id != epochs._study_id
    assert first.user_attrs["identity"] == {"version": 2, "digest": resplit.digest, "settings": resplit.settings}


# The train keys that do not change what a trial measures (covidtl.tune.NOT_MEASURED says why),
# written out here rather than imported: a key left out of the identity by mistake fails the test.
SAME_MEASURE = {"train.model", "train.init", "train.max_epochs", "train.run_eagerly", "train.learning_rates"}


def leaf_keys(cls: type, prefix: str):
    """(dotted key, type) of every value of a config group, nested groups opened."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}.{f.name}", hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from leaf_keys(tp, key)
        else:
            yield key, tp


def other_values(key: str, tp, value, model: str) -> list:
    """Values of the key's type other than `value`, to try in order until params accept one."""
    if typing.get_origin(tp) is typing.Literal:
        return [a for a in typing.get_args(tp) if not (a == value and type(a) is type(value))]
    if tp is bool:
        return [not value]
    if tp in (int, float):
        return [value + 1 if tp is int else value + 0.1]
    if tp is str:
        return {"train.model": ["vgg16"], "train.init": ["imagenet"]}.get(key, ["top_block"])
    if typing.get_origin(tp) is list:
        return [value + [value[-1] * 2]]
    if typing.get_origin(tp) is dict:  # per model: this model's entry
        return [{**value, model: value[model] * 2}]
    raise AssertionError(f"no other value for {tp}")


def config_with(root: Path, key: str, value, *extra: str):
    """`config(root, *extra)` with one key set to `value`, or None if params refuse that value."""
    from covidtl.config import ConfigError

    settings = dict(parse_override(s) for s in overrides(root, *extra))
    try:
        return load_config(PARAMS, {**settings, key: value})
    except ConfigError:
        return None


def test_every_train_and_augment_key_names_another_study(tmp_path):
    """The identity is the resolved config less a documented list: each other key of train and
    augment (precision, crop, warm-up, the frozen base's levers ...) changes it."""
    from covidtl.config import AugmentConfig, TrainConfig
    from covidtl.data.tables import augmented_manifest_path
    from covidtl.tune import study_identity

    root = make_project(tmp_path)
    base = config(root)
    augmented = augmented_manifest_path(base, "tiny")  # augment.mode offline reads the stored set
    augmented.parent.mkdir(parents=True)
    augmented.write_text("path,label,source_path\n")
    same = study_identity(base, "custom_cnn", "random", "tiny").digest
    checked, wrong = [], []
    for key, tp in [*leaf_keys(TrainConfig, "train"), *leaf_keys(AugmentConfig, "augment")]:
        value = functools.reduce(getattr, key.split("."), base)
        cfg = next(filter(None, (config_with(root, key, v) for v in other_values(key, tp, value, "custom_cnn"))))
        if (study_identity(cfg, "custom_cnn", "random", "tiny").digest == same) != (key in SAME_MEASURE):
            wrong.append(key)
        checked.append(key)
    assert wrong == []  # each listed key names another study, or keeps it where it should not
    assert {"train.precision", "train.crop", "train.normalize", "train.label_smoothing",
            "train.weight_decay", "train.schedule", "train.warmup_epochs", "train.tta",
            "augment.intensity.brightness", "train.linear_probe.folds", "train.unfreeze_after",
            "train.feature_copies", "train.feature_cache", "augment.copies_per_image"} <= set(checked)

    # Another model's input size is not this study's; a drawn batch size replaces the configured one.
    assert study_identity(config(root, "train.image_size.vgg16=64"), "custom_cnn", "random", "tiny").digest == same
    drawn = "tune.search_batch_size=true"
    assert (study_identity(config(root, drawn, "train.batch_size=16"), "custom_cnn", "random", "tiny").digest
            == study_identity(config(root, drawn), "custom_cnn", "random", "tiny").digest)


def test_what_a_trial_does_not_read_keeps_the_study(tmp_path):
    """Bookkeeping, the other stages' groups and the other profiles' definitions keep one study;
    choosing a profile that sets a lever does not."""
    from covidtl.tune import study_identity

    root = make_project(tmp_path)

    def digest(*extra: str) -> str:
        return study_identity(config(root, *extra), "custom_cnn", "random", "tiny").digest

    same = digest()
    for setting in ("eval.bootstrap=0", "eval.operating_point=sensitivity:0.9", "report.out=elsewhere",
                    "cache.max_gb=1", "cv.folds=3", "synth.size=64", "study.models=[vgg16]",
                    "pretrain.epochs=9", "ingest.thumbnail=16", "data.labels.sick=covid",
                    "external.tiny=[]", "tune.out=elsewhere", "tune.decades=2",
                    "profiles.other={train.crop: body}"):
        assert digest(setting) == same, setting
    assert digest("profiles.other={train.crop: body}", "profile=other") != same


@pytest.mark.parametrize("init", ["weights-file", "imagenet", "pretrained"])
def test_the_init_weights_count_by_their_content_not_their_path(init, tmp_path, monkeypatch):
    from covidtl.weight_records import IMAGENET_FILES
    from covidtl.tune import study_identity

    root = make_project(tmp_path)
    monkeypatch.chdir(tmp_path)  # no weights records of the project's own (data/weights)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))

    def identity(content: bytes, folder: str):
        if init == "weights-file":
            path, given, extra = tmp_path / folder / "base.weights.h5", str(tmp_path / folder / "base.weights.h5"), ()
        elif init == "imagenet":  # Keras' cache, where `covidtl weights` finds ImageNet's file
            path, given, extra = tmp_path / "keras" / "models" / IMAGENET_FILES["vgg16"], "imagenet", ()
        else:  # covidtl pretrain's file under pretrain.out
            path, given, extra = tmp_path / folder / "vgg16.weights.h5", "pretrained", (f"pretrain.out={tmp_path / folder}",)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        return study_identity(config(root, *extra), "vgg16", given, "tiny")

    first = identity(b"weights one", "a")
    assert first.settings["init_sha256"] == hashlib.sha256(b"weights one").hexdigest()
    assert identity(b"weights two", "a").digest != first.digest
    if init != "imagenet":  # the same bytes elsewhere: the same study (pretrain.out is not measured)
        assert identity(b"weights one", "b").digest == first.digest


def test_a_profiles_tuned_rate_has_its_own_file(tmp_path, monkeypatch):
    """Tuning under a profile writes tuned/<cell>-<profile>.yaml and leaves the paper's file alone;
    `--lr tuned` reads the running profile's."""
    root = make_project(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.chdir(root)
    paper_file = root / "tuned" / "custom_cnn-random-tiny.yaml"
    paper_file.parent.mkdir()
    paper_file.write_text("learning_rate: 0.001\n")  # a file of the paper's profile, from before
    smooth = ("profiles.smooth={train.label_smoothing: 0.1}", "profile=smooth", "tune.epochs=1",
              "tune.pruner=none")
    result = invoke(settings(root, *smooth) + [
        "tune", "--model", "custom_cnn", "--dataset", "tiny", "--trials", "1", "--storage", sqlite_url(root)])
    assert result.exit_code == 0, result.output
    assert paper_file.read_text() == "learning_rate: 0.001\n"
    record = yaml.safe_load((root / "tuned" / "custom_cnn-random-tiny-smooth.yaml").read_text())
    assert record["profile"] == "smooth" and record["identity"]["settings"]["train"]["label_smoothing"] == 0.1
    assert tuned_learning_rate(config(root, *smooth), "custom_cnn", "tiny") == record["learning_rate"]
    with pytest.raises(UserError, match=r"custom_cnn-random-tiny\.yaml: tuned for other settings"):
        tuned_learning_rate(config(root, "tune.epochs=1", "tune.pruner=none"), "custom_cnn", "tiny")

    # `train --lr tuned` under the profile reads its file: another tune.epochs is refused, naming it.
    line = one_error_line(invoke(settings(root, *smooth[:2]) + [
        "train", "--model", "custom_cnn", "--init", "random", "--dataset", "tiny", "--lr", "tuned"]))
    assert "custom_cnn-random-tiny-smooth.yaml: tuned for other settings" in line
    assert "tune.epochs 1 (now 5)" in line and "covidtl -S profile=smooth tune --model custom_cnn" in line


def test_a_changed_search_runs_again_with_total(tmp_path, monkeypatch):
    """`--total` after narrower bounds: a new study runs its trials; the same again runs none."""
    root = make_project(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.chdir(root)
    url = sqlite_url(root)
    args = settings(root, "tune.pruner=none") + [
        "tune", "--model", "custom_cnn", "--dataset", "tiny", "--epochs", "1", "--trials", "2",
        "--total", "--storage", url,
    ]
    tuned = root / "tuned" / "custom_cnn-random-tiny.yaml"
    assert invoke(args).exit_code == 0
    wide = yaml.safe_load(tuned.read_text())

    narrow = args + ["--bounds", "1e-4", "5e-4"]
    result = invoke(narrow)
    assert result.exit_code == 0, result.output
    record = yaml.safe_load(tuned.read_text())
    assert record["study"] != wide["study"]
    assert sorted(optuna.get_all_study_names(url)) == sorted([wide["study"], record["study"]])
    study = optuna.load_study(study_name=record["study"], storage=url)
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 2
    assert all(1e-4 <= t.params["lr"] <= 5e-4 for t in study.get_trials())
    assert 1e-4 <= record["learning_rate"] <= 5e-4  # the best rate is inside the current bounds
    assert record["identity"]["settings"]["tune"]["space"]["lr"] == [1e-4, 5e-4]
    assert study.user_attrs["identity"] == record["identity"]
    run = MlflowClient().get_run(record["mlflow_run_id"])
    assert run.data.params["study_digest"] == record["identity"]["digest"]

    # The same settings again: the same, full study; nothing runs.
    assert invoke(narrow).exit_code == 0
    assert yaml.safe_load(tuned.read_text())["study"] == record["study"]
    assert len(optuna.load_study(study_name=record["study"], storage=url).get_trials()) == 2


def test_train_refuses_a_rate_tuned_for_other_settings(searched, tmp_path, monkeypatch):
    root, _ = searched  # its tuned file was searched with --epochs 2; params.yaml says 5
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    line = one_error_line(invoke(settings(root, "train.max_epochs=1") + [
        "train", "--model", "custom_cnn", "--init", "random", "--dataset", "tiny", "--lr", "tuned",
    ]))
    assert "custom_cnn-random-tiny.yaml: tuned for other settings" in line
    assert "tune.epochs 2 (now 5)" in line
    assert "covidtl tune --model custom_cnn --dataset tiny --init random --total" in line

    # A file from before study identities cannot say what it was tuned for.
    old = tmp_path / "old"
    (old / "custom_cnn-random-tiny.yaml").parent.mkdir()
    (old / "custom_cnn-random-tiny.yaml").write_text("learning_rate: 0.001\n")
    with pytest.raises(UserError, match="records no study identity"):
        tuned_learning_rate(config(root, f"tune.out={old}"), "custom_cnn", "tiny")


def test_a_rate_tuned_under_the_old_hand_kept_identity_is_refused_with_the_fix(tmp_path):
    """A tuned file of an older covidtl loads, but its identity left levers out: search again."""
    root = make_project(tmp_path)
    old = root / "tuned" / "custom_cnn-random-tiny.yaml"
    old.parent.mkdir()
    old.write_text(yaml.safe_dump({"learning_rate": 1e-3, "identity": {
        "digest": "0123456789", "settings": {"tune": {"epochs": 5}, "train": {"head": "paper"}}}}))
    with pytest.raises(UserError, match=r"custom_cnn-random-tiny\.yaml: tuned for other settings than the "
                       r"current config \(its identity is from an older covidtl.*--init random --total"):
        tuned_learning_rate(config(root), "custom_cnn", "tiny")


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--bounds", "0", "1e-3"], "--bounds: learning-rate bounds must be > 0"),
        (["--bounds", "1e-2", "1e-4"], "--bounds: lower bound 0.01 is not below upper bound 0.0001"),
        (["--model", "resnet9"], "resnet9"),
        (["--trials", "0"], "tune.trials: 0 must be > 0"),
        (["--enqueue", "5"], "--enqueue 5: outside the search bounds [0.0001, 0.01]"),
        (["--storage", "postgresql://u:secret@127.0.0.1:1/db"], "cannot open the Optuna database"),
        (["--storage", "sqlite:////no/such/dir/optuna.db"], "cannot open the Optuna database"),
        (["--dataset", "xray"], "split.csv: no split"),
    ],
)
def test_bad_input_is_one_line(tmp_path, monkeypatch, options, message):
    root = make_project(tmp_path)
    monkeypatch.chdir(root)
    result = invoke(settings(root, wide=False) + [
        "tune", "--model", "custom_cnn", "--dataset", "tiny", "--storage", sqlite_url(root), *options])
    line = one_error_line(result)
    assert message in line
    assert "secret" not in line  # a password never reaches the terminal


def test_bad_bounds_in_params_are_one_line(tmp_path):
    root = make_project(tmp_path)
    line = one_error_line(invoke(settings(root, "tune.bounds.custom_cnn=[1.0e-2, 1.0e-4]") + [
        "tune", "--model", "custom_cnn", "--dataset", "tiny", "--storage", sqlite_url(root)]))
    assert "tune.bounds.custom_cnn" in line


# --------------------------------------------------------------------------- search space and sampler


def test_bounds_are_decades_around_the_papers_rate():
    cfg = load_config(PARAMS)
    assert lr_bounds(cfg, "vgg16") == pytest.approx((1e-6, 1e-4))
    assert lr_bounds(cfg, "custom_cnn") == pytest.approx((1e-4, 1e-2))
    cfg = load_config(PARAMS, {"tune.decades": 2, "tune.bounds.vgg16": [1e-7, 1e-3]})
    assert lr_bounds(cfg, "resnet50") == pytest.approx((1e-5, 1e-1))
    assert lr_bounds(cfg, "vgg16") == pytest.approx((1e-7, 1e-3))


def test_sampler_is_reproducible_and_resumes_with_new_draws():
    from covidtl.tune import TrialSeededTPE

    def draws(study, n):
        study.optimize(lambda t: (math.log10(t.suggest_float("lr", 1e-4, 1e-2, log=True)) + 3) ** 2,
                       n_trials=n)
        return [t.params["lr"] for t in study.trials]

    first = draws(optuna.create_study(sampler=TrialSeededTPE(0)), 8)
    again = draws(optuna.create_study(sampler=TrialSeededTPE(0)), 8)
    assert first == again
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="s", sampler=TrialSeededTPE(0))
    draws(study, 3)
    resumed = optuna.load_study(study_name="s", storage=storage, sampler=TrialSeededTPE(0))
    assert draws(resumed, 3) == first[:6]  # a fresh process continues the sequence, no replay


def test_only_the_worker_that_creates_a_study_queues_the_papers_rate(tmp_path):
    # Workers starting together on one new study: exactly one creates it (and queues 1e-3);
    # the others load it. Checking "already queued?" instead raced in CI: 1e-3 ran twice.
    from covidtl.tune import load_study, study_identity

    root = make_project(tmp_path)  # its own split table: the identity hashes it
    cfg = config(root)
    identity = study_identity(cfg, "custom_cnn", "random", "tiny")
    url = sqlite_url(root)
    first, created_first = load_study(cfg, identity, url)
    second, created_second = load_study(cfg, identity, url)
    assert (created_first, created_second) == (True, False)
    assert first._study_id == second._study_id


def test_dvc_tune_stages_are_a_separate_pipeline():
    """`dvc repro` runs the root dvc.yaml only; the tune stages live in tune/dvc.yaml."""
    def stages(*target: str) -> str:
        return subprocess.run([str(Path(sys.executable).parent / "dvc"), "stage", "list", *target],
                              cwd=ROOT, capture_output=True, text=True, check=True).stdout

    tune_stages = stages("tune/dvc.yaml")
    assert "tune/dvc.yaml:tune@custom_cnn-ct" in tune_stages
    assert "tuned/vgg16-random-xray.yaml" in tune_stages
    assert "tune" not in stages().replace("finetune", "")


def test_the_dvc_tune_stages_write_the_file_train_reads():
    """The stages search the paper's profile, so their outs are the paper's tuned-rate files."""
    from covidtl.tune import tuned_path

    stage = yaml.safe_load((ROOT / "tune" / "dvc.yaml").read_text())["stages"]["tune"]
    assert stage["cmd"].startswith("covidtl -S profile=paper tune ")
    cfg = load_config(PARAMS, {"profile": "paper"})
    (out,) = stage["outs"]
    for model in cfg.study.models:
        for dataset in cfg.study.datasets:
            named = (out.replace("${tune.out}", cfg.tune.out).replace("${tune.init}", cfg.tune.init)
                     .replace("${item.model}", model).replace("${item.dataset}", dataset))
            assert named == str(tuned_path(cfg, model, cfg.tune.init, dataset))
