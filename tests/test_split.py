"""Split: grouped keeps every group in one split, random leaks, both stratified near 80/10/10."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest

from conftest import config
from covidtl import paths
from covidtl.config import SplitConfig
from covidtl.data import ingest, split
from covidtl.errors import UserError


@pytest.fixture(scope="module")
def synth_ct(tmp_path_factory, synth_data):
    work = tmp_path_factory.mktemp("synth-ct")
    cfg = config(work, **{"data.datasets.ct.path": str(synth_data / "ct")})
    ingest.run(cfg, "ct", progress=False)
    return cfg


def split_with(cfg, strategy: str, seed: int = 42):
    cfg = dataclasses.replace(cfg, split=SplitConfig(strategy=strategy, fractions=cfg.split.fractions, seed=seed))
    return split.run(cfg, "ct")


def fractions(table: pd.DataFrame) -> dict[str, float]:
    return (table["split"].value_counts() / len(table)).to_dict()


def test_grouped_split_keeps_groups_whole_and_stratifies(synth_ct):
    table, report = split_with(synth_ct, "grouped")
    assert (table.groupby("group")["split"].nunique() == 1).all()
    assert report["crossing_pairs"]["same_group_total"] == 0
    assert report["crossing_pairs"]["near_duplicate_total"] == 0
    assert report["groups_split_across"] == 0
    for name in split.SPLITS:  # both classes in every split
        assert set(table.loc[table["split"] == name, "label"]) == {"covid", "non_covid"}


def test_random_split_leaks_groups_across_splits(synth_ct):
    table, report = split_with(synth_ct, "random")
    crossing = report["crossing_pairs"]["same_group"]
    assert all(crossing[pair] > 0 for pair in ("train/val", "train/test", "val/test"))
    assert report["groups_split_across"] > 0
    # image-level stratification: each class exactly 80/10/10 of its images
    counts = table.groupby(["label", "split"]).size().unstack()
    assert (counts["train"] == 48).all() and (counts["val"] == 6).all() and (counts["test"] == 6).all()


def test_split_files_follow_the_contract_and_are_seeded(synth_ct):
    table, report = split_with(synth_ct, "grouped", seed=3)
    manifest = pd.read_csv(paths.manifest_path(synth_ct, "ct"))
    on_disk = pd.read_csv(paths.split_path(synth_ct, "ct"))
    assert list(on_disk.columns) == [*manifest.columns, "split", "manifest_sha256"]
    assert set(on_disk["split"]) == {"train", "val", "test"}
    saved = json.loads(paths.leakage_path(synth_ct, "ct").read_text())
    assert saved == json.loads(json.dumps(report))
    assert sum(sum(c.values()) for c in saved["counts"].values()) == len(manifest)
    again, _ = split_with(synth_ct, "grouped", seed=3)
    assert again["split"].tolist() == table["split"].tolist()
    other, _ = split_with(synth_ct, "grouped", seed=4)
    assert other["split"].tolist() != table["split"].tolist()


def test_split_without_manifest_says_to_ingest_first(tmp_path):
    with pytest.raises(UserError, match=r"manifest.csv: no manifest yet; run `covidtl ingest ct` first"):
        split.run(config(tmp_path), "ct")


def test_real_ct_random_leaks_and_grouped_does_not(real_ct):
    cfg, _ = real_ct
    _, random_report = split_with(cfg, "random")
    grouped, grouped_report = split_with(cfg, "grouped")
    assert random_report["crossing_pairs"]["same_group_total"] > 1000
    assert random_report["groups_split_across"] > 0.9 * random_report["groups"]["count"]
    assert grouped_report["crossing_pairs"]["same_group_total"] == 0
    assert grouped_report["crossing_pairs"]["near_duplicate_total"] == 0
    for name, share in fractions(grouped).items():  # whole patients, yet close to 80/10/10
        assert share == pytest.approx(cfg.split.fractions[name], abs=0.02)
    per_class = grouped.groupby("label")["split"].value_counts(normalize=True)
    for label in ("covid", "non_covid"):
        assert per_class[label]["test"] == pytest.approx(0.1, abs=0.03)


def test_real_xray_split_is_stratified(real_xray):
    cfg, _ = real_xray
    table, report = split.run(cfg, "xray")
    assert report["crossing_pairs"]["near_duplicate_total"] == 0
    for name, share in fractions(table).items():
        assert share == pytest.approx(cfg.split.fractions[name], abs=0.03)
    assert all(report["counts"][s]["covid"] > 0 and report["counts"][s]["non_covid"] > 0 for s in split.SPLITS)
