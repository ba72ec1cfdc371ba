"""`covidtl augment`: a seeded uint8 copy of the training split only, per input size, readable by training."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from covidtl.cli import main
from covidtl.config import load_config

PARAMS = Path(__file__).parents[1] / "params.yaml"
SIZES = ["-S", "study.models=[custom_cnn, vgg16]", "-S", "train.image_size={custom_cnn: 32, vgg16: 40}"]


@pytest.fixture
def split_dir(tmp_path, monkeypatch):
    """data/ct/split.csv over 12 small PNGs (greyscale and RGB), plus one corrupt training file."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        label = "covid" if i % 2 else "non_covid"
        split = "train" if i < 8 else ("val" if i < 10 else "test")
        path = tmp_path / "images" / f"{label}_{i}.png"
        path.parent.mkdir(exist_ok=True)
        mode = "L" if i % 3 else "RGB"
        shape = (48, 64) if mode == "L" else (48, 64, 3)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(path)
        rows.append({"path": str(path), "label": label, "group": str(i), "split": split})
    broken = tmp_path / "images" / "covid_broken.png"
    broken.write_bytes(b"not a png")
    rows.append({"path": str(broken), "label": "covid", "group": "b", "split": "train"})
    (tmp_path / "data" / "ct").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(tmp_path / "data" / "ct" / "split.csv", index=False)
    return tmp_path


def _augment(*extra: str) -> None:
    result = CliRunner().invoke(main, ["--params", str(PARAMS), *SIZES, *extra, "augment", "ct"])
    assert result.exit_code == 0, result.output


def _digest(root: Path) -> dict[str, str]:
    out = root / "data" / "ct" / "augmented"
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*")) if p.is_file()}


def test_augment_training_split_only_per_size_and_deterministic(split_dir):
    _augment("-S", "augment.copies_per_image=3")
    out = split_dir / "data" / "ct" / "augmented"
    manifest = pd.read_csv(out / "manifest.csv")
    split = pd.read_csv(split_dir / "data" / "ct" / "split.csv")
    train_paths = set(split.loc[split["split"] == "train", "path"]) - {str(split_dir / "images" / "covid_broken.png")}
    # Only the 8 readable training images, 3 copies each, at both sizes; the corrupt one skipped.
    assert set(manifest["source_path"]) == train_paths
    assert manifest.groupby("size").size().to_dict() == {32: 24, 40: 24}
    assert sorted(manifest["copy"].unique()) == [0, 1, 2]
    for size in (32, 40):
        images = np.load(out / f"{size}/images.npy", mmap_mode="r")
        assert images.shape == (24, size, size, 3) and images.dtype == np.uint8
        # Copies are augmented differently from each other.
        first = manifest[(manifest["size"] == size) & (manifest["copy"] == 0)]["offset"].iloc[0]
        second = manifest[(manifest["size"] == size) & (manifest["copy"] == 1)]["offset"].iloc[0]
        assert not np.array_equal(images[first], images[second])

    before = _digest(split_dir)
    _augment("-S", "augment.copies_per_image=3")
    assert _digest(split_dir) == before  # same params, same bytes: DVC sees no change
    _augment("-S", "augment.copies_per_image=3", "-S", "augment.seed=99")
    assert _digest(split_dir)["32/images.npy"] != before["32/images.npy"]


def test_augment_cap_and_offline_dataset(split_dir):
    _augment("-S", "augment.copies_per_image=4", "-S", "augment.max_images=10")
    manifest = pd.read_csv(split_dir / "data" / "ct" / "augmented" / "manifest.csv")
    assert manifest.groupby("size").size().to_dict() == {32: 10, 40: 10}
    # Copy-major order: the cap keeps every image's first copy before any second copy.
    assert (manifest[manifest["size"] == 32]["copy"].value_counts().sort_index().tolist()) == [8, 2]

    from covidtl.data.augment import load_offline_dataset

    cfg = load_config(PARAMS, {"train.image_size": {"custom_cnn": 32, "vgg16": 40}})
    items = list(load_offline_dataset(cfg, "ct", 40).as_numpy_iterator())
    assert len(items) == 10
    assert all(img.shape == (40, 40, 3) and img.dtype == np.uint8 for img, _ in items)
    expected = sorted(manifest[manifest["size"] == 40]["label"].map({"non_covid": 0, "covid": 1}))
    assert sorted(int(y) for _, y in items) == expected


def test_training_reads_the_offline_set_when_mode_is_offline(split_dir):
    """augment.mode=offline: train's input pipeline batches the stored copies, preprocessed, one-hot."""
    from covidtl.data.augment import make_offline_dataset
    from covidtl.models.registry import get_spec

    _augment("-S", "augment.copies_per_image=2")
    cfg = load_config(PARAMS, {"train.image_size": {"custom_cnn": 32, "vgg16": 40}, "augment.mode": "offline",
                               "train.batch_size": 5, "train.preprocessing": "rescale"})
    batches = list(make_offline_dataset(cfg, "ct", get_spec("vgg16"), 40).as_numpy_iterator())
    images = np.concatenate([x for x, _ in batches])
    labels = np.concatenate([y for _, y in batches])
    assert images.shape == (16, 40, 40, 3) and labels.shape == (16, 2)
    assert images.dtype == np.float32 and 0.0 <= images.min() and images.max() <= 1.0
    stored = np.load(split_dir / "data" / "ct" / "augmented" / "40" / "images.npy")
    assert np.isclose(np.sort(images.ravel()), np.sort(stored.ravel() / 255.0)).all()  # the same pixels, shuffled


def test_augment_errors_name_the_fix(split_dir):
    from covidtl.data.augment import load_offline_dataset

    cfg = load_config(PARAMS)
    result = CliRunner().invoke(main, ["--params", str(PARAMS), "augment", "xray"])
    assert result.exit_code == 2 and "covidtl split xray" in result.output
    with pytest.raises(Exception, match="covidtl augment ct"):
        load_offline_dataset(cfg, "ct", 32)


def test_augmented_manifest_names_sources_relative_to_the_dataset_root(split_dir):
    """Images under the dataset root are stored relative to it; read back, they open."""
    from covidtl.data import tables

    split = pd.read_csv(split_dir / "data" / "ct" / "split.csv")
    split["path"] = [Path(p).name for p in split["path"]]  # as `covidtl split` now writes them
    split.to_csv(split_dir / "data" / "ct" / "split.csv", index=False)
    root = ["-S", "data.datasets.ct.path=images"]
    result = CliRunner().invoke(main, ["--params", str(PARAMS), *SIZES, *root, "-S", "augment.copies_per_image=1",
                                       "augment", "ct", "--size", "32"])
    assert result.exit_code == 0, result.output
    stored = pd.read_csv(split_dir / "data" / "ct" / "augmented" / "manifest.csv")
    assert set(stored["source_path"]) == {f"{label}_{i}.png" for i, label in
                                          enumerate(["non_covid", "covid"] * 4)}
    cfg = load_config(PARAMS, {"data.datasets.ct.path": "images"})
    read = tables.read_augmented_manifest(cfg, "ct")
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in read["source_path"])
