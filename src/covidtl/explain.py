"""`covidtl explain`: one Grad-CAM overlay per image file, where the model looked for its answer.

The maps themselves are `covidtl.gradcam`'s (one definition for the six architectures, also
drawn by training's sample figure and the shortcut probe).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import keras
import numpy as np
from PIL import Image

from covidtl.data.images import image_files, measure_or_reason
from covidtl.files import atomic_path
# Grad-CAM itself lives in covidtl.gradcam (below the steps: training and the probe draw it too).
from covidtl.gradcam import (  # noqa: F401 - re-exported
    CamResult,
    GradCam,
    NetworkCam,
    feature_split,
    grad_cam,
    load_image,
    overlay,
    sample_figure,
    sample_indices,
    uncrop,
)
from covidtl.paths import CLASSES, p_covid

log = logging.getLogger(__name__)


def write_png(path: str | Path, rgb: np.ndarray) -> Path:
    """One uint8 RGB array as a PNG, written under a temporary name and then renamed."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(rgb, dtype="uint8"), "RGB").save(tmp, format="PNG")
    return path


# --------------------------------------------------------------------------- explain files


@dataclass
class Explained:
    path: Path
    p_covid: float | None = None
    predicted: str | None = None
    output: Path | None = None
    reason: str | None = None  # why the file could not be explained


def output_names(paths: list[Path]) -> list[str]:
    """`<stem>-gradcam.png`; a stem seen before gets -2, -3 ... so no overlay overwrites another."""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        seen[path.stem] = seen.get(path.stem, 0) + 1
        suffix = "" if seen[path.stem] == 1 else f"-{seen[path.stem]}"
        names.append(f"{path.stem}{suffix}-gradcam.png")
    return names


def explain_files(
    model: keras.Model,
    preprocess: Callable,
    inputs: Iterable[str | Path],
    out_dir: str | Path,
    class_index: int | None = None,
    batch_size: int = 16,
) -> list[Explained]:
    """A Grad-CAM overlay PNG per readable image in out_dir; unreadable ones keep their reason."""
    files = image_files(list(inputs))
    out = Path(out_dir)
    cam = GradCam(model)
    size = cam.size[0]
    results = [Explained(p) for p in files]
    good: list[tuple[Explained, str, np.ndarray]] = []
    for result, name in zip(results, output_names(files)):
        measured = measure_or_reason(result.path)  # the same checks and reasons as ingest
        if isinstance(measured, str):
            result.reason = measured
            continue
        if measured.note:
            log.warning("Warning: %s: %s", result.path, measured.note)
        try:
            good.append((result, name, load_image(result.path, size)))
        except Exception as exc:  # noqa: BLE001 - a file ingest accepts but TF cannot decode
            result.reason = f"cannot be decoded: {str(exc).splitlines()[0][:160]}"
    for start in range(0, len(good), batch_size):
        batch = good[start : start + batch_size]
        raw = np.stack([image for _, _, image in batch])
        explained = cam(preprocess(raw.copy()), class_index)
        for (result, name, image), heat, prob in zip(batch, explained.heatmaps, explained.probs):
            result.p_covid = float(p_covid(prob))
            result.predicted = CLASSES[int(np.argmax(prob))]
            result.output = write_png(out / name, overlay(image.round().astype("uint8"), heat))
    return results
