"""Bad input to the data commands (ingest, split, params), as a user hands it over the CLI.

Each case checks the message, the exit status and that nothing else was lost: per-file problems
are quarantined with their reason while the rest go on; a problem with the whole input is one line
naming it and the fix, and the outputs of an earlier run stay as they were. The model commands
(train, evaluate, predict, tune) are in test_bad_input_model.py.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import PARAMS, write_image
from covidtl.cli import CovidtlGroup, main

COVIDTL = str(Path(sys.executable).parent / "covidtl")
SETPRIV = shutil.which("setpriv")
NOBODY = ["--reuid=65534", "--regid=65534", "--clear-groups"]


def covidtl(work: Path, *args: str, params: Path = PARAMS):
    """The CLI in-process, derived files under `work`, the dataset `ct` at work/images."""
    return CliRunner().invoke(main, [
        "--params", str(params), "-S", f"data.workdir={work / 'data'}",
        "-S", f"data.datasets.ct.path={work / 'images'}", "-S", "data.datasets.ct.series=false", *args])


def cli_args(work: Path, *args: str) -> list[str]:
    """The same command line for a subprocess."""
    return [COVIDTL, "--params", str(PARAMS), "-S", f"data.workdir={work / 'data'}",
            "-S", f"data.datasets.ct.path={work / 'images'}", "-S", "data.datasets.ct.series=false", *args]


def good_images(work: Path, per_class: int = 5) -> Path:
    root = work / "images"
    for k, folder in enumerate(("COVID", "non-COVID")):
        for i in range(per_class):
            write_image(root / folder / f"{folder} ({i + 1}).png", seed=100 * k + i)
    return root


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height pixels, with almost no data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def _zero(path: Path) -> None:
    path.write_bytes(b"")


def _truncated_png(path: Path) -> None:
    data = write_image(path.with_name("whole.png.tmp"), 7, size=(64, 64), fmt="PNG").read_bytes()
    path.with_name("whole.png.tmp").unlink()
    path.write_bytes(data[: len(data) // 2])


def _truncated_jpeg(path: Path) -> None:
    whole = write_image(path.with_name("whole.jpg.tmp"), 8, size=(64, 64), mode="RGB", fmt="JPEG")
    data = whole.read_bytes()
    whole.unlink()
    path.write_bytes(data[: len(data) // 2])


def _text(path: Path) -> None:
    path.write_text("a note, not a picture\n")


def _bomb(path: Path) -> None:
    path.write_bytes(png_claiming(50_000, 50_000))


def _one_pixel(path: Path) -> None:
    Image.new("L", (1, 1), 128).save(path)


def _symlink_loop(path: Path) -> None:
    path.symlink_to(path.name)  # points at itself


def _dangling(path: Path) -> None:
    path.symlink_to("no-such-file.png")


BAD_FILES = {
    "zero.png": (_zero, "empty file (0 bytes)"),
    "truncated.png": (_truncated_png, "truncated or corrupt image data: image file is truncated"),
    "truncated.jpg": (_truncated_jpeg, "truncated or corrupt image data"),
    "text.png": (_text, "not an image: Pillow cannot identify the file format"),
    # Its limit after: the CLI's is params.yaml's, the server's Pillow's own (89.48).
    "bomb.png": (_bomb, "too large to decode safely: 2500 megapixels is over twice ingest.max_megapixels"),
    "one-pixel.png": (_one_pixel, "image is 1x1 px, too small to use"),
    "loop.png": (_symlink_loop, "cannot read file: Too many levels of symbolic links"),
    "dangling.png": (_dangling, "cannot read file: No such file or directory"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_a_bad_file_is_quarantined_with_its_reason_and_the_rest_go_on(tmp_path, name):
    make, reason = BAD_FILES[name]
    good_images(tmp_path)
    bad = tmp_path / "images" / "COVID" / name
    make(bad)
    result = covidtl(tmp_path, "ingest", "ct", "--quiet")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert f"Quarantined: {os.path.abspath(bad)}: {reason}" in result.stderr
    assert result.stdout.startswith("ingest ct: 10 images (covid 5, non_covid 5)")
    assert ", 1 quarantined," in result.stdout
    quarantine = pd.read_csv(tmp_path / "data" / "ct" / "quarantine.csv")
    assert quarantine["path"].tolist() == [f"COVID/{name}"]
    assert quarantine["reason"].iloc[0].startswith(reason)
    manifest = pd.read_csv(tmp_path / "data" / "ct" / "manifest.csv")
    assert len(manifest) == 10 and f"COVID/{name}" not in set(manifest["path"])


def test_wide_images_and_odd_file_names_are_ingested_and_split(tmp_path):
    good_images(tmp_path)
    odd = tmp_path / "images" / "COVID" / "scan [2] of Zoë, Ñandú & Łódź (final).png"
    write_image(odd, 31)
    wide = write_image(tmp_path / "images" / "non-COVID" / "wide.png", 32, size=(10_000, 24))
    assert covidtl(tmp_path, "ingest", "ct", "--quiet").exit_code == 0
    result = covidtl(tmp_path, "split", "ct")
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "data" / "ct" / "split.csv")
    assert {f"COVID/{odd.name}", "non-COVID/wide.png"} <= set(table["path"])
    assert table.set_index("path").loc["non-COVID/wide.png", "width"] == 10_000
    assert Path(wide).is_file()


def test_pillows_decompression_bomb_guard_stays_on():
    """Importing the package (CLI, training pipeline, server) never lifts Pillow's limit."""
    import covidtl.cli  # noqa: F401
    import covidtl.data.pipeline  # noqa: F401
    import covidtl.serving.model  # noqa: F401
    from covidtl.data.images import BadImage, measure_bytes

    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS <= 2 ** 28
    with pytest.raises(BadImage, match="too large to decode safely"):
        measure_bytes(png_claiming(50_000, 50_000))


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _socket(path: Path) -> None:
    import socket

    with socket.socket(socket.AF_UNIX) as sock:  # the file stays once the socket is closed
        sock.bind(str(path))


def _dev_zero(path: Path) -> None:
    path.symlink_to("/dev/zero")


def _link_to_fifo(path: Path) -> None:
    os.mkfifo(path.with_name("pipe"))  # no image suffix: skipped itself, read only through the link
    path.symlink_to("pipe")


NOT_REGULAR = {
    "pipe.png": (_fifo, "a named pipe (FIFO)"),
    "socket.png": (_socket, "a socket"),
    "zero.png": (_dev_zero, "a link to /dev/zero, a character device"),
    "pipe-link.png": (_link_to_fifo, "a link to {folder}/pipe, a named pipe (FIFO)"),
}


def _at_most_4_gib() -> None:
    # Today's main reads a link to /dev/zero until memory runs out: let it fail, not the machine.
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def test_fifos_sockets_and_devices_are_quarantined_without_being_opened(tmp_path):
    """A named pipe used to hang ingest for ever; a link to /dev/zero never ends."""
    good_images(tmp_path)
    folder = tmp_path / "images" / "COVID"
    for name, (make, _) in NOT_REGULAR.items():
        make(folder / name)
    result = subprocess.run(cli_args(tmp_path, "ingest", "ct", "--quiet"), capture_output=True, text=True,
                            timeout=120, preexec_fn=_at_most_4_gib)
    assert result.returncode == 0, result.stderr
    for name, (_, kind) in NOT_REGULAR.items():
        reason = f"not a regular file: {kind.format(folder=folder)}; only regular files are read, so it was not opened"
        assert f"Quarantined: {folder / name}: {reason}\n" in result.stderr
    assert result.stdout.startswith("ingest ct: 10 images (covid 5, non_covid 5)")
    assert ", 4 quarantined, 1 non-image files skipped," in result.stdout  # the pipe without a suffix
    quarantine = pd.read_csv(tmp_path / "data" / "ct" / "quarantine.csv")
    assert sorted(quarantine["path"]) == sorted(f"COVID/{name}" for name in NOT_REGULAR)


def test_an_undeclared_dataset_is_refused_before_anything_is_written_as_split_refuses_it(tmp_path):
    good_images(tmp_path)
    ingest = covidtl(tmp_path, "ingest", "foo", "--path", str(tmp_path / "images"), "--quiet")
    split = covidtl(tmp_path, "split", "foo")
    assert ingest.exit_code == split.exit_code == 2
    assert ingest.stderr == split.stderr == (
        "Error: data.datasets.foo: unknown dataset 'foo' (known: ct, xray); add it under data.datasets in "
        "params.yaml\n")
    assert not (tmp_path / "data").exists()
    # --path still points a declared dataset at another folder.
    moved = covidtl(tmp_path, "ingest", "xray", "--path", str(tmp_path / "images"), "--quiet")
    assert moved.exit_code == 0, moved.output
    assert (tmp_path / "data" / "xray" / "manifest.csv").is_file()


def big_warning(path: Path, size: str, limit: str) -> str:
    return (f"Warning: {path}: {size} is above ingest.max_megapixels {limit}, Pillow's guard against "
            "decompression bombs; read all the same (twice that is refused); raise or lower the guard with "
            "-S ingest.max_megapixels=N")


def test_a_90_megapixel_png_is_one_warning_in_the_projects_words_and_is_ingested(tmp_path):
    good_images(tmp_path)
    big = tmp_path / "images" / "COVID" / "ninety megapixels.png"
    Image.new("1", (9500, 9500), 1).save(big)  # 90.25 MP in 11 kB: Pillow's limit is 89.48 MP
    result = subprocess.run(cli_args(tmp_path, "ingest", "ct", "--quiet"), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == big_warning(big, "9500x9500 px (90.25 megapixels)", "89.5") + "\n"
    manifest = pd.read_csv(tmp_path / "data" / "ct" / "manifest.csv").set_index("path")
    assert manifest.loc[f"COVID/{big.name}", "width"] == 9500


def test_the_guard_is_a_setting_applied_in_ingests_worker_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # the CLI run here sets it
    good_images(tmp_path, per_class=35)  # 70 files of 48x40 px: decoded by worker processes
    folder = tmp_path / "images" / "COVID"
    above = write_image(folder / "above.png", 501, size=(60, 50))  # 3000 px: above 2000, under twice
    over_twice = write_image(folder / "over twice.png", 502, size=(100, 50))  # 5000 px
    command = cli_args(tmp_path, "-S", "ingest.max_megapixels=0.002", "ingest", "ct", "--jobs", "2", "--quiet")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        big_warning(above, "60x50 px (0.003 megapixels)", "0.002"),
        f"Quarantined: {over_twice}: too large to decode safely: 0.005 megapixels is over twice "
        "ingest.max_megapixels 0.002, Pillow's guard against decompression bombs; if the file is trusted, "
        "raise it with -S ingest.max_megapixels=N",
    ]
    assert result.stdout.startswith("ingest ct: 71 images (covid 36, non_covid 35)")
    raised = covidtl(tmp_path, "-S", "ingest.max_megapixels=0.01", "ingest", "ct", "--jobs", "1", "--quiet")
    assert raised.exit_code == 0 and raised.stderr == "", raised.output
    assert raised.stdout.startswith("ingest ct: 72 images")


@pytest.mark.parametrize("layout, message", [
    ({"COVID": 3}, "only covid folders found (COVID); a binary task needs both covid and non_covid folders"),
    ({"COVID": 0, "non-COVID": 3}, "no readable covid image (its folders are empty"),
    ({"scans": 3}, "no class folders found (sub-folders here: scans)"),
])
def test_a_dataset_that_cannot_make_two_classes_is_one_line(tmp_path, layout, message):
    for folder, n in layout.items():
        (tmp_path / "images" / folder).mkdir(parents=True)
        for i in range(n):
            write_image(tmp_path / "images" / folder / f"{i}.png", i)
    result = covidtl(tmp_path, "ingest", "ct", "--quiet")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"Error: {tmp_path / 'images'}: {message}")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "data" / "ct").exists()  # nothing written


def test_an_empty_class_folder_warns_and_the_rest_go_on(tmp_path):
    good_images(tmp_path)
    (tmp_path / "images" / "train" / "Normal").mkdir(parents=True)
    result = covidtl(tmp_path, "ingest", "ct", "--quiet")
    assert result.exit_code == 0, result.output
    assert f"Warning: class folder {tmp_path / 'images' / 'train' / 'Normal'} is empty" in result.stderr
    assert len(pd.read_csv(tmp_path / "data" / "ct" / "manifest.csv")) == 10


def test_a_missing_dataset_folder_or_unknown_dataset_is_one_line(tmp_path):
    result = covidtl(tmp_path, "ingest", "ct")
    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: data.datasets.ct.path: folder {tmp_path / 'images'} does not exist; download it, or point "
        f"at it with -S data.datasets.ct.path=/path/to/ct (or `covidtl ingest ct --path ...`)\n")
    result = covidtl(tmp_path, "split", "lungs")
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: data.datasets.lungs: unknown dataset 'lungs' (known: ct, xray)")


@pytest.fixture
def ingested(tmp_path):
    """A dataset ingested and split: the outputs a bad re-run must leave as they were."""
    good_images(tmp_path, per_class=8)
    assert covidtl(tmp_path, "ingest", "ct", "--quiet").exit_code == 0
    assert covidtl(tmp_path, "split", "ct").exit_code == 0
    folder = tmp_path / "data" / "ct"
    return tmp_path, {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def unchanged(work: Path, before: dict[str, bytes]) -> None:
    """The dataset's tables are byte for byte the earlier ones, and no temporary file is left."""
    folder = work / "data" / "ct"
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


def test_split_fractions_that_do_not_sum_to_one_are_refused(ingested):
    work, before = ingested
    result = covidtl(work, "-S", "split.fractions={train: 0.7, val: 0.1, test: 0.1}", "split", "ct")
    assert result.exit_code == 2
    assert result.stderr == "Error: split.fractions: train + val + test = 0.9, must be 1\n"
    unchanged(work, before)


def test_a_misspelled_key_in_params_yaml_names_the_key(ingested, tmp_path):
    work, before = ingested
    params = tmp_path / "typo.yaml"
    params.write_text(PARAMS.read_text().replace("  strategy: grouped", "  stratgy: grouped"))
    result = covidtl(work, "split", "ct", params=params)
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: split.stratgy: unknown key; known keys here: fractions, seed, strategy")
    unchanged(work, before)


@pytest.mark.parametrize("damage, message", [
    (lambda text: text[: len(text) // 2], r"line \d+ has no [a-z0-9, ]+: truncated or damaged"),
    (lambda text: "", r"not a readable table, truncated or damaged \(No columns to parse from file\)"),
    (lambda text: text.splitlines()[0][:12] + "\n", r"missing column\(s\) .*truncated or damaged"),
])
def test_a_truncated_manifest_is_one_line_naming_the_fix(ingested, damage, message):
    work, before = ingested
    manifest = work / "data" / "ct" / "manifest.csv"
    manifest.write_text(damage(before["manifest.csv"].decode()))
    result = covidtl(work, "split", "ct")
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"Error: {manifest}: ")
    assert result.stderr.rstrip().endswith("run `covidtl ingest ct` to write it again")
    assert re.search(message, result.stderr), result.stderr
    assert (work / "data" / "ct" / "split.csv").read_bytes() == before["split.csv"]


def test_a_split_records_its_manifest_and_a_re_ingest_without_a_re_split_is_refused(ingested):
    work, before = ingested
    split = pd.read_csv(work / "data" / "ct" / "split.csv")
    from covidtl.files import file_sha256

    assert set(split["manifest_sha256"]) == {file_sha256(work / "data" / "ct" / "manifest.csv")}
    write_image(work / "images" / "COVID" / "new.png", 999)
    assert covidtl(work, "ingest", "ct", "--quiet").exit_code == 0  # other images now
    for command in (["train", "--model", "custom_cnn", "--dataset", "ct"], ["augment", "ct"]):
        result = covidtl(work, *command)
        assert result.exit_code == 2, result.output
        assert result.stderr == (
            f"Error: {work / 'data' / 'ct' / 'split.csv'}: made from another manifest.csv than the one in "
            f"{work / 'data' / 'ct'} (the dataset was re-ingested since); run `covidtl split ct` "
            "(or `dvc repro split@ct`)\n"), command
    assert (work / "data" / "ct" / "split.csv").read_bytes() == before["split.csv"]
    assert covidtl(work, "split", "ct").exit_code == 0  # the fix it names


def limited_file_size(limit: int):
    """For a subprocess: files may not grow past `limit` bytes; SIGXFSZ ignored, so a write gets EFBIG
    (what a full disk looks like to the program, apart from the errno)."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_during_a_re_ingest_leaves_the_old_tables(ingested):
    work, before = ingested
    write_image(work / "images" / "COVID" / "more.png", 555)
    done = subprocess.run(cli_args(work, "ingest", "ct", "--quiet", "--jobs", "1"), capture_output=True,
                          text=True, preexec_fn=limited_file_size(512), timeout=300)
    manifest = work / "data" / "ct" / "manifest.csv"
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"Error: {manifest}: cannot write it (File too large); free some disk space (or write to another "
        "disk) and run the same command again; an earlier file of that name is left as it was")
    unchanged(work, before)


def test_an_output_path_through_a_file_is_one_line(tmp_path):
    good_images(tmp_path)
    (tmp_path / "data").write_text("a file where the derived tables' folder should be\n")
    result = covidtl(tmp_path, "ingest", "ct", "--quiet")
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"Error: {tmp_path / 'data' / 'ct' / 'manifest.csv'}: cannot write it (Not a directory); check the path: "
        "a file may stand where a folder is needed (or the reverse), or a folder on it cannot be made; an "
        "earlier file of that name is left as it was\n")
    assert (tmp_path / "data").read_text().startswith("a file where")


def test_a_negative_number_of_decoding_processes_is_refused(tmp_path):
    good_images(tmp_path)
    result = covidtl(tmp_path, "ingest", "ct", "--jobs", "-1")
    assert result.exit_code == 2
    assert "Invalid value for '--jobs': -1 is not in the range x>=0." in result.stderr
    assert not (tmp_path / "data").exists()


def run_as_nobody(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([SETPRIV, *NOBODY, *args], capture_output=True, text=True, timeout=600, **kwargs)


@pytest.fixture
def shared_tmp():
    """A folder another user can enter (pytest's tmp_path is private to root)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="covidtl-nobody-"))
    folder.chmod(0o777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _needs_a_user_without_rights():
    if os.geteuid() != 0:
        return  # an ordinary user is refused by the file modes themselves
    if SETPRIV is None:
        pytest.skip("running as root without setpriv: no way to drop the privileges that ignore file modes")


def as_user(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`args` as a user that file modes apply to: nobody when running as root (CI), else ourselves."""
    if os.geteuid() == 0:
        return run_as_nobody(args, env=env)
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)


def test_an_unreadable_file_is_quarantined_and_the_rest_go_on(shared_tmp):
    _needs_a_user_without_rights()
    good_images(shared_tmp)
    locked = write_image(shared_tmp / "images" / "COVID" / "locked.png", 77)
    locked.chmod(0o000)
    for path in shared_tmp.rglob("*"):
        if path != locked:
            path.chmod(0o777 if path.is_dir() else 0o644)
    done = as_user(cli_args(shared_tmp, "ingest", "ct", "--quiet", "--jobs", "1"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"Quarantined: {locked}: cannot read file: Permission denied" in done.stderr
    quarantine = pd.read_csv(shared_tmp / "data" / "ct" / "quarantine.csv")
    assert quarantine.to_dict("records") == [{"path": "COVID/locked.png", "reason": "cannot read file: Permission denied"}]
    assert len(pd.read_csv(shared_tmp / "data" / "ct" / "manifest.csv")) == 10


def test_a_read_only_output_folder_is_one_line_and_the_old_tables_stay(shared_tmp):
    _needs_a_user_without_rights()
    good_images(shared_tmp, per_class=8)
    for path in shared_tmp.rglob("*"):
        path.chmod(0o777 if path.is_dir() else 0o644)
    assert as_user(cli_args(shared_tmp, "ingest", "ct", "--quiet", "--jobs", "1")).returncode == 0
    folder = shared_tmp / "data" / "ct"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    folder.chmod(0o555)  # read-only for everyone but root
    done = as_user(cli_args(shared_tmp, "split", "ct"))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"Error: {folder / 'split.csv'}: cannot write it (Permission denied); choose a folder you can write "
        "to, or fix its permissions, and run the command again; an earlier file of that name is left as it was")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_read_only_mlflow_store_is_one_line(shared_tmp):
    """MLflow's SQLite file that this user cannot write: the store and the fix, not a traceback."""
    _needs_a_user_without_rights()
    import mlflow

    store = shared_tmp / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    mlflow.MlflowClient(uri).search_experiments()  # the store exists, made by another user
    for path in (store, *store.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    work = shared_tmp / "work"
    work.mkdir(mode=0o777)
    work.chmod(0o777)
    done = as_user([COVIDTL, "--params", str(PARAMS), "-S", f"report.out={work / 'reports'}", "report"],
                   env={**os.environ, "MLFLOW_TRACKING_URI": uri, "HOME": str(work),
                        "MPLCONFIGDIR": str(work / "mpl")})
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"Error: MLflow's store {uri}: readonly database; make the file (and its folder) writable, or point "
        "MLFLOW_TRACKING_URI at another store, and run the command again")


# --------------------------------------------------------------------------- the last resort


def _group_with_a_bug():
    """The real CLI group class with one command that fails as a bug would (not a user's error)."""
    import click

    @click.group(cls=CovidtlGroup)
    def cli():
        pass

    @cli.command()
    def broken():
        {}["no such key"]  # noqa: B018 - the bug

    return cli


def test_an_unexpected_error_is_one_line_saying_it_is_a_bug_and_where_the_traceback_is(tmp_path, monkeypatch):
    monkeypatch.setenv("COVIDTL_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.delenv("COVIDTL_DEBUG", raising=False)
    result = CliRunner().invoke(_group_with_a_bug(), ["broken"])
    assert result.exit_code == 1
    (log,) = (tmp_path / "logs").glob("covidtl-crash-*.log")
    assert result.stderr == (
        f"Error: unexpected KeyError: 'no such key'. This is a bug in covidtl: the traceback is in {log}; "
        "please report it with that file (or re-run with COVIDTL_DEBUG=1 to see it here)\n")
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "KeyError: 'no such key'" in text


def test_covidtl_debug_re_raises_the_unexpected_error(monkeypatch):
    monkeypatch.setenv("COVIDTL_DEBUG", "1")
    result = CliRunner().invoke(_group_with_a_bug(), ["broken"])
    assert isinstance(result.exception, KeyError)


# --------------------------------------------------------------------------- safety


@pytest.mark.parametrize("command", [["ui"], ["server"], ["models", "serve"]])
def test_mlflow_servers_we_document_bind_to_localhost_by_default(command):
    """The MLflow UI and the served model listen on 127.0.0.1 unless asked otherwise."""
    import click
    from mlflow.cli import cli

    found = cli
    for name in command:
        found = found.get_command(click.Context(found), name)
    (host,) = [p for p in found.params if p.name == "host"]
    assert host.default == "127.0.0.1"


def test_no_documented_command_binds_every_interface():
    """README, the docs pages, MLproject, dvc.yaml and the package never tell a user to serve on 0.0.0.0
    (or ::)."""
    root = Path(__file__).parents[1]
    docs = sorted((root / "docs").glob("*.md"))
    assert docs, root / "docs"
    texts = {p: p.read_text() for p in [root / "README.md", *docs, root / "MLproject", root / "dvc.yaml",
                                         *(root / "src" / "covidtl").rglob("*.py")]}
    for path, text in texts.items():
        assert "0.0.0.0" not in text and "--host ::" not in text, path
        for line in text.splitlines():
            if "models serve" in line and "--host" in line:
                assert "--host 127.0.0.1" in line, (path, line)
