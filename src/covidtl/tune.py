"""Learning-rate search with Optuna: each trial trains one cell briefly, judged on validation only.

One study per cell and objective (`lr-<model>-<init>-<dataset>-<digest>`, see `study_identity`)
in persistent storage, so an interrupted search resumes and several workers can share one study
through a database URL, while changed settings start a new study. Each `covidtl tune` call is a
parent MLflow run (kind=tune), each trial a nested run (kind=tune-trial); the best rate goes to
`tuned/<model>-<init>-<dataset>.yaml` (`...-<dataset>-<profile>.yaml` under a profile other than
the paper's), which `covidtl train --lr tuned` under that profile reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import keras
import matplotlib.pyplot as plt
import mlflow
import optuna
import sqlalchemy
import sqlalchemy.exc
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from optuna.visualization import matplotlib as vis
from sqlalchemy.engine import make_url

from covidtl import paths, tracking, weight_records
from covidtl.cells import PAPER_PROFILE, cell_name
from covidtl.config import Config, TuneConfig
from covidtl.data import tables
from covidtl.errors import UserError
from covidtl.files import atomic_write_text, file_sha256
from covidtl.inits import Init, init_label
from covidtl.models.registry import get_spec, trainable_image_size
from covidtl.pretrain import resolve_init
from covidtl.train import RunOptions, plan_run, train

log = logging.getLogger(__name__)

BATCH_SIZES = (8, 16, 32, 64)  # searched only with tune.search_batch_size
DROPOUT_RANGE = (0.0, 0.5)  # searched only with tune.search_dropout
# Random trials before TPE models the history: Optuna's default (10) is most of a 10-trial study.
TPE_STARTUP_TRIALS = 5
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
DIRECTIONS = {"val_loss": "minimize", "val_accuracy": "maximize"}

PRUNERS: dict[str, Callable[[TuneConfig], optuna.pruners.BasePruner]] = {
    "median": lambda t: optuna.pruners.MedianPruner(
        n_startup_trials=t.prune_after, n_warmup_steps=t.min_epochs
    ),
    "halving": lambda t: optuna.pruners.SuccessiveHalvingPruner(min_resource=t.min_epochs),
    "none": lambda t: optuna.pruners.NopPruner(),
}


# --------------------------------------------------------------------------- names and files


# What a study's identity leaves out of the resolved config (`tracking.run_settings`): the keys that
# do not change what a trial measures, each with why. Everything else is in, so a lever added to
# params.yaml counts without being listed here. A key that might matter stays in: a needless new
# study costs time, a missing key reuses trials measured under other settings.
HOW_THE_SEARCH_RUNS = ("how the search runs, not what a trial measures: an interrupted search "
                       "resumes and several workers share one study")
NOT_MEASURED: dict[str, str] = {
    "profile": "a name: the values it chose are in the keys it set",
    "synth": "makes the demo images; which images a trial reads is the split table's sha256",
    "data": "where the images lie and which folder is which class: the split table holds each "
            "image's path, label and sha256, and its own sha256 is in",
    "ingest": "makes the manifest the split table is made from",
    "cache": "the caches' disk budget: a cached decode or feature is the one computed afresh",
    "study": "which cells the study trains",
    "pretrain": "makes the pretraining file, whose sha256 is in (init_sha256)",
    "cv": "the cross-validation's folds, not the split a trial trains on",
    "external": "external sets are scored after training, never trained or selected on",
    "report": "where the report goes",
    "eval": "intervals and operating point of the test scores; a trial's value is Keras' "
            "validation loss or accuracy",
    "train.model": "the identity's model",
    "train.init": "the identity's init (a weights file by its sha256, not its path)",
    "tune.init": "the identity's init",
    "train.max_epochs": "every trial trains tune.epochs instead (trial_config)",
    "train.run_eagerly": "eager or graphs: the same steps at another speed",
    "train.learning_rates": "a trial trains at its drawn rate; the paper's counts through the "
                            "bounds it gives (tune.space)",
    "tune.decades": "counts through the bounds it gives (tune.space)",
    "tune.bounds": "counts through the bounds it gives (tune.space)",
    **dict.fromkeys(("tune.trials", "tune.storage", "tune.pruner", "tune.sampler_seed",
                     "tune.min_epochs", "tune.prune_after", "tune.stale_after", "tune.out"),
                    HOW_THE_SEARCH_RUNS),
}
# 2: the resolved config less NOT_MEASURED; before (no version), a hand-kept list that missed keys.
IDENTITY_VERSION = 2


@dataclass(frozen=True)
class StudyIdentity:
    """What one trial measures (the settings that change the objective) and its short digest."""

    model: str
    init: str
    dataset: str
    settings: dict[str, Any]
    digest: str

    @property
    def name(self) -> str:
        cell = cell_name(self.model, init_label(self.init), self.dataset)
        return f"lr-{cell}-{self.digest}"

    @property
    def bounds(self) -> tuple[float, float]:
        low, high = self.settings["tune"]["space"]["lr"]
        return low, high

    def record(self) -> dict[str, Any]:
        return {"version": IDENTITY_VERSION, "digest": self.digest, "settings": self.settings}


def study_identity(
    cfg: Config, model: str, init: str, dataset: str, bounds: tuple[float, float] | None = None
) -> StudyIdentity:
    """The settings a trial's value depends on; equal settings name the same study.

    The resolved config less `NOT_MEASURED`, with the search space, this model's input size (not
    the other models'), and the sha256 of each file a trial reads: the split table, the stored
    augmented set's manifest (augment.mode offline) and the init's weights file (ImageNet's, a
    pretraining file or one given as --init). A searched batch size or dropout replaces the
    configured one.
    """
    spec = get_spec(model)
    settings = tracking.run_settings(cfg)
    for key in NOT_MEASURED:
        _drop(settings, key)
    training = settings["train"]
    training["image_size"] = trainable_image_size(spec, cfg.train)
    low, high = lr_bounds(cfg, model, bounds)
    space: dict[str, Any] = {"lr": [low, high]}
    if cfg.tune.search_batch_size:
        space["batch_size"] = list(BATCH_SIZES)
        del training["batch_size"]
    if cfg.tune.search_dropout:
        space["dropout"] = list(DROPOUT_RANGE)
        del training["dropout"]
    settings["tune"]["space"] = space
    settings["split"]["table_sha256"] = _sha256(paths.split_path(cfg, dataset),
                                                f"covidtl split {dataset}")
    if cfg.augment.mode == "offline":  # trials read the stored set; its manifest says which copies it holds
        settings["augment"]["manifest_sha256"] = _sha256(tables.augmented_manifest_path(cfg, dataset),
                                                         f"covidtl augment {dataset}")
    weights = weight_records.provenance(model, resolve_init(cfg, model, init))
    if weights is not None:  # a weights file: its content, not its path
        settings["init_sha256"] = weights["sha256"]
    settings.update(model=model, init=init_label(init), dataset=dataset)
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:10]
    return StudyIdentity(model, init, dataset, settings, digest)


def _drop(settings: dict[str, Any], dotted: str) -> None:
    *groups, key = dotted.split(".")
    node = settings
    for group in groups:
        node = node[group]
    del node[key]


def _sha256(path: Path, fix: str) -> str:
    if not path.is_file():
        raise UserError(f"{path}: missing, and a study is named by its content; run `{fix}` first")
    return file_sha256(path)


def _differences(made: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """'tune.epochs 2 (now 5)' for each setting that differs between two identities."""
    out = []
    for key in sorted(set(made) | set(now)):
        a, b = made.get(key, "unset"), now.get(key, "unset")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a} (now {b})")
    return out


def tuned_path(cfg: Config, model: str, init: Init | str, dataset: str) -> Path:
    """tuned/<model>-<init>-<dataset>.yaml, with `-<profile>` for a profile other than the paper's."""
    return Path(cfg.tune.out) / f"{cell_name(model, init_label(init), dataset, cfg.profile)}.yaml"


def _tune_command(cfg: Config, model: str, dataset: str, init: str) -> str:
    profile = "" if cfg.profile == PAPER_PROFILE else f"-S profile={cfg.profile} "
    return f"covidtl {profile}tune --model {model} --dataset {dataset} --init {init}"


def tuned_learning_rate(cfg: Config, model: str, dataset: str, init: Init | str | None = None) -> float:
    """The best rate a finished search wrote for this cell and profile; one clear error when there
    is none, or when it was tuned under other settings."""
    init = init or cfg.tune.init
    path = tuned_path(cfg, model, init, dataset)
    if not path.is_file():
        raise UserError(f"{path}: no tuned learning rate yet; run `{_tune_command(cfg, model, dataset, init)}` first")
    try:
        record = yaml.safe_load(path.read_text())
        rate = float(record["learning_rate"])
    except (yaml.YAMLError, TypeError, KeyError, ValueError):
        raise UserError(
            f"{path}: no learning_rate in it; re-run `covidtl tune` to rewrite it"
        ) from None
    if not rate > 0:
        raise UserError(f"{path}: learning_rate {rate} must be > 0; re-run `covidtl tune`")
    made = record.get("identity") or {}
    now = study_identity(cfg, model, init, dataset)
    if made.get("version") != IDENTITY_VERSION or made.get("digest") != now.digest:
        changed = _differences(made.get("settings") or {}, now.settings)
        why = "; ".join(changed[:3]) + ("; ..." if len(changed) > 3 else "")
        if not made:
            why = "it records no study identity"
        elif made.get("version") != IDENTITY_VERSION:
            why = "its identity is from an older covidtl, which left out settings a trial depends on"
        raise UserError(
            f"{path}: tuned for other settings than the current config ({why}); run "
            f"`{_tune_command(cfg, model, dataset, init)} --total` "
            f"to search with these, or train with the settings it was tuned for"
        )
    return rate


def lr_bounds(
    cfg: Config, model: str, bounds: tuple[float, float] | None = None
) -> tuple[float, float]:
    """[low, high] of the log-uniform search: --bounds, else tune.bounds.<model>, else
    tune.decades either side of the paper's rate."""
    if bounds is not None:
        where = "--bounds"
    elif model in cfg.tune.bounds:
        bounds, where = tuple(cfg.tune.bounds[model]), f"tune.bounds.{model}"
    else:
        rate = cfg.train.learning_rates.get(model)
        if rate is None:
            raise UserError(
                f"train.learning_rates.{model}: no paper rate to search around; add it or set "
                f"tune.bounds.{model}: [low, high] in params.yaml"
            )
        factor = 10**cfg.tune.decades
        bounds, where = (rate / factor, rate * factor), "tune.decades"
    low, high = (float(b) for b in bounds)
    if not (low > 0 and high > 0):
        raise UserError(f"{where}: learning-rate bounds must be > 0, got [{low:g}, {high:g}]")
    if not low < high:
        raise UserError(f"{where}: lower bound {low:g} is not below upper bound {high:g}")
    return low, high


# --------------------------------------------------------------------------- storage and study


def open_storage(url: str, stale_after: int) -> optuna.storages.RDBStorage:
    """The study database; a heartbeat lets a later run fail the trials of a killed worker."""
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - any unparsable URL is the same user error
        raise UserError(
            f"--storage {url!r}: not a database URL; e.g. sqlite:///optuna.db"
        ) from None
    shown = parsed.render_as_string(hide_password=True)
    if parsed.drivername == "postgresql" and importlib.util.find_spec("psycopg") is None:
        # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; the project ships psycopg2.
        url = parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    try:
        # Reach the server first: a down server or bad password is one line, not three retries.
        engine = sqlalchemy.create_engine(url)
        with engine.connect():
            pass
        engine.dispose()
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise UserError(
            f"--storage {shown}: cannot open the Optuna database ({reason}); start the server "
            f"or fix the URL (tune.storage in params.yaml)"
        ) from None
    # Workers starting together race to create the schema on an empty database; retry briefly.
    for attempt in range(4):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs={"pool_pre_ping": True},
                    heartbeat_interval=max(1, stale_after // 4),
                    grace_period=stale_after,
                    heartbeat_stale_trial_callback=close_stale_run,
                )
        except sqlalchemy.exc.SQLAlchemyError:
            if attempt == 3:
                raise
            time.sleep(0.5 + attempt)
    raise AssertionError("unreachable")


def close_stale_run(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A killed worker's trial, just failed by Optuna: mark its MLflow run and parent KILLED too."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    if not run_id:
        return
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return  # tracked elsewhere (another MLFLOW_TRACKING_URI)
    client.set_tag(run_id, "trial_state", "failed")
    for rid in (run_id, run.data.tags.get("mlflow.parentRunId")):
        if rid and client.get_run(rid).info.status == "RUNNING":
            client.set_terminated(rid, status="KILLED")


class TrialSeededTPE(optuna.samplers.TPESampler):
    """TPE whose randomness is seeded per trial (seed + trial number).

    A resumed study then draws new rates instead of replaying the first run's, and parallel
    workers (distinct trial numbers) do not repeat each other's draws; one worker stays
    reproducible.
    """

    def __init__(self, seed: int, **kwargs: Any) -> None:
        super().__init__(seed=seed, n_startup_trials=TPE_STARTUP_TRIALS, **kwargs)
        self._base_seed = seed

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        seed = (self._base_seed + trial.number) % 2**32
        # Private since Optuna 3; both RNGs exist in Optuna 4 and 5.
        self._rng.rng.seed(seed)
        self._random_sampler._rng.rng.seed(seed)
        super().before_trial(study, trial)


def load_study(cfg: Config, identity: StudyIdentity, storage_url: str) -> tuple[optuna.Study, bool]:
    """Create the identity's study or load it, with the sampler and pruner from params; True if
    created here.

    Creation is tried first, not load_if_exists: of several workers starting on one new study
    exactly one creates it, and only that one queues the paper's rate (two workers that both
    checked for it before either queued it would otherwise run it twice).
    """
    storage = open_storage(storage_url, cfg.tune.stale_after)
    options = dict(
        study_name=identity.name,
        storage=storage,
        sampler=TrialSeededTPE(cfg.tune.sampler_seed),
        pruner=PRUNERS[cfg.tune.pruner](cfg.tune),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            study = optuna.create_study(direction=DIRECTIONS[cfg.tune.metric], **options)
            created = True
            study.set_user_attr("identity", identity.record())
        except optuna.exceptions.DuplicatedStudyError:
            study, created = optuna.load_study(**options), False
        study.set_metric_names([cfg.tune.metric])
    # Absent for a moment while its creator is still writing it; else the digest's own settings.
    made = study.user_attrs.get("identity", {}).get("settings", identity.settings)
    if made != identity.settings:
        raise UserError(
            f"study {identity.name}: holds trials of other settings ("
            f"{'; '.join(_differences(made, identity.settings)[:3])}); delete it "
            f"(optuna delete-study --study-name {identity.name} --storage ...)"
        )
    return study, created


def check_enqueue(rates: tuple[float, ...], bounds: tuple[float, float]) -> None:
    for rate in rates:
        if not bounds[0] <= rate <= bounds[1]:
            raise UserError(
                f"--enqueue {rate:g}: outside the search bounds [{bounds[0]:g}, {bounds[1]:g}]; "
                f"widen them with --bounds or tune.bounds"
            )


def enqueue(study: optuna.Study, rates: list[float]) -> None:
    """Queue rates as the next trials (once per study), e.g. the paper's for a direct comparison."""
    for rate in rates:
        study.enqueue_trial({"lr": rate}, skip_if_exists=True)


# --------------------------------------------------------------------------- one trial


def suggest(trial: optuna.Trial, cfg: Config, bounds: tuple[float, float]) -> dict[str, Any]:
    """The trial's hyper-parameters: the rate on a log scale, optionally batch size and dropout."""
    params: dict[str, Any] = {"lr": trial.suggest_float("lr", *bounds, log=True)}
    if cfg.tune.search_batch_size:
        params["batch_size"] = trial.suggest_categorical("batch_size", BATCH_SIZES)
    if cfg.tune.search_dropout:
        params["dropout"] = trial.suggest_float("dropout", *DROPOUT_RANGE)
    return params


def trial_config(cfg: Config, params: dict[str, Any]) -> Config:
    """The config one trial trains with: tune.epochs, and any searched batch size or dropout."""
    train = dataclasses.replace(
        cfg.train,
        max_epochs=cfg.tune.epochs,
        batch_size=params.get("batch_size", cfg.train.batch_size),
        dropout=params.get("dropout", cfg.train.dropout),
    )
    return dataclasses.replace(cfg, train=train)


class TrialReporter(keras.callbacks.Callback):
    """Keras callback: tags the trial's MLflow run, reports the metric each epoch, stops if pruned.

    It stops training rather than raising inside `fit`, so `train()` closes its run normally;
    the objective then raises `optuna.TrialPruned`.
    """

    def __init__(self, trial: optuna.Trial, metric: str, study: str) -> None:
        super().__init__()
        self.trial, self.metric, self.study = trial, metric, study
        self.run_id: str | None = None
        self.pruned_at: int | None = None
        self.values: dict[str, list[float]] = {}

    def on_train_begin(self, logs: dict | None = None) -> None:
        run = mlflow.active_run()
        if run is not None:
            self.run_id = run.info.run_id
            self.trial.set_user_attr("mlflow_run_id", self.run_id)
            mlflow.set_tags({
                "kind": "tune-trial", "optuna_study": self.study, "optuna_trial": self.trial.number,
            })
            mlflow.log_params({f"trial.{k}": v for k, v in self.trial.params.items()})

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        for key in ("val_loss", "val_accuracy"):
            if key in logs:
                self.values.setdefault(key, []).append(float(logs[key]))
        if self.metric not in logs:
            return
        # Step = epochs completed, so tune.min_epochs reads as "epochs before pruning may happen".
        self.trial.report(float(logs[self.metric]), step=epoch + 1)
        if self.trial.should_prune():
            self.pruned_at = epoch + 1
            self.model.stop_training = True


def objective(
    cfg: Config, model: str, init: str, dataset: str, bounds: tuple[float, float], study: str
) -> Callable[[optuna.Trial], float]:
    """Optuna's objective: train one trial on train, return the metric's last value on val."""
    metric = cfg.tune.metric

    def run(trial: optuna.Trial) -> float:
        params = suggest(trial, cfg, bounds)
        reporter = TrialReporter(trial, metric, study)
        state = "failed"
        try:
            with tempfile.TemporaryDirectory(prefix="covidtl-trial-") as out_dir:
                plan = plan_run(trial_config(cfg, params), model, init, dataset, lr=params["lr"], out_dir=out_dir)
                train(plan, RunOptions(
                    extra_callbacks=(reporter,), run_name=f"{study}-trial-{trial.number}", nested=True,
                    evaluate_test=False,  # the test split never steers the search
                    log_model=False,  # a trial's model is thrown away; only its rate matters
                ))
            values = reporter.values.get(metric, [])
            val_acc = reporter.values.get("val_accuracy", [])
            if val_acc:
                trial.set_user_attr("val_accuracy", val_acc[-1])
            trial.set_user_attr("epochs", len(values))
            if reporter.pruned_at is not None:
                state = "pruned"
                raise optuna.TrialPruned(f"pruned after epoch {reporter.pruned_at}")
            value = values[-1] if values else math.nan
            # A NaN value (diverged rate) makes Optuna mark the trial FAIL: tag it so.
            state = "complete" if math.isfinite(value) else "failed"
            return value
        except (optuna.TrialPruned, UserError):
            raise
        except Exception:  # noqa: BLE001 - one broken trial must not end a long study
            log.exception("trial %d failed (lr=%g)", trial.number, params["lr"])
            return math.nan
        finally:
            _tag_trial_run(reporter.run_id, state)

    return run


def _tag_trial_run(run_id: str | None, state: str) -> None:
    # After train() closed the run: its own tags must not overwrite these.
    if run_id is not None:
        client = MlflowClient()
        client.set_tag(run_id, "kind", "tune-trial")
        client.set_tag(run_id, "trial_state", state)


# --------------------------------------------------------------------------- the search


@dataclass
class TuneResult:
    study: str
    run_id: str
    best_lr: float
    best_value: float
    best_val_accuracy: float | None
    best_trial: int
    counts: dict[str, int]
    tuned_file: Path
    seconds: float


def run_study(
    cfg: Config,
    model: str,
    dataset: str,
    *,
    bounds: tuple[float, float] | None = None,
    enqueue_rates: tuple[float, ...] = (),
    total: bool = False,
) -> TuneResult:
    """Run tune.trials more trials (total: until the study holds that many); save the best rate.

    Storage, init, epochs and trials come from cfg.tune (the CLI's options override them). The
    paper's rate for the model is queued first in every new study, so the search always compares
    directly with it.
    """
    init, trials = cfg.tune.init, cfg.tune.trials
    get_spec(model)  # unknown model: one line listing the known ones
    cfg = cfg.with_recipe(model, init)  # config.yaml of the search says what its trials train
    cfg.dataset(dataset)
    tracking.tracking_uri()  # a tracking server that does not answer: refused before the study is made
    span = lr_bounds(cfg, model, bounds)
    check_enqueue(enqueue_rates, span)
    split = paths.split_path(cfg, dataset)
    if not split.is_file():
        raise UserError(
            f"{split}: no split for dataset {dataset!r}; run `covidtl ingest {dataset}` and "
            f"`covidtl split {dataset}` first"
        )
    url = cfg.tune.storage
    identity = study_identity(cfg, model, init, dataset, span)
    study, created = load_study(cfg, identity, url)
    paper = cfg.train.learning_rates.get(model)
    baseline = [paper] if created and paper is not None and span[0] <= paper <= span[1] else []
    enqueue(study, baseline + list(enqueue_rates))
    _use_experiment(dataset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a killed worker's RUNNING trial, before counting

    to_run = trials
    if total:
        to_run = max(0, trials - len(study.get_trials(deepcopy=False, states=FINISHED)))

    start = time.monotonic()
    tags = {
        "kind": "tune", "model": model, "init": init_label(init), "dataset": dataset,
        "cell": cell_name(model, init_label(init), dataset),
        "split_strategy": cfg.split.strategy,
        "git_commit": tracking.git_commit(), "manifest_sha256": file_sha256(
            paths.manifest_path(cfg, dataset)), "optuna_study": study.study_name,
        "study_digest": identity.digest,
    }
    with mlflow.start_run(run_name=f"tune {study.study_name}", tags=tags) as parent:
        mlflow.log_params({
            "study": study.study_name, "storage": _shown(url), "trials_requested": trials,
            "total": total, "lr_low": span[0], "lr_high": span[1], "metric": cfg.tune.metric,
            "pruner": cfg.tune.pruner, "sampler_seed": cfg.tune.sampler_seed,
            "epochs_per_trial": cfg.tune.epochs, "paper_lr": paper, "study_digest": identity.digest,
        })
        mlflow.log_text(tracking.config_yaml(cfg), "config.yaml")
        mlflow.log_dict(identity.record(), "optuna/study_identity.json")
        callbacks = [optuna.study.MaxTrialsCallback(trials, states=FINISHED)] if total else []
        if to_run:
            study.optimize(
                objective(cfg, model, init, dataset, span, study.study_name),
                n_trials=to_run, callbacks=callbacks, gc_after_trial=True,
            )
        seconds = time.monotonic() - start
        result = _summarise(cfg, study, identity, url, paper, seconds, parent.info.run_id)
        mlflow.log_metrics({
            f"best_{cfg.tune.metric}": result.best_value, "best_lr": result.best_lr,
            "best_trial": result.best_trial, "tune_seconds": seconds,
            **{f"trials_{k}": v for k, v in result.counts.items()},
            **({"best_val_accuracy": result.best_val_accuracy}
               if result.best_val_accuracy is not None else {}),
        })
        mlflow.set_tag("best_trial_run_id", study.best_trial.user_attrs.get("mlflow_run_id", ""))
        mlflow.log_artifact(str(result.tuned_file), "optuna")
        log_plots(study)
    return result


def _use_experiment(dataset: str) -> None:
    """tracking.use_experiment, safe when workers start together on a fresh store."""
    # Local workers take turns on the store's lock (tracking.store_lock: MLflow's first-time
    # schema migration is not safe twice at once); workers on other machines only race on
    # creating the experiment, which a retry settles.
    for attempt in range(3):
        try:
            return tracking.use_experiment(dataset)
        except Exception:  # noqa: BLE001 - MlflowException or the store's own error
            if attempt == 2:
                raise
            time.sleep(1 + attempt)


def _summarise(
    cfg: Config, study: optuna.Study, identity: StudyIdentity, url: str, paper: float | None,
    seconds: float, run_id: str,
) -> TuneResult:
    """The study's best trial (all workers' trials), written to the tuned-rate file."""
    model, init, dataset = identity.model, identity.init, identity.dataset
    trials = study.get_trials(deepcopy=False)
    counts = {
        state.name.lower(): sum(t.state == state for t in trials)
        for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
    }
    if not counts["complete"]:
        raise UserError(
            f"study {study.study_name}: no trial completed ({counts}); see the tune-trial runs in "
            f"MLflow, widen the bounds or raise tune.epochs"
        )
    best = study.best_trial
    baseline = [
        t for t in trials
        if t.state == TrialState.COMPLETE and paper is not None
        and math.isclose(t.params["lr"], paper)
    ]
    record = {
        "model": model, "init": init, "dataset": dataset, "profile": cfg.profile, "study": study.study_name,
        "storage": _shown(url), "learning_rate": float(best.params["lr"]),
        **{k: v for k, v in best.params.items() if k != "lr"},
        "metric": cfg.tune.metric, "value": float(best.value),
        "val_accuracy": best.user_attrs.get("val_accuracy"), "trial": best.number,
        "trials": counts, "paper_learning_rate": paper,
        "paper_value": float(baseline[0].value) if baseline else None,
        "paper_val_accuracy": baseline[0].user_attrs.get("val_accuracy") if baseline else None,
        "epochs_per_trial": cfg.tune.epochs, "mlflow_run_id": run_id,
        "identity": identity.record(),  # what `train --lr tuned` checks against its config
    }
    path = tuned_path(cfg, model, init, dataset)
    # atomic: a reader (train --lr tuned) never sees half a file
    atomic_write_text(path, yaml.safe_dump(record, sort_keys=False))
    return TuneResult(
        study=study.study_name, run_id=run_id, best_lr=record["learning_rate"],
        best_value=record["value"], best_val_accuracy=record["val_accuracy"],
        best_trial=best.number, counts=counts, tuned_file=path, seconds=seconds,
    )


def log_plots(study: optuna.Study) -> None:
    """Optuna's matplotlib plots into the active run; one it cannot draw yet is listed, with why."""
    plots = {
        "optimization_history": lambda: vis.plot_optimization_history(study),
        "param_importances": lambda: vis.plot_param_importances(study),
        "slice_lr": lambda: vis.plot_slice(study, params=["lr"]),
        "intermediate_values": lambda: vis.plot_intermediate_values(study),
    }
    skipped = {}
    for name, draw in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = draw()
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.tight_layout()
            mlflow.log_figure(fig, f"optuna/{name}.png")
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            # e.g. parameter importances need two completed trials with different rates.
            skipped[name] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        finally:
            plt.close("all")
    if skipped:
        mlflow.log_dict(skipped, "optuna/skipped_plots.json")


def _shown(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return url
