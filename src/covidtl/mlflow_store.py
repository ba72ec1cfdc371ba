"""Where MLflow runs go, and the store problems a user can fix, told without importing MLflow.

Kept light: `covidtl train` refuses a tracking server that does not answer before MLflow and
TensorFlow load (seconds, not the minutes of MLflow's own retries).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from covidtl.errors import UserError

# How long a tracking server may take to accept a connection before we give up, in seconds.
SERVER_CONNECT_TIMEOUT_S = 5
# MLflow's own HTTP retries, unless the user set them: its default (7 retries, backoff factor 2,
# 120 s timeout) turned a server that went away into minutes of silence.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
_reachable: set[str] = set()


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, or the project's mlflow.db; a server that does not answer is one line,
    at once."""
    uri = configured_uri()
    if uri.startswith(("http://", "https://")):
        require_server(uri)
    return uri


def configured_uri() -> str:
    """MLFLOW_TRACKING_URI, or the project's mlflow.db (checked by nothing)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def project_root(cwd: Path | None = None) -> Path:
    """The checkout a process works for: cwd, or the project whose queued DVC experiment runs in
    cwd (DVC runs it in <project>/.dvc/tmp/exps/..., removed when it ends)."""
    cwd = Path.cwd() if cwd is None else Path(cwd)
    for folder in cwd.parents:
        if folder.name == "exps" and folder.parent.name == "tmp" and folder.parent.parent.name == ".dvc":
            return folder.parent.parent.parent
    return cwd


def require_server(uri: str) -> None:
    """Refuse, in seconds, a tracking server that does not accept a connection (checked once)."""
    if uri in _reachable:
        return
    for key, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    parts = urlsplit(uri)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=SERVER_CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise UserError(
            f"MLFLOW_TRACKING_URI={uri}: no tracking server answers there ({reason}); start it "
            f"(mlflow server --host 127.0.0.1 --port {port}) or unset MLFLOW_TRACKING_URI to log "
            "to ./mlflow.db"
        ) from None
    _reachable.add(uri)


# What SQLite says when MLflow's store cannot be written, and what to do about each.
_STORE_PROBLEMS = {
    "readonly database": "make the file (and its folder) writable",
    "database or disk is full": "free some disk space",
    "unable to open database file": "make its folder writable, or check the path",
    "disk I/O error": "check the disk and free some space",
}


def store_problem(exc: BaseException) -> str | None:
    """One line for an MLflow store the user can fix (a read-only or full SQLite file, a server that
    is not an MLflow tracking server), else None."""
    text = str(exc)
    uri = configured_uri()
    for phrase, fix in _STORE_PROBLEMS.items():
        if phrase in text:
            return (f"MLflow's store {uri}: {phrase}; {fix}, or point MLFLOW_TRACKING_URI at another store, "
                    "and run the command again")
    if text.startswith("API request to ") and uri.startswith(("http://", "https://")):
        first = text.splitlines()[0][:200]
        return (f"MLFLOW_TRACKING_URI={uri}: the server there does not answer as an MLflow tracking "
                f"server ({first}); check the URI and that `mlflow server` runs there, or unset "
                "MLFLOW_TRACKING_URI to log to ./mlflow.db")
    return None
