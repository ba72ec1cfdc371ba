"""curve.png: AUC and balanced accuracy against K, one line per method with its interval bars,
the unadapted source model as a horizontal reference; where the curve scored the source's home
test split too, a third panel: each method's AUC at home, what adaptation costs there."""

from __future__ import annotations

import numpy as np
import pandas as pd

PANELS = (("roc_auc", "AUC"), ("balanced_accuracy", "balanced accuracy"))
SOURCE = "source"  # the curve's row of the unadapted source model


def curve_figure(table: pd.DataFrame, title: str):
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, nothing global to close

    home = "home_roc_auc" in table.columns and bool(np.isfinite(table["home_roc_auc"].astype(float)).any())
    figure = Figure(figsize=(15 if home else 10, 4.2))
    panels = figure.subplots(1, 3 if home else 2)
    for axes, (metric, label) in zip(panels, PANELS):
        source = table[table["method"] == SOURCE]
        if len(source):
            row = source.iloc[0]
            axes.axhline(row[metric], color="black", linestyle="--", label="source (unadapted)")
            if np.isfinite([row[f"{metric}_low"], row[f"{metric}_high"]]).all():
                axes.axhspan(row[f"{metric}_low"], row[f"{metric}_high"], color="black", alpha=0.08)
        for method, rows in table[table["method"] != SOURCE].groupby("method", sort=False):
            rows = rows.sort_values("k")
            low, high = rows[metric] - rows[f"{metric}_low"], rows[f"{metric}_high"] - rows[metric]
            axes.errorbar(rows["k"], rows[metric], yerr=np.nan_to_num([low, high]), marker="o", capsize=3,
                          label=method)
        axes.axhline(0.5, color="grey", linewidth=0.5)  # chance, for both metrics
        axes.set_xlabel("K labelled patient groups per class")
        axes.set_ylabel(f"{label} (scoring half)")
        axes.set_ylim(0, 1.02)
        axes.set_xticks(sorted(table["k"].unique()))
    if home:
        _home_panel(panels[2], table)
    figure.axes[0].legend(fontsize=7, loc="lower right")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return figure


def _home_panel(axes, table: pd.DataFrame) -> None:
    """Each method's mean home test AUC over seeds against K (the home split is the source's own
    test split: no interval here, its bootstrap belongs to the source model's evaluation)."""
    source = table[table["method"] == SOURCE]
    if len(source):
        axes.axhline(source.iloc[0]["home_roc_auc"], color="black", linestyle="--")
    for method, rows in table[table["method"] != SOURCE].groupby("method", sort=False):
        rows = rows.sort_values("k")
        axes.plot(rows["k"], rows["home_roc_auc"], marker="o", label=method)
    axes.axhline(0.5, color="grey", linewidth=0.5)
    axes.set_xlabel("K labelled patient groups per class")
    axes.set_ylabel("AUC at home (source's test split, mean over seeds)")
    axes.set_ylim(0, 1.02)
    axes.set_xticks(sorted(table["k"].unique()))
