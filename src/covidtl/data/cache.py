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

Caches of old manifests, sizes or rules are never read again; `prune` (`covidtl cache prune`)
removes all but the most recently used ones. Each use touches the index, so its modification time
is the cache's last use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from covidtl.files import atomic_path, file_sha256

log = logging.getLogger(__name__)

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


def cached_images(table: pd.DataFrame, image_size: int, root: str | Path) -> Cached:
    """The cache of `table`'s images at `image_size` under `root`, built first if it is missing."""
    key = cache_key(table, image_size)
    npy, index = Path(root) / f"{key}.npy", Path(root) / f"{key}.json"
    record = None
    if npy.exists() and index.exists():
        record, damage = _checked(npy, index)
        if damage:
            log.warning("rebuilding the decode cache: %s", damage)
    if record is None:
        record = build(table, image_size, npy, index)
    else:
        _mark_used(index)
    return Cached(np.load(npy, mmap_mode="r"), np.asarray(record["kept"], dtype=bool), npy)


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
    import tensorflow as tf

    from covidtl.data.pipeline import resize_rgb

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
    from covidtl.data.images import load_rgb

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


@dataclass
class Pruned:
    removed: list[Path]  # the files removed
    kept: int  # caches left
    freed_bytes: int


def prune(root: str | Path, keep: int) -> Pruned:
    """Keep the `keep` most recently used caches under `root`; remove the others, any array whose
    index is missing (a killed build) and the temporary files of builds whose process is gone.
    Run it while no training builds a cache: an array renamed a moment before its index counts as orphaned."""
    if keep < 0:
        raise ValueError(f"keep must be >= 0, not {keep}")
    root = Path(root)
    if not root.is_dir():
        return Pruned([], 0, 0)
    indexes = sorted(_visible(root, "*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    kept_keys = {p.stem for p in indexes[:keep]}
    doomed = list(indexes[keep:])  # the index first: a half-pruned cache never looks complete
    doomed += [p for p in _visible(root, "*.npy") if p.stem not in kept_keys]
    doomed += [p for p in root.glob(".*.tmp*") if not _alive(p)]
    freed = 0
    for path in doomed:
        freed += path.stat().st_size
        path.unlink()
    return Pruned(doomed, len(kept_keys), freed)


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
