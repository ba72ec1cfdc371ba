"""Model cards state the failure modes the study measured, each with its own figures."""

from __future__ import annotations

from covidtl.cards import failure_modes
from covidtl.config import load_config
from helpers_train import ROOT_PARAMS

CFG = load_config(ROOT_PARAMS)
GOOD = {"test_roc_auc": 0.90, "test_roc_auc_ci_low": 0.85, "test_roc_auc_ci_high": 0.95,
        "test_recall_covid": 0.85, "test_recall_non_covid": 0.80, "test_ece": 0.04, "test_images": 300}


def test_a_sound_model_on_a_grouped_split_has_no_finding():
    assert failure_modes(CFG, "ct", GOOD, {}, "grouped") == []


def test_each_measured_weakness_is_stated_with_its_figures():
    weak = {**GOOD, "test_roc_auc_ci_low": 0.55, "test_recall_non_covid": 0.40, "test_ece": 0.20}
    external = {"ct-external": {"all_roc_auc": 0.62, "all_roc_auc_ci_low": 0.58, "all_roc_auc_ci_high": 0.66,
                                "all_recall_non_covid": 0.08}}
    found = " | ".join(failure_modes(CFG, "ct", weak, external, "random"))
    assert "Does not hold up on ct-external" in found and "0.620 [0.580, 0.660]" in found
    assert "Calls most non-COVID images of ct-external COVID (specificity 0.080)" in found
    assert "calls non-COVID cases COVID" in found and "too small to pin it down" in found
    assert "poorly calibrated" in found and "image-level split" in found


def test_a_datasets_caution_reaches_every_card_trained_on_it():
    found = failure_modes(CFG, "xray", GOOD, {}, "grouped")
    assert len(found) == 1 and "different collections" in found[0]


def test_a_probed_shortcut_is_stated_with_its_figure_and_a_clean_probe_adds_nothing():
    flagged = {"shortcut_risk": True, "sentence": "This model uses image source or border cues.",
               "figure": "m-probe.png"}
    found = failure_modes(CFG, "ct", GOOD, {}, "grouped", flagged)
    assert found == ["This model uses image source or border cues (figure: m-probe.png)."]
    assert failure_modes(CFG, "ct", GOOD, {}, "grouped", {**flagged, "shortcut_risk": False}) == []
