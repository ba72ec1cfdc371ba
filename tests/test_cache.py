"""The decoded-image cache: built once, reused, rebuilt when the files change, and the decode's pixels."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from covidtl.config import load_config
from covidtl.data.cache import cache_key, cached_images
from covidtl.data.pipeline import augment_batch, decode_image, make_dataset
from covidtl.models.registry import get_spec
from helpers_train import split_table, write_images

ROOT = Path(__file__).parents[1]


@pytest.fixture
def table(tmp_path):
    return split_table(write_images(tmp_path / "img", per_class=4, size=40))


def config(workdir: Path, **overrides):
    return load_config(ROOT / "params.yaml", {"data.workdir": str(workdir), "train.batch_size": 4, **overrides})


def collect(ds):
    xs, ys = zip(*[(np.asarray(x), np.asarray(y)) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)


def assert_decoded(table, images, size):
    """`images` are what the decode makes of `table`'s files, rounded to uint8."""
    for path, image in zip(table["path"], images, strict=True):
        decoded = decode_image(tf.constant(path), size).numpy()
        np.testing.assert_array_equal(image, np.clip(np.round(decoded), 0, 255).astype(np.uint8))


def test_cache_holds_the_decodes_pixels_rounded(table, tmp_path):
    cached = cached_images(table, 36, tmp_path / "cache")
    assert cached.images.shape == (len(table), 36, 36, 3) and cached.images.dtype == np.uint8
    assert set(table["mode"]) == {"L", "RGB", "RGBA"}
    assert_decoded(table, cached.images, 36)


def test_real_ct_slices_cache_as_they_decode(shared_data, tmp_path):
    files = sorted((shared_data / "sarscov2-ct" / "COVID").glob("*.png"))[:2]
    rows = pd.DataFrame({"path": [str(f) for f in files], "label": "covid"})
    cached = cached_images(rows, 64, tmp_path)
    for path, image in zip(rows["path"], cached.images):
        np.testing.assert_array_equal(image, np.round(decode_image(tf.constant(path), 64).numpy()).astype(np.uint8))


def test_cache_is_built_once_and_reused(table, tmp_path):
    first = cached_images(table, 32, tmp_path / "cache")
    stamp = first.path.stat().st_mtime_ns
    again = cached_images(table, 32, tmp_path / "cache")
    assert again.path == first.path and again.path.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([first.path.name, first.path.stem + ".json"])


def test_a_changed_file_or_size_makes_a_new_cache(table, tmp_path):
    before = cached_images(table, 32, tmp_path)
    assert cache_key(table, 40) != cache_key(table, 32)
    # Re-ingested with one file changed: the manifest's content hash changes, so does the key.
    path = Path(table["path"].iloc[0])
    Image.fromarray(np.full((40, 40), 255, np.uint8)).save(path)
    changed = table.copy()
    changed.loc[0, "sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    after = cached_images(changed, 32, tmp_path)
    assert after.path != before.path
    assert (after.images[0] == 255).all() and not (before.images[0] == 255).all()


def test_a_build_without_its_index_counts_as_unfinished(table, tmp_path):
    """The array is renamed into place first and the index last: an array alone is rebuilt."""
    built = cached_images(table, 32, tmp_path / "cache")
    index = built.path.with_suffix(".json")
    index.unlink()
    built.path.write_bytes(b"half a file")
    rebuilt = cached_images(table, 32, tmp_path / "cache")
    assert index.exists() and rebuilt.images.shape == (len(table), 32, 32, 3)
    assert not [p for p in (tmp_path / "cache").iterdir() if ".tmp" in p.name]  # no temporary left behind


def truncate(npy: Path) -> None:
    npy.write_bytes(npy.read_bytes()[:-100])


def flip_a_pixel(npy: Path) -> None:
    data = bytearray(npy.read_bytes())
    data[-1] ^= 0xFF  # the last image's last pixel: same size, same header
    npy.write_bytes(bytes(data))


def break_the_index(npy: Path) -> None:
    npy.with_suffix(".json").write_text('{"kept": [true, ')


def index_from_before_the_checks(npy: Path) -> None:
    index = npy.with_suffix(".json")
    record = json.loads(index.read_text())
    index.write_text(json.dumps({k: v for k, v in record.items() if k not in ("bytes", "sha256")}))


@pytest.mark.parametrize(("damage", "said"), [
    (truncate, "(truncated)"),
    (flip_a_pixel, "its sha256 is not the one its index records"),
    (break_the_index, "not valid JSON"),
    (index_from_before_the_checks, "records no size and sha256"),
])
def test_a_damaged_cache_is_never_read_but_rebuilt(table, tmp_path, caplog, damage, said):
    root = tmp_path / "cache"
    npy = cached_images(table, 32, root).path
    damage(npy)
    with caplog.at_level(logging.WARNING, logger="covidtl.data.cache"):
        rebuilt = cached_images(table, 32, root)
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and said in warnings[0] and npy.stem in warnings[0], warnings
        assert_decoded(table, rebuilt.images, 32)
        caplog.clear()
        assert cached_images(table, 32, root).path == npy and not caplog.records  # whole again: reused


def test_cached_training_skips_a_corrupt_file_and_says_which(table, tmp_path, caplog):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    rows = pd.concat([table, table.iloc[:1].assign(path=str(broken), sha256="x")], ignore_index=True)
    cfg = config(tmp_path / "work")
    with caplog.at_level(logging.WARNING):
        x, y = collect(make_dataset(rows, get_spec("custom_cnn"), cfg, 32, training=True, cache=True))
    assert len(x) == len(y) == len(table)
    assert str(broken) in caplog.text


def test_cached_evaluation_batches_match_the_decoded_ones(table, tmp_path):
    cfg = config(tmp_path / "work", **{"train.preprocessing": "rescale"})
    spec = get_spec("custom_cnn")
    decoded, y_decoded = collect(make_dataset(table, spec, cfg, 32, training=False))
    cached, y_cached = collect(make_dataset(table, spec, cfg, 32, training=False, cache=True, batch_size=16))
    np.testing.assert_array_equal(y_cached, y_decoded)
    np.testing.assert_allclose(cached, decoded, atol=0.5 / 255 + 1e-6)  # rounding to uint8 only
    assert list((tmp_path / "work" / "cache").glob("*.npy"))


def test_augmentation_flips_exactly_and_is_seeded(table, tmp_path):
    images = tf.constant(cached_images(table, 32, tmp_path).images)
    aug = load_config(ROOT / "params.yaml").augment
    assert (aug.rotation, aug.zoom, aug.horizontal_flip) == (25, 0.2, True)  # the paper's
    flip_only = dataclasses.replace(aug, rotation=0, zoom=0.0)
    out = augment_batch(images, flip_only, (1, 2)).numpy()
    flipped = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images.numpy())]
    same = [np.array_equal(o, i) for o, i in zip(out, images.numpy())]
    assert all(f or s for f, s in zip(flipped, same)) and any(flipped) and any(same)

    full = augment_batch(images, aug, (1, 2)).numpy()
    np.testing.assert_array_equal(full, augment_batch(images, aug, (1, 2)).numpy())
    assert not np.array_equal(full, augment_batch(images, aug, (1, 3)).numpy())
    assert full.dtype == np.uint8 and not np.array_equal(full, images.numpy())


def test_prune_keeps_the_most_recently_used_caches(table, tmp_path):
    import os

    from click.testing import CliRunner

    from covidtl.cli import main
    from covidtl.data.cache import prune

    root = tmp_path / "data" / "cache"
    old, middle, new = (cached_images(table, size, root) for size in (20, 24, 28))
    for age, cached in ((300, old), (200, middle), (100, new)):
        stamp = cached.path.stat().st_mtime - age
        os.utime(cached.path.with_suffix(".json"), (stamp, stamp))
    cached_images(table, 20, root)  # reused: now the most recently used
    orphan = root / ("0" * 64 + ".npy")  # an array whose index a killed build never wrote
    orphan.write_bytes(b"x")
    dead_tmp = root / ".abc.tmp999999999.npy"
    dead_tmp.write_bytes(b"x")

    pruned = prune(root, keep=2)
    assert pruned.kept == 2
    assert sorted(p.name for p in pruned.removed) == sorted(
        [middle.path.name, middle.path.with_suffix(".json").name, orphan.name, dead_tmp.name])
    assert old.path.exists() and new.path.exists()
    again = cached_images(table, 20, root)
    assert again.path == old.path  # the kept cache is still whole: reused, not rebuilt

    result = CliRunner().invoke(main, ["-S", f"data.workdir={tmp_path / 'data'}", "cache", "prune", "--keep", "0"])
    assert result.exit_code == 0, result.output
    assert "removed 4 files" in result.output and not list(root.iterdir())
