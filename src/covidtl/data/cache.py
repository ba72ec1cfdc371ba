"""Decode and resize each image once: a memory-mapped uint8 array at the model's input size.

Training used to decode every PNG again in every epoch (Pillow + resize: ~100 images/s on two
cores, slower than the custom CNN's own step). The cache holds what `pipeline.decode_image` makes
of each file, rounded to uint8 (as the offline augmented set always stored it), in
``<data.workdir>/cache/<key>.npy`` with ``<key>.json`` listing the rows it holds. The key covers
the files (path and content hash from the manifest), the size and the decode rules, so a changed
manifest, size or rule builds a new cache and an unchanged one is reused by every run.

The index also records the array's size and sha256, and each use checks both: a truncated or
altered array (or an index that is not valid JSON, or one written before these checks) is never
read but rebuilt, with one warning naming the file. The check reads the array once per run: its
sha256 took 0.18 s for 1,762 images at 224 px (265 MB in the page cache; ~1 s from this machine's
disk, pages the first epoch then finds cached), against ~34 s to build it.

Caches of old manifests, sizes or rules are never read again. They share one budget,
`cache.max_gb`, with the feature caches of frozen backbones in the same root (one folder per view,
``features/<view digest>/``): after each build `enforce_budget` removes the least recently used
units past it, never one the running process uses; `prune` (`covidtl cache prune`) does the same
on demand, with a count beside the size. Each use touches the index (a feature view: its
view.json), so its modification time is the unit's last use.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from covidtl import locks
from covidtl.data.images import load_rgb
from covidtl.files import atomic_path, file_sha256

if TYPE_CHECKING:
    from covidtl.config import Config

log = logging.getLogger(__name__)

def cache_dir(cfg: Config) -> Path:
    """Where decoded images are cached: git-ignored, beside the dataset's other derived files."""
    return Path(cfg.data.workdir) / "cache"


def resize_rgb(image, image_size: int):
    """uint8 RGB (h, w, 3) -> float32 RGB in [0, 255] at image_size x image_size (bilinear)."""
    import tensorflow as tf  # here, not above: `covidtl cache prune` loads this module without TensorFlow

    image = tf.image.resize(tf.ensure_shape(image, (None, None, 3)), (image_size, image_size))
    image.set_shape((image_size, image_size, 3))
    return image


# Bump when decode_image changes what it makes of a file: every cache then rebuilds.
DECODE_RULES = "pillow load_rgb, tf.image.resize bilinear, round to uint8; v1"


@dataclass
class Cached:
    """A built cache: the images of the rows that decoded (in table order) and which rows those are."""

    images: np.ndarray  # (n, size, size, 3) uint8, memory-mapped
    kept: np.ndarray  # bool per table row: False for a file that failed to decode
    path: Path


def cache_key(table: pd.DataFrame, image_size: int) -> str:
    """sha256 of the rows' files (by content hash when the manifest has one), the size and the rules."""
    digest = hashlib.sha256(f"{DECODE_RULES}\n{image_size}\n".encode())
    hashes = table["sha256"] if "sha256" in table else [_file_stamp(p) for p in table["path"]]
    for path, content in zip(table["path"], hashes):
        digest.update(f"{path}\t{content}\n".encode())
    return digest.hexdigest()


def cached_images(table: pd.DataFrame, image_size: int, cfg: Config) -> Cached:
    """The cache of `table`'s images at `image_size` under `cfg`'s cache root; built first if it is
    missing or damaged, then the root pruned to `cache.max_gb`."""
    key = cache_key(table, image_size)
    npy, index = cache_dir(cfg) / f"{key}.npy", cache_dir(cfg) / f"{key}.json"
    _in_use.add(npy.resolve())
    record = _whole(npy, index, warn=True)
    if record is None:
        # One build per cache: a second process that needs it (another cell of the dataset) waits
        # for the first, then reads what it built.
        with locks.hold(npy, "a decode-cache build", wait=True):
            record = _whole(npy, index)
            if record is None:
                record = build(table, image_size, npy, index)
                enforce_budget(cfg, protect=[npy])
    _mark_used(index)
    return Cached(np.load(npy, mmap_mode="r"), np.asarray(record["kept"], dtype=bool), npy)


def _whole(npy: Path, index: Path, warn: bool = False) -> dict | None:
    """The index of a whole cache there now, else None (with `warn`, saying why a damaged one is rebuilt)."""
    if not (npy.exists() and index.exists()):
        return None
    record, damage = _checked(npy, index)
    if damage and warn:
        log.warning("rebuilding the decode cache: %s", damage)
    return record


def _checked(npy: Path, index: Path) -> tuple[dict | None, str | None]:
    """The index of a whole cache, or None and what is wrong: the array is read only if its size
    and sha256 are the ones its index recorded."""
    try:
        record = json.loads(index.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, f"{index}: not valid JSON (a damaged index)"
    if not isinstance(record, dict) or not {"bytes", "sha256", "kept"} <= record.keys():
        return None, f"{index}: records no size and sha256 of its array (written before they were checked)"
    size = npy.stat().st_size
    if size != record["bytes"]:
        what = "truncated" if size < record["bytes"] else "longer than built"
        return None, f"{npy}: {size} bytes where its index records {record['bytes']} ({what})"
    if file_sha256(npy) != record["sha256"]:
        return None, f"{npy}: its sha256 is not the one its index records (its bytes changed since the build)"
    return record, None


def build(table: pd.DataFrame, image_size: int, npy: Path, index: Path) -> dict:
    """Decode every row in parallel into a temporary file, then rename; the index (returned) is
    written last, so a killed build leaves no cache that looks complete."""
    import tensorflow as tf  # here, not above: `covidtl cache prune` loads this module without TensorFlow

    paths = table["path"].astype(str).tolist()
    log.info("caching %d images at %d px in %s", len(paths), image_size, npy)

    def decode(path):
        image, ok = tf.numpy_function(_try_load, [path], (tf.uint8, tf.bool), stateful=False)
        resized = tf.cond(ok, lambda: resize_rgb(image, image_size),
                          lambda: tf.zeros((image_size, image_size, 3)))
        return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8), ok

    ds = tf.data.Dataset.from_tensor_slices(paths).map(
        decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(64).prefetch(2)
    kept: list[bool] = []
    with atomic_path(npy) as tmp:
        images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                           shape=(len(paths), image_size, image_size, 3))
        n = 0
        for batch, ok in ds:
            batch, ok = batch.numpy(), ok.numpy()
            good = batch[ok]
            images[n : n + len(good)] = good
            n += len(good)
            kept.extend(ok.tolist())
        images.flush()
        del images
        if n < len(paths):  # rows that failed were left out: shrink to the rows kept
            _truncate(tmp, n)
        # Of the final bytes, before the rename: the index never vouches for an array it did not see.
        written = {"bytes": tmp.stat().st_size, "sha256": file_sha256(tmp)}
    record = {"rules": DECODE_RULES, "size": image_size, "paths": paths, "kept": kept, **written}
    with atomic_path(index) as tmp:
        tmp.write_text(json.dumps(record))
    return record


def _try_load(path) -> tuple[np.ndarray, np.bool_]:
    name = os.fsdecode(np.asarray(path).item())
    try:
        return np.asarray(load_rgb(name), dtype=np.uint8), np.bool_(True)
    except Exception as exc:  # noqa: BLE001 - any file that cannot be decoded is skipped the same way
        log.warning("skipping %s: cannot be decoded (%s)", name, exc)
        return np.zeros((1, 1, 3), dtype=np.uint8), np.bool_(False)


def _truncate(npy: Path, n: int) -> None:
    full = np.load(npy, mmap_mode="r")
    part = np.array(full[:n])
    del full
    np.save(npy, part)


def _mark_used(index: Path) -> None:
    try:
        os.utime(index)
    except OSError:  # a read-only workdir still reads its caches; only pruning loses the order
        pass


# The feature caches of frozen backbones (their own module) share the root and the budget: each
# view is one unit, features/<view digest>/, whose view.json marks it whole and, by its modification
# time, says when it was last used.
FEATURES = "features"
VIEW_FILE = "view.json"
# While other processes run, an orphan this young may be a unit between its two writes (array then
# index, folder then view.json), not a killed one: the budget leaves it; `covidtl cache prune` does not.
ORPHAN_AGE_S = 3600.0
KINDS = {"decode": "decode caches", "feature": "feature views", "orphan": "orphans",
         "temporary": "temporary files"}

# Decode caches this process has opened: its own budget never removes them under it.
_in_use: set[Path] = set()


@dataclass(frozen=True)
class Unit:
    """What pruning removes whole: a decode cache (its .npy and index) or a feature view (its folder)."""

    kind: str  # "decode" or "feature"
    path: Path  # the .npy, or the view's folder
    bytes: int
    last_used: float  # modification time of the index, or of view.json


@dataclass
class Removed:
    """What one prune removed of one kind."""

    count: int = 0  # units, orphans or temporary files
    files: int = 0
    bytes: int = 0


@dataclass
class Pruned:
    removed: list[Path] = field(default_factory=list)  # files; a feature view or orphan folder as one path
    by_kind: dict[str, Removed] = field(default_factory=lambda: {kind: Removed() for kind in KINDS})
    kept: int = 0  # units left
    kept_bytes: int = 0

    @property
    def freed_bytes(self) -> int:
        return sum(r.bytes for r in self.by_kind.values())

    @property
    def files(self) -> int:
        return sum(r.files for r in self.by_kind.values())

    def summary(self) -> str:
        return ", ".join(f"{KINDS[k]} {r.count} ({r.bytes / 1e6:.1f} MB)" for k, r in self.by_kind.items())


def list_units(root: str | Path) -> list[Unit]:
    """Every whole unit under `root` (decode caches and feature views), least recently used first."""
    root = Path(root)
    found = [_decode_unit(index) for index in _visible(root, "*.json")]
    found += [_feature_unit(view) for view in (root / FEATURES).glob(f"*/{VIEW_FILE}")]
    return sorted((unit for unit in found if unit is not None), key=lambda unit: unit.last_used)


def prune(root: str | Path, keep: int | None = None, max_bytes: int | None = None,
          protect: Iterable[str | Path] = (), orphan_age: float = 0.0) -> Pruned:
    """Remove the least recently used units under `root` until at most `keep` remain within `max_bytes`
    (None: no limit), never one in `protect` (a .npy or a view's folder); also the temporary files of
    dead processes and orphans (an array without its index or the reverse, a view folder without
    view.json) at least `orphan_age` seconds old: with 0, run it while no process builds a cache."""
    for name, value in (("keep", keep), ("max_bytes", max_bytes)):
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0, not {value}")
    root, pruned = Path(root), Pruned()
    if not root.is_dir():
        return pruned
    for path in _dead_temporaries(root):
        _remove(pruned, "temporary", [path])
    for path in _orphans(root, orphan_age):
        _remove(pruned, "orphan", [path])
    units = list_units(root)
    protected = {Path(p).resolve() for p in protect}
    count, total = len(units), sum(unit.bytes for unit in units)
    for unit in units:
        if not ((keep is not None and count > keep) or (max_bytes is not None and total > max_bytes)):
            break
        if unit.path.resolve() in protected:
            continue
        # The marker first: a unit pruned halfway never looks whole.
        marker = unit.path.with_suffix(".json") if unit.kind == "decode" else unit.path / VIEW_FILE
        _remove(pruned, unit.kind, [marker, unit.path])
        count, total = count - 1, total - unit.bytes
    pruned.kept, pruned.kept_bytes = count, total
    return pruned


def budget_bytes(max_gb: float) -> int | None:
    """`cache.max_gb` in bytes (GB = 10^9), None for 0 (no limit)."""
    return None if max_gb == 0 else int(max_gb * 1e9)


def enforce_budget(cfg: Config, protect: Iterable[str | Path] = ()) -> Pruned:
    """Prune `cfg`'s cache root to `cache.max_gb`, least recently used first, never a unit in
    `protect` or a decode cache this process opened. Walks every file of the feature views."""
    limit = budget_bytes(cfg.cache.max_gb)
    if limit is None:
        return Pruned()
    pruned = prune(cache_dir(cfg), max_bytes=limit, protect=[*protect, *_in_use], orphan_age=ORPHAN_AGE_S)
    if pruned.removed:
        log.info("cache.max_gb %g: removed %s", cfg.cache.max_gb, pruned.summary())
    if pruned.kept_bytes > limit:
        log.warning("cache.max_gb: the caches this run uses hold %.2f GB, over the budget of %g GB; "
                    "set a larger cache.max_gb (0 = no limit)", pruned.kept_bytes / 1e9, cfg.cache.max_gb)
    return pruned


def _decode_unit(index: Path) -> Unit | None:
    npy = index.with_suffix(".npy")
    try:
        st = index.stat()
        return Unit("decode", npy, npy.stat().st_size + st.st_size, st.st_mtime)
    except FileNotFoundError:  # an index without its array (an orphan), or removed meanwhile
        return None


def _feature_unit(view: Path) -> Unit | None:
    try:
        used = view.stat().st_mtime
    except FileNotFoundError:  # removed meanwhile
        return None
    size = 0
    for folder, _, names in os.walk(view.parent):
        for name in names:
            with contextlib.suppress(FileNotFoundError):  # an entry replaced meanwhile
                size += os.lstat(os.path.join(folder, name)).st_size
    return Unit("feature", view.parent, size, used)


def _orphans(root: Path, min_age: float) -> list[Path]:
    """What killed builds leave: arrays without their index and the reverse, view folders without view.json."""
    arrays = {p.stem: p for p in _visible(root, "*.npy")}
    indexes = {p.stem: p for p in _visible(root, "*.json")}
    lone = [p for stem, p in arrays.items() if stem not in indexes]
    lone += [p for stem, p in indexes.items() if stem not in arrays]
    features = root / FEATURES
    if features.is_dir():
        lone += [p for p in features.iterdir() if p.is_dir() and not (p / VIEW_FILE).exists()]
    now = time.time()
    return [p for p in lone if now - _mtime(p, default=now) >= min_age]


def _dead_temporaries(root: Path) -> list[Path]:
    found = list(root.glob(".*.tmp*"))
    if (root / FEATURES).is_dir():
        found += (root / FEATURES).rglob(".*.tmp*")
    return [p for p in found if p.is_file() and not _alive(p)]


def _remove(pruned: Pruned, kind: str, paths: list[Path]) -> None:
    """Remove `paths` in order (files or folders), counted as one of `kind`."""
    tally = pruned.by_kind[kind]
    tally.count += 1
    for path in paths:
        files, size = _delete(path)
        tally.files, tally.bytes = tally.files + files, tally.bytes + size
        pruned.removed.append(path)


def _delete(path: Path) -> tuple[int, int]:
    """Remove a file or a whole folder: the files and bytes it held (nothing if already gone)."""
    if not path.is_dir() or path.is_symlink():
        try:
            size = path.lstat().st_size
        except FileNotFoundError:
            return 0, 0
        path.unlink(missing_ok=True)
        return 1, size
    files = size = 0
    for folder, _, names in os.walk(path, topdown=False):
        for name in names:
            n, s = _delete(Path(folder, name))
            files, size = files + n, size + s
        try:
            os.rmdir(folder)
        except FileNotFoundError:
            pass
        except OSError as exc:  # an entry written meanwhile: without its view.json the folder is an
            if exc.errno != errno.ENOTEMPTY:  # orphan, which the next prune removes
                raise
    return files, size


def _mtime(path: Path, default: float) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return default


def _visible(root: Path, pattern: str) -> list[Path]:
    """Caches and their indexes; pathlib's glob also matches the hidden temporary files."""
    return [p for p in root.glob(pattern) if not p.name.startswith(".")]


def _alive(tmp: Path) -> bool:
    """Whether the process that writes this temporary file (atomic_path names it by pid) still runs."""
    pid = tmp.name.split(".tmp")[-1].split(".")[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _file_stamp(path: str) -> str:
    """Without the manifest's hash (a table made by hand): size and modification time."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"
