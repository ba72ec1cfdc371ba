"""The README's results tables, generated from `covidtl cv` summaries (`covidtl results`), never
typed by hand.

One markdown table per dataset, one row per cross-validated recipe: its pooled out-of-fold AUC
per slice and per patient, accuracy at the operating point across folds, what it cost, the
command that ran it, and the shortcut probe's verdict where `covidtl probe --cv` judged it.
Below each table, every row against each baseline on the same images: the paired patient-group
bootstrap of the AUC difference (Holm-corrected across every comparison shown) and DeLong's
test, which ignores the patient clusters.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidtl import comparisons, cv_records, stats
from covidtl.cells import read_verdict
from covidtl.config import Config, EvalConfig
from covidtl.errors import UserError
from covidtl.files import atomic_write_text
from covidtl.scores import with_interval

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
NONE = "—"


@dataclass(frozen=True)
class CVRun:
    """One finished cv run's folder, as the table reads it."""

    dir: Path
    summary: dict[str, Any]

    @property
    def name(self) -> str:
        return self.summary.get("cell") or self.dir.name

    @property
    def dataset(self) -> str:
        return self.summary["dataset"]

    @property
    def model(self) -> str | None:
        return self.summary.get("model")

    def predictions(self) -> pd.DataFrame:
        """Every image (path as stored), its fold and out-of-fold p_covid."""
        return cv_records.read_pooled(self.dir)

    def verdict(self) -> dict[str, Any] | None:
        return read_verdict(cv_records.probe_dir(self.dir))


def find_runs(cfg: Config, given: list[str | Path] = ()) -> list[CVRun]:
    """The given cv folders (or their summary.json), else every cv/<dataset>/*/summary.json under cv.out."""
    if given:
        dirs = [Path(p).parent if Path(p).name == "summary.json" else Path(p) for p in given]
    else:
        dirs = sorted(p.parent for p in Path(cfg.cv.out).glob("*/*/summary.json"))
        if not dirs:
            raise UserError(f"cv.out {cfg.cv.out}: no cv/<dataset>/<cell>/summary.json; run `covidtl cv` "
                            "first or give the cv folders")
    return [CVRun(d, cv_records.read_summary(d)) for d in dirs]


# --------------------------------------------------------------------------- the recipe table


def recipe_rows(runs: list[CVRun]) -> pd.DataFrame:
    """One row per cv run, each figure as its summary holds it (NaN where an older one lacks it)."""
    rows = []
    for run in runs:
        s = run.summary
        pooled, patient = s.get("pooled", {}), s.get("patient", {})
        op = s.get("across_folds", {}).get("op_accuracy", {})
        compute = s.get("compute", {})
        verdict = run.verdict()
        rows.append({
            "dataset": run.dataset, "recipe": run.name, "profile": s.get("profile", NONE),
            "model": run.model, "confidence": s.get("confidence", np.nan),
            **{f"slice_auc{end}": _number(pooled.get(f"pooled_roc_auc{end}")) for end in ("", "_ci_low", "_ci_high")},
            **{f"patient_auc{end}": _number(patient.get(f"patient_roc_auc{end}")) for end in ("", "_ci_low", "_ci_high")},
            "op_accuracy_mean": _number(op.get("mean")), "op_accuracy_sd": _number(op.get("sd")),
            "wall_minutes": _number(compute.get("wall_seconds")) / 60,
            "cpu_minutes": _number(compute.get("cpu_seconds")) / 60,
            "features_computed": _number(compute.get("feature_entries_computed")),
            "features_read": _number(compute.get("feature_entries_read")),
            "command": s.get("command"),
            "shortcut_probe": None if verdict is None else
            ("shortcut risk" if verdict.get("shortcut_risk") else "no sign found"),
        })
    return pd.DataFrame(rows)


def _number(value: Any) -> float:
    return np.nan if value is None else float(value)


def shared_settings(commands: list[str | None]) -> list[str]:
    """The `-S key=value` options every command gives (the data's paths, say): said once above the
    table instead of in every row."""
    given = [_settings(c) for c in commands if c]
    if len(given) < 2:
        return []
    common = set.intersection(*(set(g) for g in given))
    return [s for s in given[0] if s in common]


def _settings(command: str) -> list[str]:
    words = shlex.split(command)
    return [words[i + 1] for i, word in enumerate(words[:-1]) if word in ("-S", "--set")]


def without_settings(command: str, settings: list[str]) -> str:
    words, out, skip = shlex.split(command), [], False
    for i, word in enumerate(words):
        if skip:
            skip = False
        elif word in ("-S", "--set") and i + 1 < len(words) and words[i + 1] in settings:
            skip = True
        else:
            out.append(word)
    return shlex.join(out)


def recipe_markdown(rows: pd.DataFrame) -> str:
    """The table of one dataset's rows, as the README shows it; settings shared by every row's
    command are given once above it."""
    shared = shared_settings(list(rows["command"]))
    if shared:
        rows = rows.assign(command=[c and without_settings(c, shared) for c in rows["command"]])
    ci = _ci_label(rows["confidence"])
    table = pd.DataFrame({
        "recipe": rows["recipe"], "profile": rows["profile"],
        f"slice-level AUC [{ci}]": [with_interval(*r) for r in
                                    rows[["slice_auc", "slice_auc_ci_low", "slice_auc_ci_high"]].to_numpy()],
        f"patient-level AUC [{ci}]": [with_interval(*r) for r in
                                      rows[["patient_auc", "patient_auc_ci_low", "patient_auc_ci_high"]].to_numpy()],
        "accuracy at the operating point, mean (sd) over folds": [
            NONE if np.isnan(m) else f"{m:.3f} ({s:.3f})" for m, s in rows[["op_accuracy_mean", "op_accuracy_sd"]].to_numpy()],
        "wall (min)": [_minutes(v) for v in rows["wall_minutes"]],
        "CPU (min)": [_minutes(v) for v in rows["cpu_minutes"]],
        "command": [NONE if not c else f"`{c}`".replace("|", "\\|") for c in rows["command"]],
    })
    if rows["features_computed"].notna().any():  # a frozen base's pass is paid by the row that computes it
        table.insert(table.columns.get_loc("command"), "frozen-base features computed / read", [
            NONE if np.isnan(c) else f"{c:,.0f} / {r:,.0f}" for c, r in rows[["features_computed", "features_read"]].to_numpy()])
    if rows["shortcut_probe"].notna().any():
        table["shortcut probe"] = rows["shortcut_probe"].fillna(NONE).to_numpy()
    text = table.to_markdown(index=False, disable_numparse=True)  # "10.0" stays as written
    if shared:
        text = "Every command also gives " + " ".join(f"`-S {shlex.quote(s)}`" for s in shared) + ".\n\n" + text
    return text


def _ci_label(confidence: pd.Series) -> str:
    levels = set(confidence.dropna())
    return f"{levels.pop():.0%} CI" if len(levels) == 1 else "CI"


def _minutes(value: float) -> str:
    return NONE if np.isnan(value) else f"{value:.1f}"


# --------------------------------------------------------------------------- paired comparisons


def pairs(runs: list[CVRun], baselines: list[str]) -> list[tuple[CVRun, CVRun]]:
    """(row, baseline) within each dataset: every other row against each baseline, each pair once.
    Baselines: the runs of those names, or (none named) every custom CNN's."""
    names = {run.name for run in runs}
    unknown = [name for name in baselines if name not in names]
    if unknown:
        raise UserError(f"--baseline {unknown[0]}: no cv run of that name; the runs are "
                        f"{', '.join(sorted(names))}")
    is_baseline = (lambda run: run.name in baselines) if baselines else \
        (lambda run: run.model == comparisons.BASELINE_MODEL)
    out, seen = [], set()
    for base in filter(is_baseline, runs):
        for run in runs:
            key = frozenset((run.dir, base.dir))
            if run.dataset == base.dataset and run.dir != base.dir and key not in seen:
                seen.add(key)
                out.append((run, base))
    return out


def compare(run: CVRun, base: CVRun, cfg: EvalConfig) -> tuple[dict[str, Any] | None, str | None]:
    """(the row's AUC against the baseline's on their shared images, None) or (None, why not)."""
    both = comparisons.paired(run.predictions(), base.predictions())
    if both.joined.empty:
        return None, f"{run.name} vs {base.name}: no image in common"
    moved = int((both.joined["fold_a"] != both.joined["fold_b"]).sum())
    if moved:
        return None, (f"{run.name} vs {base.name}: {moved} of {len(both.joined)} shared images "
                      "lie in different folds (run both with the same cv.folds, cv.seed and manifest)")
    if len(np.unique(both.y)) < 2:
        return None, f"{run.name} vs {base.name}: the shared images hold one class"
    diff = stats.paired_difference(both.y, both.pa, both.pb, both.groups, metric="roc_auc",
                                   resamples=comparisons.resamples(cfg), confidence=cfg.confidence, seed=cfg.seed)
    delong = stats.delong_test(both.y, both.pa, both.pb)
    return {
        "dataset": run.dataset, "recipe": run.name, "baseline": base.name, "images": len(both.joined),
        "groups": len(np.unique(both.groups)) if both.groups is not None else len(both.joined),
        **dict(zip(("auc", "baseline_auc"), (stats.metrics_at(both.y, p)["roc_auc"] for p in (both.pa, both.pb)))),
        "difference": diff.difference,
        "ci_low": diff.low, "ci_high": diff.high, "p_bootstrap": diff.p_value, "p_delong": delong.p_value,
    }, None


def comparison_rows(runs: list[CVRun], baselines: list[str],
                    cfg: EvalConfig) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Every comparison shown, Holm-corrected across all of them, and (dataset, why) for each refused."""
    rows, refused = [], []
    for run, base in pairs(runs, baselines):
        row, why = compare(run, base, cfg)
        if row is None:
            refused.append((run.dataset, why))
        else:
            rows.append(row)
    table = pd.DataFrame(rows, columns=["dataset", "recipe", "baseline", "images", "groups", "auc", "baseline_auc",
                                        "difference", "ci_low", "ci_high", "p_bootstrap", "p_delong"])
    table["p_holm"] = stats.holm(table["p_bootstrap"].to_numpy(float)) if len(table) else []
    return table, refused


def comparison_markdown(rows: pd.DataFrame, confidence: float) -> str:
    table = pd.DataFrame({
        "recipe": rows["recipe"], "baseline": rows["baseline"], "images": rows["images"],
        "groups": rows["groups"], "AUC": rows["auc"].map("{:.3f}".format),
        "baseline AUC": rows["baseline_auc"].map("{:.3f}".format),
        f"difference [{confidence:.0%} CI]": [_signed(*r) for r in rows[["difference", "ci_low", "ci_high"]].to_numpy()],
        "p (patient bootstrap)": rows["p_bootstrap"].map(_p),
        "p (Holm)": rows["p_holm"].map(_p),
        "DeLong p (ignores patient clusters)": rows["p_delong"].map(_p),
    })
    return table.to_markdown(index=False, disable_numparse=True)  # "10.0" stays as written


def _signed(value: float, low: float, high: float) -> str:
    """'+0.050 [-0.010, +0.110]'; '[n/a]' where the interval is undefined."""
    if np.isnan(value):
        return NONE
    return f"{value:+.3f} [n/a]" if np.isnan(low) or np.isnan(high) else f"{value:+.3f} [{low:+.3f}, {high:+.3f}]"


def _p(value: float) -> str:
    return NONE if pd.isna(value) else f"{value:.3g}"


# --------------------------------------------------------------------------- the whole block


def results_markdown(cfg: Config, given: list[str | Path] = (), baselines: list[str] = ()) -> str:
    """The tables of every dataset, each with its comparisons: the README's results block."""
    runs = find_runs(cfg, list(given))
    recipes = recipe_rows(runs)
    compared, refused = comparison_rows(runs, list(baselines), cfg.eval)
    parts = [f"_Generated by `covidtl results` from {len(runs)} cross-validation summaries; do not edit "
             f"by hand. Comparisons: each row's pooled out-of-fold AUC minus its baseline's on the same "
             f"images, a paired bootstrap over patient groups, Holm-corrected across every comparison "
             f"shown ({len(compared)}); DeLong's test beside it treats slices as independent._"]
    for dataset in sorted(recipes["dataset"].unique()):
        parts += [f"#### {dataset}", recipe_markdown(recipes[recipes["dataset"] == dataset])]
        mine = compared[compared["dataset"] == dataset]
        if len(mine):
            parts.append(comparison_markdown(mine, cfg.eval.confidence))
        parts += [f"Not compared: {why}" for where, why in refused if where == dataset]
    return "\n\n".join(parts) + "\n"


def replace_block(readme: str | Path, block: str) -> Path:
    """`readme` with the text between its results markers replaced by `block`; the rest kept."""
    path = Path(readme)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"--readme {path}: cannot read it ({exc.strerror or exc})") from None
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise UserError(f"--readme {path}: no {BEGIN} ... {END} block; put the two markers where "
                        "the results belong")
    return atomic_write_text(path, text[:start + len(BEGIN)] + "\n" + block + text[end:])
