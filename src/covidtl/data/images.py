"""Decode one image file and measure it; the one place that knows image modes and file types.

Worker functions here import only numpy and Pillow, so ingest can run them in fresh processes.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

import numpy as np
from PIL import Image, UnidentifiedImageError

from covidtl.errors import UserError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
# The formats the training pipeline is built and tested for; TIFF is recognised only to be quarantined.
READABLE_FORMATS = frozenset({"PNG", "JPEG", "BMP"})

# Modes read as 8-bit RGB by `to_rgb`. Wide greyscale (16-bit PNG, 32-bit int or float TIFF) is
# stretched by its own min..max, since scanners use any sub-range of 16 bits; CMYK JPEG is
# converted by Pillow. Anything else (LAB, HSV ...) is quarantined rather than guessed at.
WIDE_MODES = frozenset({"I;16", "I;16B", "I;16L", "I", "F"})
SUPPORTED_MODES = WIDE_MODES | {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"}

# The decompression-bomb guard is Pillow's own (Image.MAX_IMAGE_PIXELS, set by `set_pixel_limit`
# from ingest.max_megapixels), so every reader applies it. Between the limit and twice it Pillow
# only warns, with a traceback-like line: ingest says it in its own words (`Measured.note`).
# Above twice it Pillow refuses, and so do we.
PIXEL_LIMIT_SETTING = "ingest.max_megapixels"
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# What a path is when it is not a regular file: never opened (a named pipe blocks the reader forever,
# a device such as /dev/zero never ends).
SPECIAL_FILES = {stat.S_ISFIFO: "a named pipe (FIFO)", stat.S_ISSOCK: "a socket",
                 stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
                 stat.S_ISDIR: "a folder"}


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
    note: str | None = None  # read, but worth a warning (above the decompression-bomb limit)


def set_pixel_limit(megapixels: float) -> None:
    """This process's decompression-bomb guard (ingest.max_megapixels): Pillow's limit, applied by
    every reader; above it an image is read with a warning, above twice it refused."""
    Image.MAX_IMAGE_PIXELS = int(megapixels * 1e6)


def special_file(path: str | Path) -> str | None:
    """What a path is if not a regular file (a FIFO, socket, device, or a link to one), found
    without opening it; None for a regular file. A broken link raises, as opening it would."""
    mode = os.stat(path).st_mode  # follows links: a link to /dev/zero is a character device
    kind = next((name for test, name in SPECIAL_FILES.items() if test(mode)), None)
    if kind is None and not stat.S_ISREG(mode):
        kind = "not a regular file"
    if kind is not None and os.path.islink(path):
        kind = f"a link to {os.path.realpath(path)}, {kind}"
    return kind


def open_regular(path: str | Path) -> BinaryIO:
    """The file opened for reading, or BadImage for anything but a regular file (never opened)."""
    kind = special_file(path)
    if kind is None:
        # Non-blocking and checked again once open: a file swapped for a pipe meanwhile cannot hang us.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return os.fdopen(fd, "rb")
        os.close(fd)
        kind = "not a regular file"
    raise BadImage(f"not a regular file: {kind}; only regular files are read, so it was not opened")


def read_file(path: str | Path) -> bytes:
    """A regular file's bytes (`open_regular`)."""
    with open_regular(path) as fh:
        return fh.read()


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
    data = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open_regular(source)
    with data, Image.open(data) as im:
        im.load()
        return to_rgb(im)


def measure(path: str | Path, hash_size: int = 8, thumbnail: int = 32) -> Measured:
    """Decode the whole file and measure it, or raise BadImage with the reason."""
    return measure_bytes(read_file(path), hash_size, thumbnail)


def measure_bytes(data: bytes, hash_size: int = 8, thumbnail: int = 32) -> Measured:
    """`measure` of a file's bytes (an image sent to the server)."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage("not an image: Pillow cannot identify the file format") from None
    except Image.DecompressionBombError as exc:
        raise BadImage(f"too large to decode safely: {too_large(exc)}") from None
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
        note=size_note(im.width, im.height),
    )


def size_note(width: int, height: int) -> str | None:
    """The warning for an image above the decompression-bomb limit (not twice it), else None."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or width * height <= limit:
        return None
    return (f"{width}x{height} px ({width * height / 1e6:.4g} megapixels) is above {PIXEL_LIMIT_SETTING} "
            f"{limit / 1e6:.4g}, Pillow's guard against decompression bombs; read all the same (twice that "
            f"is refused); raise or lower the guard with -S {PIXEL_LIMIT_SETTING}=N")


def too_large(exc: Image.DecompressionBombError) -> str:
    """Pillow's refusal above twice the limit, in our words: the size, the limit and its setting."""
    counted = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{int(counted.group(1)) / 1e6:.4g} megapixels" if counted else "the image"
    limit = Image.MAX_IMAGE_PIXELS or 0
    return (f"{size} is over twice {PIXEL_LIMIT_SETTING} {limit / 1e6:.4g}, Pillow's guard against "
            f"decompression bombs; if the file is trusted, raise it with -S {PIXEL_LIMIT_SETTING}=N")


def measure_or_reason(path: str | Path, hash_size: int = 8, thumbnail: int = 32) -> Measured | str:
    """`measure`, with a bad or unreadable file turned into its quarantine reason."""
    checked = checked_bytes(path, hash_size, thumbnail)
    return checked if isinstance(checked, str) else checked[1]


def checked_bytes(path: str | Path, hash_size: int = 8, thumbnail: int = 32) -> tuple[bytes, Measured] | str:
    """The file's bytes and measures when ingest would accept it, else its quarantine reason."""
    try:
        data = read_file(path)
        return data, measure_bytes(data, hash_size, thumbnail)
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


def image_files(inputs: Iterable[str | Path], purpose: str = "to explain") -> list[Path]:
    """Files as given, and the image files in each folder (its subfolders too), sorted."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        # Not is_file(): a broken link, a link loop or a FIFO is listed, so its reason is shown, not skipped.
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*")
                                if not p.is_dir() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif os.path.lexists(path):
            found.append(path)
        else:
            raise UserError(f"{path}: no such file or folder; give image files or folders of images")
    if not found:
        names = ", ".join(str(i) for i in inputs) or "nothing"
        raise UserError(f"{names}: no image files (.png, .jpg, .bmp) {purpose}")
    return found
