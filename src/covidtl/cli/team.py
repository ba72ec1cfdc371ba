"""Commands for working as a team: datasets under DVC (`data add`) and the tracking server (`server`)."""

from __future__ import annotations

import os

import click


@click.group("data")
def data() -> None:
    """Datasets versioned by DVC (pushed to and pulled from the project's DVC remote)."""


@data.command("add")
@click.argument("name")
@click.argument("path", type=click.Path(file_okay=False))
@click.option("--series/--no-series", default=None,
              help="Files numbered in acquisition order (slices of one patient); a new dataset: no.")
@click.option("--subdir", default=None, help="The folder inside PATH that holds the class folders.")
@click.pass_context
def add(ctx: click.Context, name: str, path: str, series: bool | None, subdir: str | None) -> None:
    """Copy PATH to datasets/NAME, `dvc add` it and set data.datasets.NAME.path in params.yaml.

    Again with a newer download: the new version replaces the old; commit, then `dvc push`."""
    from covidtl.data.versioned import add_dataset  # here, not above: keeps the CLI's start-up free of numpy and Pillow

    added = add_dataset(name, path, ctx.obj.get("params_path") or "params.yaml", series=series, subdir=subdir)
    click.echo(
        f"data add {name}: {added.files} files in {added.folder} (tracked by {added.dvc_file}); "
        f"{ctx.obj.get('params_path')}: data.datasets.{name}.path = {added.folder.as_posix()}\n"
        f"Next: git add {added.dvc_file} {added.folder.parent / '.gitignore'} "
        f"{ctx.obj.get('params_path')} && git commit -m 'data: {name}' && dvc push"
    )


@click.command("server")
@click.option("--backend-store-uri", envvar="COVIDTL_BACKEND_STORE_URI", required=True,
              help="PostgreSQL for runs, e.g. postgresql://USER:PASSWORD@HOST:5432/DATABASE "
              "(or env COVIDTL_BACKEND_STORE_URI, which keeps the password out of `ps`).")
@click.option("--artifacts-destination", default="mlartifacts", show_default=True,
              help="Where the server keeps artifacts (models, figures): a folder, or s3://bucket/path.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; this machine's address on a trusted network serves other machines "
                   "(add --allowed-hosts after --).")
@click.option("--port", default=5000, show_default=True, type=int)
@click.argument("mlflow_args", nargs=-1, type=click.UNPROCESSED)
def server(backend_store_uri: str, artifacts_destination: str, host: str, port: int,
           mlflow_args: tuple[str, ...]) -> None:
    """Start MLflow's tracking server (runs in PostgreSQL, artifacts served through it).

    Clients: export MLFLOW_TRACKING_URI=http://HOST:PORT. Arguments after `--` go to `mlflow server`."""
    # here, not above: keeps the CLI's start-up free of psycopg2
    from covidtl.tracking_server import check_backend_store, masked, server_command

    check_backend_store(backend_store_uri)
    command = server_command(backend_store_uri, artifacts_destination, host, port, mlflow_args)
    click.echo(f"MLflow tracking server on http://{host}:{port} (runs: {masked(backend_store_uri)}; "
               f"artifacts: {command[command.index('--artifacts-destination') + 1]}); clients: "
               f"export MLFLOW_TRACKING_URI=http://{host}:{port}", err=True)
    # Become the server: signals (Ctrl-C, a service manager's stop) reach it directly.
    os.execv(command[0], command)


COMMANDS: list[click.Command] = [data, server]
