"""The CLI's last resort: an MLflow store that cannot be written is the user's to fix; anything else
unexpected is a bug, whose traceback goes to a log file the one-line message names."""

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


# What SQLite says when MLflow's store cannot be written, and what to do about each.
_STORE_PROBLEMS = {
    "readonly database": "make the file (and its folder) writable",
    "database or disk is full": "free some disk space",
    "unable to open database file": "make its folder writable, or check the path",
    "disk I/O error": "check the disk and free some space",
}


def store_problem(exc: BaseException) -> str | None:
    """One line for an MLflow store that cannot be written (a read-only or full SQLite file), else None."""
    text = str(exc)
    for phrase, fix in _STORE_PROBLEMS.items():
        if phrase in text:
            uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
            return (f"MLflow's store {uri}: {phrase}; {fix}, or point MLFLOW_TRACKING_URI at another store, "
                    "and run the command again")
    return None
