"""Shortcut probe: does a model read the lungs, or the image's source (borders, corners, markers)?

A trained model is scored on the same images with the lung fields hidden, with only the border
kept, with only the centre kept, and shrunk or shifted a little. A model that still separates
COVID from non-COVID with the lungs hidden, or whose Grad-CAM weight lies mostly outside the lung
region, has learnt where its images came from: it will likely fail on X-rays from elsewhere.
`covidtl probe` writes probe.csv / probe_classes.csv / probe.json / probe.png; a study cell's
probe lives in `models/<cell>/probe/`, and its verdict (probe.json, `cells.read_verdict`) goes into
the cell's model card. A
cross-validated recipe (`covidtl probe --cv cv/<dataset>/<cell>`) is probed fold by fold, each
model on its own test fold, and judged once on the pooled images, in `cv/<dataset>/<cell>/probe/`.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlflow
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from covidtl import cv_records, stats, tracking
from covidtl.cells import Cell, write_verdict
from covidtl.data import tables
from covidtl.data.pipeline import label_indices, readable_rows
from covidtl.errors import UserError
from covidtl.files import atomic_path, atomic_write_text
from covidtl.gradcam import GradCam, load_image, overlay
from covidtl.models.registry import get_spec, preprocess_for
from covidtl.paths import CLASSES, p_covid
from covidtl.trained import SPLITS, load_rows, load_trained, model_files

logger = logging.getLogger(__name__)  # `log` is the MLflow switch of this module's functions

# The lung region: the central box that leaves this fraction of each side out (0.10: the central
# 80% x 80%, 64% of the area, so an even Grad-CAM map puts 36% of its weight outside). On a PA
# chest X-ray the lung fields lie inside it; the corners and edges, where collections put their
# text, rulers and markers, lie outside.
LUNG_MARGIN = 0.10
# "Only the border": the outer band of this fraction of each side (corners, edges, markers);
BORDER = 0.07  # inside LUNG_MARGIN: the band shows nothing of the lung region
SHRINK = 0.85  # the image scaled to 85% about its centre, the rest black
SHIFT = 0.08  # the image moved right and down by 8% of its side, black where it left
# The verdict (shortcut_risk): a hidden-lung variant that still separates the classes ...
SEPARATES_AUC = 0.75
SEPARATES_LOW = 0.5  # ... with the lower bound of its AUC interval above chance
OUTSIDE_MASS = 0.5  # ... or most of the mean Grad-CAM weight outside the lung region
COARSEST_GRID = 2  # a feature map this small (e.g. the custom CNN's 2x2 at 200 px) cannot place weight
# Not lungs_blurred: a blurred opacity keeps its brightness, a real sign a lung reader may still use.
HIDDEN_LUNG_VARIANTS = ("lungs_black", "border_only")
TABLE_METRICS = ("roc_auc", "accuracy", "balanced_accuracy", "recall_covid", "recall_non_covid")


# --------------------------------------------------------------------------- masks


def lung_box(size: int, margin: float = LUNG_MARGIN) -> tuple[slice, slice]:
    """(rows, cols) slices of the central lung region of a size x size image."""
    lo, hi = int(round(margin * size)), int(round((1 - margin) * size))
    return slice(lo, hi), slice(lo, hi)


def lung_mask(size: int, margin: float = LUNG_MARGIN) -> np.ndarray:
    """(size, size) bool: True inside the lung region."""
    mask = np.zeros((size, size), dtype=bool)
    mask[lung_box(size, margin)] = True
    return mask


def border_mask(size: int, band: float = BORDER) -> np.ndarray:
    """(size, size) bool: True in the outer band (width `band` of the side) of the image."""
    width = max(1, int(round(band * size)))
    mask = np.ones((size, size), dtype=bool)
    mask[width:size - width, width:size - width] = False
    return mask


def hide_lungs(images: np.ndarray) -> np.ndarray:
    """The lung region blacked out; the rest as it was."""
    out = np.array(images, dtype="float32", copy=True)
    rows, cols = lung_box(out.shape[1])
    out[:, rows, cols] = 0.0
    return out


def blur_lungs(images: np.ndarray, blocks: int = 4) -> np.ndarray:
    """The lung region replaced by its mean over a coarse `blocks` x `blocks` grid: brightness kept,
    every structure (vessels, opacities) gone."""
    out = np.array(images, dtype="float32", copy=True)
    rows, cols = lung_box(out.shape[1])
    region = out[:, rows, cols]
    edges = np.linspace(0, region.shape[1], blocks + 1).round().astype(int)
    for r0, r1 in zip(edges[:-1], edges[1:]):
        for c0, c1 in zip(edges[:-1], edges[1:]):
            region[:, r0:r1, c0:c1] = region[:, r0:r1, c0:c1].mean(axis=(1, 2), keepdims=True)
    out[:, rows, cols] = region
    return out


def keep_border(images: np.ndarray) -> np.ndarray:
    """Only the outer band kept (corners, edges, text markers); everything inside it black."""
    out = np.array(images, dtype="float32", copy=True)
    out[:, ~border_mask(out.shape[1])] = 0.0
    return out


def keep_centre(images: np.ndarray) -> np.ndarray:
    """Only the lung region kept; the border, corners and markers black."""
    out = np.array(images, dtype="float32", copy=True)
    out[:, ~lung_mask(out.shape[1])] = 0.0
    return out


def shrink(images: np.ndarray, scale: float = SHRINK) -> np.ndarray:
    """The image scaled down about its centre (nearest pixel), black around it."""
    images = np.asarray(images, dtype="float32")
    size = images.shape[1]
    small = max(1, int(round(scale * size)))
    pick = np.minimum((np.arange(small) * size / small).astype(int), size - 1)
    out = np.zeros_like(images)
    at = (size - small) // 2
    out[:, at:at + small, at:at + small] = images[:, pick][:, :, pick]
    return out


def shift(images: np.ndarray, fraction: float = SHIFT) -> np.ndarray:
    """The image moved right and down by `fraction` of its side; black where it left."""
    images = np.asarray(images, dtype="float32")
    step = max(1, int(round(fraction * images.shape[1])))
    out = np.zeros_like(images)
    out[:, step:, step:] = images[:, :-step, :-step]
    return out


@dataclass(frozen=True)
class Variant:
    name: str
    what: str
    apply: Callable[[np.ndarray], np.ndarray]


VARIANTS = (
    Variant("original", "the images as scored", lambda x: np.asarray(x, dtype="float32")),
    Variant("lungs_black", "lung region blacked out", hide_lungs),
    Variant("lungs_blurred", "lung region blurred to 4x4 means", blur_lungs),
    Variant("border_only", "only the outer band kept", keep_border),
    Variant("centre_only", "only the lung region kept", keep_centre),
    Variant("shrunk", f"scaled to {SHRINK:.0%} about the centre", shrink),
    Variant("shifted", f"moved {SHIFT:.0%} right and down", shift),
)


# --------------------------------------------------------------------------- scores and verdict


def variant_table(
    y_true: np.ndarray, p_covid: dict[str, np.ndarray], groups, *, resamples: int, confidence: float,
    seed: int,
) -> pd.DataFrame:
    """One row per variant: each metric of TABLE_METRICS with its group-bootstrap interval."""
    rows = []
    what = {v.name: v.what for v in VARIANTS}
    for name, p in p_covid.items():
        point = stats.metrics_at(y_true, p)
        intervals = (stats.bootstrap_intervals(y_true, p, groups, resamples=resamples,
                                               confidence=confidence, seed=seed) if resamples else {})
        row: dict[str, Any] = {"variant": name, "what": what.get(name, name), "images": len(p)}
        for metric in TABLE_METRICS:
            low, high = intervals.get(metric, (np.nan, np.nan))
            row.update({metric: point[metric], f"{metric}_ci_low": low, f"{metric}_ci_high": high})
        rows.append(row)
    return pd.DataFrame(rows)


def class_table(y_true: np.ndarray, p_covid: dict[str, np.ndarray]) -> pd.DataFrame:
    """Per variant and true class: how that class's p(COVID) distribution moves from the original."""
    rows = []
    base = p_covid["original"]
    for name, p in p_covid.items():
        for index, label in enumerate(CLASSES):
            of_class = y_true == index
            if not of_class.any():
                continue
            q1, median, q3 = np.percentile(p[of_class], [25, 50, 75])
            rows.append({
                "variant": name, "class": label, "images": int(of_class.sum()),
                "mean_p_covid": float(p[of_class].mean()), "median_p_covid": float(median),
                "q1_p_covid": float(q1), "q3_p_covid": float(q3),
                "called_covid": float((p[of_class] >= 0.5).mean()),
                "mean_change": float((p[of_class] - base[of_class]).mean()),
            })
    return pd.DataFrame(rows)


def verdict(table: pd.DataFrame, outside_mass: float | None) -> dict[str, Any]:
    """shortcut_risk and the card's one plain sentence (the card adds its figure), from the variant
    table and the Grad-CAM weight outside the lungs (None: not measurable)."""
    by_name = table.set_index("variant")
    hidden = [name for name in HIDDEN_LUNG_VARIANTS if name in by_name.index]
    separating = [f"{by_name.at[n, 'what']}: ROC AUC {by_name.at[n, 'roc_auc']:.3f} "
                  f"[{by_name.at[n, 'roc_auc_ci_low']:.3f}, {by_name.at[n, 'roc_auc_ci_high']:.3f}]"
                  for n in hidden
                  if by_name.at[n, "roc_auc"] > SEPARATES_AUC and by_name.at[n, "roc_auc_ci_low"] > SEPARATES_LOW]
    looks_outside = outside_mass is not None and outside_mass > OUTSIDE_MASS
    evidence = []
    if separating:
        evidence.append(f"it still separates COVID from non-COVID with the lungs hidden ({'; '.join(separating)})")
    if looks_outside:
        evidence.append(f"{outside_mass:.0%} of its Grad-CAM weight lies outside the central lung region")
    risk = bool(evidence)
    if risk:
        sentence = ("This model uses image source or border cues and would likely fail on X-rays from "
                    f"elsewhere: {' and '.join(evidence)}.")
    else:
        aucs = ", ".join(f"{by_name.at[n, 'what']} {by_name.at[n, 'roc_auc']:.3f}" for n in hidden)
        mass = "" if outside_mass is None else f"; {outside_mass:.0%} of its Grad-CAM weight outside the lung region"
        sentence = (f"The shortcut probe found no sign of source cues (ROC AUC with the lungs hidden: "
                    f"{aucs}{mass}); that does not show it works on X-rays from elsewhere.")
    return {"shortcut_risk": risk, "sentence": sentence, "evidence": evidence}


# --------------------------------------------------------------------------- Grad-CAM


@dataclass
class CamSummary:
    mean_map: dict[str, np.ndarray] = field(default_factory=dict)  # per true class, (h, w)
    outside: dict[str, float] = field(default_factory=dict)  # per class: mean share outside the lungs
    outside_all: float | None = None  # over every image
    samples: dict[str, list[tuple[np.ndarray, np.ndarray, float]]] = field(default_factory=dict)
    note: str = ""
    grid: tuple[int, int] | None = None  # the feature map's size: the map's real resolution
    shares: np.ndarray | None = None  # per image: its share outside the lungs (NaN: not measurable)


def outside_share(heatmaps: np.ndarray, margin: float = LUNG_MARGIN) -> np.ndarray:
    """Per map (n, h, w): its share of weight outside the lung region (NaN for an all-zero map)."""
    heat = np.asarray(heatmaps, dtype="float64")
    total = heat.sum(axis=(1, 2))
    inside = heat[:, lung_mask(heat.shape[1], margin)].sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, 1 - inside / np.where(total > 0, total, 1), np.nan)


# --------------------------------------------------------------------------- running it


@dataclass
class ProbeResult:
    table: pd.DataFrame
    classes: pd.DataFrame
    verdict: dict[str, Any]
    cams: CamSummary
    out: Path
    files: list[Path]
    run_id: str | None = None  # the model's MLflow run the probe was logged to


def score_variants(model, preprocess, images: np.ndarray, batch_size: int = 32) -> dict[str, np.ndarray]:
    """p(COVID) per variant for raw decoded images (n, h, w, 3) in [0, 255]."""
    out: dict[str, list[np.ndarray]] = {v.name: [] for v in VARIANTS}
    for start in range(0, len(images), batch_size):
        raw = images[start:start + batch_size]
        for variant in VARIANTS:
            x = preprocess(variant.apply(raw).copy())
            out[variant.name].append(p_covid(np.asarray(model(x, training=False))))
    return {name: np.concatenate(parts).astype("float64") for name, parts in out.items()}


def gradcam_summary(model, preprocess, images: np.ndarray, y_true: np.ndarray, p_covid: np.ndarray,
                    samples: int = 3, batch_size: int = 16) -> CamSummary:
    """Mean Grad-CAM map (of the predicted class) per true class, its weight outside the lungs, and
    a few overlays per class."""
    try:
        cam = GradCam(model)
    except ValueError as exc:  # a model without a conv layer to explain
        return CamSummary(note=f"no Grad-CAM: {exc}")
    maps = np.concatenate([cam(preprocess(images[s:s + batch_size].copy())).heatmaps
                           for s in range(0, len(images), batch_size)])
    grid = tuple(int(d) for d in cam.forward.outputs[0].shape[1:3])
    summary = CamSummary(grid=grid)
    share = outside_share(maps)
    if min(grid) <= COARSEST_GRID:
        # A 2x2 map upsampled bilinearly is symmetric enough that any centred box holds exactly its
        # area share of the weight: the number would say nothing about where the model looks.
        summary.note = (f"Grad-CAM map {grid[0]}x{grid[1]}: too coarse to tell inside from outside "
                        "the lung region")
        share = np.full(len(maps), np.nan)
    summary.shares = share
    summary.outside_all = float(np.nanmean(share)) if np.isfinite(share).any() else None
    for index, label in enumerate(CLASSES):
        rows = np.flatnonzero(y_true == index)
        if not rows.size:
            continue
        summary.mean_map[label] = maps[rows].mean(axis=0)
        finite = share[rows][np.isfinite(share[rows])]
        summary.outside[label] = float(finite.mean()) if finite.size else float("nan")
        summary.samples[label] = [(images[i], maps[i], float(p_covid[i])) for i in rows[:samples]]
    return summary


def probe_figure(cams: CamSummary, classes: pd.DataFrame, title: str):
    """Per class: a few Grad-CAM overlays and the mean map with the lung box; below, p(COVID) per
    variant and class (median and quartiles)."""
    labels = [c for c in CLASSES if c in cams.mean_map] or list(dict.fromkeys(classes["class"]))
    cols = max([len(cams.samples.get(c, [])) for c in labels] + [1]) + 1
    fig = Figure(figsize=(2.4 * cols, 2.6 * len(labels) + 3.0), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[2.6 * len(labels), 3.0])
    axes = top.subplots(len(labels), cols, squeeze=False)
    for r, label in enumerate(labels):
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
        for c, (image, heat, p) in enumerate(cams.samples.get(label, [])):
            axes[r][c].imshow(overlay(image.round().astype("uint8"), heat))
            axes[r][c].set_title(f"{label} · p_covid {p:.2f}", fontsize=8)
        mean = cams.mean_map.get(label)
        ax = axes[r][-1]
        if mean is None:
            ax.text(0.5, 0.5, cams.note or "no Grad-CAM", ha="center", va="center", fontsize=8, wrap=True)
            continue
        ax.imshow(mean, cmap="jet", vmin=0, vmax=max(float(mean.max()), 1e-6))
        rows, cols_ = lung_box(mean.shape[0])
        ax.add_patch(Rectangle((cols_.start - 0.5, rows.start - 0.5), cols_.stop - cols_.start,
                               rows.stop - rows.start, fill=False, edgecolor="white", linewidth=1.5))
        outside = cams.outside.get(label, float("nan"))
        ax.set_title(f"mean map, {label}\n" + (f"{outside:.0%} outside the box" if np.isfinite(outside)
                                               else f"{cams.grid[0]}x{cams.grid[1]} map: too coarse"),
                     fontsize=8)
        axes[r][0].set_ylabel(label, fontsize=9)
    ax = bottom.subplots()
    variants = list(dict.fromkeys(classes["variant"]))
    for k, label in enumerate(labels):
        part = classes[classes["class"] == label].set_index("variant").reindex(variants)
        x = np.arange(len(variants)) + (k - (len(labels) - 1) / 2) * 0.25
        ax.errorbar(x, part["median_p_covid"], yerr=[part["median_p_covid"] - part["q1_p_covid"],
                    part["q3_p_covid"] - part["median_p_covid"]], fmt="o", capsize=3,
                    label=f"true {label} (median, quartiles)")
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(np.arange(len(variants)), variants, fontsize=8)
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("p(COVID)")
    ax.legend(fontsize=8, loc="best")
    fig.suptitle(title + "  (white box: the lung region the masks hide or keep)", fontsize=10)
    return fig


def write_outputs(out: Path, table: pd.DataFrame, classes: pd.DataFrame, summary: dict[str, Any],
                  figure) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = [atomic_write_text(out / "probe.csv", table.to_csv(index=False)),
             atomic_write_text(out / "probe_classes.csv", classes.to_csv(index=False))]
    with atomic_path(out / "probe.png") as tmp:
        figure.savefig(tmp, dpi=80, format="png")
    files.append(out / "probe.png")
    # Written last: the verdict the card reads stands for a complete set of files.
    files.append(write_verdict(out, summary))
    return files


def probe(
    cfg, model_uri: str, data: str, split: str = "test", out: str | Path | None = None,
    *, samples: int = 3, log: bool = True,
) -> ProbeResult:
    """Score `model_uri` on `data` under every variant, explain it, judge it and write the files."""
    if split not in SPLITS:
        raise UserError(f"--split {split}: choose one of {', '.join(SPLITS)}")
    if out is None:
        # A study cell's probe lives in its folder, where its model card looks for it.
        local = Path(model_uri)
        is_uri = "://" in model_uri or ":/" in model_uri
        if not is_uri:
            model_files(local)  # a path that holds no model: one line, before anything runs
        if is_uri or not local.is_dir():
            raise UserError(f"--model-uri {model_uri}: give --out (only a models/<cell>/ folder has "
                            "a place of its own for the probe)")
        out = Cell(local if (local / "model").is_dir() else local.parent).probe_dir
    loaded = load_trained(model_uri, cfg)
    with tempfile.TemporaryDirectory(prefix="covidtl-probe-") as tmp:
        rows, _, _, is_dataset = load_rows(cfg, data, split, Path(tmp))
        rows = readable_rows(rows).reset_index(drop=True)
        if rows.empty:
            raise UserError(f"--data {data}: no readable image in the {split if is_dataset else 'folder'}")
        probed = probe_rows(loaded, rows, samples)
    scored = f"{split} split of {data}" if is_dataset else f"folder {data}"
    about = {"model_uri": model_uri, "model": loaded.name, "run_id": loaded.source_run_id,
             "data": str(data), "scored": scored}
    return judge_and_write(cfg, probed, Path(out), about, f"Shortcut probe: {loaded.name} on the {scored}",
                           log=log)


def probe_cv(
    cfg, cv_dir: str | Path, out: str | Path | None = None,
    *, samples: int = 3, log: bool = True,
) -> ProbeResult:
    """A cross-validated recipe's probe: each fold's model on its own test fold (fold-<k>/split.csv's
    test rows), the variants' p(COVID) pooled over folds and judged once; files in <cv_dir>/probe/
    (logged to the cv run's parent run)."""
    members = cv_records.members(cv_dir)  # no finished cv run: one line, before any model loads
    summary = cv_records.read_summary(cv_dir)
    probes, folds = [], []
    for member in map(Path, members):
        split_file = member.parent / "split.csv"
        table = tables.read_split(cfg, summary["dataset"], split_file)
        rows = readable_rows(table[table["split"] == "test"]).reset_index(drop=True)
        if rows.empty:
            raise UserError(f"{split_file}: no readable test image to probe; run the same cv command again")
        loaded = load_trained(str(member), cfg)
        logger.info(f"probe {member.parent.name}: its model on its {len(rows)} test images")
        probes.append(probe_rows(loaded, rows, samples))
        folds.append({"fold": member.parent.name, "model_uri": str(member), "run_id": loaded.source_run_id,
                      "images": int(len(rows))})
    scored = f"each fold's own test split of {summary['dataset']} ({len(folds)} folds, pooled)"
    about = {"cv": str(cv_dir), "model": summary.get("model"), "run_id": summary.get("run_id"),
             "data": summary["dataset"], "scored": scored, "folds": folds}
    title = f"Shortcut probe: {summary.get('cell') or Path(cv_dir).name} cross-validated, {scored}"
    return judge_and_write(cfg, pool_probes(probes, samples), Path(out or cv_records.probe_dir(cv_dir)), about, title,
                           log=log)


@dataclass
class Probed:
    """p(COVID) of every variant for a set of images, and their Grad-CAM summary."""

    y_true: np.ndarray
    groups: np.ndarray | None
    p_covid: dict[str, np.ndarray]
    cams: CamSummary
    size: int  # the models' input side


def probe_rows(loaded, rows: pd.DataFrame, samples: int) -> Probed:
    """A loaded model (`trained.load_trained`) scored and explained on readable `rows`."""
    preprocess = preprocess_for(get_spec(loaded.name), loaded.preprocessing)
    size = int(loaded.model.input_shape[1])
    images = np.stack([load_image(p, size) for p in rows["path"].astype(str)])
    y_true = label_indices(rows)
    groups = rows["group"].astype(str).to_numpy() if "group" in rows else None
    p_covid = score_variants(loaded.model, preprocess, images)
    cams = gradcam_summary(loaded.model, preprocess, images, y_true, p_covid["original"], samples)
    return Probed(y_true, groups, p_covid, cams, size)


def pool_probes(probes: list[Probed], samples: int) -> Probed:
    """Several models' probes on disjoint images (a cv run's folds) as one set of images."""
    groups = None if any(p.groups is None for p in probes) else np.concatenate([p.groups for p in probes])
    return Probed(np.concatenate([p.y_true for p in probes]), groups,
                  {name: np.concatenate([p.p_covid[name] for p in probes]) for name in probes[0].p_covid},
                  pool_cams([(p.cams, p.y_true) for p in probes], samples), probes[0].size)


def pool_cams(parts: list[tuple[CamSummary, np.ndarray]], samples: int) -> CamSummary:
    """Grad-CAM summaries of disjoint images (with their classes) as one: each class's mean map
    weighted by its images, the share outside the lungs over every image, the first samples."""
    notes = "; ".join(dict.fromkeys(cams.note for cams, _ in parts if cams.note))
    explained = [(cams, y) for cams, y in parts if cams.shares is not None]
    if not explained:
        return CamSummary(note=notes)
    share = np.concatenate([cams.shares for cams, _ in explained])
    y_true = np.concatenate([y for _, y in explained])
    pooled = CamSummary(note=notes, grid=explained[0][0].grid, shares=share,
                        outside_all=float(np.nanmean(share)) if np.isfinite(share).any() else None)
    for index, label in enumerate(CLASSES):
        counts = [int((y == index).sum()) for _, y in explained]
        if not sum(counts):
            continue
        pooled.mean_map[label] = sum(n * cams.mean_map[label] for (cams, _), n in zip(explained, counts) if n) / sum(counts)
        finite = share[y_true == index][np.isfinite(share[y_true == index])]
        pooled.outside[label] = float(finite.mean()) if finite.size else float("nan")
        pooled.samples[label] = [s for cams, _ in explained for s in cams.samples.get(label, [])][:samples]
    return pooled


def judge_and_write(
    cfg, probed: Probed, out: Path, about: dict[str, Any], title: str, *, log: bool,
) -> ProbeResult:
    """The variant tables and verdict of `probed`, its files in `out`, logged to `about`'s run_id."""
    table = variant_table(probed.y_true, probed.p_covid, probed.groups, resamples=cfg.eval.bootstrap,
                          confidence=cfg.eval.confidence, seed=cfg.eval.seed)
    classes = class_table(probed.y_true, probed.p_covid)
    cams = probed.cams
    judged = verdict(table, cams.outside_all)
    summary = {
        **judged, **about, "images": int(len(probed.y_true)),
        "lung_region": {"margin": LUNG_MARGIN, "area_share": float(lung_mask(probed.size).mean())},
        "gradcam_outside_lungs": cams.outside_all, "gradcam_outside_lungs_by_class": cams.outside,
        "gradcam_note": cams.note, "gradcam_grid": cams.grid, "variants": table.to_dict("records"),
        "by_class": classes.to_dict("records"),
    }
    files = write_outputs(out, table, classes, summary, probe_figure(cams, classes, title))
    result = ProbeResult(table, classes, judged, cams, out, files)
    if log:
        result.run_id = log_probe(about.get("run_id"), table, cams, judged, out)
    return result


def probe_metrics(table: pd.DataFrame, cams: CamSummary, judged: dict[str, Any]) -> dict[str, float]:
    """probe_auc_<variant> (+ _ci_low/_ci_high), probe_accuracy_<variant>, Grad-CAM share, verdict."""
    metrics: dict[str, float] = {}
    for row in table.to_dict("records"):
        for metric, short in (("roc_auc", "auc"), ("accuracy", "accuracy")):
            for end in ("", "_ci_low", "_ci_high"):
                metrics[f"probe_{short}_{row['variant']}{end}"] = float(row[f"{metric}{end}"])
    if cams.outside_all is not None:
        metrics["probe_gradcam_outside_lungs"] = cams.outside_all
    metrics["probe_shortcut_risk"] = float(judged["shortcut_risk"])
    return metrics


def log_probe(run_id: str | None, table, cams, judged, out: Path) -> str | None:
    """The probe's metrics and files on the model's own MLflow run (artifact folder probe/)."""
    if not run_id:
        logger.warning("Not logged to MLflow: the model has no run of its own (a model.keras without card.json)")
        return None
    mlflow.set_tracking_uri(tracking.tracking_uri())
    try:
        mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise UserError(f"run {run_id}: not in {tracking.tracking_uri()}; point MLFLOW_TRACKING_URI at "
                        "the store the model was trained with, or pass --no-log") from None
    with mlflow.start_run(run_id=run_id):
        tracking.log_metrics(probe_metrics(table, cams, judged))
        mlflow.set_tag("shortcut_risk", str(judged["shortcut_risk"]).lower())
        mlflow.log_artifacts(str(out), artifact_path="probe")
    return run_id
