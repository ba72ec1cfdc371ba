"""The learning curve's protocol: halves, draws of K groups, the leak refusal and the two-level bootstrap."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from covidtl import stats
from covidtl.adapt.protocol import (
    CURVE_METRICS, SeedScores, class_indices, curve_point, draw_labelled, refuse_leaks, split_halves,
)
from covidtl.errors import UserError
from covidtl.paths import POSITIVE_INDEX


def site(groups_per_class: int = 8, images_per_group: int = 3) -> pd.DataFrame:
    rows = [{"path": f"{label}/{g:03d}-{i}.png", "label": label, "group": f"{label}/{g}"}
            for label in ("covid", "non_covid") for g in range(groups_per_class) for i in range(images_per_group)]
    return pd.DataFrame(rows)


def test_the_halves_split_groups_per_class_and_the_seed_alone_decides():
    table = site(groups_per_class=7)
    halves = split_halves(table, seed=3)
    scoring, adaptation = set(halves.scoring["group"]), set(halves.adaptation["group"])
    assert not scoring & adaptation
    assert scoring | adaptation == set(table["group"])
    for half in (halves.scoring, halves.adaptation):
        assert set(half["label"]) == {"covid", "non_covid"}
    # 7 groups a class: 4 score, 3 adapt.
    assert halves.scoring.groupby("label")["group"].nunique().tolist() == [4, 4]
    shuffled = split_halves(table.sample(frac=1, random_state=0), seed=3)
    assert set(shuffled.scoring["group"]) == scoring
    assert set(split_halves(table, seed=4).scoring["group"]) != scoring


def test_a_draw_holds_k_groups_per_class_from_the_adaptation_half_only():
    halves = split_halves(site(groups_per_class=10), seed=0)
    for k in (0, 1, 2, 5):
        drawn = draw_labelled(halves.adaptation, k, seed=k)
        assert drawn.groupby("label")["group"].nunique().reindex(["covid", "non_covid"], fill_value=0).tolist() == [k, k]
        assert set(drawn["group"]) <= set(halves.adaptation["group"])
    assert not draw_labelled(halves.adaptation, 0, seed=0).shape[0]
    with pytest.raises(UserError, match=r"^K=6 groups per class, but the adaptation half holds 5 non_covid groups: choose K <= 5"):
        draw_labelled(halves.adaptation, 6, seed=0)


def test_a_labelled_image_of_the_scoring_half_is_refused_as_a_leak():
    halves = split_halves(site(), seed=0)
    refuse_leaks(draw_labelled(halves.adaptation, 2, seed=1), halves.scoring)
    leaked = pd.concat([draw_labelled(halves.adaptation, 1, seed=1), halves.scoring.head(1)])
    with pytest.raises(UserError, match="1 labelled image.*also in the scoring half.*refused as a leak"):
        refuse_leaks(leaked, halves.scoring)


def test_a_site_with_one_group_of_a_class_cannot_be_halved():
    table = site(groups_per_class=3)
    table = table[(table["label"] == "covid") | (table["group"] == "non_covid/0")]
    with pytest.raises(UserError, match="holds 1 non_covid patient group"):
        split_halves(table, seed=0)


def test_weighted_metrics_count_an_image_by_its_weight():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 40)
    p = rng.random(40)
    w = rng.integers(0, 4, 40)
    got = stats.weighted_metrics(y, p, w[None, :], threshold=0.5)
    y_rep, p_rep = np.repeat(y, w), np.repeat(p, w)
    positive = y_rep == POSITIVE_INDEX
    assert got["roc_auc"][0] == pytest.approx(skm.roc_auc_score(positive, p_rep))
    assert got["balanced_accuracy"][0] == pytest.approx(skm.balanced_accuracy_score(positive, p_rep >= 0.5))
    assert got["brier"][0] == pytest.approx(stats.brier(y_rep, p_rep))
    assert got["ece"][0] == pytest.approx(stats.reliability(y_rep, p_rep).ece)


def test_a_curve_point_is_the_seeds_mean_and_its_interval_widens_when_seeds_disagree():
    halves = split_halves(site(groups_per_class=12), seed=0)
    y = class_indices(halves.scoring)
    is_covid = (y == POSITIVE_INDEX).astype(float)
    rng = np.random.default_rng(1)
    good = SeedScores(np.clip(is_covid * 0.6 + rng.random(y.size) * 0.4, 0, 1), threshold=0.5)
    noise = SeedScores(rng.random(y.size), threshold=0.5)
    one = curve_point(2, y, halves.scoring["group"], [good], resamples=400)
    assert one.mean["roc_auc"] == pytest.approx(skm.roc_auc_score(is_covid, good.p_covid))
    assert set(one.mean) == set(CURVE_METRICS) == set(one.interval)
    for m in CURVE_METRICS:
        low, high = one.interval[m]
        assert low <= one.mean[m] <= high
    mixed = curve_point(2, y, halves.scoring["group"], [good, noise], resamples=400)
    assert mixed.mean["roc_auc"] == pytest.approx((one.mean["roc_auc"] + skm.roc_auc_score(is_covid, noise.p_covid)) / 2)
    width = lambda point: np.subtract(*point.interval["roc_auc"][::-1])  # noqa: E731
    assert width(mixed) > 2 * width(one)
