"""`covidtl results`: the README's tables come from cv summaries, their comparisons are Holm-corrected,
and the README keeps everything outside its results block."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from covidtl import cv, results, stats
from covidtl.cli import main
from covidtl.comparisons import paired
from covidtl.scores import with_interval
from conftest import config

ROOT = Path(__file__).parents[1]
GROUPS, SLICES, FOLDS = 40, 3, 4


def write_cv(out_root: Path, model: str, init: str, signal: float, seed: int, fold_seed: int = 0,
             dataset: str = "ct", cfg=None) -> Path:
    """A finished cv run's folder as `cv.write` leaves it, from hand-made out-of-fold predictions:
    40 patients of 3 slices, 4 folds of whole patients; p_covid = truth x signal + noise."""
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"p{g:02d}" for g in range(GROUPS)], SLICES)
    covid = np.repeat(np.arange(GROUPS) % 2 == 0, SLICES)
    p = np.clip(covid * signal + rng.uniform(0, 1 - signal, len(groups)), 0, 1)
    fold_of_group = np.random.default_rng(fold_seed).permutation(np.arange(GROUPS) % FOLDS) + 1
    pooled = pd.DataFrame({
        "fold": np.repeat(fold_of_group, SLICES), "path": [f"{g}/slice{i % SLICES}.png" for i, g in enumerate(groups)],
        "group": groups, "actual": np.where(covid, "covid", "non_covid"),
        "predicted": np.where(p >= 0.5, "covid", "non_covid"), "p_covid": p,
    })
    per_fold = pd.DataFrame([{"fold": k, **{name: 0.6 + 0.05 * k + 0.01 * seed for name in cv.FOLD_METRICS},
                              "wall_seconds": 60.0 * k, "cpu_seconds": 100.0 * k} for k in range(1, FOLDS + 1)])
    name = f"{model}-{init}-{dataset}"
    summary = cv.summarise(cfg, per_fold, pooled, model=model, init=init, dataset=dataset, cell=name,
                           profile="paper", run_id=f"run-{name}", command=f"covidtl cv --model {model} --init {init}")
    out = out_root / dataset / name
    cv.write(out, per_fold, pooled, summary)
    return out


@pytest.fixture
def cv_runs(tmp_path):
    cfg = config(tmp_path, **{"cv.out": str(tmp_path / "cv"), "eval.bootstrap": 200})
    dirs = {
        "base": write_cv(tmp_path / "cv", "custom_cnn", "random", 0.05, seed=1, cfg=cfg),
        "good": write_cv(tmp_path / "cv", "vgg16", "imagenet", 0.5, seed=2, cfg=cfg),
        "fair": write_cv(tmp_path / "cv", "densenet121", "imagenet", 0.25, seed=3, cfg=cfg),
        # Folds drawn with another seed: its images lie in other folds than the rest's.
        "other": write_cv(tmp_path / "cv", "resnet50", "random", 0.3, seed=4, fold_seed=9, cfg=cfg),
    }
    return cfg, dirs


def cli(cfg_dir: Path, *args: str):
    return CliRunner().invoke(main, ["--params", str(ROOT / "params.yaml"), "-S", f"cv.out={cfg_dir / 'cv'}",
                                     "-S", "eval.bootstrap=200", "results", *args])


def test_the_table_shows_each_summarys_figures(cv_runs, tmp_path):
    cfg, dirs = cv_runs
    run = cli(tmp_path)
    assert run.exit_code == 0, run.output
    lines = run.output.splitlines()
    assert "#### ct" in lines
    for out in dirs.values():
        s = json.loads((out / "summary.json").read_text())
        row = next(line for line in lines if line.startswith(f"| {s['cell']} "))
        p, g, op = s["pooled"], s["patient"], s["across_folds"]["op_accuracy"]
        assert with_interval(p["pooled_roc_auc"], p["pooled_roc_auc_ci_low"], p["pooled_roc_auc_ci_high"]) in row
        assert with_interval(g["patient_roc_auc"], g["patient_roc_auc_ci_low"], g["patient_roc_auc_ci_high"]) in row
        assert f"{op['mean']:.3f} ({op['sd']:.3f})" in row
        assert f"| {s['compute']['wall_seconds'] / 60:.1f} " in row and f"| {s['compute']['cpu_seconds'] / 60:.1f} " in row
        assert f"`{s['command']}`" in row
    assert "shortcut probe" not in run.output  # no run was probed
    assert "frozen-base features" not in run.output  # no run read stored features


def test_comparisons_are_holm_corrected_and_refuse_other_folds(cv_runs, tmp_path):
    cfg, dirs = cv_runs
    runs = results.find_runs(cfg)
    table, refused = results.comparison_rows(runs, ["custom_cnn-random-ct", "vgg16-imagenet-ct"], cfg.eval)
    assert sorted(zip(table["recipe"], table["baseline"])) == [
        ("densenet121-imagenet-ct", "custom_cnn-random-ct"), ("densenet121-imagenet-ct", "vgg16-imagenet-ct"),
        ("vgg16-imagenet-ct", "custom_cnn-random-ct")]
    assert len(refused) == 2 and all("resnet50-random-ct vs" in why and "different folds" in why
                                     for _, why in refused)
    np.testing.assert_array_equal(table["p_holm"], stats.holm(table["p_bootstrap"].to_numpy(float)))
    # Each p is the paired patient bootstrap of the AUC difference on the joined predictions.
    good = table.set_index(["recipe", "baseline"]).loc[("vgg16-imagenet-ct", "custom_cnn-random-ct")]
    both = paired(*(results.CVRun(dirs[d], {}).predictions() for d in ("good", "base")))
    expected = stats.paired_difference(both.y, both.pa, both.pb, both.groups, metric="roc_auc", resamples=200,
                                       confidence=cfg.eval.confidence, seed=cfg.eval.seed)
    assert (good["difference"], good["p_bootstrap"]) == (expected.difference, expected.p_value)
    assert good["groups"] == GROUPS and good["images"] == GROUPS * SLICES
    assert good["p_delong"] == stats.delong_test(both.y, both.pa, both.pb).p_value

    run = cli(tmp_path, "--baseline", "custom_cnn-random-ct", "--baseline", "vgg16-imagenet-ct")
    assert run.exit_code == 0, run.output
    holm = f"{good['p_holm']:.3g}"
    row = next(line for line in run.output.splitlines()
               if line.startswith("| vgg16-imagenet-ct ") and "custom_cnn-random-ct" in line)
    assert f"| {holm} " in row and f"{good['difference']:+.3f} [" in row
    assert run.output.count("Not compared: resnet50-random-ct vs") == 2
    assert "DeLong p (ignores patient clusters)" in run.output


def test_the_default_baseline_is_the_custom_cnn_and_an_unknown_one_is_one_line(cv_runs, tmp_path):
    cfg, _ = cv_runs
    pairs = results.pairs(results.find_runs(cfg), [])
    assert {base.name for _, base in pairs} == {"custom_cnn-random-ct"} and len(pairs) == 3
    run = cli(tmp_path, "--baseline", "vgg16")
    assert run.exit_code == 2 and run.output.count("\n") == 1
    assert "--baseline vgg16: no cv run of that name" in run.output and "vgg16-imagenet-ct" in run.output


def test_a_probed_run_shows_its_verdict(cv_runs, tmp_path):
    _, dirs = cv_runs
    (dirs["good"] / "probe").mkdir()
    (dirs["good"] / "probe" / "probe.json").write_text(json.dumps({"shortcut_risk": True}))
    run = cli(tmp_path, str(dirs["good"]), str(dirs["base"] / "summary.json"))
    assert run.exit_code == 0, run.output
    header = next(line for line in run.output.splitlines() if line.startswith("| recipe "))
    assert header.rstrip(" |").endswith("shortcut probe")
    rows = {line.split("|")[1].strip(): line.rstrip(" |").rsplit("|", 1)[1].strip()
            for line in run.output.splitlines() if line.startswith("| ") and "-ct " in line and "`" in line}
    assert rows == {"vgg16-imagenet-ct": "shortcut risk", "custom_cnn-random-ct": "—"}


def test_the_readme_block_is_replaced_and_the_rest_kept(cv_runs, tmp_path):
    readme = tmp_path / "README.md"
    before, after = "# Title\n\nSome text.\n\n<!-- results:begin -->\n", "<!-- results:end -->\n\n## After\n"
    readme.write_text(before + "old table\n" + after)
    run = cli(tmp_path, "--readme", str(readme))
    assert run.exit_code == 0, run.output
    text = readme.read_text()
    assert text.startswith(before) and text.endswith(after) and "old table" not in text
    alone = cli(tmp_path, "--out", str(tmp_path / "results.md"))
    assert alone.exit_code == 0, alone.output
    assert text == before + (tmp_path / "results.md").read_text() + after
    cli(tmp_path, "--readme", str(readme))
    assert readme.read_text() == text  # run again: the same file

    readme.write_text("# No markers\n")
    refused = cli(tmp_path, "--readme", str(readme))
    assert refused.exit_code == 2 and "no <!-- results:begin --> ... <!-- results:end --> block" in refused.output
    assert readme.read_text() == "# No markers\n"


def test_a_folder_that_is_not_a_cv_run_is_one_line(tmp_path):
    run = cli(tmp_path, str(tmp_path))
    assert run.exit_code == 2 and "no summary.json, not a finished `covidtl cv` run" in run.output


def test_settings_every_command_gives_are_said_once_above_the_table(tmp_path):
    cfg = config(tmp_path, **{"cv.out": str(tmp_path / "cv"), "eval.bootstrap": 200})
    for name, (model, extra) in {"a": ("custom_cnn", ""), "b": ("vgg16", " -S profile=probe")}.items():
        out = write_cv(tmp_path / "cv", model, "random", 0.3, seed=1, cfg=cfg)
        summary = json.loads((out / "summary.json").read_text())
        summary["command"] = (f"covidtl -S 'data.datasets.ct.path=../shared/data/sars ct' -S data.workdir=/w{extra} "
                              f"cv --model {model}")
        (out / "summary.json").write_text(json.dumps(summary))
    run = cli(tmp_path)
    assert run.exit_code == 0, run.output
    assert "Every command also gives `-S 'data.datasets.ct.path=../shared/data/sars ct'` `-S data.workdir=/w`." \
        in run.output
    assert "`covidtl cv --model custom_cnn`" in run.output
    assert "`covidtl -S profile=probe cv --model vgg16`" in run.output


def test_a_frozen_base_row_says_how_many_features_it_computed_and_read(tmp_path):
    cfg = config(tmp_path, **{"cv.out": str(tmp_path / "cv"), "eval.bootstrap": 200})
    out = write_cv(tmp_path / "cv", "vgg16", "imagenet", 0.3, seed=1, cfg=cfg)
    write_cv(tmp_path / "cv", "custom_cnn", "random", 0.3, seed=2, cfg=cfg)
    summary = json.loads((out / "summary.json").read_text())
    summary["compute"].update(feature_entries_computed=1761.0, feature_entries_read=7050.0)
    (out / "summary.json").write_text(json.dumps(summary))
    run = cli(tmp_path)
    assert run.exit_code == 0, run.output
    row = next(line for line in run.output.splitlines() if line.startswith("| vgg16-imagenet-ct "))
    assert "| 1,761 / 7,050 " in row
    assert "frozen-base features computed / read" in run.output
