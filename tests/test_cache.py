"""The decoded-image cache: built once, reused, rebuilt when the files change, and the decode's pixels."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
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
    cached = cached_images(table, 36, config(tmp_path))
    assert cached.images.shape == (len(table), 36, 36, 3) and cached.images.dtype == np.uint8
    assert set(table["mode"]) == {"L", "RGB", "RGBA"}
    assert_decoded(table, cached.images, 36)


def test_real_ct_slices_cache_as_they_decode(shared_data, tmp_path):
    files = sorted((shared_data / "sarscov2-ct" / "COVID").glob("*.png"))[:2]
    rows = pd.DataFrame({"path": [str(f) for f in files], "label": "covid"})
    cached = cached_images(rows, 64, config(tmp_path))
    for path, image in zip(rows["path"], cached.images):
        np.testing.assert_array_equal(image, np.round(decode_image(tf.constant(path), 64).numpy()).astype(np.uint8))


def test_cache_is_built_once_and_reused(table, tmp_path):
    first = cached_images(table, 32, config(tmp_path))
    stamp = first.path.stat().st_mtime_ns
    again = cached_images(table, 32, config(tmp_path))
    assert again.path == first.path and again.path.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([first.path.name, first.path.stem + ".json"])


def test_a_changed_file_or_size_makes_a_new_cache(table, tmp_path):
    before = cached_images(table, 32, config(tmp_path))
    assert cache_key(table, 40) != cache_key(table, 32)
    # Re-ingested with one file changed: the manifest's content hash changes, so does the key.
    path = Path(table["path"].iloc[0])
    Image.fromarray(np.full((40, 40), 255, np.uint8)).save(path)
    changed = table.copy()
    changed.loc[0, "sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    after = cached_images(changed, 32, config(tmp_path))
    assert after.path != before.path
    assert (after.images[0] == 255).all() and not (before.images[0] == 255).all()


def test_a_build_without_its_index_counts_as_unfinished(table, tmp_path):
    """The array is renamed into place first and the index last: an array alone is rebuilt."""
    built = cached_images(table, 32, config(tmp_path))
    index = built.path.with_suffix(".json")
    index.unlink()
    built.path.write_bytes(b"half a file")
    rebuilt = cached_images(table, 32, config(tmp_path))
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
    cfg = config(tmp_path)
    npy = cached_images(table, 32, cfg).path
    damage(npy)
    with caplog.at_level(logging.WARNING, logger="covidtl.data.cache"):
        rebuilt = cached_images(table, 32, cfg)
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and said in warnings[0] and npy.stem in warnings[0], warnings
        assert_decoded(table, rebuilt.images, 32)
        caplog.clear()
        assert cached_images(table, 32, cfg).path == npy and not caplog.records  # whole again: reused


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
    images = tf.constant(cached_images(table, 32, config(tmp_path)).images)
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
    from click.testing import CliRunner

    from covidtl.cli import main
    from covidtl.data.cache import prune

    cfg = config(tmp_path / "data")
    root = tmp_path / "data" / "cache"
    old, middle, new = (cached_images(table, size, cfg) for size in (20, 24, 28))
    for age, cached in ((300, old), (200, middle), (100, new)):
        stamp = cached.path.stat().st_mtime - age
        os.utime(cached.path.with_suffix(".json"), (stamp, stamp))
    cached_images(table, 20, cfg)  # reused: now the most recently used
    orphan = root / ("0" * 64 + ".npy")  # an array whose index a killed build never wrote
    orphan.write_bytes(b"x")
    dead_tmp = root / ".abc.tmp999999999.npy"
    dead_tmp.write_bytes(b"x")

    pruned = prune(root, keep=2)
    assert pruned.kept == 2
    assert sorted(p.name for p in pruned.removed) == sorted(
        [middle.path.name, middle.path.with_suffix(".json").name, orphan.name, dead_tmp.name])
    assert old.path.exists() and new.path.exists()
    again = cached_images(table, 20, cfg)
    assert again.path == old.path  # the kept cache is still whole: reused, not rebuilt

    result = CliRunner().invoke(main, ["-S", f"data.workdir={tmp_path / 'data'}", "cache", "prune", "--keep", "0"])
    assert result.exit_code == 0, result.output
    assert "removed 4 files" in result.output and not list(root.iterdir())


# --------------------------------------------------------------------------- one budget for both kinds

VIEW_TEXT = '{"backbone": "densenet121", "size": 224}'


def make_view(root: Path, name: str, entries: dict[str, int], age: float) -> tuple[Path, int]:
    """A feature view as the feature cache lays it out: entries of the given sizes, view.json last
    used `age` seconds ago; the folder and its bytes."""
    folder = root / "features" / name
    for relative, size in entries.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(b"f" * size)
    (folder / "view.json").write_text(VIEW_TEXT)
    backdate(folder / "view.json", age)
    return folder, len(VIEW_TEXT) + sum(entries.values())


def make_decode_unit(root: Path, key: str, size: int, age: float) -> Path:
    """A decode cache's two files made by hand (never read here, only listed and pruned)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{key}.npy").write_bytes(b"d" * size)
    (root / f"{key}.json").write_text("{}")
    backdate(root / f"{key}.json", age)
    return root / f"{key}.npy"


def backdate(path: Path, age: float) -> None:
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))


def entry(n: int) -> str:
    return f"{n:064x}.feat"


def test_prune_takes_the_least_recently_used_of_both_kinds_and_never_a_protected_one(table, tmp_path):
    from covidtl.data.cache import list_units, prune

    cfg = config(tmp_path)
    root = tmp_path / "cache"
    f_oldest, f_oldest_bytes = make_view(root, "a" * 64, {entry(1): 30_000}, age=500)
    d_old = cached_images(table, 20, cfg).path
    backdate(d_old.with_suffix(".json"), 400)
    f_protected, f_protected_bytes = make_view(root, "b" * 64, {entry(2): 40_000, f"sub/{entry(3)}": 10_000}, age=300)
    d_new = cached_images(table, 24, cfg).path
    backdate(d_new.with_suffix(".json"), 200)
    live_tmp = f".{entry(5)}.tmp{os.getpid()}.feat"  # an entry this process is writing: stays
    f_new, f_new_bytes = make_view(root, "c" * 64, {entry(4): 10_000, live_tmp: 500}, age=100)
    orphan = root / "features" / ("d" * 64)  # its creation was killed before view.json
    (orphan / "sub").mkdir(parents=True)
    (orphan / "sub" / entry(6)).write_bytes(b"f" * 700)
    dead_tmp = f_protected / f".{entry(7)}.tmp999999999.feat"
    dead_tmp.write_bytes(b"f" * 300)

    units = list_units(root)
    assert [(u.kind, u.path) for u in units] == [
        ("feature", f_oldest), ("decode", d_old), ("feature", f_protected), ("decode", d_new), ("feature", f_new)]
    decode_bytes = {p: p.stat().st_size + p.with_suffix(".json").stat().st_size for p in (d_old, d_new)}
    assert [u.bytes for u in units] == [f_oldest_bytes, decode_bytes[d_old], f_protected_bytes + 300,
                                        decode_bytes[d_new], f_new_bytes]

    # Over by more than the two oldest: the protected view is skipped, the next decode cache goes.
    total = sum(u.bytes for u in units) - 300  # the dead temporary file goes first
    pruned = prune(root, max_bytes=total - f_oldest_bytes - decode_bytes[d_old] - 1, protect=[f_protected])
    assert not f_oldest.exists() and not d_old.exists() and not d_new.exists() and not orphan.exists()
    assert not d_old.with_suffix(".json").exists() and not dead_tmp.exists()
    assert (f_protected / entry(2)).exists() and (f_new / live_tmp).exists()
    counts = {kind: (r.count, r.bytes) for kind, r in pruned.by_kind.items()}
    assert counts == {"decode": (2, sum(decode_bytes.values())), "feature": (1, f_oldest_bytes),
                      "orphan": (1, 700), "temporary": (1, 300)}
    assert (pruned.kept, pruned.kept_bytes) == (2, f_protected_bytes + f_new_bytes)
    assert [u.path for u in list_units(root)] == [f_protected, f_new]

    # --keep counts units of both kinds; the protected one stays even when it is the oldest.
    assert prune(root, keep=1, protect=[f_protected]).kept == 1
    assert f_protected.exists() and not f_new.exists()


def test_a_build_over_the_budget_prunes_the_oldest_but_never_a_cache_of_this_run(table, tmp_path, caplog):
    from click.testing import CliRunner

    from covidtl.cli import main

    root = tmp_path / "cache"
    f_old, _ = make_view(root, "a" * 64, {entry(1): 20_000}, age=1000)
    d_hand = make_decode_unit(root, "e" * 64, 4_000, age=800)
    f_young, _ = make_view(root, "b" * 64, {entry(2): 20_000}, age=500)
    young_orphan = root / "features" / ("c" * 64)  # maybe another process creating its view: left
    young_orphan.mkdir()

    # Room for the new cache (its array, its index of ~1 kB) and the youngest view, not one more.
    budget = (len(table) * 32 * 32 * 3 + 128) + (len(VIEW_TEXT) + 20_000) + 3_000
    built = cached_images(table, 32, config(tmp_path, **{"cache.max_gb": budget / 1e9})).path
    assert built.exists() and f_young.exists() and young_orphan.exists()
    assert not f_old.exists() and not d_hand.exists() and not d_hand.with_suffix(".json").exists()

    # A budget below this run's own caches: they stay (the first is still in use), with one warning.
    with caplog.at_level(logging.WARNING, logger="covidtl.data.cache"):
        second = cached_images(table, 36, config(tmp_path, **{"cache.max_gb": 1e3 / 1e9})).path
    assert built.exists() and second.exists() and not f_young.exists()
    assert "cache.max_gb: the caches this run uses hold" in caplog.text and "set a larger cache.max_gb" in caplog.text

    # On demand: the same budget from the command line, orphans of any age, per kind.
    # 50 kB: room for the newer decode cache (~32 kB) only.
    result = CliRunner().invoke(main, ["-S", f"data.workdir={tmp_path}", "cache", "prune", "--max-gb", "0.00005"])
    assert result.exit_code == 0, result.output
    assert "decode caches 1 (" in result.output and "feature views 0 (" in result.output
    assert "orphans 1 (" in result.output and "kept 1 caches" in result.output
    assert second.exists() and not built.exists() and not young_orphan.exists()

    bad = CliRunner().invoke(main, ["-S", f"data.workdir={tmp_path}", "cache", "prune", "--max-gb", "-1"])
    assert bad.exit_code == 2 and bad.stderr == "Error: cache.max_gb: -1.0 must be >= 0\n"
