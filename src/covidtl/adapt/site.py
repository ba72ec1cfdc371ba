"""A site's images, as the adaptation methods read them: the unlabelled pool, the labelled rows and
(for the methods that need it) the source model's training split, each refused in one line where
it cannot serve.

`site_rows` ingests a folder the project's way (class folders, patient groups by ingest's rules);
`site_data` checks the rows chosen for adaptation and decodes them at the model's input size and
preprocessing. The learning curve calls `site_data` with rows it drew itself, so nothing else of
the site is decoded.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import tensorflow as tf

from covidtl import paths
from covidtl.adapt.features import BodyFeatures
from covidtl.config import Config, DatasetConfig
from covidtl.data import ingest, tables
from covidtl.data.images import IMAGE_SUFFIXES, measure_or_reason
from covidtl.data.pipeline import decode_image, label_indices, make_dataset
from covidtl.errors import UserError
from covidtl.models.registry import get_spec, preprocess_for
from covidtl.train import rows_of
from covidtl.trained import LoadedModel, scoring_config

# A site image upsampled more than twice to the model's input side holds less detail than the
# network reads: refused. (The synthetic sets' 128 px images go to the custom CNN's 200 px.)
MIN_SIDE_FRACTION = 0.5
ROLES = ("pool", "labelled")


@dataclass(frozen=True)
class Labelled:
    x: np.ndarray  # model inputs (n, side, side, 3), preprocessed as the model was trained
    y: np.ndarray  # class indices in CLASSES order
    groups: np.ndarray  # patient groups (ingest's)


@dataclass(frozen=True)
class SourceSplit:
    """The source model's training rows, streamed (they may not fit in memory)."""
    batches: Callable[[int], Iterator[tuple[np.ndarray, np.ndarray]]]  # batch size -> (x, class indices)
    groups: np.ndarray


@dataclass(frozen=True)
class SiteData:
    pool: np.ndarray  # unlabelled model inputs (labels, where the folder has them, unused)
    labelled: Labelled | None
    images: pd.DataFrame  # path, sha256, role (pool | labelled), label, group: the record
    source: SourceSplit | None = None
    features: BodyFeatures | None = None  # the source model's base features, read once per image


def site_rows(cfg: Config, folder: str | Path, workdir: Path, option: str = "--site",
              series: bool = True, shared_frame: bool = False) -> pd.DataFrame:
    """path, label, group, sha256, width, height per image of `folder`: class folders are ingested
    (patient groups by ingest's series rules); a flat folder's images are unlabelled, one group each."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"{option} {folder}: no such folder; give a folder of site images (class "
                        "folders such as COVID/ and non-COVID/, or a flat folder for the unlabelled methods)")
    if not ingest.class_folders(root, cfg.data.labels):
        return _flat_rows(root, option)
    name = f"site-{root.resolve().name}"
    own = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, workdir=str(workdir), datasets={
        name: DatasetConfig(path=str(root), series=series, shared_frame=shared_frame)}))
    _check_two_classes(root, cfg, option)
    return ingest.run(own, name, progress=False, strict=True).manifest


def _check_two_classes(root: Path, cfg: Config, option: str) -> None:
    present = {label for folder, label in ingest.class_folders(root, cfg.data.labels).items()
               if any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.rglob("*"))}
    if option == "--labelled" and len(present) < 2:
        only = ", ".join(sorted(present)) or "no"
        raise UserError(f"--labelled {root}: holds {only} images only; the labelled methods fit on both "
                        "classes: add a folder of the other class (COVID/ and non-COVID/)")


def _flat_rows(root: Path, option: str) -> pd.DataFrame:
    rows = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        measured = measure_or_reason(path)
        if isinstance(measured, str):
            raise UserError(f"{option} {root}: {path} cannot be read ({measured}); remove or replace it")
        rows.append({"path": str(path.resolve()), "label": None, "group": path.name,
                     "sha256": measured.sha256, "width": measured.width, "height": measured.height})
    if option == "--labelled" or not rows:
        what = "no images" if not rows else "no class folders"
        raise UserError(f"{option} {root}: {what}; give a folder of class folders (COVID/ and non-COVID/)")
    return pd.DataFrame(rows)


def check_sizes(rows: pd.DataFrame, side: int, option: str) -> None:
    """Refuse an image smaller than MIN_SIDE_FRACTION of the model's input side in either dimension."""
    least = int(np.ceil(side * MIN_SIDE_FRACTION))
    small = rows[(rows["width"] < least) | (rows["height"] < least)]
    if len(small):
        first = small.iloc[0]
        raise UserError(f"{option}: {first['path']} is {first['width']}x{first['height']} px, below "
                        f"{least} px (half the model's {side} px input side), and {len(small) - 1} more; "
                        "give the site's images at their scanned size")


def check_no_leak(labelled: pd.DataFrame, exclude: Iterable[str]) -> None:
    """Refuse labelled images that are also in the scoring set (given by path or sha256)."""
    held = {str(e).strip() for e in exclude if str(e).strip()}
    held_paths = {os.path.abspath(e) for e in held}
    leaked = labelled[labelled["sha256"].isin(held) | labelled["path"].map(os.path.abspath).isin(held_paths)]
    if len(leaked):
        raise UserError(f"--labelled: {leaked.iloc[0]['path']} (and {len(leaked) - 1} more) is also in the "
                        "scoring set: a leak; draw the labelled images from outside the images scored")


def model_inputs(cfg: Config, loaded: LoadedModel, rows: pd.DataFrame, batch_size: int = 32) -> np.ndarray:
    """rows' images decoded, resized and preprocessed exactly as `score_rows` feeds the model."""
    side = int(loaded.model.input_shape[1])
    preprocess = preprocess_for(get_spec(loaded.name), scoring_config(cfg, loaded).train.preprocessing)
    ds = tf.data.Dataset.from_tensor_slices(rows["path"].astype(str).to_numpy())
    ds = ds.map(lambda p: decode_image(p, side)).batch(batch_size)
    batches = [np.asarray(preprocess(tf.cast(x, tf.float32))) for x in ds]
    return np.concatenate(batches) if batches else np.zeros((0, side, side, 3), np.float32)


def source_split(cfg: Config, loaded: LoadedModel, method: str) -> SourceSplit:
    """The training split of the dataset the source model was trained on (its card's)."""
    if loaded.dataset is None or loaded.dataset not in cfg.data.datasets:
        raise UserError(f"adapt --method {method}: needs the source model's training split, but its card "
                        f"names no dataset of params.yaml ({loaded.dataset}); give a model trained here "
                        "(models/<cell>) with its card.json")
    rows = rows_of(tables.read_split(cfg, loaded.dataset), "train")
    spec, scoring, side = get_spec(loaded.name), scoring_config(cfg, loaded), int(loaded.model.input_shape[1])

    def batches(batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for x, y in make_dataset(rows, spec, scoring, side, training=False, batch_size=batch_size):
            yield np.asarray(x), np.asarray(y).argmax(axis=1)
    return SourceSplit(batches, rows["group"].astype(str).to_numpy())


def site_data(cfg: Config, loaded: LoadedModel, pool: pd.DataFrame, labelled: pd.DataFrame | None,
              exclude: Iterable[str] = (), source: SourceSplit | None = None) -> SiteData:
    """The adaptation images checked (size, leak) and decoded; only these rows are read."""
    side = int(loaded.model.input_shape[1])
    check_sizes(pool, side, "--site")
    pool_x = model_inputs(cfg, loaded, pool)
    images = [pool.assign(role="pool")]
    fitted = None
    if labelled is not None:
        check_sizes(labelled, side, "--labelled")
        check_no_leak(labelled, exclude)
        fitted = Labelled(model_inputs(cfg, loaded, labelled), label_indices(labelled),
                          labelled["group"].astype(str).to_numpy())
        images.append(labelled.assign(role="labelled"))
    record = pd.concat(images, ignore_index=True)[["path", "sha256", "role", "label", "group"]]
    return SiteData(pool_x, fitted, record, source)


def relative_paths(images: pd.DataFrame, roots: dict[str, Path]) -> pd.DataFrame:
    """The record's paths relative to their folder (portable outputs)."""
    out = images.copy()
    out["path"] = [paths.relative_to_root(p, roots[role]) for p, role in zip(out["path"], out["role"])]
    return out
