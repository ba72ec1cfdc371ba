"""Read a dataset folder, check every image by decoding it, and write its manifest.

The class of a file is the nearest folder above it whose name is a key of `data.labels`
(case-insensitive), so `COVID/`, `CT/COVID/` and `train/Viral Pneumonia/` all work. Files that
fail to decode go to the quarantine report with the reason; the rest go on. Images under no class
folder are counted per folder: a warning here, an error when evaluating a folder.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from covidtl import paths
from covidtl.config import Config
from covidtl.data import tables
from covidtl.data.groups import assign_groups
from covidtl.data.images import IMAGE_SUFFIXES, Measured, measure_or_reason, set_pixel_limit
from covidtl.errors import UserError

MANIFEST_COLUMNS = [
    "path", "label", "source", "width", "height", "mode", "bytes", "sha256", "dhash", "group",
]
QUARANTINE_COLUMNS = ["path", "reason"]
# Below this many files a process pool costs more than it saves.
PARALLEL_MIN_FILES = 64


@dataclass
class IngestResult:
    manifest: pd.DataFrame
    quarantine: pd.DataFrame
    skipped: list[Path]  # files that are not images by their suffix (notes, hidden files)
    empty_class_folders: list[Path]
    # folder relative to the root ("." for the root itself) -> images in it that have no class
    unmapped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # "<path>: why it deserves a warning", read all the same


def dataset_root(cfg: Config, dataset: str) -> Path:
    """The folder holding the class folders, or one clear error saying how to point at it."""
    ds = cfg.dataset(dataset)
    root = tables.dataset_root(cfg, dataset)
    top = root.parent if ds.subdir else root
    key = f"data.datasets.{dataset}.path"
    if not top.is_dir():
        hint = "run `covidtl synth` first" if Path(ds.path).parts[:1] == ("data",) else "download it"
        raise UserError(
            f"{key}: folder {top} does not exist; {hint}, or point at it with "
            f"-S {key}=/path/to/{dataset} (or `covidtl ingest {dataset} --path ...`)"
        )
    if not root.is_dir():
        raise UserError(
            f"data.datasets.{dataset}.subdir: {root} does not exist; "
            f"set the subdir to one of: {_children(top)}"
        )
    return root


def find_images(
    root: Path, labels: dict[str, str]
) -> tuple[list[tuple[Path, str, str]], list[Path], dict[str, int]]:
    """(path, label, source) per image under a class folder; skipped non-image files; unmapped counts."""
    labels = {name.lower(): cls for name, cls in labels.items()}
    found, skipped, unmapped = [], [], {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        folder = Path(dirpath)
        rel = folder.relative_to(root)
        label = _nearest_label(rel, labels)
        for name in sorted(filenames, key=_natural_key):
            path = folder / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append(path)
            elif label is None:
                unmapped[rel.as_posix()] = unmapped.get(rel.as_posix(), 0) + 1
            else:
                found.append((path, label, rel.as_posix()))
    return found, skipped, unmapped


def unmapped_fix(folder: str) -> str:
    """How to give the images of an unmapped folder a class."""
    if folder == ".":
        return "move them into a class folder"
    key = f"data.labels.{Path(folder).name.lower()}"
    setting = f'-S "{key}=non_covid"' if " " in key else f"-S {key}=non_covid"
    return f"map the folder with {setting} (or =covid)"


def unmapped_warning(folder: str, count: int) -> str:
    return f"{count} images in {_shown(folder)} have no class and are left out; {unmapped_fix(folder)}"


def class_folders(root: Path, labels: dict[str, str]) -> dict[Path, str]:
    """Every folder under root whose name is a class name, with its class."""
    labels = {name.lower(): cls for name, cls in labels.items()}
    out = {}
    for dirpath, dirnames, _ in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        folder = Path(dirpath)
        if folder != root and folder.name.lower() in labels:
            out[folder] = labels[folder.name.lower()]
    return out


def ingest(
    cfg: Config, dataset: str, jobs: int = 0, progress: bool = True, strict: bool = False
) -> IngestResult:
    """Scan, decode, group and return the manifest and quarantine tables (nothing written).

    strict: images under no class folder stop the run (a test set scored in part is scored wrong).
    """
    root = dataset_root(cfg, dataset)
    folders = class_folders(root, cfg.data.labels)
    _check_classes(root, folders, cfg, dataset)
    files, skipped, unmapped = find_images(root, cfg.data.labels)
    if strict and unmapped:
        _refuse_unmapped(root, unmapped)
    empty = sorted(f for f in folders if not any(p.is_file() for p in f.rglob("*")))

    rows, bad, thumbs, notes = [], [], [], []
    measured = _measure_all([p for p, _, _ in files], cfg, jobs, progress, dataset)
    for (path, label, source), result in zip(files, measured):
        if isinstance(result, str):
            bad.append({"path": os.path.abspath(path), "reason": result})
            continue
        if result.note:
            notes.append(f"{os.path.abspath(path)}: {result.note}")
        rows.append({
            "path": os.path.abspath(path), "label": label, "source": source,
            "width": result.width, "height": result.height, "mode": result.mode,
            "bytes": result.bytes, "sha256": result.sha256, "dhash": result.dhash,
        })
        thumbs.append(result.thumb)

    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS[:-1])
    present = set(manifest["label"])
    if present != {"covid", "non_covid"}:
        missing = sorted({"covid", "non_covid"} - present)[0]
        raise UserError(
            f"{root}: no readable {missing} image (its folders are empty or every file was "
            f"quarantined: {len(bad)} quarantined); add {missing} images or replace the bad files"
        )
    ds = cfg.dataset(dataset)
    manifest["group"] = assign_groups(
        manifest["sha256"].tolist(),
        manifest["dhash"].tolist(),
        manifest["source"].tolist(),
        [Path(p).name for p in manifest["path"]],
        np.stack(thumbs),
        manifest[["width", "height"]].to_numpy(dtype=np.float64),
        near_duplicate_bits=cfg.ingest.near_duplicate_bits,
        series=ds.series,
        series_break=cfg.ingest.series_break,
        shared_frame=ds.shared_frame,
    )
    quarantine = pd.DataFrame(bad, columns=QUARANTINE_COLUMNS)
    return IngestResult(manifest, quarantine, skipped, empty, unmapped, notes)


def summary(cfg: Config, dataset: str, result: IngestResult) -> dict:
    """What ingest.json records: the root as written in params.yaml (not resolved) and the counts."""
    ds = cfg.dataset(dataset)
    classes = result.manifest["label"].value_counts()
    return {
        "root": ds.path,
        "subdir": ds.subdir,
        "images": int(len(result.manifest)),
        "classes": {c: int(classes.get(c, 0)) for c in paths.CLASSES},
        "quarantined": int(len(result.quarantine)),
        "skipped_non_image": len(result.skipped),
        "unmapped_images": sum(result.unmapped.values()),
        "unmapped_folders": result.unmapped,
    }


def run(cfg: Config, dataset: str, jobs: int = 0, progress: bool = True, strict: bool = False) -> IngestResult:
    """Ingest and write data/<dataset>/manifest.csv, quarantine.csv and ingest.json."""
    result = ingest(cfg, dataset, jobs=jobs, progress=progress, strict=strict)
    tables.write_manifest(cfg, dataset, result.manifest)
    tables.write_quarantine(cfg, dataset, result.quarantine)
    tables.write_summary(cfg, dataset, summary(cfg, dataset, result))
    return result


# --------------------------------------------------------------------------- helpers


def _check_classes(root: Path, folders: dict[Path, str], cfg: Config, dataset: str) -> None:
    if not folders:
        raise UserError(
            f"{root}: no class folders found (sub-folders here: {_children(root)}); expected folder "
            f"names from data.labels ({', '.join(sorted(cfg.data.labels))}) — add yours there or "
            f"set data.datasets.{dataset}.subdir"
        )
    classes = set(folders.values())
    if len(classes) < 2:
        (only,) = classes
        names = ", ".join(sorted({f.name for f in folders}))
        raise UserError(
            f"{root}: only {only} folders found ({names}); a binary task needs both covid and "
            "non_covid folders — add the other class or map its folder name in data.labels"
        )


def _refuse_unmapped(root: Path, unmapped: dict[str, int]) -> None:
    counts = ", ".join(f"{_shown(folder)} {n}" for folder, n in unmapped.items())
    fixes = "; ".join(sorted({unmapped_fix(folder) for folder in unmapped}))
    raise UserError(
        f"{root}: {sum(unmapped.values())} images are in folders of no class ({counts}), and a score "
        f"on part of a test set is a wrong score; {fixes}"
    )


def _measure_all(
    files: list[Path], cfg: Config, jobs: int, progress: bool, dataset: str
) -> list[Measured | str]:
    work = partial(measure_or_reason, hash_size=cfg.ingest.hash_size, thumbnail=cfg.ingest.thumbnail)
    jobs = jobs or os.cpu_count() or 1
    bar = partial(tqdm, total=len(files), desc=f"ingest {dataset}", unit="img",
                  disable=not progress, file=sys.stderr)
    set_pixel_limit(cfg.ingest.max_megapixels)  # the guard here and, below, in each worker
    if jobs == 1 or len(files) < PARALLEL_MIN_FILES:
        return list(bar(map(work, files)))
    # spawn, not fork: a parent that has imported TensorFlow (tests, notebooks) must not be forked.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=set_pixel_limit,
                             initargs=(cfg.ingest.max_megapixels,)) as pool:
        return list(bar(pool.map(work, files, chunksize=16)))


def _shown(folder: str) -> str:
    return "the root folder" if folder == "." else f"{folder}/"


def _nearest_label(rel: Path, labels: dict[str, str]) -> str | None:
    for part in reversed(rel.parts):
        if part.lower() in labels:
            return labels[part.lower()]
    return None


def _natural_key(name: str) -> list:
    """'Covid (2).png' before 'Covid (10).png'."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _children(folder: Path) -> str:
    if not folder.is_dir():
        return "none"
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    return ", ".join(names[:10]) or "none"
