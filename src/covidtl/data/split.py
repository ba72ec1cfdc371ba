"""Stratified train/val/test split of a manifest, and the report of what leaks across it.

`grouped` (default) puts every group (duplicates, near-duplicates, one patient's slices) in one
split; `random` is the paper's image-level split, kept to measure how much it leaks.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import combinations

import numpy as np
import pandas as pd

from covidtl import paths
from covidtl.config import Config, SplitConfig
from covidtl.data import tables
from covidtl.data.groups import near_duplicate_pairs, size_summary
from covidtl.errors import UserError

SPLITS = ("train", "val", "test")


def split_random(table: pd.DataFrame, cfg: SplitConfig) -> pd.Series:
    """Image-level split, stratified by class: the paper's protocol (leaks whole patients)."""
    rng = np.random.default_rng(cfg.seed)
    out = pd.Series("", index=table.index, dtype=object)
    for _, rows in table.groupby("label", sort=True):
        order = rows.index.to_numpy()[rng.permutation(len(rows))]
        bounds = _cut_points(len(order), cfg.fractions)
        for name, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:]):
            out.loc[order[lo:hi]] = name
    return out


def split_grouped(table: pd.DataFrame, cfg: SplitConfig) -> pd.Series:
    """Whole groups to splits, stratified by each group's majority class, largest groups first.

    Each group goes to the split furthest below its target share of that class (relative to the
    target), so small splits get groups early and the fractions come out close.
    """
    rng = np.random.default_rng(cfg.seed)
    sizes = table.groupby("group").size()
    group_label = table.groupby("group")["label"].agg(lambda s: s.value_counts().idxmax())
    assignment: dict[str, str] = {}
    for label in sorted(group_label.unique()):
        groups = group_label.index[group_label == label].to_numpy()
        groups = groups[rng.permutation(len(groups))]  # the seed picks among equal-sized groups
        groups = sorted(groups, key=lambda g: -sizes[g])  # stable: keeps the shuffled order
        total = sizes[groups].sum()
        target = {s: cfg.fractions[s] * total for s in SPLITS}
        filled = dict.fromkeys(SPLITS, 0)
        for g in groups:
            name = max(
                (s for s in SPLITS if target[s] > 0),
                key=lambda s: (target[s] - filled[s]) / target[s],
            )
            assignment[g] = name
            filled[name] += sizes[g]
    return table["group"].map(assignment)


STRATEGIES: dict[str, Callable[[pd.DataFrame, SplitConfig], pd.Series]] = {
    "grouped": split_grouped,
    "random": split_random,
}


def make_split(manifest: pd.DataFrame, cfg: SplitConfig) -> pd.DataFrame:
    """The manifest plus a `split` column."""
    if cfg.strategy not in STRATEGIES:
        raise UserError(f"split.strategy: {cfg.strategy!r} is not one of {', '.join(STRATEGIES)}")
    table = manifest.copy()
    table["split"] = STRATEGIES[cfg.strategy](table, cfg)
    return table


def leakage_report(table: pd.DataFrame, near_duplicate_bits: int, cfg: SplitConfig) -> dict:
    """Counts per split and class, and the image pairs that should be together but cross splits."""
    split = table["split"].to_numpy()
    pairs = near_duplicate_pairs(table["dhash"].tolist(), near_duplicate_bits)
    near = _crossing(split[pairs[:, 0]], split[pairs[:, 1]]) if len(pairs) else _crossing([], [])
    same_group = dict.fromkeys(_pair_names(), 0)
    counts = table.groupby(["group", "split"]).size().unstack(fill_value=0)
    for a, b in combinations(SPLITS, 2):
        if a in counts and b in counts:
            same_group[f"{a}/{b}"] = int((counts[a] * counts[b]).sum())
    per_split = table.groupby(["split", "label"]).size().unstack(fill_value=0)
    return {
        "strategy": cfg.strategy,
        "seed": cfg.seed,
        "fractions": cfg.fractions,
        "images": int(len(table)),
        "counts": {
            s: {c: int(per_split.loc[s, c]) if s in per_split.index else 0 for c in paths.CLASSES}
            for s in SPLITS
        },
        "groups": size_summary(table["group"].tolist()),
        "groups_split_across": int((table.groupby("group")["split"].nunique() > 1).sum()),
        "crossing_pairs": {
            "same_group": same_group,
            "near_duplicate": near,
            "same_group_total": sum(same_group.values()),
            "near_duplicate_total": sum(near.values()),
        },
        "near_duplicate_pairs": int(len(pairs)),
        "near_duplicate_bits": near_duplicate_bits,
    }


def run(cfg: Config, dataset: str) -> tuple[pd.DataFrame, dict]:
    """Read data/<dataset>/manifest.csv; write split.csv and leakage.json."""
    table = make_split(tables.read_manifest(cfg, dataset), cfg.split)
    report = {"dataset": dataset, **leakage_report(table, cfg.ingest.near_duplicate_bits, cfg.split)}
    tables.write_split(cfg, dataset, table)
    tables.write_json(paths.leakage_path(cfg, dataset), report)
    return table, report


def _cut_points(n: int, fractions: dict[str, float]) -> list[int]:
    cumulative = np.cumsum([fractions[s] for s in SPLITS])
    return [0, *[int(round(c * n)) for c in cumulative[:-1]], n]


def _pair_names() -> list[str]:
    return [f"{a}/{b}" for a, b in combinations(SPLITS, 2)]


def _crossing(a, b) -> dict[str, int]:
    out = dict.fromkeys(_pair_names(), 0)
    for x, y in zip(a, b):
        if x != y:
            key = f"{x}/{y}" if SPLITS.index(x) < SPLITS.index(y) else f"{y}/{x}"
            out[key] += 1
    return out
