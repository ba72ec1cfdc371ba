"""Writing a file so that a failure (full disk, kill) never leaves half of it under its name."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator

from covidtl.errors import UserError

# errno values that mean "this output cannot be written here", each with what the user can do.
_NO_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}
# A path that cannot be a file here: a file where a folder is needed, or the reverse.
_BAD_PATH = {errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOENT, errno.ENAMETOOLONG}


class OutputError(UserError):
    """An output file that cannot be written (full disk, read-only or forbidden folder)."""


def write_problem(exc: OSError) -> str | None:
    """The fix for an OSError raised while writing, or None if it is not a known write failure."""
    if exc.errno in _NO_SPACE:
        return "free some disk space (or write to another disk) and run the same command again"
    if exc.errno in _NOT_WRITABLE:
        return "choose a folder you can write to, or fix its permissions, and run the command again"
    if exc.errno in _BAD_PATH:
        return ("check the path: a file may stand where a folder is needed (or the reverse), or a folder "
                "on it cannot be made")
    return None


def output_error(path: Path, exc: OSError) -> UserError | None:
    """One line naming the output and the fix; the earlier file of that name, if any, is untouched."""
    fix = write_problem(exc)
    if fix is None:
        return None
    return OutputError(f"{path}: cannot write it ({exc.strerror or exc}); {fix}; "
                       "an earlier file of that name is left as it was")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` (same suffix, e.g. for Keras' `.keras`) that replaces
    `path` only when the block finishes; otherwise it is removed and `path` is untouched.
    A full disk or an unwritable folder becomes one OutputError naming `path`."""
    path = Path(path)
    # Keras' weights files must end in .weights.h5, the whole two-part suffix.
    suffix = ".weights.h5" if path.name.endswith(".weights.h5") else path.suffix
    tmp = path.with_name(f".{path.name.removesuffix(suffix)}.tmp{os.getpid()}{suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        error = output_error(path, exc)
        if error is None:
            raise
        raise error from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, `missing` if absent (e.g. a table built in memory)."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def json_text(value: Any) -> str:
    """Indented JSON with a final newline; NaN becomes null (JSON has no NaN: "undefined")."""
    return json.dumps(_without_nan(value), indent=2, default=str) + "\n"


def _without_nan(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _without_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_nan(v) for v in value]
    return value
