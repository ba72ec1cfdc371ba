"""`covidtl synth`: seeded, laid out like the real sets, CT series grouped as patients."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import config
from covidtl.config import SynthConfig
from covidtl.data import ingest, synth
from covidtl.data.groups import series_number


def digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_layout_matches_the_real_datasets(synth_data):
    ct = synth_data / "ct"
    assert sorted(p.name for p in ct.iterdir()) == ["COVID", "non-COVID"]
    assert sorted(p.name for p in (ct / "COVID").iterdir()) == sorted(f"Covid ({n}).png" for n in range(1, 61))
    assert len(list((ct / "non-COVID").glob("Non-Covid (*).png"))) == 60
    xray = synth_data / "xray"
    for part in ("train", "test"):
        assert sorted(p.name for p in (xray / part).iterdir()) == ["Covid", "Normal", "Viral Pneumonia"]
    files = [p for p in xray.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} == {".jpeg", ".png"}
    assert sum("Covid" == p.parent.name for p in files) == 60
    assert {Image.open(p).mode for p in files} == {"L", "RGB"}
    assert {Image.open(p).mode for p in ct.rglob("*.png")} == {"RGB", "RGBA"}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path, synth_data):
    cfg = SynthConfig(out="data/synth", images_per_class=60, slices_per_patient=10, size=128, seed=7,
                      site2_images_per_class=20)
    synth.generate(cfg, tmp_path / "again")
    assert digests(tmp_path / "again") == digests(synth_data)
    small = SynthConfig(out="data/synth", images_per_class=6, slices_per_patient=3, size=64, seed=8,
                        site2_images_per_class=4)
    counts = synth.generate(small, tmp_path / "other")
    assert counts == {"ct": 12, "xray": 12, "ct-site2": 8, "xray-site2": 8}
    with Image.open(tmp_path / "other" / "ct" / "COVID" / "Covid (1).png") as im:
        assert max(im.size) <= 64


def test_covid_slices_differ_by_patchy_opacities_only(synth_data):
    rng = np.random.default_rng(0)
    patient = synth._ct_patient(rng, covid=True)
    clear = dict(patient, patches=[])
    sick = np.asarray(synth._ct_slice(patient, 0.5, 128, np.random.default_rng(1)), dtype=float)
    well = np.asarray(synth._ct_slice(clear, 0.5, 128, np.random.default_rng(1)), dtype=float)
    brighter = (sick - well) > 8
    assert sick.mean() > well.mean()
    assert 0.005 < brighter.mean() < 0.25  # patches, not a whole-image shift


def test_brightness_alone_does_not_give_the_class_away(synth_data):
    # the best mean-brightness threshold must stay far from perfect, or a model learns nothing real
    for folders in (("ct/COVID", "ct/non-COVID"), ("xray/train/Covid", "xray/train/Normal")):
        means = [
            [np.asarray(Image.open(p).convert("L"), dtype=float).mean() for p in (synth_data / f).iterdir()]
            for f in folders
        ]
        values = np.concatenate(means)
        labels = np.r_[np.ones(len(means[0])), np.zeros(len(means[1]))]
        best = max(max(((values > t) == labels).mean(), ((values <= t) == labels).mean()) for t in values)
        assert best < 0.85


def test_ct_series_groups_are_the_synthetic_patients(tmp_path, synth_data):
    cfg = config(tmp_path, **{"data.datasets.ct.path": str(synth_data / "ct")})
    m = ingest.ingest(cfg, "ct", jobs=1, progress=False).manifest
    m["patient"] = [f"{src}/{(series_number(Path(p).name) - 1) // 10}" for src, p in zip(m["source"], m["path"])]
    # same patient <=> same group
    assert m.groupby("patient")["group"].nunique().eq(1).all()
    assert m["group"].nunique() == m["patient"].nunique() == 12


def _grey(files) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("L"), dtype=float) for p in files]


def test_second_site_has_both_classes_and_another_scanner_look(tmp_path, synth_data):
    """Same classes from the same generator, other patients; another window and a wider field."""
    for first, second in (("ct", "ct-site2"), ("xray", "xray-site2")):
        one = _grey(p for p in (synth_data / first).rglob("*") if p.is_file())
        two = _grey(p for p in (synth_data / second).rglob("*") if p.is_file())
        assert len(two) == 40
        # contrast: the second site's window compresses the grey levels
        assert np.mean([x.std() for x in two]) < np.mean([x.std() for x in one]) - 2
    ct1 = _grey((synth_data / "ct").rglob("*.png"))
    ct2 = _grey((synth_data / "ct-site2").rglob("*.jpg"))
    assert {x.shape for x in ct2} == {(128, 128)} and len({x.shape for x in ct1}) > 10  # uncropped
    assert np.mean([x.mean() for x in ct2]) > np.mean([x.mean() for x in ct1]) + 3  # lifted blacks
    # the round field of view: corners black, the field's edge (air inside it) grey
    assert max(x[:4, :4].mean() for x in ct2) < 10 and min(x[64, 8:14].mean() for x in ct2) > 25

    cfg = config(tmp_path, **{"data.datasets.ct.path": str(synth_data / "ct-site2")})
    m = ingest.ingest(cfg, "ct", jobs=1, progress=False).manifest
    assert m["label"].value_counts().to_dict() == {"covid": 20, "non_covid": 20}
    first = ingest.ingest(config(tmp_path, **{"data.datasets.ct.path": str(synth_data / "ct")}),
                          "ct", jobs=1, progress=False).manifest
    assert not set(m["sha256"]) & set(first["sha256"])
