"""Model cards: what a trained model is, how good it is with intervals, and where it fails.

Two cards, both built here with one intended-use text. card.json, beside each model.keras:
what evaluate, predict and the external sets need to score the model, and what it is
(`training_card`, `ensemble_card`). The report's card, assembled where every input exists (the
cell's card.json and test metrics, the split's leakage report, the external test sets'
scores): written to `reports/cards/<cell>.json` and `.md` (`model_card`). The failure modes
are the study's own measurements, stated as findings.

Below training and the steps (they write card.json through it): it takes plain values, or reads
training's plan by attribute, and imports none of theirs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from covidtl import paths, tracking, weight_records
from covidtl.cells import Cell, read_verdict
from covidtl.config import Config
from covidtl.files import atomic_path, atomic_write_text, json_text
from covidtl.scores import DEFAULT_THRESHOLD, with_interval

INTENDED_USE = (
    "Research only: not a diagnostic device. It has not been validated for clinical use; its "
    "figures come from small public datasets and do not transfer to other hospitals by default."
)
# Thresholds for stating a measured weakness; each finding quotes its own numbers.
EXTERNAL_DROP = 0.10  # AUC lower than in-dataset by more than this
WIDE_INTERVAL = 0.20  # an AUC interval wider than this says little
LOW_RECALL = 0.60
HIGH_ECE = 0.10


def _value(metrics: dict[str, Any], key: str) -> float:
    value = metrics.get(key)
    return float("nan") if value is None else float(value)


def _with_interval(metrics: dict[str, Any], key: str) -> str:
    return with_interval(*(metrics.get(k) for k in (key, f"{key}_ci_low", f"{key}_ci_high")))


def failure_modes(
    cfg: Config, dataset: str, metrics: dict[str, Any], external: dict[str, dict[str, Any]],
    strategy: str, probe: dict[str, Any] | None = None,
) -> list[str]:
    """Weaknesses the study measured for this model, each with its figures."""
    found = []
    if probe and probe.get("shortcut_risk"):
        # `covidtl probe`: it reads the image's source, not its lungs; the sentence, then its figure.
        figure = f" (figure: {probe['figure']})" if probe.get("figure") else ""
        found.append(probe["sentence"].rstrip(".") + figure + ".")
    auc = _value(metrics, "test_roc_auc")
    for name, scored in external.items():
        ext_auc = _value(scored, "all_roc_auc")
        if not math.isnan(ext_auc) and not math.isnan(auc) and auc - ext_auc > EXTERNAL_DROP:
            found.append(f"Does not hold up on {name} (another collection): ROC AUC "
                         f"{_with_interval(scored, 'all_roc_auc')} against {auc:.3f} on its own test split.")
        specificity = _value(scored, "all_recall_non_covid")
        if specificity < 1 - LOW_RECALL:
            found.append(f"Calls most non-COVID images of {name} COVID (specificity {specificity:.3f}).")
    for key, what in (("test_recall_covid", "misses COVID cases"),
                      ("test_recall_non_covid", "calls non-COVID cases COVID")):
        value = _value(metrics, key)
        if value < LOW_RECALL:
            found.append(f"At threshold 0.5 it {what} (recall {_with_interval(metrics, key)}).")
    low, high = _value(metrics, "test_roc_auc_ci_low"), _value(metrics, "test_roc_auc_ci_high")
    if not math.isnan(low) and high - low > WIDE_INTERVAL:
        found.append(f"The test split is too small to pin it down: ROC AUC interval "
                     f"[{low:.3f}, {high:.3f}] ({int(_value(metrics, 'test_images'))} images).")
    ece = _value(metrics, "test_ece")
    if ece > HIGH_ECE:
        found.append(f"Its probabilities are poorly calibrated (expected calibration error {ece:.3f}).")
    if strategy == "random":
        found.append("Trained and tested on the paper's image-level split: images of one patient "
                     "are in both, so its figures overstate performance on new patients.")
    caution = cfg.dataset(dataset).caution if dataset in cfg.data.datasets else None
    if caution:
        found.append(caution.rstrip(".") + ".")
    return found


def model_card(
    cfg: Config, cell: Cell, row: dict[str, Any], external: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The card of one finished cell (row: its line of the report's results table)."""
    dataset = row["dataset"]
    trained = cell.read_card()
    leakage = _read_json(paths.leakage_path(cfg, dataset))
    metrics = {k: v for k, v in row.items() if k.startswith(("test_", "operating_"))}
    probe = read_verdict(cell.probe_dir)
    if probe is not None:
        probe["figure"] = f"{cell.name}-probe.png"  # write_cards copies probe.png there
    return {
        "cell": cell.name, "model": row["model"], "init": row["init"], "run_id": row.get("run_id"),
        "intended_use": INTENDED_USE,
        "data": {
            "dataset": dataset, "split_strategy": row.get("split_strategy"),
            "images": leakage.get("counts"), "groups": leakage.get("groups"),
            "same_patient_pairs_across_splits": leakage.get("crossing_pairs", {}).get("same_group_total"),
            "near_duplicate_pairs_across_splits": leakage.get("crossing_pairs", {}).get("near_duplicate_total"),
        },
        "training": {k: trained.get(k) for k in ("image_size", "preprocessing", "learning_rate",
                                                 "lr_source", "epochs_used", "git_commit", "tta")},
        "operating_point": trained.get("operating_point"),
        "test_metrics": metrics,
        "external": external,
        # None: never probed (`covidtl probe --model-uri models/<cell>`); else true or false.
        "shortcut_risk": None if probe is None else bool(probe.get("shortcut_risk")),
        "shortcut_probe": None if probe is None else {
            "sentence": probe.get("sentence"), "scored": probe.get("scored"),
            "gradcam_outside_lungs": probe.get("gradcam_outside_lungs"),
            "figure": probe["figure"],
            "auc": {v["variant"]: [v.get("roc_auc"), v.get("roc_auc_ci_low"), v.get("roc_auc_ci_high")]
                    for v in probe.get("variants", [])},
        },
        "failure_modes": failure_modes(cfg, dataset, metrics, external, row.get("split_strategy", ""), probe),
    }


def training_card(plan: Any, fitted: Any, run_id: str, operating: dict[str, Any],
                  frozen: Any | None = None) -> dict[str, Any]:
    """card.json beside model.keras: what evaluate and predict need, and what the model is.

    `plan` and `fitted` are training's Plan and Fitted, `frozen` a frozen.FrozenTraining: read by
    attribute, since training imports this module."""
    trained_on = {}
    if frozen is not None:  # which part was frozen and stored, and how many copies each image had
        trained_on["frozen_part"] = {"cut": frozen.parts.cut, "feature_view": frozen.clean_view.digest(),
                                     "feature_copies": plan.cfg.train.feature_copies}
    provenance = weight_records.provenance(plan.model, plan.build_init)
    if provenance:  # the exact ImageNet or weights file it started from, and where that came from
        trained_on["init_weights"] = provenance
    return {
        "model": plan.model, "init": plan.init, "dataset": plan.dataset,
        "image_size": plan.image_size, "preprocessing": plan.cfg.train.preprocessing,
        "classes": list(paths.CLASSES), "positive": paths.POSITIVE,
        "learning_rate": plan.learning_rate, "lr_source": plan.lr_source,
        "epochs_used": fitted.epochs_used, "run_id": run_id, **plan.run_on,
        "run_eagerly_used": plan.run_eagerly,
        # The weights are this epoch's: the last (the paper) or the best by `selected_by`.
        "selected_by": fitted.selected_by, "best_epoch": fitted.best_epoch,
        "tta": plan.cfg.train.tta,  # the saved model averages over these views itself
        # Read by everything that scores this model: evaluate, predict, the external sets.
        "operating_point": operating,
        "head": plan.cfg.train.head, "unfreeze_after": plan.cfg.train.unfreeze_after,
        **trained_on, **fitted.about,
        "git_commit": tracking.git_commit(), "intended_use": INTENDED_USE,
    }


def ensemble_card(members: list[dict[str, Any]], *, model: str, image_size: int, preprocessing: str,
                  dataset: str, operating: dict[str, Any], run_id: str) -> dict[str, Any]:
    """card.json beside the ensemble's model.keras: what evaluate and predict need, and its
    members (each as the ensemble names it)."""
    return {
        "kind": "ensemble", "model": model, "init": "ensemble", "dataset": dataset,
        "image_size": image_size, "preprocessing": preprocessing,
        "classes": list(paths.CLASSES), "positive": paths.POSITIVE,
        "members": members, "tta": "none",  # members keep their own TTA
        "operating_point": operating or {"threshold": DEFAULT_THRESHOLD},
        "run_id": run_id, "git_commit": tracking.git_commit(), "intended_use": INTENDED_USE,
    }


def card_markdown(card: dict[str, Any]) -> str:
    data, metrics = card["data"], card["test_metrics"]
    op = card.get("operating_point") or {}
    lines = [
        f"# Model card: {card['cell']}", "", f"**Intended use.** {card['intended_use']}", "",
        f"**Model.** {card['model']}, init {card['init']}; MLflow run `{card['run_id']}`; "
        f"training {json.dumps(card['training'])}.", "",
        f"**Data.** {data['dataset']}, split `{data['split_strategy']}`: images per split and class "
        f"{json.dumps(data['images'])}; same-patient pairs across splits "
        f"{data['same_patient_pairs_across_splits']}, near-duplicate pairs "
        f"{data['near_duplicate_pairs_across_splits']}.", "",
        f"**Operating point.** {op.get('rule')} → threshold {op.get('threshold')} "
        f"(chosen on: {op.get('chosen_on')}).", "",
        "**Test split** (95% group-bootstrap intervals unless stated):", "",
        "| metric | at 0.5 | at the operating point |", "|---|---|---|",
    ]
    for key in ("accuracy", "balanced_accuracy", "roc_auc", "recall_covid", "recall_non_covid", "brier"):
        op_key = f"test_op_{key}"
        lines.append(f"| {key} | {_with_interval(metrics, f'test_{key}')} | "
                     f"{_with_interval(metrics, op_key) if op_key in metrics else '—'} |")
    lines.append("")
    if card["external"]:
        lines += ["**External test sets** (never used for training or selection):", "",
                  "| set | images | accuracy | balanced accuracy | ROC AUC |", "|---|---|---|---|---|"]
        for name, scored in card["external"].items():
            images = scored.get("all_images")
            lines.append(f"| {name} | {'—' if images is None else int(images)} | {_with_interval(scored, 'all_accuracy')} | "
                         f"{_with_interval(scored, 'all_balanced_accuracy')} | {_with_interval(scored, 'all_roc_auc')} |")
        lines.append("")
    else:
        lines += ["**External test sets.** None scored: nothing here says how it fares elsewhere.", ""]
    probe = card.get("shortcut_probe")
    if probe:
        said = ("see the failure modes" if card["shortcut_risk"] else probe["sentence"])
        lines += [f"**Shortcut probe** (`covidtl probe`, on the {probe['scored']}): shortcut_risk "
                  f"{str(card['shortcut_risk']).lower()}; {said}", "",
                  f"![shortcut probe]({probe['figure']})", ""]
    else:
        lines += ["**Shortcut probe.** Not run: nothing here says whether it reads the lungs or the "
                  "image's source (`covidtl probe --model-uri models/<cell>`).", ""]
    lines += ["**Failure modes measured.**", ""]
    lines += [f"- {f}" for f in card["failure_modes"]] or ["- None crossed the report's thresholds."]
    return "\n".join(lines) + "\n"


def write_cards(
    cards: list[dict[str, Any]], out: Path, models_root: str | Path = "models"
) -> list[Path]:
    """reports/cards/<cell>.json and .md for each card, and its probe figure beside them."""
    written = []
    for card in cards:
        base = out / "cards" / card["cell"]
        written.append(atomic_write_text(base.with_suffix(".json"), json_text(card)))
        written.append(atomic_write_text(base.with_suffix(".md"), card_markdown(card)))
        figure = Cell(Path(models_root) / card["cell"]).probe_dir / "probe.png"
        if card.get("shortcut_probe") and figure.is_file():
            target = base.parent / card["shortcut_probe"]["figure"]
            with atomic_path(target) as tmp:
                tmp.write_bytes(figure.read_bytes())
            written.append(target)
    return written


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
