"""Paired comparisons between the study's cells: the pairs the paper's claims need, Holm-adjusted."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from covidtl.comparisons import CellPredictions, comparison_table, pairs
from covidtl.config import load_config
from helpers_train import ROOT_PARAMS, make_workdir

EVAL = load_config(ROOT_PARAMS).eval


def _cell(model: str, init: str, p_covid, y, groups, dataset="ct") -> CellPredictions:
    frame = pd.DataFrame({
        "path": [f"img{i}.png" for i in range(len(y))], "group": groups,
        "actual": np.where(np.asarray(y) == 1, "covid", "non_covid"), "p_covid": p_covid,
    })
    return CellPredictions(dataset, model, init, frame)


def test_pairs_are_model_vs_custom_cnn_and_pretrained_vs_random():
    y = [0, 1]
    cells = [_cell(m, i, [0.1, 0.9], y, ["a", "b"]) for m, i in [
        ("custom_cnn", "random"), ("vgg16", "random"), ("vgg16", "file-donor"), ("resnet50", "imagenet")]]
    asked = {(a.name, b.name) for a, b, _ in pairs(cells)}
    assert asked == {("vgg16-random", "custom_cnn-random"), ("vgg16-file-donor", "vgg16-random")}


def test_a_clearly_better_model_is_distinguishable_and_an_equal_one_is_not():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    groups = [f"p{i // 4}" for i in range(400)]  # 100 patients of 4 images
    good = np.clip(y * 0.6 + 0.2 + rng.normal(0, 0.15, 400), 0, 1)
    noise = rng.uniform(0, 1, 400)
    cells = [_cell("custom_cnn", "random", noise, y, groups), _cell("vgg16", "random", good, y, groups),
             _cell("vgg16", "file-donor", good, y, groups)]
    table = comparison_table(cells, EVAL).set_index(["a", "b", "metric"])
    better = table.loc[("vgg16-random", "custom_cnn-random", "roc_auc")]
    assert better["distinguishable"] and better["ci_low"] > 0 and better["test"] == "DeLong"
    same = table.loc[("vgg16-file-donor", "vgg16-random", "accuracy")]
    assert not same["distinguishable"] and same["difference"] == 0 and same["ci_low"] == same["ci_high"] == 0
    assert (table["p_holm"] >= table["p_value"]).all()  # Holm never makes a p smaller


@pytest.mark.timeout(900)
def test_report_compares_a_pretrained_init_with_random_weights(tmp_path, monkeypatch):
    """Issue 9.2 demonstrated: VGG16 from a test-made weights file against VGG16 from scratch and
    against the custom CNN, trained on the same tiny split, in the report's words."""
    from covidtl.cli import main
    from covidtl.models.registry import base_of, build_model, get_spec
    from covidtl.train import RunOptions, plan_run, train

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg, _ = make_workdir(tmp_path, **{"train.head_units": 16, "train.max_epochs": 1})
    donor = tmp_path / "donor.weights.h5"
    base_of(build_model(get_spec("vgg16"), "random", cfg.train, 32)).save_weights(donor)
    for model, init in (("custom_cnn", "random"), ("vgg16", "random"), ("vgg16", str(donor))):
        train(plan_run(cfg, model, init, "tiny"), RunOptions(log_model=False))
    result = CliRunner().invoke(main, [
        "--params", str(ROOT_PARAMS), "-S", f"data.workdir={tmp_path / 'data'}",
        "-S", f"data.datasets.tiny.path={tmp_path / 'images'}", "-S", "study.models=[custom_cnn, vgg16]",
        "-S", f"study.inits=[random, {donor}]", "-S", "study.datasets=[tiny]", "report", "--no-log",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "reports" / "comparisons.csv")
    assert set(zip(table["a"], table["b"])) == {
        ("vgg16-random", "custom_cnn-random"), ("vgg16-file-donor", "vgg16-random")}
    md = (tmp_path / "reports" / "results.md").read_text()
    assert "## Paired comparisons" in md and "file-donor vs random weights (vgg16)" in md
    assert "distinguishable from zero" in md and "Holm-adjusted p" in md
    assert (tmp_path / "reports" / "calibration-tiny.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Grad-CAM samples" in md and "(gradcam/custom_cnn-random-tiny.png)" in md
    assert (tmp_path / "reports" / "gradcam" / "custom_cnn-random-tiny.png").read_bytes()[:4] == b"\x89PNG"
    card = (tmp_path / "reports" / "cards" / "vgg16-file-donor-tiny.md").read_text()
    for part in ("Research only: not a diagnostic device", "**Operating point.** youden",
                 "**Failure modes measured.**", "None scored: nothing here says how it fares elsewhere"):
        assert part in card
    assert json.loads((tmp_path / "reports" / "cards" / "vgg16-file-donor-tiny.json").read_text())["run_id"]


def test_a_comparison_that_cannot_be_tested_says_so():
    from covidtl.comparisons import in_words

    row = pd.Series({"dataset": "ct", "question": "resnet50 vs the custom CNN (random)", "metric": "roc_auc",
                     "a_value": 0.0, "b_value": 1.0, "difference": -1.0, "ci_low": float("nan"),
                     "ci_high": float("nan"), "images": 20, "p_holm": float("nan"),
                     "distinguishable": False, "test": "DeLong"})
    words = in_words(row)
    assert "cannot be tested on these images" in words and "no interval" in words
