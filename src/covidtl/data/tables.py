"""A dataset's tables on disk (manifest, quarantine, split, the offline set's manifest, ingest.json).

The one owner of their layout. On disk an image path is POSIX and relative to the dataset root
(`data.datasets.<ds>.path` as written, plus `subdir`), so the same images give the same bytes in
any checkout; in memory it is a path that opens (the root joined, absolute).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from covidtl import paths
from covidtl.config import Config
from covidtl.errors import UserError
from covidtl.files import atomic_path, file_sha256

# Read as text: ids such as "0123" or "1e5" must not turn into numbers.
TEXT_COLUMNS = {c: str for c in ("path", "source_path", "label", "source", "mode", "sha256", "dhash", "group",
                                 "manifest_sha256")}
# split.csv's record of the manifest.csv it was made from: a re-ingest without a re-split is refused.
MANIFEST_SHA_COLUMN = "manifest_sha256"


def dataset_root(cfg: Config, dataset: str) -> Path:
    """Where the dataset's relative paths start: its path as written (~ expanded), plus subdir."""
    ds = cfg.dataset(dataset)
    root = Path(ds.path).expanduser()
    return root / ds.subdir if ds.subdir else root


def summary_path(cfg: Config, dataset: str) -> Path:
    return paths.dataset_dir(cfg, dataset) / "ingest.json"


def augmented_manifest_path(cfg: Config, dataset: str) -> Path:
    return paths.augmented_dir(cfg, dataset) / "manifest.csv"


# --------------------------------------------------------------------------- writers


def write_manifest(cfg: Config, dataset: str, manifest: pd.DataFrame) -> Path:
    return _write_table(manifest, paths.manifest_path(cfg, dataset), dataset_root(cfg, dataset))


def write_quarantine(cfg: Config, dataset: str, quarantine: pd.DataFrame) -> Path:
    return _write_table(quarantine, paths.quarantine_path(cfg, dataset), dataset_root(cfg, dataset))


def write_split(cfg: Config, dataset: str, table: pd.DataFrame) -> Path:
    """split.csv, each row holding the sha256 of the manifest.csv the split was made from."""
    table = table.assign(**{MANIFEST_SHA_COLUMN: file_sha256(paths.manifest_path(cfg, dataset))})
    return _write_table(table, paths.split_path(cfg, dataset), dataset_root(cfg, dataset))


def write_split_at(cfg: Config, dataset: str, table: pd.DataFrame, path: Path) -> Path:
    """A split table of the dataset kept elsewhere (a cross-validation fold's)."""
    return _write_table(table, Path(path), dataset_root(cfg, dataset))


def write_augmented_manifest(cfg: Config, dataset: str, manifest: pd.DataFrame) -> Path:
    path = augmented_manifest_path(cfg, dataset)
    return _write_table(manifest, path, dataset_root(cfg, dataset), column="source_path")


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """A small JSON record (ingest.json, leakage.json), written whole or not at all."""
    return _replace(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def write_summary(cfg: Config, dataset: str, summary: dict[str, Any]) -> Path:
    return write_json(summary_path(cfg, dataset), summary)


# --------------------------------------------------------------------------- readers


def read_manifest(cfg: Config, dataset: str) -> pd.DataFrame:
    """data/<dataset>/manifest.csv with usable paths, or one line saying to ingest first."""
    root = dataset_root(cfg, dataset)  # an unknown dataset name is the error to show, not "ingest it"
    path = paths.manifest_path(cfg, dataset)
    if not path.is_file():
        raise UserError(f"{path}: no manifest yet; run `covidtl ingest {dataset}` first")
    return _read_table(path, root, fix=f"covidtl ingest {dataset}",
                       required=("path", "label", "sha256", "dhash", "group"))


def read_quarantine(cfg: Config, dataset: str) -> pd.DataFrame:
    return _read_table(paths.quarantine_path(cfg, dataset), dataset_root(cfg, dataset))


def read_split(cfg: Config, dataset: str, path: Path | None = None) -> pd.DataFrame:
    """data/<dataset>/split.csv (or another split table of the dataset, e.g. a cross-validation
    fold's) with usable paths, or one line saying how to make it."""
    root = dataset_root(cfg, dataset)  # an unknown dataset name is the error to show
    path = Path(path) if path is not None else paths.split_path(cfg, dataset)
    if not path.is_file():
        raise UserError(
            f"{path}: no split table for dataset {dataset!r}; run `covidtl ingest {dataset}` "
            f"and `covidtl split {dataset}` (or `dvc repro split@{dataset}`) first"
        )
    table = _read_table(path, root, fix=f"covidtl split {dataset}",
                        required=("path", "label", "split"))
    _check_made_from_manifest(cfg, dataset, path, table)
    return table


def _check_made_from_manifest(cfg: Config, dataset: str, path: Path, table: pd.DataFrame) -> None:
    """A split made from another manifest (re-ingested since) would train on stale images."""
    manifest = paths.manifest_path(cfg, dataset)
    if MANIFEST_SHA_COLUMN not in table.columns or not manifest.is_file():
        return  # a table from before this record existed, or a split shipped without its manifest
    recorded = set(table[MANIFEST_SHA_COLUMN])
    if recorded != {file_sha256(manifest)}:
        raise UserError(
            f"{path}: made from another {manifest.name} than the one in {manifest.parent} (the dataset "
            f"was re-ingested since); run `covidtl split {dataset}` (or `dvc repro split@{dataset}`)"
        )


def read_augmented_manifest(cfg: Config, dataset: str) -> pd.DataFrame:
    path = augmented_manifest_path(cfg, dataset)
    if not path.is_file():
        raise UserError(f"{path}: no augmented set; run `covidtl augment {dataset}` first")
    return _read_table(path, dataset_root(cfg, dataset), column="source_path")


def read_summary(cfg: Config, dataset: str) -> dict[str, Any]:
    return json.loads(summary_path(cfg, dataset).read_text())


def _write_table(frame: pd.DataFrame, path: Path, root: Path, column: str = "path") -> Path:
    stored = frame.assign(**{column: [paths.relative_to_root(p, root) for p in frame[column]]})
    return _replace(path, lambda tmp: stored.to_csv(tmp, index=False))


def _read_table(path: Path, root: Path, column: str = "path", fix: str = "",
                required: tuple[str, ...] = ()) -> pd.DataFrame:
    """A table written by `_write_table`, or one line saying it is damaged and which command remakes it."""
    remake = f"; run `{fix}` to write it again" if fix else "; write it again"
    try:
        table = pd.read_csv(path, dtype=TEXT_COLUMNS)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: not a readable table, truncated or damaged ({reason}){remake}") from None
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}, truncated or damaged{remake}")
    empty = table[list(required)].isna()
    if empty.to_numpy().any():
        row = int(empty.any(axis=1).to_numpy().argmax())
        blank = ", ".join(c for c in required if empty.iloc[row][c])
        # +2: the header is line 1 and rows count from 0.
        raise UserError(f"{path}: line {row + 2} has no {blank}: truncated or damaged{remake}")
    if column in table.columns:
        table[column] = [paths.usable_path(p, root) for p in table[column]]
    return table


def _replace(path: Path, write: Callable[[Path], Any]) -> Path:
    """Write beside the target, then rename: a failure never leaves half a file."""
    with atomic_path(path) as tmp:
        write(tmp)
    return path
