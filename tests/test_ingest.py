"""Ingest: every file decoded, bad files quarantined with a reason, the rest kept, manifest contract."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import config, write_image
from covidtl.data import ingest, tables
from covidtl.data.groups import series_number
from covidtl.data.images import load_rgb
from covidtl.errors import UserError

CONTRACT = ["path", "label", "source", "width", "height", "mode", "bytes", "sha256", "group"]


def ingest_cfg(tmp_path, root, dataset="xray", **overrides):
    return config(tmp_path / "work", **{f"data.datasets.{dataset}.path": str(root), **overrides})


def run_ingest(tmp_path, root, dataset="xray", **overrides):
    return ingest.run(ingest_cfg(tmp_path, root, dataset, **overrides), dataset, progress=False)


@pytest.fixture
def bad_folder(image_folder, tmp_path):
    """Good images beside every kind of bad or unusual file the issue lists."""
    root = image_folder({"COVID": 4, "non-COVID": 4})
    covid, non = root / "COVID", root / "non-COVID"
    (covid / "zero.png").write_bytes(b"")
    good = (covid / "img (1).png").read_bytes()
    (covid / "truncated.png").write_bytes(good[: len(good) // 2])
    (non / "text.png").write_text("this is a note, not a PNG\n")
    sixteen = (np.arange(40 * 48, dtype=np.uint32).reshape(40, 48) * 30).astype(np.uint16)
    Image.fromarray(sixteen).save(non / "sixteen-bit.png")
    write_image(covid / "rgba.png", 101, mode="RGBA")
    write_image(non / "cmyk.jpg", 102, mode="CMYK", fmt="JPEG")
    Image.new("LAB", (40, 40)).save(covid / "lab.tif")
    write_image(non / "scan.tiff", 103, mode="RGB")
    (non / "notes.txt").write_text("not an image, not in the manifest, not quarantined\n")
    (non / ".DS_Store").write_bytes(b"\0\0")
    return root


def test_bad_files_are_quarantined_with_reasons_and_nothing_else_is_lost(tmp_path, bad_folder):
    result = run_ingest(tmp_path, bad_folder)
    reasons = {Path(p).name: r for p, r in result.quarantine.itertuples(index=False)}
    assert set(reasons) == {"zero.png", "truncated.png", "text.png", "lab.tif", "scan.tiff"}
    assert reasons["zero.png"] == "empty file (0 bytes)"
    assert reasons["truncated.png"].startswith("truncated or corrupt image data")
    assert reasons["text.png"].startswith("not an image")
    assert reasons["scan.tiff"] == "TIFF files are not read by the training pipeline; convert to PNG"
    assert "unsupported image mode 'LAB'" in reasons["lab.tif"]

    kept = {Path(p).name: mode for p, mode in zip(result.manifest["path"], result.manifest["mode"])}
    expected_good = {f"img ({i}).png" for i in range(1, 5)} | {"rgba.png", "sixteen-bit.png", "cmyk.jpg"}
    assert set(kept) == expected_good
    assert kept["sixteen-bit.png"] == "I;16" and kept["cmyk.jpg"] == "CMYK" and kept["rgba.png"] == "RGBA"
    assert {p.name for p in result.skipped} == {"notes.txt", ".DS_Store"}

    on_disk = pd.read_csv(tmp_path / "work" / "xray" / "quarantine.csv")
    assert list(on_disk.columns) == ["path", "reason"] and len(on_disk) == 5


def test_accepted_unusual_modes_read_as_8bit_rgb(tmp_path, bad_folder):
    result = run_ingest(tmp_path, bad_folder)
    for path in result.manifest["path"]:
        image = load_rgb(path)
        assert image.mode == "RGB"
    sixteen = np.asarray(load_rgb(bad_folder / "non-COVID" / "sixteen-bit.png"))
    assert sixteen.min() == 0 and sixteen.max() == 255  # stretched by its own range, not clipped


def test_manifest_contract_on_synthetic_xray(tmp_path, synth_data):
    result = run_ingest(tmp_path, synth_data / "xray")
    m = pd.read_csv(tmp_path / "work" / "xray" / "manifest.csv", dtype={"group": str})
    assert CONTRACT == [c for c in m.columns if c in CONTRACT] and set(CONTRACT) <= set(m.columns)
    files = sorted(p for p in (synth_data / "xray").rglob("*") if p.is_file())
    # On disk relative to the dataset root; read back through tables, a path that opens.
    assert sorted(m["path"]) == sorted(p.relative_to(synth_data / "xray").as_posix() for p in files)
    m = tables.read_manifest(ingest_cfg(tmp_path, synth_data / "xray"), "xray")
    assert sorted(m["path"]) == sorted(str(p.resolve()) for p in files)
    assert set(m["source"]) == {f"{s}/{c}" for s in ("train", "test") for c in ("Covid", "Normal", "Viral Pneumonia")}
    assert (m.loc[m["source"].str.endswith("Covid"), "label"] == "covid").all()
    assert (m.loc[~m["source"].str.endswith("Covid"), "label"] == "non_covid").all()
    row = m.iloc[0]
    data = Path(row["path"]).read_bytes()
    assert row["sha256"] == hashlib.sha256(data).hexdigest() and row["bytes"] == len(data)
    with Image.open(row["path"]) as im:
        assert (row["width"], row["height"], row["mode"]) == (im.width, im.height, im.mode)
    assert result.quarantine.empty


def test_parallel_and_serial_decoding_give_the_same_manifest(tmp_path, synth_data):
    cfg = config(tmp_path, **{"data.datasets.ct.path": str(synth_data / "ct")})
    serial = ingest.ingest(cfg, "ct", jobs=1, progress=False).manifest
    parallel = ingest.ingest(cfg, "ct", jobs=2, progress=False).manifest
    pd.testing.assert_frame_equal(serial, parallel)


def test_el_shafai_layout_reads_one_modality_through_subdir(tmp_path, image_folder):
    root = tmp_path / "el-shafai"
    image_folder({"CT/COVID": 2, "CT/Non-COVID": 2}, root)
    image_folder({"X-ray/COVID": 3, "X-ray/Non-COVID": 3}, root)
    result = run_ingest(tmp_path, root, **{"data.datasets.xray.subdir": "CT"})
    assert len(result.manifest) == 4
    assert set(result.manifest["source"]) == {"COVID", "Non-COVID"}
    with pytest.raises(UserError, match=r"subdir: .*MRI does not exist; set the subdir to one of: CT, X-ray"):
        run_ingest(tmp_path, root, **{"data.datasets.xray.subdir": "MRI"})


def test_empty_class_folder_warns_and_the_rest_goes_on(tmp_path, image_folder):
    root = image_folder({"Covid": 2, "Normal": 2})
    (root / "Viral Pneumonia").mkdir()
    result = run_ingest(tmp_path, root)
    assert [p.name for p in result.empty_class_folders] == ["Viral Pneumonia"]
    assert len(result.manifest) == 4


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({"COVID": 2}, r"only covid folders found \(COVID\); a binary task needs both"),
        ({"Normal": 2, "Viral Pneumonia": 1}, r"only non_covid folders found \(Normal, Viral Pneumonia\)"),
        ({"cats": 2, "dogs": 2}, r"no class folders found \(sub-folders here: cats, dogs\)"),
        ({"COVID": 0, "non-COVID": 2}, r"no readable covid image"),
    ],
)
def test_unusable_folders_stop_with_one_clear_message(tmp_path, image_folder, layout, message):
    root = image_folder(layout)
    with pytest.raises(UserError, match=message):
        run_ingest(tmp_path, root)


def test_missing_path_names_the_key_and_the_fix(tmp_path):
    with pytest.raises(UserError, match=r"data\.datasets\.xray\.path: folder .*nowhere does not exist"):
        run_ingest(tmp_path, tmp_path / "nowhere")


def test_duplicates_share_a_group_and_distinct_images_do_not(tmp_path, image_folder):
    root = image_folder({"COVID": 3, "non-COVID": 3})
    shutil.copy(root / "COVID" / "img (1).png", root / "COVID" / "copy.png")
    with Image.open(root / "non-COVID" / "img (2).png") as im:  # re-encoded and resized
        im.resize((60, 50)).save(root / "non-COVID" / "resaved.jpg", quality=90)
    m = run_ingest(tmp_path, root).manifest.set_index("path")
    group = {Path(p).name + "@" + Path(p).parent.name: g for p, g in m["group"].items()}
    assert group["copy.png@COVID"] == group["img (1).png@COVID"]
    assert group["resaved.jpg@non-COVID"] == group["img (2).png@non-COVID"]
    assert m["group"].nunique() == 6


# --------------------------------------------------------------------------- real data


def test_real_ct_set_is_complete_clean_and_grouped_like_patients(real_ct):
    cfg, result = real_ct
    m = result.manifest
    assert result.quarantine.empty
    assert m["label"].value_counts().to_dict() == {"covid": 902, "non_covid": 860}
    assert set(m["source"]) == {"COVID", "non-COVID"}
    assert set(m["mode"]) <= {"RGB", "RGBA"}
    sizes = m["group"].value_counts()
    # ~20 slices per patient: groups should look like patients, not single images or whole folders
    assert 10 <= sizes.median() <= 40 and sizes.min() >= 5 and sizes.max() < 100
    # each group is one unbroken run of file numbers inside one folder
    for _, rows in m.groupby("group"):
        assert rows["source"].nunique() == 1
        numbers = sorted(series_number(Path(p).name) for p in rows["path"])
        folder_numbers = sorted(
            series_number(Path(p).name) for p in m.loc[m["source"] == rows["source"].iloc[0], "path"]
        )
        start = folder_numbers.index(numbers[0])
        assert folder_numbers[start : start + len(numbers)] == numbers


def test_real_xray_set_maps_three_classes_to_two(real_xray):
    _, result = real_xray
    m = result.manifest
    assert result.quarantine.empty and len(m) == 317
    by_source = m.groupby("source").size().to_dict()
    assert by_source == {
        "test/Covid": 26, "test/Normal": 20, "test/Viral Pneumonia": 20,
        "train/Covid": 111, "train/Normal": 70, "train/Viral Pneumonia": 70,
    }
    assert m["label"].value_counts().to_dict() == {"non_covid": 180, "covid": 137}
    assert {"RGB", "L"} <= set(m["mode"])
    assert all(re.fullmatch(r"[0-9a-f]{64}", s) for s in m["sha256"])


def test_images_in_folders_of_no_class_are_counted_with_the_fix(tmp_path, image_folder):
    root = image_folder({"Covid-19": 2, "No_findings": 3, "Pneumonia": 2, "Other scans": 1})
    write_image(root / "stray.png", 99)
    (root / "No_findings" / "notes.txt").write_text("a note, not an image\n")
    result = run_ingest(tmp_path, root)
    assert result.unmapped == {".": 1, "No_findings": 3, "Other scans": 1}
    assert len(result.manifest) == 4 and [p.name for p in result.skipped] == ["notes.txt"]
    summary = json.loads((tmp_path / "work" / "xray" / "ingest.json").read_text())
    assert summary["unmapped_folders"] == result.unmapped and summary["unmapped_images"] == 5
    assert summary["skipped_non_image"] == 1 and summary["images"] == 4
    assert ingest.unmapped_warning("No_findings", 3) == (
        "3 images in No_findings/ have no class and are left out; "
        "map the folder with -S data.labels.no_findings=non_covid (or =covid)"
    )
    assert '-S "data.labels.other scans=non_covid"' in ingest.unmapped_warning("Other scans", 1)
    assert "move them into a class folder" in ingest.unmapped_warning(".", 1)
    # ... and the fix it names works.
    fixed = run_ingest(tmp_path, root, **{"data.labels.no_findings": "non_covid",
                                          "data.labels.other scans": "covid"})
    assert fixed.unmapped == {".": 1} and len(fixed.manifest) == 8
