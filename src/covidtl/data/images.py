"""Decode one image file and measure it; the one place that knows image modes and file types.

Worker functions here import only numpy and Pillow, so ingest can run them in fresh processes.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
# The formats the training pipeline is built and tested for; TIFF is recognised only to be quarantined.
READABLE_FORMATS = frozenset({"PNG", "JPEG", "BMP"})

# Modes read as 8-bit RGB by `to_rgb`. Wide greyscale (16-bit PNG, 32-bit int or float TIFF) is
# stretched by its own min..max, since scanners use any sub-range of 16 bits; CMYK JPEG is
# converted by Pillow. Anything else (LAB, HSV ...) is quarantined rather than guessed at.
WIDE_MODES = frozenset({"I;16", "I;16B", "I;16L", "I", "F"})
SUPPORTED_MODES = WIDE_MODES | {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"}


class BadImage(Exception):
    """A file that cannot be used; the message is the quarantine reason."""


@dataclass
class Measured:
    """What ingest records about one valid image, plus the features grouping needs."""

    width: int
    height: int
    mode: str
    bytes: int
    sha256: str
    dhash: str  # hex of the difference hash
    thumb: np.ndarray  # grey thumbnail, zero mean, unit norm, flattened


def to_grey(im: Image.Image) -> Image.Image:
    """Any supported mode -> 8-bit greyscale."""
    if im.mode in WIDE_MODES:
        return _stretch(np.asarray(im, dtype=np.float64))
    if im.mode not in ("L", "RGB"):
        im = im.convert("RGB")
    return im.convert("L")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any supported mode -> 8-bit RGB, the form every model reads."""
    if im.mode in WIDE_MODES:
        return to_grey(im).convert("RGB")
    return im.convert("RGB")


def load_rgb(source: str | Path | bytes) -> Image.Image:
    """Open an image ingest accepted (a path, or the file's bytes) and return it as 8-bit RGB."""
    # Bytes come from a client of the server; Pillow's decompression-bomb guard applies to both.
    with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as im:
        im.load()
        return to_rgb(im)


def measure(path: str | Path, hash_size: int = 8, thumbnail: int = 32) -> Measured:
    """Decode the whole file and measure it, or raise BadImage with the reason."""
    return measure_bytes(Path(path).read_bytes(), hash_size, thumbnail)


def measure_bytes(data: bytes, hash_size: int = 8, thumbnail: int = 32) -> Measured:
    """`measure` of a file's bytes (an image sent to the server)."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage("not an image: Pillow cannot identify the file format") from None
    except Image.DecompressionBombError as exc:
        raise BadImage(f"too large to decode safely: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:  # e.g. a JPEG cut short inside its header
        raise BadImage(f"truncated or corrupt image data: {exc}") from None
    try:
        im.load()  # decodes every byte: truncated or corrupt data fails here, not in training
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"truncated or corrupt image data: {exc}") from None
    if im.mode not in SUPPORTED_MODES:
        raise BadImage(f"unsupported image mode {im.mode!r}; convert it to RGB or greyscale")
    if im.format not in READABLE_FORMATS:
        raise BadImage(f"{im.format} files are not read by the training pipeline; convert to PNG")
    if im.width < 2 or im.height < 2:
        raise BadImage(f"image is {im.width}x{im.height} px, too small to use")
    grey = to_grey(im)
    return Measured(
        width=im.width,
        height=im.height,
        mode=im.mode,
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        dhash=difference_hash(grey, hash_size),
        thumb=normalised_thumbnail(grey, thumbnail),
    )


def measure_or_reason(path: str | Path, hash_size: int = 8, thumbnail: int = 32) -> Measured | str:
    """`measure`, with a bad or unreadable file turned into its quarantine reason."""
    try:
        return measure(path, hash_size, thumbnail)
    except BadImage as exc:
        return str(exc)
    except OSError as exc:  # unreadable (permissions, vanished): report it, keep going
        return f"cannot read file: {exc.strerror or exc}"


def bytes_reason(data: bytes) -> str | None:
    """Why a file's bytes are not an image the models read (ingest's reasons), or None."""
    try:
        measure_bytes(data)
    except BadImage as exc:
        return str(exc)
    return None


def difference_hash(grey: Image.Image, hash_size: int = 8) -> str:
    """dHash: is each pixel of a (hash_size+1) x hash_size thumbnail brighter than its right neighbour."""
    small = np.asarray(grey.resize((hash_size + 1, hash_size), Image.BILINEAR), dtype=np.int16)
    bits = small[:, 1:] > small[:, :-1]
    return np.packbits(bits.ravel()).tobytes().hex()


def normalised_thumbnail(grey: Image.Image, size: int = 32) -> np.ndarray:
    """size x size grey thumbnail with zero mean and unit norm: dot products are correlations."""
    small = np.asarray(grey.resize((size, size), Image.BILINEAR), dtype=np.float32).ravel()
    small = small - small.mean()
    norm = float(np.linalg.norm(small))
    return small / norm if norm > 0 else small


def _stretch(values: np.ndarray) -> Image.Image:
    lo, hi = float(values.min()), float(values.max())
    scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    return Image.fromarray(np.clip(scaled + 0.5, 0, 255).astype(np.uint8))
