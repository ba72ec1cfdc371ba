"""The comparison report: every study cell's MLflow run → a table, the paper's figures, MLflow.

Reads the runs (``mlflow.search_runs``) and the cells' saved predictions; writes ``reports/``:
``results.csv`` and ``results.md`` (every metric of every model x init x dataset), ``fig5_6-<dataset>.png``
(per-class recall, precision, F1 and accuracy, random vs ImageNet), ``fig7-epochs.png``,
``confusion-<dataset>.png`` and, where both split strategies were run, ``split_strategies.png``.
A cell without a finished run stays empty (``—`` / no bar), never a zero.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from covidtl import paths, tracking
from covidtl.config import Config

MODELS_ROOT = "models"
REPORT_EXPERIMENT = "covidtl-report"
CLASS_METRICS = ("recall", "precision", "f1")
AVERAGES = ("covid", "non_covid", "micro", "macro")
METRICS = (
    ["test_accuracy", "test_roc_auc"]
    + [f"test_{m}_{a}" for m in CLASS_METRICS for a in AVERAGES]
    + ["epochs_used", "train_seconds"]
)
KEY = ["dataset", "model", "init", "split_strategy"]


@dataclass
class Report:
    table: pd.DataFrame
    files: list[Path]
    run_id: str | None = None


# --------------------------------------------------------------------------- collect


def fetch_runs(datasets: list[str]) -> pd.DataFrame:
    """Every `kind=train` run of the datasets' experiments, newest first, one row per run."""
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri())
    names = [f"covidtl-{d}" for d in datasets]
    existing = [n for n in names if mlflow.get_experiment_by_name(n) is not None]
    if not existing:
        return pd.DataFrame(columns=[*KEY, "status", "run_id", "start_time"])
    runs = mlflow.search_runs(
        experiment_names=existing,
        filter_string="tags.kind = 'train'",
        order_by=["attributes.start_time DESC"],
    )
    if runs.empty:
        return pd.DataFrame(columns=[*KEY, "status", "run_id", "start_time"])
    out = pd.DataFrame(
        {
            "dataset": runs.get("tags.dataset"),
            "model": runs.get("tags.model"),
            "init": runs.get("tags.init"),
            "split_strategy": runs.get("tags.split_strategy"),
            "status": runs["status"],
            "run_id": runs["run_id"],
            "start_time": runs["start_time"],
        }
    )
    for metric in METRICS:
        column = f"metrics.{metric}"
        out[metric] = runs[column] if column in runs else float("nan")
    return out


def results_table(cfg: Config, runs: pd.DataFrame, models_root: str | Path = MODELS_ROOT) -> pd.DataFrame:
    """One row per cell of cfg.study and split strategy: its newest finished run, else why it is empty."""
    strategies = sorted(set(runs["split_strategy"].dropna()) | {cfg.split.strategy})
    grid = pd.DataFrame(
        [
            (d, m, i, s)
            for d in cfg.study.datasets
            for m in cfg.study.models
            for i in cfg.study.inits
            for s in strategies
        ],
        columns=KEY,
    )

    finished = runs[runs["status"] == "FINISHED"].drop_duplicates(KEY, keep="first")
    failed = runs[runs["status"] == "FAILED"].drop_duplicates(KEY, keep="first")
    table = grid.merge(finished.drop(columns=["status", "start_time"]), on=KEY, how="left")
    table["status"] = "ok"
    table.loc[table["run_id"].isna(), "status"] = "missing"
    failed_keys = set(map(tuple, failed[KEY].values))
    table["note"] = ""
    for idx, row in table[table["status"] == "missing"].iterrows():
        # The cell's own current outcome (skipped) outranks an older failed attempt.
        note = _skip_reason(Path(models_root), row["model"], row["init"], row["dataset"])
        if note:
            table.loc[idx, ["status", "note"]] = ["skipped", note]
        elif tuple(row[KEY]) in failed_keys:
            table.loc[idx, "status"] = "failed"
    return table[[*KEY, "status", "note", "run_id", *METRICS]]


def _skip_reason(root: Path, model: str, init: str, dataset: str) -> str:
    """The reason a cell's metrics.json gives for being skipped, or ''."""
    path = paths.cell_dir(model, init, dataset, root) / "metrics.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return ""
    if data.get("status") == "skipped":
        return str(data.get("reason", "skipped"))
    return ""


# --------------------------------------------------------------------------- write


def write_tables(table: pd.DataFrame, out: Path) -> list[Path]:
    """results.csv (all columns) and results.md (one table per dataset and split strategy)."""
    csv_path, md_path = out / "results.csv", out / "results.md"
    table.to_csv(csv_path, index=False)
    lines = [
        "# Study results",
        "",
        "Test-split metrics of the newest finished MLflow run of each cell. "
        "`—` = no result (status says why); never a zero.",
        "",
    ]
    shown = ["model", "init", "status", *METRICS]
    for (dataset, strategy), part in table.groupby(["dataset", "split_strategy"], sort=False):
        lines += [f"## {dataset} — split {strategy}", "", _markdown(part[shown]), ""]
        notes = part[part["note"] != ""]
        for _, row in notes.iterrows():
            lines.append(f"- {row['model']}-{row['init']}: {row['note']}")
        if len(notes):
            lines.append("")
    md_path.write_text("\n".join(lines))
    return [csv_path, md_path]


def _markdown(frame: pd.DataFrame) -> str:
    def cell(column: str, value: object) -> str:
        if isinstance(value, float):
            if pd.isna(value):
                return "—"
            # Counts and seconds read better whole; scores keep three decimals.
            return f"{value:.0f}" if column in ("epochs_used", "train_seconds") else f"{value:.3f}"
        return str(value)

    header = "| " + " | ".join(c.removeprefix("test_") for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = [
        "| " + " | ".join(cell(c, v) for c, v in zip(frame.columns, row)) + " |"
        for row in frame.itertuples(index=False)
    ]
    return "\n".join([header, rule, *rows])


def plot_metrics(table: pd.DataFrame, dataset: str, out: Path) -> Path:
    """Paper Fig. 5/6: per-class recall, precision, F1 and accuracy per model, random vs ImageNet."""
    import matplotlib.pyplot as plt

    part = table[table["dataset"] == dataset]
    models = list(dict.fromkeys(part["model"]))
    inits = list(dict.fromkeys(part["init"]))
    panels = [(m, [f"test_{m}_covid", f"test_{m}_non_covid"]) for m in CLASS_METRICS]
    panels.append(("accuracy", ["test_accuracy"]))
    fig, axes = plt.subplots(2, 2, figsize=(13, 8), sharey=True)
    for ax, (title, columns) in zip(axes.flat, panels):
        series = [(init, col) for init in inits for col in columns]
        width = 0.8 / len(series)
        for k, (init, col) in enumerate(series):
            rows = part[part["init"] == init].drop_duplicates("model").set_index("model")
            values = [rows[col].get(m, float("nan")) if col in rows else float("nan") for m in models]
            xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(models))]
            label = init if len(columns) == 1 else f"{init} · {_class_label(col)}"
            ax.bar(xs, [0 if pd.isna(v) else v for v in values], width, label=label)
            for x, v in zip(xs, values):
                if pd.isna(v):  # Missing is written, not drawn as a zero-height bar.
                    ax.text(x, 0.02, "n/a", rotation=90, ha="center", va="bottom", fontsize=7)
        ax.set_title(title)
        ax.set_xticks(range(len(models)), models, rotation=30, ha="right")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7)
    fig.suptitle(f"{dataset}: test metrics per model, random vs ImageNet weights")
    fig.tight_layout()
    path = out / f"fig5_6-{dataset}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _class_label(column: str) -> str:
    return "non-COVID" if column.endswith("non_covid") else "COVID"


def plot_epochs(table: pd.DataFrame, out: Path) -> Path:
    """Paper Fig. 7: epochs each model needed, per dataset and init."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    datasets = list(dict.fromkeys(table["dataset"]))
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        part = table[table["dataset"] == dataset]
        pivot = part.drop_duplicates(["model", "init"]).pivot(index="model", columns="init", values="epochs_used")
        pivot = pivot.reindex(list(dict.fromkeys(part["model"])))
        pivot.plot.bar(ax=ax, rot=30)
        ax.set_title(f"{dataset}: epochs used")
        ax.set_ylabel("epochs")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.set_ylim(0, max(pivot.max().max(), 1) * 1.5)  # head room: the legend above the bars
        ax.legend(title="init", loc="upper left", ncols=2)
    fig.tight_layout()
    path = out / "fig7-epochs.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_confusions(table: pd.DataFrame, dataset: str, out: Path, models_root: Path) -> Path:
    """A grid of test confusion matrices (rows = model, columns = init) from predictions.csv."""
    import matplotlib.pyplot as plt

    part = table[table["dataset"] == dataset].drop_duplicates(["model", "init"])
    models = list(dict.fromkeys(part["model"]))
    inits = list(dict.fromkeys(part["init"]))
    fig, axes = plt.subplots(
        len(models), len(inits), figsize=(2.6 * len(inits), 2.3 * len(models)), squeeze=False
    )
    for r, model in enumerate(models):
        for c, init in enumerate(inits):
            ax = axes[r][c]
            ax.set_title(f"{model} · {init}", fontsize=8)
            matrix = _confusion(paths.cell_dir(model, init, dataset, models_root) / "predictions.csv")
            ax.set_xticks([0, 1], ["non", "covid"], fontsize=7)
            ax.set_yticks([0, 1], ["non", "covid"], fontsize=7)
            if matrix is None:
                ax.text(0.5, 0.5, "missing", ha="center", va="center", transform=ax.transAxes)
                ax.set_xticks([]), ax.set_yticks([])
                continue
            ax.imshow(matrix, cmap="Blues", vmin=0)
            high = matrix.values.max() / 2
            for (i, j), n in matrix.stack().items():
                color = "white" if n > high else "black"
                ax.text(paths.CLASSES.index(j), paths.CLASSES.index(i), int(n), ha="center", va="center", color=color)
    fig.supxlabel("predicted")
    fig.supylabel("actual")
    fig.tight_layout()
    path = out / f"confusion-{dataset}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _confusion(predictions: Path) -> pd.DataFrame | None:
    try:
        frame = pd.read_csv(predictions)
    except (OSError, ValueError):
        return None
    if frame.empty or not {"actual", "predicted"} <= set(frame.columns):
        return None
    counts = pd.crosstab(frame["actual"], frame["predicted"])
    return counts.reindex(index=list(paths.CLASSES), columns=list(paths.CLASSES), fill_value=0)


def plot_split_strategies(table: pd.DataFrame, out: Path) -> Path | None:
    """Test accuracy per cell under each split strategy, side by side (only when both were run)."""
    import matplotlib.pyplot as plt

    ran = table[table["status"] == "ok"]
    if ran["split_strategy"].nunique() < 2:
        return None
    datasets = list(dict.fromkeys(table["dataset"]))
    fig, axes = plt.subplots(1, len(datasets), figsize=(7 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        part = table[table["dataset"] == dataset].copy()
        part["cell"] = part["model"] + "-" + part["init"]
        pivot = part.pivot_table(
            index="cell", columns="split_strategy", values="test_accuracy", dropna=False
        )
        pivot.plot.bar(ax=ax, rot=30)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{dataset}: test accuracy by split strategy")
        ax.legend(title="split", loc="upper left", bbox_to_anchor=(1.0, 1.0))  # accuracies reach 1
    fig.tight_layout()
    path = out / "split_strategies.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- entry point


def build_report(cfg: Config, models_root: str | Path = MODELS_ROOT, log: bool = True) -> Report:
    """Collect the runs, write every table and figure into cfg.report.out, log them to MLflow."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(cfg.report.out)
    out.mkdir(parents=True, exist_ok=True)
    table = results_table(cfg, fetch_runs(cfg.study.datasets), models_root)
    files = write_tables(table, out)
    # The paper's figures show the configured split strategy; the side-by-side plot shows both.
    current = table[table["split_strategy"] == cfg.split.strategy]
    for dataset in dict.fromkeys(current["dataset"]):
        files.append(plot_metrics(current, dataset, out))
        files.append(plot_confusions(current, dataset, out, Path(models_root)))
    files.append(plot_epochs(current, out))
    split_plot = plot_split_strategies(table, out)
    if split_plot:
        files.append(split_plot)
    report = Report(table=table, files=files)
    if log:
        report.run_id = log_report(table, out)
    return report


def log_report(table: pd.DataFrame, out: Path) -> str:
    """One `kind=report` run holding the report folder and a count of cells per status."""
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri())
    mlflow.set_experiment(REPORT_EXPERIMENT)
    with mlflow.start_run(run_name="report", tags={"kind": "report"}) as run:
        counts = table["status"].value_counts()
        mlflow.log_metrics({f"cells_{status}": float(n) for status, n in counts.items()})
        mlflow.log_artifacts(str(out), artifact_path="report")
        return run.info.run_id
