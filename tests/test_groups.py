"""Group ids: duplicates, near-duplicates and series runs stay together; unrelated images do not."""

from __future__ import annotations

import numpy as np
from PIL import Image

from covidtl.data.groups import (
    MIN_SERIES_RUN,
    assign_groups,
    near_duplicate_pairs,
    series_cuts,
    series_number,
    size_summary,
)
from covidtl.data.images import difference_hash, normalised_thumbnail


def textures(n: int, seed: int = 0, size: int = 64) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).resize((size, size), Image.BILINEAR)
        for _ in range(n)
    ]


def drifting_series(patients: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Thumbnails and sizes of patients whose slices drift slowly; a new patient is a new texture."""
    rng = np.random.default_rng(seed)
    thumbs, sizes = [], []
    for n in patients:
        base = rng.normal(size=(8, 8))
        drift = rng.normal(size=(8, 8))
        width, height = rng.integers(150, 500, size=2)
        for k in range(n):
            slice_ = base + 0.03 * k * drift
            grey = Image.fromarray(np.uint8(np.clip(128 + 40 * slice_, 0, 255))).resize((64, 64), Image.BILINEAR)
            thumbs.append(normalised_thumbnail(grey, 32))
            sizes.append((width + k, height + k))
    return np.stack(thumbs), np.array(sizes, dtype=float)


def test_series_number_reads_the_acquisition_number():
    assert series_number("Covid (12).png") == 12
    assert series_number("Non-Covid (151).png") == 151
    assert series_number("patient3_slice017.png") == 17
    assert series_number("scan.png") is None


def test_series_cuts_start_a_group_where_the_patient_changes():
    thumbs, sizes = drifting_series([12, 20, 8])
    assert series_cuts(thumbs, sizes, threshold=0.5).tolist() == [12, 32]


def test_short_runs_join_their_more_similar_neighbour():
    thumbs, sizes = drifting_series([12, 2, 20])  # a 2-file fragment between two patients
    cuts = series_cuts(thumbs, sizes, threshold=0.5)
    runs = np.diff([0, *cuts, len(thumbs)])
    assert len(cuts) == 1 and runs.min() >= MIN_SERIES_RUN


def test_near_duplicate_pairs_by_hamming_distance():
    images = textures(4)
    hashes = [difference_hash(im, 16) for im in images]
    # the same picture re-encoded smaller and slightly brighter is still a near-duplicate
    hashes.append(difference_hash(images[2].resize((40, 40)).point(lambda v: min(255, v + 8)), 16))
    assert near_duplicate_pairs(hashes, max_bits=10).tolist() == [[2, 4]]
    assert near_duplicate_pairs(hashes, max_bits=0).tolist() == []


def test_assign_groups_unions_duplicates_near_duplicates_and_series():
    thumbs, sizes = drifting_series([6, 6])
    n = len(thumbs)
    sha = [f"s{i}" for i in range(n)] + ["s0"]  # the last file is a byte copy of the first
    images = textures(n + 1, seed=1)
    dhash = [difference_hash(im, 16) for im in images]
    dhash[5] = dhash[11]  # a near-duplicate linking the two patients' last slices
    sources = ["COVID"] * n + ["elsewhere"]
    names = [f"Covid ({i + 1}).png" for i in range(n)] + ["copy.png"]
    all_thumbs = np.vstack([thumbs, thumbs[:1]])
    all_sizes = np.vstack([sizes, sizes[:1]])
    kwargs = dict(near_duplicate_bits=10, series_break=0.5)

    series = assign_groups(sha, dhash, sources, names, all_thumbs, all_sizes, series=True, **kwargs)
    assert len(set(series)) == 1  # two patients joined by a near-duplicate, plus the copy

    dhash = [difference_hash(im, 16) for im in images]
    series = assign_groups(sha, dhash, sources, names, all_thumbs, all_sizes, series=True, **kwargs)
    assert series[:6] == ["g00001"] * 6 and set(series[6:12]) == {"g00002"} and series[12] == "g00001"

    flat = assign_groups(sha, dhash, sources, names, all_thumbs, all_sizes, series=False, **kwargs)
    assert len(set(flat)) == n and flat[12] == flat[0]  # without series only the copy is linked


def test_size_summary_describes_the_distribution():
    summary = size_summary(["a"] * 3 + ["b"] * 5 + ["c"])
    assert summary["count"] == 3 and summary["singletons"] == 1
    assert (summary["min"], summary["median"], summary["max"]) == (1, 3.0, 5)
