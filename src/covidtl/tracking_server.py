"""A shared MLflow tracking server: PostgreSQL for runs, a directory (or bucket) for artifacts.

`covidtl server` only checks what a user can get wrong (an unreachable database) and then becomes
`mlflow server`: clients that set MLFLOW_TRACKING_URI=http://host:port send runs, and their models,
there; artifacts travel through the server (--serve-artifacts), so clients need no access to the
artifact store themselves.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg2

from covidtl.errors import UserError

POSTGRES_SCHEMES = ("postgresql", "postgresql+psycopg2")


def masked(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def check_backend_store(url: str, timeout_s: int = 5) -> None:
    """Connect once, so a wrong URL or a stopped database is one line now, not a server that fails later."""
    scheme = urlsplit(url).scheme
    if scheme not in POSTGRES_SCHEMES:
        raise UserError(f"--backend-store-uri {masked(url)}: not a PostgreSQL URL; give "
                        "postgresql://USER:PASSWORD@HOST:5432/DATABASE")

    try:
        psycopg2.connect(url.replace("postgresql+psycopg2://", "postgresql://", 1),
                         connect_timeout=timeout_s).close()
    except psycopg2.Error as exc:
        reason = (str(exc).strip().splitlines() or ["no reason given"])[0]
        raise UserError(f"--backend-store-uri {masked(url)}: cannot connect ({reason}); start "
                        "PostgreSQL or fix the URL (user, password, host, port, database)") from None


def artifacts_destination(value: str) -> str:
    """A URI as is (s3://..., gs://...); a local folder made absolute, so the server's cwd does not matter."""
    if "://" in value:
        return value
    folder = Path(value).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return folder.as_uri()


def server_command(store: str, artifacts: str, host: str, port: int, extra: tuple[str, ...] = ()) -> list[str]:
    """The `mlflow server` command line."""
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
    program = [mlflow] if mlflow else [sys.executable, "-m", "mlflow"]
    # The installed driver: SQLAlchemy as MLflow configures it would look for psycopg 3.
    store = store.replace("postgresql://", "postgresql+psycopg2://", 1)
    return [*program, "server", "--backend-store-uri", store, "--serve-artifacts",
            "--artifacts-destination", artifacts_destination(artifacts),
            "--host", host, "--port", str(port), *extra]
