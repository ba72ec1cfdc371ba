"""The dataset tables on disk: the same images give the same bytes in any checkout, and still open."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from conftest import PARAMS, config
from covidtl.cli import main
from covidtl.data import tables

TABLES = ("manifest.csv", "quarantine.csv", "split.csv", "ingest.json")


def checkout(place: Path, synth_data: Path, monkeypatch) -> dict[str, bytes]:
    """params.yaml's own relative root (data/synth/ct), ingested and split from inside `place`."""
    shutil.copytree(synth_data / "ct", place / "data" / "synth" / "ct")
    (place / "data" / "synth" / "ct" / "COVID" / "broken.png").write_bytes(b"")
    monkeypatch.chdir(place)
    for args in (["ingest", "ct", "--quiet"], ["split", "ct"]):
        result = CliRunner().invoke(main, ["--params", str(PARAMS), *args])
        assert result.exit_code == 0, result.output
    return {name: (place / "data" / "ct" / name).read_bytes() for name in TABLES}


def test_two_checkouts_write_byte_identical_tables_that_open_after_a_move(tmp_path, synth_data, monkeypatch):
    first = checkout(tmp_path / "alice" / "covidtl", synth_data, monkeypatch)
    second = checkout(tmp_path / "bob" / "work" / "covidtl", synth_data, monkeypatch)
    assert first == second
    for name, data in first.items():
        assert str(tmp_path) not in data.decode(), name
    on_disk = pd.read_csv(tmp_path / "bob" / "work" / "covidtl" / "data" / "ct" / "split.csv")
    assert list(on_disk.columns)[0] == "path" and on_disk["path"].iloc[0] == "COVID/Covid (1).png"
    quarantine = pd.read_csv(tmp_path / "bob" / "work" / "covidtl" / "data" / "ct" / "quarantine.csv")
    assert quarantine["path"].tolist() == ["COVID/broken.png"]
    summary = json.loads(first["ingest.json"])
    assert summary["root"] == "data/synth/ct" and summary["subdir"] is None  # as written in params.yaml
    assert summary["classes"] == {"non_covid": 60, "covid": 60} and summary["quarantined"] == 1

    moved = tmp_path / "carol"
    shutil.move(tmp_path / "alice" / "covidtl", moved)  # a checkout brought elsewhere still reads
    monkeypatch.chdir(moved)
    table = tables.read_split(config(Path("data")), "ct")
    assert len(table) == 120 and all(Path(p).is_absolute() and Path(p).is_file() for p in table["path"])
    assert Path(table["path"].iloc[0]).is_relative_to(moved)


def test_home_root_is_expanded_when_read_and_absolute_paths_of_old_tables_stay(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    image = tmp_path / "home" / "scans" / "CT" / "COVID" / "a.png"
    cfg = config(tmp_path / "work", **{"data.datasets.ct": {"path": "~/scans", "subdir": "CT"}})
    old = "/somewhere/else/b.png"
    table = pd.DataFrame({"path": [str(image), old], "label": ["covid", "non_covid"], "split": ["train", "val"]})
    tables.write_split(cfg, "ct", table)
    assert pd.read_csv(tmp_path / "work" / "ct" / "split.csv")["path"].tolist() == ["COVID/a.png", old]
    assert tables.read_split(cfg, "ct")["path"].tolist() == [str(image), old]


def test_a_failed_write_leaves_the_previous_table_whole(tmp_path, monkeypatch):
    cfg = config(tmp_path)
    table = pd.DataFrame({"path": ["/x/a.png"], "label": ["covid"], "split": ["train"]})
    target = tables.write_split(cfg, "ct", table)
    before = target.read_bytes()

    def half_then_fail(self, path, **_):
        Path(path).write_text("path,la")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        tables.write_split(cfg, "ct", table.assign(label="non_covid"))
    assert target.read_bytes() == before
    assert [p.name for p in target.parent.iterdir()] == ["split.csv"]
