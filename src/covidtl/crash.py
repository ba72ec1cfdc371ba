"""Where the traceback of an unexpected error goes: a log file the one-line message names."""

from __future__ import annotations

import datetime
import os
import tempfile
import traceback
from pathlib import Path

# COVIDTL_LOG_DIR: where crash logs go (default: the system's temporary folder).
LOG_DIR_ENV = "COVIDTL_LOG_DIR"


def write_crash_log(exc: BaseException, argv: list[str]) -> Path | None:
    """The command line and the full traceback in covidtl-crash-<time>-<pid>.log, or None if even
    that cannot be written (a full disk): the caller then says so."""
    folder = Path(os.environ.get(LOG_DIR_ENV) or tempfile.gettempdir())
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = folder / f"covidtl-crash-{stamp}-{os.getpid()}.log"
    text = "command: " + " ".join(argv) + "\n\n" + "".join(
        traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError:
        return None
    return path
