"""Tiny image folders and split tables for the model and training tests (made in tmp dirs)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import keras
import numpy as np
import pandas as pd
from keras.src.legacy.saving import legacy_h5_format
from PIL import Image

from covidtl.config import load_config

ROOT_PARAMS = Path(__file__).parents[1] / "params.yaml"
SPLIT_COLUMNS = ["path", "label", "source", "width", "height", "mode", "bytes", "sha256", "group", "split"]


def write_images(root: Path, per_class: int = 12, size: int = 48, seed: int = 0) -> list[Path]:
    """PNG files in COVID/ and non-COVID/: bright blob = covid, so a model can learn something.

    Modes vary (RGB, greyscale, RGBA) so the pipeline's conversion is exercised too.
    """
    rng = np.random.default_rng(seed)
    files = []
    modes = ["L", "RGB", "RGBA"]
    for label, folder in (("covid", "COVID"), ("non_covid", "non-COVID")):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 60, (size, size), dtype=np.uint8)
            if label == "covid":
                c = size // 2
                img[c - size // 4 : c + size // 4, c - size // 4 : c + size // 4] = 230
            mode = modes[i % len(modes)]
            pil = Image.fromarray(img, "L").convert(mode)
            path = root / folder / f"{folder} ({i + 1}).png"
            pil.save(path)
            files.append(path)
    return files


def split_table(files: list[Path], seed: int = 0) -> pd.DataFrame:
    """A split table with the contract's columns; 2 images per group, groups split 60/20/20."""
    rows = []
    for path in sorted(files):
        with Image.open(path) as im:
            w, h, mode = im.width, im.height, im.mode
        label = "non_covid" if "non" in path.parent.name.lower() else "covid"
        number = int(path.stem.split("(")[-1].rstrip(")")) if "(" in path.stem else len(rows)
        rows.append({
            "path": str(path.resolve()), "label": label, "source": path.parent.name,
            "width": w, "height": h, "mode": mode, "bytes": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "group": f"{path.parent.name}-{(number - 1) // 2}",
        })
    table = pd.DataFrame(rows)
    rng = np.random.default_rng(seed)
    assigned = {}
    for label, part in table.groupby("label"):
        groups = sorted(part["group"].unique())
        rng.shuffle(groups)
        n = len(groups)
        n_val = n_test = max(1, round(n * 0.2))
        for i, g in enumerate(groups):
            assigned[g] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    table["split"] = table["group"].map(assigned)
    return table[SPLIT_COLUMNS]


def make_workdir(tmp: Path, dataset: str = "tiny", files: list[Path] | None = None, **overrides):
    """data/<dataset>/split.csv (+ manifest.csv) under tmp and a Config pointing at it."""
    files = files if files is not None else write_images(tmp / "images")
    table = split_table(files)
    work = tmp / "data"
    (work / dataset).mkdir(parents=True, exist_ok=True)
    table.to_csv(work / dataset / "split.csv", index=False)
    table.drop(columns="split").to_csv(work / dataset / "manifest.csv", index=False)
    settings = {
        "data.workdir": str(work),
        f"data.datasets.{dataset}": {"path": str(tmp / "images"), "subdir": None, "series": True},
        "train.batch_size": 8,
        "train.max_epochs": 1,
        "train.image_size": {"densenet121": 32, "resnet50": 32, "resnet101v2": 32,
                             "vgg16": 32, "inceptionv3": 75},
    }
    settings.update(overrides)
    return load_config(ROOT_PARAMS, settings), table


def save_keras_cache_file(base: keras.Model, path: Path) -> Path:
    """Write weights in the legacy .h5 layout of the files keras.applications downloads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, base)
    return path
