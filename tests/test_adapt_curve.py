"""`covidtl adapt-curve` end to end on the synthetic second site (real files, no mocks), its
refusals, and the spy that shows no scoring-half image is decoded while adapting."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from covidtl.adapt import held_out
from covidtl.adapt.curve_files import CurveDir
from covidtl.adapt.protocol import split_halves
from covidtl.data import pipeline
from covidtl.errors import UserError
from test_adapt import invoke, study  # noqa: F401 - the saved custom CNN and the synthetic site2

# Every image its own group (10 per class: 5 score, 5 adapt), so K = 1, 2 fit; few steps and resamples.
FAST = ["-S", "adapt.series=false", "-S", "adapt.curve_resamples=100", "-S", "adapt.epochs=1",
        "-S", "adapt.tent_steps=2", "-S", "adapt.batch_size=8",
        # head and head_bn tune inside K (two candidates, one epoch each): K = 2 tunes, K = 1 cannot
        "-S", "adapt.tune_learning_rates=[1.0e-3,1.0e-2]", "-S", "adapt.tune_epochs=[1]"]
CURVE = ["adapt-curve", "--model-uri", "models/cnn", "--site", "site2", "--k", "0,1,2", "--seeds", "2",
         "--split-seed", "3"]


@pytest.fixture(scope="module")
def curve(study):  # noqa: F811 - the imported fixture
    """One whole curve run, every decode of the data pipeline recorded with the phase it ran in:
    `scoring` inside the scoring sets' decode, `adapting` anywhere else."""
    decoded: list[tuple[str, str]] = []
    phase = {"now": "adapting"}
    real_load, real_decode = pipeline.load_rgb, held_out.ScoringSet.decode.__func__

    def spy_load(path):
        decoded.append((phase["now"], os.path.abspath(path)))
        return real_load(path)

    def scoring_decode(cls, *args, **kwargs):
        phase["now"] = "scoring"
        try:
            return real_decode(cls, *args, **kwargs)
        finally:
            phase["now"] = "adapting"

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "load_rgb", spy_load)
        mp.setattr(held_out.ScoringSet, "decode", classmethod(scoring_decode))
        out = invoke(study, mp, *FAST, *CURVE, "--out", "adapted/curve")
    assert out.exit_code == 0, out.output
    return study / "adapted" / "curve", out, decoded


def test_the_curve_writes_its_halves_table_and_plot(curve):
    folder, _, _ = curve
    halves = pd.read_csv(folder / "halves.csv")
    assert len(halves) == 20 and set(halves["split_seed"]) == {3}
    assert halves.groupby(["half", "label"])["group"].nunique().tolist() == [5, 5, 5, 5]
    assert not halves["path"].str.startswith("/").any()  # relative to the site folder
    table = pd.read_csv(folder / "curve.csv")
    points = list(zip(table["method"], table["k"], table["seeds"]))
    # adabn is deterministic (one seed); Tent's batches are seeded; the custom CNN has no source
    # split here (no card) and no pooled linear head: standardize and probe_refit are skipped.
    assert points == [("source", 0, 1), ("adabn", 0, 1), ("tent", 0, 2)] + [
        (m, k, 2) for m in ("recalibrate", "head", "head_bn") for k in (1, 2)]
    for m in ("roc_auc", "balanced_accuracy", "ece", "brier"):
        assert {m, f"{m}_low", f"{m}_high"} <= set(table.columns)
    assert table["brier"].between(0, 1).all() and table["home_roc_auc"].isna().all()
    about = json.loads((folder / "curve.json").read_text())
    assert set(about["skipped"]) == {"standardize", "probe_refit"} and about["split_seed"] == 3
    assert len(about["points"]) == len(table) and (folder / "curve.png").stat().st_size > 1000
    # The tuned methods' choices per seed: K = 1 holds one group per class, too few to fold.
    tuned = table[table["method"].isin(["head", "head_bn"])].set_index(["method", "k"])["chosen"]
    assert all(c == "0.0001x1 (default), 0.0001x1 (default)" for c in tuned.xs(1, level="k"))
    assert all(len(c.split(", ")) == 2 and "default" not in c for c in tuned.xs(2, level="k"))
    shown = (folder / "curve.md").read_text().splitlines()
    assert len(shown) == 2 + len(table) and shown[0].startswith("| method")
    assert f"{table['roc_auc'][0]:.3f} [{table['roc_auc_low'][0]:.3f}, {table['roc_auc_high'][0]:.3f}]" in shown[2]


def test_the_curve_is_one_parent_run_with_a_nested_run_per_method_k_and_seed(curve):
    folder, out, _ = curve
    run_id = out.output.strip().rsplit("MLflow run ", 1)[1].rstrip(")")
    client = MlflowClient(f"sqlite:///{folder.parents[1] / 'mlflow.db'}")
    parent = client.get_run(run_id)
    assert parent.data.tags["kind"] == "adapt" and parent.data.tags["adapt_kind"] == "curve"
    assert parent.data.params["split_seed"] == "3" and parent.data.params["skipped"] == "standardize,probe_refit"
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"curve.csv", "curve.json", "curve.md", "curve.png", "halves.csv"} <= artifacts
    nested = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    assert len(nested) == 1 + 1 + 2 + 3 * 2 * 2  # source, adabn, tent x2, three labelled methods x K x seeds
    assert all(r.data.tags["kind"] == "adapt" and "scoring_roc_auc" in r.data.metrics for r in nested)
    tuned = {r.data.params["tuned"] for r in nested if r.data.params["method"] == "head" and r.data.params["k"] == "2"}
    assert tuned == {"True"}


def test_no_scoring_half_image_is_decoded_while_adapting(curve):
    folder, _, decoded = curve
    halves = pd.read_csv(folder / "halves.csv")
    site = folder.parents[1] / "site2"
    half = {h: {os.path.abspath(site / p) for p in halves.loc[halves["half"] == h, "path"]}
            for h in ("scoring", "adaptation")}
    adapting = {path for phase, path in decoded if phase == "adapting"}
    scoring = {path for phase, path in decoded if phase == "scoring"}
    assert adapting == half["adaptation"]  # the methods read the adaptation half, and only it
    assert not adapting & half["scoring"]
    assert scoring == half["scoring"]  # the spy sees the scoring half, where it is scored


def one_line_refusal(study, monkeypatch, out: str, *args) -> str:  # noqa: F811
    result = invoke(study, monkeypatch, *FAST, *CURVE, "--methods", "adabn,recalibrate", "--out", out, *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_k_beyond_the_adaptation_half_is_one_line_and_writes_nothing(study, monkeypatch):  # noqa: F811
    line = one_line_refusal(study, monkeypatch, "adapted/too-many", "--k", "0,6")
    assert "K=6 groups per class, but the adaptation half holds 5" in line
    assert not (study / "adapted" / "too-many").exists()
    line = one_line_refusal(study, monkeypatch, "adapted/no-home", "--home")
    assert line.startswith("Error: --home: the source model's card names no dataset")


def test_reusing_the_halves_with_another_split_seed_is_refused(curve, monkeypatch):
    folder, _, _ = curve
    before = (folder / "halves.csv").read_text()
    line = one_line_refusal(folder.parents[1], monkeypatch, "adapted/curve", "--split-seed", "4")
    assert "halved with --split-seed 3, not 4; the halves are fixed once per site" in line
    assert (folder / "halves.csv").read_text() == before


def test_an_earlier_halves_table_is_kept_only_for_the_same_site_and_seed(tmp_path):
    rows = pd.DataFrame([{"path": str(tmp_path / f"{label}{g}.png"), "label": label, "group": f"{label}{g}",
                          "sha256": f"{label}{g}"} for label in ("covid", "non_covid") for g in range(4)])
    folder = CurveDir(tmp_path / "curve")
    folder.fix_halves(split_halves(rows, 1), tmp_path)
    written = folder.halves_file.stat().st_mtime_ns
    folder.fix_halves(split_halves(rows, 1), tmp_path)  # the same split: kept as it is
    assert folder.halves_file.stat().st_mtime_ns == written
    other = rows.assign(sha256=rows["sha256"] + "x")  # the same names, other images
    with pytest.raises(UserError, match="its halves are not those of"):
        folder.fix_halves(split_halves(other, 1), tmp_path)


def test_the_plot_shows_the_home_cost_where_the_curve_scored_at_home():
    from covidtl.adapt.curve_plot import curve_figure

    metrics = {f"{m}{end}": [0.6, 0.62] for m in ("roc_auc", "balanced_accuracy") for end in ("", "_low", "_high")}
    table = pd.DataFrame({"method": ["source", "head"], "k": [0, 1], **metrics})
    assert len(curve_figure(table.assign(home_roc_auc=[float("nan")] * 2), "no home").axes) == 2
    with_home = curve_figure(table.assign(home_roc_auc=[0.95, 0.31]), "home")
    assert len(with_home.axes) == 3 and list(with_home.axes[2].lines[1].get_ydata()) == [0.31]
