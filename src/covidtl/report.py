"""The comparison report: every study cell's MLflow run → a table, the paper's figures, MLflow.

Reads exactly the run each cell's metrics.json names (`cells.Cell`), plus the runs of DVC
experiments the user names (`--with-experiment NAME`), each as its own group; writes ``reports/``:
``results.csv`` and ``results.md`` (every metric of every model x init x dataset), ``fig5_6-<dataset>.png``
(per-class recall, precision, F1 and accuracy, random vs ImageNet), ``fig7-epochs.png``,
``confusion-<dataset>.png`` and, where more than one group or split strategy is shown,
``split_strategies.png``. A cell without a result stays empty (``—`` / no bar), never a zero.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import mlflow
import pandas as pd
from matplotlib.ticker import MaxNLocator

from covidtl import paths, stats, tracking
from covidtl.cards import model_card, write_cards
from covidtl.cells import PAPER_PROFILE, Cell
from covidtl.inits import init_label
from covidtl.comparisons import CellPredictions, comparison_table, in_words
from covidtl.config import Config
from covidtl.errors import UserError
from covidtl.files import atomic_write_text
from covidtl.confusion import draw_confusion
from covidtl.scores import with_interval

MODELS_ROOT = "models"  # cells.MODELS_ROOT
EXTERNAL_ROOT = "external"  # covidtl external: external/<dataset>/<cell>/<set>/
REPORT_EXPERIMENT = "covidtl-report"
CLASS_METRICS = ("recall", "precision", "f1")
AVERAGES = ("covid", "non_covid", "micro", "macro")
POINT_METRICS = (
    ["test_accuracy", "test_roc_auc", "test_balanced_accuracy", "test_brier"]
    + [f"test_{m}_{a}" for m in CLASS_METRICS for a in AVERAGES]
)
# Shown in results.md as "value [low, high]"; the rest of the intervals are in results.csv.
HEADLINE = ["test_accuracy", "test_roc_auc", "test_balanced_accuracy", "test_recall_covid",
            "test_recall_non_covid", "test_brier"]
OPERATING = ["operating_threshold", "test_op_accuracy", "test_op_balanced_accuracy",
             "test_op_recall_covid", "test_op_recall_non_covid"]
METRICS = (
    POINT_METRICS
    + [f"{m}_ci_{end}" for m in POINT_METRICS for end in ("low", "high")]
    + ["test_ece", "test_images", *OPERATING]
    + [f"{m}_ci_{end}" for m in OPERATING[1:] for end in ("low", "high")]
    + ["epochs_used", "train_seconds"]
)
KEY = ["group", "dataset", "model", "init", "profile", "split_strategy"]
WORKSPACE = "workspace"  # the study cells under models/, as their metrics.json record them


@dataclass
class Report:
    table: pd.DataFrame
    files: list[Path]
    run_id: str | None = None


# --------------------------------------------------------------------------- collect


def _client():
    mlflow.set_tracking_uri(tracking.tracking_uri())
    return mlflow.MlflowClient()


def _metrics_of(run) -> dict[str, float]:
    return {m: run.data.metrics.get(m, float("nan")) for m in METRICS}


def workspace_rows(cfg: Config, models_root: str | Path = MODELS_ROOT) -> pd.DataFrame:
    """One row per cell of cfg.study: exactly the run its metrics.json names, or why there is none."""
    client = _client()
    rows = []
    for dataset in cfg.study.datasets:
        for profile, model, init in cfg.study.cells():
            cell = Cell.of(model, init, dataset, models_root, profile)
            row = {"group": WORKSPACE, "dataset": dataset, "model": model, "init": init_label(init),
                   "profile": profile, "split_strategy": cfg.split.strategy, "status": "missing",
                   "note": "", "run_id": None, **dict.fromkeys(METRICS, float("nan"))}
            record = cell.read_metrics()
            if record is None:
                row["note"] = f"no {cell.metrics_file}: the cell has not run (dvc repro)"
            elif record.get("status") in ("skipped", "failed"):
                row.update(status=record["status"], note=str(record.get("reason", "")),
                           run_id=record.get("run_id"))
            elif not record.get("run_id"):
                row["note"] = f"{cell.metrics_file} names no MLflow run; re-run the cell"
            else:
                row["run_id"] = record["run_id"]
                try:
                    run = client.get_run(record["run_id"])
                except mlflow.exceptions.MlflowException:
                    row["note"] = (f"run {record['run_id']} of {cell.metrics_file} is not in "
                                   f"{tracking.tracking_uri()}; set MLFLOW_TRACKING_URI to its store")
                else:
                    row.update(status="ok", **_metrics_of(run),
                               split_strategy=run.data.tags.get("split_strategy", row["split_strategy"]))
            rows.append(row)
    return pd.DataFrame(rows, columns=[*KEY, "status", "note", "run_id", *METRICS])


def experiment_rows(cfg: Config, name: str) -> pd.DataFrame:
    """The newest finished train run per cell of DVC experiment `name` (tag dvc_experiment)."""
    _client()
    names = [tracking.experiment_name(d) for d in cfg.study.datasets]
    existing = [n for n in names if mlflow.get_experiment_by_name(n) is not None]
    runs = pd.DataFrame()
    if existing:
        runs = mlflow.search_runs(
            experiment_names=existing,
            filter_string=f"tags.kind = 'train' AND tags.dvc_experiment = '{name}' "
                          "AND attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
        )
    if runs.empty:
        raise UserError(
            f"--with-experiment {name}: no finished training run tagged dvc_experiment={name} in "
            f"{tracking.tracking_uri()}; run it with `dvc exp run -n {name}` (same MLFLOW_TRACKING_URI)"
        )
    out = pd.DataFrame({
        "group": name, "dataset": runs["tags.dataset"], "model": runs["tags.model"],
        "init": runs["tags.init"], "split_strategy": runs["tags.split_strategy"],
        "profile": runs["tags.profile"].fillna("paper") if "tags.profile" in runs else "paper",
        "status": "ok", "note": "", "run_id": runs["run_id"],
    })
    for metric in METRICS:
        column = f"metrics.{metric}"
        out[metric] = runs[column] if column in runs else float("nan")
    return out.drop_duplicates(KEY, keep="first").reset_index(drop=True)


def results_table(
    cfg: Config, models_root: str | Path = MODELS_ROOT, experiments: tuple[str, ...] = ()
) -> pd.DataFrame:
    """The workspace's cells, then each named experiment as its own group; never mixed."""
    parts = [workspace_rows(cfg, models_root)] + [experiment_rows(cfg, name) for name in experiments]
    return pd.concat(parts, ignore_index=True)


# --------------------------------------------------------------------------- write


def write_tables(
    table: pd.DataFrame, out: Path, confidence: float, sections: list[str] = ()
) -> list[Path]:
    """results.csv (all columns) and results.md (one table per dataset and split strategy)."""
    csv_path, md_path = out / "results.csv", out / "results.md"
    atomic_write_text(csv_path, table.to_csv(index=False))
    lines = [
        "# Study results",
        "",
        "Test-split metrics of the MLflow run each study cell's metrics.json names (group "
        "`workspace`), and of each DVC experiment named with `--with-experiment` (its own group). "
        "`—` = no result (status says why); never a zero.",
        "",
    ]
    shown = ["model", "init", "profile", "status", *HEADLINE, "test_images", "operating_threshold",
             "test_op_balanced_accuracy", "epochs_used", "train_seconds", "run_id"]
    lines += [
        f"Values at threshold 0.5 with their {confidence:.0%} group-bootstrap interval "
        "(resampling the test split's patient groups; `[n/a]`: the metric is undefined in most "
        "resamples, e.g. AUC when a resample holds one class, so no interval is given); `op_` = "
        "at the operating point chosen on "
        "the validation split (`operating_threshold`). Differences between two cells are judged "
        "in *Paired comparisons* below, not by eye.",
        "",
    ]
    for (group, dataset, strategy), part in table.groupby(["group", "dataset", "split_strategy"], sort=False):
        lines += [f"## {group}: {dataset} — split {strategy}", "", _markdown(_with_intervals(part)[shown]), ""]
        notes = part[part["note"] != ""]
        for _, row in notes.iterrows():
            lines.append(f"- {_cell_of(row).name}: {row['note']}")
        if len(notes):
            lines.append("")
    lines += list(sections)
    atomic_write_text(md_path, "\n".join(lines))
    return [csv_path, md_path]


def _with_intervals(part: pd.DataFrame) -> pd.DataFrame:
    """Headline metrics as "0.750 [0.610, 0.860]" strings."""
    shown = part.copy()
    for metric in [*HEADLINE, "test_op_balanced_accuracy"]:
        shown[metric] = [with_interval(v, lo, hi) for v, lo, hi in zip(
            part[metric], _column(part, f"{metric}_ci_low"), _column(part, f"{metric}_ci_high"))]
    return shown


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    return frame[name] if name in frame else pd.Series(float("nan"), index=frame.index)


def _markdown(frame: pd.DataFrame) -> str:
    def cell(column: str, value: object) -> str:
        if isinstance(value, float):
            if pd.isna(value):
                return "—"
            # Counts and seconds read better whole; scores keep three decimals.
            whole = ("epochs_used", "train_seconds", "test_images")
            return f"{value:.0f}" if column in whole else f"{value:.3f}"
        if value is None or (column == "run_id" and pd.isna(value)):
            return "—"
        return str(value)

    shown = pd.DataFrame({c.removeprefix("test_"): [cell(c, v) for v in frame[c]] for c in frame.columns})
    return shown.to_markdown(index=False, disable_numparse=True)  # "10.0" stays as written


def plot_metrics(table: pd.DataFrame, dataset: str, out: Path) -> Path:
    """Paper Fig. 5/6: per-class recall, precision, F1 and accuracy per model, random vs ImageNet."""
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
            errors = _error_bars(rows, col, models, values)
            ax.bar(xs, [0 if pd.isna(v) else v for v in values], width, label=label,
                   yerr=errors, capsize=2, error_kw={"lw": 0.8})
            for x, v in zip(xs, values):
                if pd.isna(v):  # Missing is written, not drawn as a zero-height bar.
                    ax.text(x, 0.02, "n/a", rotation=90, ha="center", va="bottom", fontsize=7)
        ax.set_title(title)
        ax.set_xticks(range(len(models)), models, rotation=30, ha="right")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7)
    fig.suptitle(f"{dataset}: test metrics per model, random vs ImageNet weights "
                 "(bars: group-bootstrap intervals)")
    fig.tight_layout()
    path = out / f"fig5_6-{dataset}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _error_bars(rows: pd.DataFrame, column: str, models: list[str], values: list[float]):
    """Matplotlib's (2, n) yerr from a metric's interval columns; zero where there is none."""
    low, high = f"{column}_ci_low", f"{column}_ci_high"
    if low not in rows or high not in rows:
        return None
    below = [v - rows[low].get(m, float("nan")) for m, v in zip(models, values)]
    above = [rows[high].get(m, float("nan")) - v for m, v in zip(models, values)]
    return [[0 if pd.isna(e) else max(e, 0) for e in below], [0 if pd.isna(e) else max(e, 0) for e in above]]


def _class_label(column: str) -> str:
    return "non-COVID" if column.endswith("non_covid") else "COVID"


def plot_epochs(table: pd.DataFrame, out: Path) -> Path:
    """Paper Fig. 7: epochs each model needed, per dataset and init."""
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
        top = pivot.max().max()  # NaN when no cell of this dataset has a result yet
        ax.set_ylim(0, (top if pd.notna(top) and top > 1 else 1) * 1.5)  # head room: the legend above the bars
        ax.legend(title="init", loc="upper left", ncols=2)
    fig.tight_layout()
    path = out / "fig7-epochs.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_confusions(table: pd.DataFrame, dataset: str, out: Path, models_root: Path) -> Path:
    """A grid of test confusion matrices (rows = model, columns = init) from predictions.csv."""
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
            matrix = _confusion(Cell.of(model, init, dataset, models_root))
            if matrix is None:
                ax.text(0.5, 0.5, "missing", ha="center", va="center", transform=ax.transAxes)
                ax.set_xticks([]), ax.set_yticks([])
                continue
            draw_confusion(ax, matrix, labels=["non", "covid"])  # rows and columns in CLASSES order
            ax.set(xlabel="", ylabel="")  # the grid's own labels say it once
            ax.tick_params(labelsize=7)
    fig.supxlabel("predicted")
    fig.supylabel("actual")
    fig.tight_layout()
    path = out / f"confusion-{dataset}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _confusion(cell: Cell) -> pd.DataFrame | None:
    try:
        frame = cell.read_predictions()
    except UserError:
        return None
    if frame.empty or not {"actual", "predicted"} <= set(frame.columns):
        return None
    counts = pd.crosstab(frame["actual"], frame["predicted"])
    return counts.reindex(index=list(paths.CLASSES), columns=list(paths.CLASSES), fill_value=0)


def plot_split_strategies(table: pd.DataFrame, out: Path) -> Path | None:
    """Test accuracy per cell for each group and split strategy, side by side (when there are two)."""
    ran = table[table["status"] == "ok"].copy()
    ran["shown"] = ran["group"] + " (" + ran["split_strategy"] + ")"
    if ran["shown"].nunique() < 2:
        return None
    datasets = list(dict.fromkeys(ran["dataset"]))
    fig, axes = plt.subplots(1, len(datasets), figsize=(7 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        part = ran[ran["dataset"] == dataset]
        part = part.assign(cell=part["model"] + "-" + part["init"])
        pivot = part.pivot_table(index="cell", columns="shown", values="test_accuracy", dropna=False)
        pivot.plot.bar(ax=ax, rot=30)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{dataset}: test accuracy by group (split strategy)")
        ax.legend(title="group (split)", loc="upper left", bbox_to_anchor=(1.0, 1.0))  # accuracies reach 1
    fig.tight_layout()
    path = out / "split_strategies.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- entry point


def build_report(
    cfg: Config, models_root: str | Path = MODELS_ROOT, log: bool = True,
    experiments: tuple[str, ...] = (),
) -> Report:
    """Collect the cells' runs, write every table and figure into cfg.report.out, log them to MLflow."""
    matplotlib.use("Agg")
    out = Path(cfg.report.out)
    out.mkdir(parents=True, exist_ok=True)
    table = results_table(cfg, models_root, experiments)
    # The paper's figures and the paired tests use the workspace's cells of the paper's protocol;
    # experiments are extra, and other profiles' cells join the tables, cards and external scores.
    workspace = table[table["group"] == WORKSPACE]
    current = workspace[workspace["profile"] == PAPER_PROFILE]
    scored = scored_cells(current, Path(models_root))
    comparisons = comparison_table(scored, cfg.eval)
    gradcams = copy_gradcams(current, Path(models_root), out)
    cross = cross_dataset_table(workspace)
    sections = (cross_dataset_section(cross, external_score_counts(cfg)) + comparison_section(comparisons)
                + gradcam_section(gradcams))
    files = write_tables(table, out, cfg.eval.confidence, sections)
    files += list(gradcams.values())
    files.append(atomic_write_text(out / "cross_dataset.csv", cross.to_csv(index=False)))
    files.append(out / "comparisons.csv")
    atomic_write_text(files[-1], comparisons.to_csv(index=False))
    for dataset in dict.fromkeys(current["dataset"]):
        files.append(plot_metrics(current, dataset, out))
        files.append(plot_confusions(current, dataset, out, Path(models_root)))
        files.append(plot_calibration([c for c in scored if c.dataset == dataset], dataset, out))
    files.append(plot_epochs(current, out))
    files += write_cards([
        model_card(cfg, _cell_of(row, models_root), row, external_scores(row["dataset"], _cell_of(row).name))
        for row in workspace[workspace["status"] == "ok"].to_dict("records")
    ], out, models_root)
    split_plot = plot_split_strategies(table, out)
    if split_plot:
        files.append(split_plot)
    report = Report(table=table, files=files)
    if log:
        report.run_id = log_report(table, out)
    return report


CROSS_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "recall_covid", "recall_non_covid")


def cross_dataset_table(table: pd.DataFrame) -> pd.DataFrame:
    """Each finished cell on its own test split beside each external set, with intervals."""
    rows = []
    for row in table[table["status"] == "ok"].to_dict("records"):
        name = _cell_of(row).name
        scored = {"test split": {k.replace("test_", "", 1): v for k, v in row.items()
                                 if isinstance(k, str) and k.startswith("test_")}}
        scored.update({s: {k.replace("all_", "", 1): v for k, v in m.items()}
                       for s, m in external_scores(row["dataset"], name).items()})
        for scored_on, metrics in scored.items():
            out = {"dataset": row["dataset"], "cell": name,
                   "scored_on": scored_on, "images": metrics.get("images")}
            for m in CROSS_METRICS:
                for suffix in ("", "_ci_low", "_ci_high"):
                    out[f"{m}{suffix}"] = metrics.get(f"{m}{suffix}")
            rows.append(out)
    return pd.DataFrame(rows)


def external_score_counts(cfg: Config) -> dict[str, int]:
    """How many scores were ever taken on each external set's folder: every kind=evaluate run
    tagged with its resolved path (`covidtl external` and `covidtl evaluate --data FOLDER`)."""
    _client()
    counts = {}
    for sets in cfg.external.values():
        for entry in sets:
            folder = str(Path(entry.path).resolve()).replace("'", "\\'")
            runs = mlflow.search_runs(search_all_experiments=True, filter_string=(
                f"tags.kind = 'evaluate' AND tags.data_folder = '{folder}'"))
            counts[entry.name] = len(runs)
    return counts


def cross_dataset_section(cross: pd.DataFrame, score_counts: dict[str, int] | None = None) -> list[str]:
    lines = ["## Cross-dataset: own test split and external test sets", ""]
    if score_counts:
        lines += ["Scores taken so far on each external set (every MLflow evaluate run on its folder, "
                  "this study's included): " + ", ".join(f"{k} {v}" for k, v in score_counts.items())
                  + ". A set looked at many times is no longer untouched.", ""]
    if cross.empty or set(cross["scored_on"]) == {"test split"}:
        return lines + ["No external test set scored (`external` in params.yaml, stage "
                        "external@<dataset>): nothing here says how the models fare elsewhere.", ""]
    rows = []
    for row in cross.to_dict("records"):
        images = row["images"]
        rows.append({"dataset": row["dataset"], "cell": row["cell"], "scored on": row["scored_on"],
                     "images": "—" if images is None or pd.isna(images) else f"{images:.0f}",
                     **{m: with_interval(*(row.get(f"{m}{s}") for s in ("", "_ci_low", "_ci_high")))
                        for m in CROSS_METRICS}})
    return lines + ["Threshold 0.5; 95% intervals resample each set's groups. External sets were never "
                    "used for training or selection.", "",
                    pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True), ""]


def _cell_of(row: dict | Any, models_root: str | Path = MODELS_ROOT) -> Cell:
    """The cell folder of a results-table row (a dict or an itertuples row)."""
    get = row.get if isinstance(row, dict) else lambda key, default=None: getattr(row, key, default)
    profile = get("profile", PAPER_PROFILE)
    return Cell.of(get("model"), get("init"), get("dataset"), models_root,
                   PAPER_PROFILE if pd.isna(profile) else profile)


def external_scores(dataset: str, cell: str, root: Path = Path(EXTERNAL_ROOT)) -> dict[str, dict]:
    """Each external test set's scores of one cell (`covidtl external`), by set name."""
    found = {}
    for file in sorted((root / dataset / cell).glob("*/metrics.json")):
        try:
            found[file.parent.name] = json.loads(file.read_text())
        except (OSError, ValueError):
            continue
    return found


def scored_cells(table: pd.DataFrame, models_root: Path) -> list[CellPredictions]:
    """The finished cells' test predictions (path, group, actual, p_covid), for paired tests."""
    cells = []
    for row in table[table["status"] == "ok"].itertuples():
        try:
            frame = Cell.of(row.model, row.init, row.dataset, models_root).read_predictions()
        except UserError:  # unreadable: the cell is left out of the comparisons
            continue
        if {"path", "actual", "p_covid"} <= set(frame.columns) and len(frame):
            cells.append(CellPredictions(row.dataset, row.model, row.init, frame))
    return cells


def comparison_section(comparisons: pd.DataFrame) -> list[str]:
    lines = ["## Paired comparisons", ""]
    if comparisons.empty:
        return lines + ["No pair of finished cells to compare (each model against the custom CNN, "
                        "each pre-trained init against random weights).", ""]
    lines += [
        "Each model against the custom CNN (same init) and each pre-trained init against random "
        f"weights (same model), on the same test images: accuracy by a paired group bootstrap, ROC "
        f"AUC by DeLong's test (interval: paired group bootstrap); p-values Holm-adjusted across "
        f"all {len(comparisons)} comparisons below (`comparisons.csv`).",
        "",
    ]
    lines += [f"- {in_words(row)}" for _, row in comparisons.iterrows()]
    return lines + [""]


def copy_gradcams(table: pd.DataFrame, models_root: Path, out: Path) -> dict[str, Path]:
    """Each finished cell's Grad-CAM sample (models/<cell>/gradcam.png) into reports/gradcam/."""
    copied = {}
    for row in table[table["status"] == "ok"].itertuples():
        cell = Cell.of(row.model, row.init, row.dataset, models_root)
        if cell.gradcam_file.is_file():
            target = out / "gradcam" / f"{cell.name}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cell.gradcam_file, target)
            copied[cell.name] = target
    return copied


def gradcam_section(copied: dict[str, Path]) -> list[str]:
    if not copied:
        return []
    lines = ["## Grad-CAM samples", "",
             "A seeded sample of each cell's test images — true and false positives and negatives — "
             "with the Grad-CAM map of the predicted class (red: most weight). At the quick defaults' "
             "32 px a backbone's last feature map is 1 x 1, so its map shows no place.", ""]
    lines += [f"- {name}: ![{name}](gradcam/{path.name})" for name, path in copied.items()]
    return lines + [""]


def plot_calibration(cells: list[CellPredictions], dataset: str, out: Path) -> Path:
    """Reliability diagram of every finished cell of a dataset: predicted vs observed COVID rate."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="perfectly calibrated")
    for cell in cells:
        y = (cell.predictions["actual"] == "covid").astype(int).to_numpy()
        p = cell.predictions["p_covid"].to_numpy(float)
        rel = stats.reliability(y, p)
        ax.plot(rel.mean_predicted, rel.observed, marker="o",
                label=f"{cell.name}: ECE {rel.ece:.3f}, Brier {stats.brier(y, p):.3f}")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="mean predicted p(COVID)",
           ylabel="observed COVID fraction", title=f"{dataset}: calibration on the test split")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = out / f"calibration-{dataset}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def log_report(table: pd.DataFrame, out: Path) -> str:
    """One `kind=report` run holding the report folder and a count of cells per status."""
    mlflow.set_tracking_uri(tracking.tracking_uri())
    tracking.set_experiment(REPORT_EXPERIMENT)
    with mlflow.start_run(run_name="report", tags={"kind": "report"}) as run:
        counts = table[table["group"] == WORKSPACE]["status"].value_counts()
        groups = sorted(set(table["group"]) - {WORKSPACE})
        if groups:
            mlflow.set_tag("experiments", ",".join(groups))
        mlflow.log_metrics({f"cells_{status}": float(n) for status, n in counts.items()})
        mlflow.log_artifacts(str(out), artifact_path="report")
        return run.info.run_id
