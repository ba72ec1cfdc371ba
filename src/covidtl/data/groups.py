"""Group ids: images that must stay in one split (duplicates, near-duplicates, one patient's slices).

Three kinds of link join two images; groups are the connected components (union-find):
1. exact duplicates: same sha256;
2. near-duplicates: difference hashes within `near_duplicate_bits` (Hamming distance);
3. series (datasets with ``series: true``): inside one class folder, files are ordered by the number
   in their name; neighbouring files stay together unless the series changes abruptly, i.e. unless
   every pair across the boundary (SERIES_WINDOW files each side) scores below `series_break`.
   The score is thumbnail correlation x overlap of the two image rectangles, so a jump in content
   or in crop size (a new body) both count as a change. Runs shorter than MIN_SERIES_RUN files
   join their more similar neighbour.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

# Files each side of a candidate boundary that are compared: one odd slice (a motion artefact,
# a slice through the liver dome) must not cut a patient in two.
SERIES_WINDOW = 3
# Shorter runs of a series are fragments (a liver-dome slice, an odd first slice), not patients.
MIN_SERIES_RUN = 5
_NUMBER = re.compile(r"\d+")


class UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)


def series_number(name: str) -> int | None:
    """The acquisition number in a file name: the last run of digits ('Covid (12).png' -> 12)."""
    found = _NUMBER.findall(name.rsplit(".", 1)[0])
    return int(found[-1]) if found else None


def hash_bits(hex_hashes: Sequence[str]) -> np.ndarray:
    """Hex difference hashes -> (n, bytes) uint8 array."""
    return np.array([np.frombuffer(bytes.fromhex(h), dtype=np.uint8) for h in hex_hashes])


def near_duplicate_pairs(hex_hashes: Sequence[str], max_bits: int, chunk: int = 512) -> np.ndarray:
    """All pairs (i < j) whose hashes differ in at most max_bits bits, as an (m, 2) array."""
    n = len(hex_hashes)
    if n < 2:
        return np.empty((0, 2), dtype=np.int64)
    bits = hash_bits(hex_hashes)
    found = []
    for start in range(0, n, chunk):
        block = bits[start : start + chunk]
        distance = np.bitwise_count(block[:, None, :] ^ bits[None, :, :]).sum(axis=2)
        i, j = np.nonzero(distance <= max_bits)
        i = i + start
        keep = i < j
        found.append(np.stack([i[keep], j[keep]], axis=1))
    return np.concatenate(found).astype(np.int64)


def series_score(
    thumbs: np.ndarray, sizes: np.ndarray, a: np.ndarray, b: np.ndarray
) -> np.ndarray:
    """Similarity of image pairs (a[k], b[k]): thumbnail correlation x overlap of their rectangles."""
    corr = np.einsum("ij,ij->i", thumbs[a], thumbs[b])
    wa, ha = sizes[a, 0], sizes[a, 1]
    wb, hb = sizes[b, 0], sizes[b, 1]
    overlap = (np.minimum(wa, wb) * np.minimum(ha, hb)) / (np.maximum(wa, wb) * np.maximum(ha, hb))
    return corr * overlap


def boundary_scores(thumbs: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """For i = 1..n-1: the best score between a file before i and one from i on (within the window)."""
    n = len(thumbs)
    scores = np.empty(max(n - 1, 0))
    for i in range(1, n):
        before = np.arange(max(0, i - SERIES_WINDOW), i)
        after = np.arange(i, min(n, i + SERIES_WINDOW))
        a, b = np.repeat(before, len(after)), np.tile(after, len(before))
        scores[i - 1] = series_score(thumbs, sizes, a, b).max()
    return scores


def series_cuts(thumbs: np.ndarray, sizes: np.ndarray, threshold: float) -> np.ndarray:
    """Positions i (1..n-1) in an ordered series where a new group starts before file i.

    A cut is made where the boundary score drops below threshold; then runs shorter than
    MIN_SERIES_RUN join the neighbour they resemble more, since a patient is many slices and
    a stray fragment in another split would leak its patient.
    """
    scores = boundary_scores(thumbs, sizes)
    cuts = [i for i in range(1, len(thumbs)) if scores[i - 1] < threshold]
    while cuts:
        edges = [0, *cuts, len(thumbs)]
        lengths = np.diff(edges)
        shortest = int(np.argmin(lengths))
        if lengths[shortest] >= MIN_SERIES_RUN:
            break
        sides = [c for c in (edges[shortest], edges[shortest + 1]) if c in cuts]
        cuts.remove(max(sides, key=lambda c: scores[c - 1]))
    return np.array(cuts, dtype=np.int64)


def assign_groups(
    sha256: Sequence[str],
    dhash: Sequence[str],
    sources: Sequence[str],
    names: Sequence[str],
    thumbs: np.ndarray,
    sizes: np.ndarray,
    *,
    near_duplicate_bits: int,
    series: bool,
    series_break: float,
    shared_frame: bool = False,
) -> list[str]:
    """One group id per image ('g00001' ...), numbered in the order the images are given.

    shared_frame: the series' images share a fixed frame (full-field CT slices: the scanner's
    circle, the table), which makes every slice correlate with every other; the folder's mean
    thumbnail is removed first, so what is compared is the anatomy.
    """
    n = len(sha256)
    uf = UnionFind(n)
    first_of: dict[str, int] = {}
    for i, digest in enumerate(sha256):
        uf.union(first_of.setdefault(digest, i), i)
    for i, j in near_duplicate_pairs(dhash, near_duplicate_bits):
        uf.union(int(i), int(j))
    if series:
        for members in _series_orders(sources, names):
            compared = _without_shared_frame(thumbs[members]) if shared_frame else thumbs[members]
            cuts = set(series_cuts(compared, sizes[members], series_break).tolist())
            for k in range(1, len(members)):
                if k not in cuts:
                    uf.union(members[k - 1], members[k])
    ids: dict[int, str] = {}
    return [ids.setdefault(uf.find(i), f"g{len(ids) + 1:05d}") for i in range(n)]


def _without_shared_frame(thumbs: np.ndarray) -> np.ndarray:
    """Thumbnails minus their mean, renormalised: dot products are again correlations."""
    centred = thumbs - thumbs.mean(axis=0)
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    return centred / np.where(norms > 0, norms, 1.0)


def _series_orders(sources: Sequence[str], names: Sequence[str]) -> list[np.ndarray]:
    """Per folder, the indices of its numbered files in acquisition (number) order."""
    by_source: dict[str, list[tuple[int, int]]] = {}
    for i, (source, name) in enumerate(zip(sources, names)):
        number = series_number(name)
        if number is not None:
            by_source.setdefault(source, []).append((number, i))
    return [np.array([i for _, i in sorted(items)]) for items in by_source.values()]


def size_summary(groups: Sequence[str]) -> dict[str, float]:
    """Count and size distribution of groups, for the leakage report."""
    _, counts = np.unique(np.asarray(groups), return_counts=True)
    if not len(counts):
        return {"count": 0}
    q = np.percentile(counts, [10, 50, 90])
    return {
        "count": int(len(counts)),
        "singletons": int((counts == 1).sum()),
        "min": int(counts.min()),
        "p10": float(q[0]),
        "median": float(q[1]),
        "p90": float(q[2]),
        "max": int(counts.max()),
        "mean": round(float(counts.mean()), 2),
    }
