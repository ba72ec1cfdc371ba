"""MLflow bookkeeping: where runs go, what every run is tagged with, and the artifacts it holds.

Runs land in a SQLite store at the project root (MLflow 3's default, what `mlflow ui` reads from
there) unless MLFLOW_TRACKING_URI says otherwise (e.g. a `covidtl server` at http://...); one
experiment per dataset. A queued DVC experiment runs in a temporary copy of the project that DVC
deletes afterwards: its runs go to the project's store, never to a file inside that copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on CI
import matplotlib.pyplot as plt
import mlflow
import mlflow.data
import numpy as np
import yaml
from mlflow.models import infer_signature
from sklearn.metrics import auc, precision_recall_curve, roc_curve

from covidtl import locks, stats
from covidtl.config import Config
from covidtl.files import file_sha256
from covidtl.confusion import confusion, draw_confusion, report_text
from covidtl.mlflow_store import project_root, tracking_uri
from covidtl.paths import CLASSES, POSITIVE_INDEX

# MLflow logs a store error with its whole traceback before raising it; the CLI then says it in one
# line (covidtl.mlflow_store.store_problem), and an unexpected one keeps its traceback in the crash log.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

# MLflow's limits on one params batch and on a param's value length.
_PARAMS_PER_BATCH = 100
_PARAM_VALUE_MAX = 6000


def in_temporary_workspace() -> bool:
    """Whether this process runs a queued (or --temp) DVC experiment in DVC's temporary copy."""
    return project_root() != Path.cwd()


def is_remote() -> bool:
    """Whether runs go to a tracking server (http/https): then nothing may stay on this disk only."""
    return tracking_uri().startswith(("http://", "https://"))


# MLflow's UI opens an experiment on its GenAI traces page unless told it holds model training.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# Set by `dvc exp run` (also for queued runs): names the experiment a run belongs to.
DVC_EXPERIMENT_ENV = "DVC_EXP_NAME"


def experiment_name(dataset: str) -> str:
    return f"covidtl-{dataset}"


def set_experiment(name: str) -> None:
    """Make `name` the active experiment, tagged as model development for the MLflow UI."""
    if mlflow.get_experiment_by_name(name) is None:
        # MLflow would put a new experiment's artifacts under ./mlruns: in a queued experiment,
        # inside the copy DVC deletes. A server keeps its own artifact store.
        location = None
        if in_temporary_workspace() and not is_remote():
            location = (project_root() / "mlruns" / name).as_uri()
        try:
            mlflow.create_experiment(name, artifact_location=location)
        except mlflow.exceptions.MlflowException:
            if mlflow.get_experiment_by_name(name) is None:  # else a parallel worker made it first
                raise
    _tag_kind(mlflow.set_experiment(name).experiment_id)


def _tag_kind(experiment_id: str) -> None:
    experiment = mlflow.get_experiment(experiment_id)
    for key, value in EXPERIMENT_KIND.items():
        if experiment.tags.get(key) != value:
            mlflow.MlflowClient().set_experiment_tag(experiment_id, key, value)


def experiment_tags() -> dict[str, str]:
    """`dvc_experiment`: the DVC experiment that ran this process, if any (`covidtl report
    --with-experiment NAME` finds its runs by it)."""
    name = os.environ.get(DVC_EXPERIMENT_ENV)
    return {"dvc_experiment": name} if name else {}


def use_experiment(dataset: str) -> None:
    """Point MLflow at the project's store and the dataset's experiment."""
    mlflow.set_tracking_uri(tracking_uri())
    with store_lock():
        _use_experiment(dataset)


def store_lock():
    """Queued experiments and tuning workers start together: MLflow's first-time schema migration
    of a database store (SQLite, PostgreSQL) is not safe to run twice at once, and two creations
    of one experiment collide. Local processes take turns on the store's lock (`covidtl.locks`,
    waiting), one per tracking URI, in the temporary folder."""
    digest = hashlib.sha1(tracking_uri().encode()).hexdigest()[:12]
    return locks.hold(Path(tempfile.gettempdir()) / f"covidtl-mlflow-store-{digest}",
                      "covidtl (MLflow store set-up)", wait=True)


def _use_experiment(dataset: str) -> None:
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id and not mlflow.active_run():
        # Inside `mlflow run`: the run exists already, in the experiment `mlflow run` chose;
        # setting another one would make MLflow refuse to resume it.
        experiment_id = mlflow.get_run(run_id).info.experiment_id
        _tag_kind(experiment_id)
        experiment = mlflow.get_experiment(experiment_id).name
        if experiment != experiment_name(dataset):
            print(
                f"Note: mlflow run logs into experiment {experiment!r}; add --experiment-name "
                f"{experiment_name(dataset)} to keep one experiment per dataset"
            )
        return
    set_experiment(experiment_name(dataset))


def git_commit() -> str:
    """HEAD of the working tree, with `-dirty` when tracked files changed; `unknown` outside git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}-dirty" if dirty else head




def log_config(cfg: Config) -> None:
    """The whole resolved config: flattened as params (within MLflow's limits) and as config.yaml."""
    params = {k: _param_value(v) for k, v in cfg.flat().items()}
    items = sorted(params.items())
    for start in range(0, len(items), _PARAMS_PER_BATCH):
        mlflow.log_params(dict(items[start : start + _PARAMS_PER_BATCH]))
    mlflow.log_text(config_yaml(cfg), "config.yaml")


def config_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def run_settings(cfg: Config) -> dict[str, Any]:
    """The resolved settings a run trains with: the config without the other profiles' definitions
    (the chosen one's values are in its fields), so adding a profile to params.yaml changes no
    run's identity; nor `adapt`, which only `covidtl adapt` reads."""
    settings = cfg.to_dict()
    settings.pop("profiles")
    settings.pop("adapt")
    return settings


def settings_yaml(cfg: Config) -> str:
    return yaml.safe_dump(run_settings(cfg), sort_keys=False)


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= _PARAM_VALUE_MAX else text[: _PARAM_VALUE_MAX - 3] + "..."


def log_split_inputs(
    dataset: str, split_file: Path, manifest_file: Path, rows: dict[str, Any]
) -> None:
    """Each split's images as an MLflow dataset input (the runs table's Dataset column).

    Name `<dataset>-<split>`, digest of the split table's file, contexts training / validation /
    test, and the manifest's sha256 as a tag: which images trained and tested the run.
    """
    split_digest = file_sha256(split_file)[:16]
    manifest = file_sha256(manifest_file)
    contexts = {"train": "training", "val": "validation", "test": "test"}
    for split, table in rows.items():
        columns = [c for c in ("path", "label", "group", "sha256") if c in table.columns]
        data = mlflow.data.from_pandas(
            table[columns].reset_index(drop=True), source=str(split_file),
            name=f"{dataset}-{split}", targets="label", digest=split_digest,
        )
        mlflow.log_input(data, context=contexts[split], tags={"manifest_sha256": manifest,
                                                               "images": str(len(table))})


def log_metrics(metrics: dict[str, float], prefix: str = "") -> None:
    # NaN (e.g. AUC on a one-class set) is kept out of MLflow, which stores it poorly.
    mlflow.log_metrics(
        {f"{prefix}{k}": float(v) for k, v in metrics.items() if not np.isnan(float(v))}
    )


def log_history(history: dict[str, list[float]]) -> None:
    """Per-epoch metrics (if not already logged live) and the training-curves plot (none for a fit
    without epochs: the linear probe)."""
    if not history:
        return
    mlflow.log_figure(curves_figure(history), "training_curves.png")
    plt.close("all")


def log_evaluation(y_true: np.ndarray, prob: np.ndarray, prefix: str = "test") -> None:
    """Confusion matrix (PNG + JSON) and the classification report of one scored set (at 0.5)."""
    y_true, p_covid = stats.covid_probability(y_true, prob)
    y_pred = np.where(p_covid >= 0.5, POSITIVE_INDEX, 1 - POSITIVE_INDEX)
    matrix = confusion(y_true, y_pred)
    mlflow.log_dict({"labels": list(CLASSES), "matrix": matrix}, f"{prefix}_confusion_matrix.json")
    mlflow.log_figure(confusion_figure(matrix), f"{prefix}_confusion_matrix.png")
    plt.close("all")
    mlflow.log_text(report_text(y_true, y_pred), f"{prefix}_classification_report.txt")


def log_curves(scores, prefix: str = "test") -> None:
    """ROC and precision-recall curves and the reliability diagram of one scored set, as one figure."""
    mlflow.log_figure(curves_and_calibration_figure(scores), f"{prefix}_roc_pr_calibration.png")
    plt.close("all")


def curves_and_calibration_figure(scores, title: str = ""):
    y, p = scores.y_true, scores.p_covid
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    if len(np.unique(y)) == 2:
        fpr, tpr, _ = roc_curve(y, p)
        axes[0].plot(fpr, tpr, label=f"AUC {auc(fpr, tpr):.3f}")
        precision, recall, _ = precision_recall_curve(y, p)
        axes[1].plot(recall, precision, label=f"prevalence {y.mean():.2f}")
        axes[1].axhline(y.mean(), color="grey", lw=0.8, ls=":")
    axes[0].plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    axes[0].set(xlabel="1 - specificity", ylabel="sensitivity (COVID recall)", title="ROC")
    axes[1].set(xlabel="recall (COVID)", ylabel="precision (COVID)", title="precision-recall")
    rel = stats.reliability(y, p)
    axes[2].plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    axes[2].plot(rel.mean_predicted, rel.observed, marker="o",
                 label=f"ECE {rel.ece:.3f}, Brier {stats.brier(y, p):.3f}")
    axes[2].set(xlabel="mean predicted p(COVID)", ylabel="observed COVID fraction", title="reliability")
    for ax in axes:
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def confusion_figure(matrix: list[list[int]]):
    fig, ax = plt.subplots(figsize=(4, 3.5))
    draw_confusion(ax, matrix)
    ax.set(xlabel="predicted", ylabel="actual")
    fig.tight_layout()
    return fig


def curves_figure(history: dict[str, list[float]]):
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key in zip(axes, ("loss", "accuracy")):
        for name in (key, f"val_{key}"):
            if name in history:
                epochs = range(1, len(history[name]) + 1)
                ax.plot(epochs, history[name], marker="o", label=name)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
    fig.tight_layout()
    return fig


def model_tags(model_file: Path, model_uri: str | None) -> dict[str, str]:
    """Where the run's model is. `model_location`: `artifacts` (logged to the run's store, loadable
    from `model_uri`) or `dvc-output` (only the cell's file). `model_path`: that file, absolute in a
    checkout; relative to the project where the checkout is not the one that reads the run (a
    queued experiment's copy, which `dvc exp apply` brings back; a server's runs, read elsewhere)."""
    model_file = Path(model_file).resolve()
    path = str(model_file)
    if in_temporary_workspace() or is_remote():
        with contextlib.suppress(ValueError):
            path = model_file.relative_to(Path.cwd().resolve()).as_posix()
    tags = {"model_path": path, "model_location": "artifacts" if model_uri else "dvc-output"}
    if model_uri:
        tags["model_uri"] = model_uri
    return tags


def log_keras_model(model, example: np.ndarray) -> str:
    """The model in MLflow's Keras flavour with signature and input example; returns its URI."""
    # here, not above: the report and the model cards use this module without TensorFlow
    import keras
    import mlflow.keras
    import tensorflow as tf

    # An eager call: predict() would trace a function just for this one example.
    signature = infer_signature(example, np.asarray(model(example, training=False)))
    with _example_dir_fix():
        # Pinning the requirements skips MLflow's slow inference subprocess (it re-imports TF).
        info = mlflow.keras.log_model(
            model,
            name="model",
            signature=signature,
            input_example=example,
            pip_requirements=[f"keras=={keras.__version__}", f"tensorflow=={tf.__version__}"],
        )
    return info.model_uri


@contextlib.contextmanager
def _example_dir_fix():
    """MLflow's Keras flavour writes the input example before creating the model folder.

    Known bug (mlflow/mlflow issue 16183, open in 3.17.2): make the folder first, then let MLflow
    write the example as usual.
    """
    import mlflow.keras.save as keras_save  # here, not above: it loads TensorFlow

    original = keras_save._save_example

    def save_example(mlflow_model, input_example, path, *args, **kwargs):
        os.makedirs(path, exist_ok=True)
        return original(mlflow_model, input_example, path, *args, **kwargs)

    keras_save._save_example = save_example
    try:
        yield
    finally:
        keras_save._save_example = original
