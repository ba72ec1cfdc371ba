"""A downloaded dataset brought under DVC: copied to datasets/<name>, `dvc add`ed, params.yaml set.

The result is plain DVC (datasets/<name>.dvc, committed; the images in DVC's cache and remote), so
`dvc push`, `dvc pull` and `dvc checkout` of an older commit work as DVC users expect, and the
ingest stage depends on the versioned folder instead of a path outside the repository.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ruamel.yaml import YAML

from covidtl.data.images import special_file
from covidtl.errors import UserError
from covidtl.files import atomic_path

RAW_ROOT = Path("datasets")


@dataclass
class Added:
    folder: Path
    dvc_file: Path
    files: int
    dvc_output: str


def add_dataset(name: str, source: str | Path, params_file: str | Path = "params.yaml",
                series: bool | None = None, subdir: str | None = None) -> Added:
    """Copy `source` to datasets/`name` (replacing an older version), `dvc add` it, point params at it."""
    source, params_file = Path(source), Path(params_file)
    if not name.replace("-", "").replace("_", "").isalnum():
        raise UserError(f"dataset name {name!r}: use letters, digits, - and _ (it names datasets/<name> "
                        "and the params key data.datasets.<name>)")
    if not Path(".dvc").is_dir():
        raise UserError(f"{Path.cwd()}: not the root of a DVC project (no .dvc/); run the command "
                        "from the project root")
    if not params_file.is_file():
        raise UserError(f"{params_file}: no such file; run from the project root or give --params")
    folder = RAW_ROOT / name
    if not source.is_dir():
        raise UserError(f"{source}: no such folder; give the downloaded dataset's folder (class "
                        "folders such as COVID/ and non-COVID/ inside)")
    if source.resolve() != folder.resolve():
        files = _replace_with_copy(source, folder)
    else:
        files = sum(1 for p in folder.rglob("*") if p.is_file())
    if files == 0:
        raise UserError(f"{source}: holds no files; give the downloaded dataset's folder")
    result = subprocess.run([sys.executable, "-m", "dvc", "add", "--quiet", str(folder)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no message"]
        raise UserError(f"dvc add {folder} failed: {lines[-1]}")
    set_dataset_path(params_file, name, folder.as_posix(), series=series, subdir=subdir)
    return Added(folder=folder, dvc_file=folder.with_name(f"{name}.dvc"), files=files,
                 dvc_output=result.stdout.strip())


def _replace_with_copy(source: Path, folder: Path) -> int:
    """Copy beside the target, then swap: a failed copy leaves the previous version in place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.incoming")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        shutil.copytree(source, staging, copy_function=_copy_regular)
    except UserError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    staging.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return sum(1 for p in folder.rglob("*") if p.is_file())


def _copy_regular(src: str, dst: str) -> str:
    """copyfile, not copy2: the source may be read-only (a shared download), the copy must not be.
    A FIFO, socket or device (or a link to one, /dev/zero) is refused unopened: it would hang or never end."""
    kind = special_file(src)
    if kind is not None:
        raise UserError(f"{src}: not a regular file ({kind}); `data add` copies only regular files: "
                        "remove it from the folder and run the command again")
    return shutil.copyfile(src, dst)


def set_dataset_path(params_file: Path, name: str, path: str, series: bool | None = None,
                     subdir: str | None = None) -> None:
    """data.datasets.<name>.path = path in params.yaml, keeping its comments and order."""
    yaml = YAML()  # round trip: the file's comments are its documentation
    yaml.preserve_quotes = True
    yaml.width = 100
    with params_file.open() as fh:
        params = yaml.load(fh)
    datasets = params.get("data", {}).get("datasets")
    if datasets is None:
        raise UserError(f"{params_file}: no data.datasets section; restore it from the project's params.yaml")
    entry = datasets.get(name)
    if entry is None:
        entry = datasets[name] = {"path": path, "subdir": subdir, "series": bool(series)}
    else:
        entry["path"] = path
        if series is not None:
            entry["series"] = series
        if subdir is not None:
            entry["subdir"] = subdir
    with atomic_path(params_file) as tmp, tmp.open("w") as fh:
        yaml.dump(params, fh)
