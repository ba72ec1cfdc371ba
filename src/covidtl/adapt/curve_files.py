"""A learning curve's folder: the one owner of its files.

adapted/curve/
    halves.csv   path (relative to the site folder), sha256, label, group, half (scoring |
                 adaptation) and split_seed of every site image: written before any model is scored
    curve.csv    one row per (method, K): seeds, each metric's seed mean and interval, home metrics
    curve.json   what ran (source model, site, seeds, methods and those skipped, with why) and the rows
    curve.png    AUC and balanced accuracy against K, one line per method
    curve.md     curve.csv as a Markdown table, each metric with its interval (for a README or a note)

Each file is written under a temporary name and renamed (covidtl.files).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from covidtl import paths
from covidtl.adapt.protocol import Halves
from covidtl.errors import UserError
from covidtl.files import atomic_path, atomic_write_text, json_text

HALVES_COLUMNS = ("path", "sha256", "label", "group", "half", "split_seed")


@dataclass(frozen=True)
class CurveDir:
    dir: Path

    @property
    def halves_file(self) -> Path:
        return self.dir / "halves.csv"

    @property
    def table_file(self) -> Path:
        return self.dir / "curve.csv"

    @property
    def json_file(self) -> Path:
        return self.dir / "curve.json"

    @property
    def plot_file(self) -> Path:
        return self.dir / "curve.png"

    @property
    def markdown_file(self) -> Path:
        return self.dir / "curve.md"

    def fix_halves(self, halves: Halves, site: str | Path) -> None:
        """halves.csv written, or the earlier one checked: the halves are fixed once per site, so a
        second run must split the same images by the same seed into the same halves."""
        table = halves_table(halves, Path(site))
        if not self.halves_file.is_file():
            atomic_write_text(self.halves_file, table.to_csv(index=False))
            return
        earlier = self._read_halves()
        seeds = sorted(set(earlier["split_seed"]))
        if seeds != [str(halves.seed)]:
            raise UserError(f"{self.halves_file}: the site was halved with --split-seed {', '.join(seeds)}, not "
                            f"{halves.seed}; the halves are fixed once per site: give --split-seed {seeds[0]}, or "
                            "another --out for a new split")
        if not _same_rows(earlier, table.astype(str)):
            raise UserError(f"{self.halves_file}: its halves are not those of {site} (other images, groups or "
                            "labels); give the site it was made from, or another --out for this site")

    def _read_halves(self) -> pd.DataFrame:
        table = pd.read_csv(self.halves_file, dtype=str, keep_default_na=False)
        missing = [c for c in HALVES_COLUMNS if c not in table.columns]
        if missing:
            raise UserError(f"{self.halves_file}: not a halves table (no {', '.join(missing)}); remove it or "
                            "give another --out")
        return table

    def write(self, rows: list[dict[str, Any]], about: dict[str, Any], figure) -> None:
        """curve.csv, curve.json, curve.md and curve.png: one row per (method, K)."""
        atomic_write_text(self.table_file, pd.DataFrame(rows).to_csv(index=False))
        atomic_write_text(self.markdown_file, markdown_table(pd.DataFrame(rows)) + "\n")
        atomic_write_text(self.json_file, json_text({**about, "points": rows}))
        with atomic_path(self.plot_file) as tmp:
            figure.savefig(tmp, dpi=80)

    def files(self) -> list[Path]:
        return [self.halves_file, self.table_file, self.json_file, self.markdown_file, self.plot_file]


# curve.csv's metric columns as the Markdown table shows them: the mean [low, high] over seeds.
SHOWN_METRICS = {"roc_auc": "AUC [95% CI]", "balanced_accuracy": "balanced accuracy", "ece": "ECE",
                 "brier": "Brier"}


def markdown_table(table: pd.DataFrame) -> str:
    """One row per (method, K): each metric as mean [low, high], home metrics as means, and the
    settings a tuned method chose per seed."""
    shown = table[["method", "k", "seeds"]].copy()
    for metric, title in SHOWN_METRICS.items():
        shown[title] = [f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in
                        zip(table[metric], table[f"{metric}_low"], table[f"{metric}_high"])]
    for metric in ("home_roc_auc", "home_balanced_accuracy"):
        shown[metric.replace("_", " ").replace("roc auc", "AUC")] = [
            "" if pd.isna(v) else f"{v:.3f}" for v in table[metric]]
    if "chosen" in table.columns:
        shown["chosen inside K"] = table["chosen"].fillna("").astype(str)
    return shown.rename(columns={"k": "K"}).to_markdown(index=False, disable_numparse=True)


def halves_table(halves: Halves, site: Path) -> pd.DataFrame:
    """One row per site image, its path relative to the site folder (portable outputs)."""
    both = pd.concat([halves.scoring.assign(half="scoring"), halves.adaptation.assign(half="adaptation")])
    table = both.assign(path=[paths.relative_to_root(p, site) for p in both["path"]], split_seed=halves.seed)
    return table[list(HALVES_COLUMNS)].sort_values("path").reset_index(drop=True)


def _same_rows(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    columns = list(HALVES_COLUMNS)
    a, b = (t[columns].sort_values("path").reset_index(drop=True) for t in (a, b))
    return a.shape == b.shape and bool((a == b).all().all())
