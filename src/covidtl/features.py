"""What a frozen network part makes of each image, computed once and kept on disk.

With a base frozen and in inference mode, its output is a fixed function of the preprocessed input:
compute it once per image (or once per augmented copy, each copy drawn with seeds of its own image),
then train the head, or the unfrozen top block, on the stored tensors. Every fold of a
cross-validation and every later run of the same settings reads the same entries.

    <data.workdir>/cache/features/<view digest>/view.json       what the entries are (see `View`);
                                                                its mtime is the unit's last use
    <data.workdir>/cache/features/<view digest>/<sha256>.feat   one image's features

A view is everything that decides an image's features besides its bytes: model, cut layer, the
frozen weights (by the sha256 of their values), input size, preprocessing, the in-model crop and
normalize steps, the decode rules and, for an augmented copy, the augmentation settings, its seed
and the copy's index. A changed setting is another view, so old features are never reused for it.

Each entry holds a sha256 of its payload and its length: a truncated or bit-flipped file is
reported, recomputed and rewritten, never read. Entries are written to a temporary name and renamed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from covidtl.files import atomic_path, json_text

log = logging.getLogger(__name__)

MAGIC = b"covidtl-features v1\n"
ENTRY_SUFFIX = ".feat"
VIEW_FILE = "view.json"
FEATURES_DIR = "features"
CLEAN = 0  # copy index of the image as decoded (validation, test, the linear probe)


@dataclass(frozen=True)
class View:
    """The settings that decide an image's features; `copy` 0 is the image itself, 1..K augmented."""

    model: str
    cut: str  # the layer whose output is stored (`base`: the whole frozen base)
    weights_sha256: str  # of the frozen part's weight values (`values_sha256`), whatever file they came from
    image_size: int
    preprocessing: str
    crop: str
    normalize: str
    decode: str  # how the pixels are made (decode rules; the uint8 cache for augmented copies)
    copy: int = CLEAN
    augment: dict[str, Any] | None = None  # the augmentation settings (seed included) of copies >= 1

    def __post_init__(self) -> None:
        if (self.copy == CLEAN) != (self.augment is None):
            raise ValueError("the clean copy (0) has no augmentation; augmented copies (>= 1) need theirs")

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:32]


def values_sha256(weights: list[np.ndarray]) -> str:
    """sha256 of weight arrays (shapes, dtypes and bytes): the same values give the same digest."""
    digest = hashlib.sha256()
    for array in weights:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


class DamagedEntry(Exception):
    """A feature file that cannot be trusted; the message says why."""


def encode_entry(features: np.ndarray) -> bytes:
    """One entry: magic line, a JSON header (dtype, shape, payload length and sha256), the payload."""
    payload = np.ascontiguousarray(features, dtype=np.float32).tobytes()
    header = {"dtype": "float32", "shape": list(features.shape), "bytes": len(payload),
              "sha256": hashlib.sha256(payload).hexdigest()}
    return MAGIC + json.dumps(header).encode() + b"\n" + payload


def decode_entry(data: bytes) -> np.ndarray:
    """The features an entry holds, or DamagedEntry saying what is wrong with it."""
    if not data.startswith(MAGIC):
        raise DamagedEntry("not a covidtl feature entry (wrong or cut-off header)")
    head_end = data.find(b"\n", len(MAGIC))
    if head_end < 0:
        raise DamagedEntry("its header is cut off")
    try:
        header = json.loads(data[len(MAGIC):head_end])
        shape, expected, digest = tuple(header["shape"]), int(header["bytes"]), header["sha256"]
    except (ValueError, KeyError, TypeError):
        raise DamagedEntry("its header is not readable") from None
    payload = data[head_end + 1:]
    if len(payload) != expected:
        raise DamagedEntry(f"truncated: {len(payload)} of {expected} payload bytes")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise DamagedEntry("checksum mismatch: its bytes changed since they were written")
    return np.frombuffer(payload, dtype=np.float32).reshape(shape)


@dataclass
class Counted:
    """What one `FeatureCache.features` call did: entries read, computed, found damaged."""

    read: int = 0
    computed: int = 0
    damaged: int = 0


class FeatureCache:
    """Feature entries under `root` (<data.workdir>/cache/features), one folder per view."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.counts = Counted()

    def unit(self, view: View) -> Path:
        return self.root / view.digest()

    def entry_path(self, view: View, sha256: str) -> Path:
        return self.unit(view) / f"{sha256}{ENTRY_SUFFIX}"

    def features(
        self, view: View, rows: pd.DataFrame, compute: Callable[[pd.DataFrame, View], np.ndarray],
    ) -> np.ndarray:
        """`rows`' features (in row order) for `view`: read where whole, else `compute(missing_rows,
        view)` (one array, in their order) and written. Rows need a `sha256` column."""
        unit = self._open_unit(view)
        shas = rows["sha256"].astype(str).tolist()
        found: dict[str, np.ndarray] = {}
        for sha in dict.fromkeys(shas):  # each image once, however many rows hold it
            entry = self._read(unit / f"{sha}{ENTRY_SUFFIX}")
            if entry is not None:
                found[sha] = entry
        missing = [i for i, sha in enumerate(shas) if sha not in found]
        if missing:
            todo = rows.iloc[missing].drop_duplicates("sha256")
            computed = compute(todo, view)
            if len(computed) != len(todo):
                raise ValueError(f"compute returned {len(computed)} features for {len(todo)} images")
            for sha, value in zip(todo["sha256"].astype(str), computed):
                self._write(unit / f"{sha}{ENTRY_SUFFIX}", value)
                found[sha] = np.asarray(value, dtype=np.float32)
            self.counts.computed += len(todo)
        self.counts.read += len(shas) - len(missing)
        return np.stack([found[sha] for sha in shas]) if shas else np.zeros((0,), np.float32)

    def _open_unit(self, view: View) -> Path:
        """The view's folder, its view.json written first (a folder without one is an orphan) and
        touched on every use: the last use that pruning goes by."""
        unit = self.unit(view)
        record = unit / VIEW_FILE
        if record.is_file():
            try:
                os.utime(record)
            except OSError:  # a read-only cache still serves its entries
                pass
        else:
            with atomic_path(record) as tmp:
                tmp.write_text(json_text(dataclasses.asdict(view)))
        return unit

    def _read(self, path: Path) -> np.ndarray | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return decode_entry(data)
        except DamagedEntry as exc:
            self.counts.damaged += 1
            log.warning("feature cache: %s is damaged (%s); recomputing it", path, exc)
            return None

    def _write(self, path: Path, features: np.ndarray) -> None:
        with atomic_path(path) as tmp:
            tmp.write_bytes(encode_entry(features))
