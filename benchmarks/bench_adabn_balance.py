"""AdaBN and the class balance of its unlabelled pool, with no site shift: the source's home data.

    nice -n 10 python benchmarks/bench_adabn_balance.py --model-uri models/<cell>/model [-S KEY=VALUE ...]

The pool is drawn (seeded, slices without replacement) from the source model's home *validation*
split at COVID fractions 0.1 ... 0.9, the same size at every fraction; AdaBN re-estimates every
BatchNorm layer's statistics on it, and the adapted model is scored on the home *test* split at
the source model's threshold. The site is the source's own collection, so whatever moves is the
pool's balance alone, not a new scanner. Prints, per fraction, the median over seeds of AUC,
balanced accuracy, ECE, the mean p(COVID) on the test split and the share called COVID, beside
the unadapted model. No external or site image is read: nothing here is an adaptation score.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import pandas as pd

from covidtl import stats
from covidtl.adapt.held_out import ScoringSet
from covidtl.adapt.settings import AdaptSettings
from covidtl.adapt.site import SiteData, model_inputs
from covidtl.adapt.unlabelled import adabn
from covidtl.config import load_config, parse_override
from covidtl.data import tables
from covidtl.data.pipeline import label_indices
from covidtl.paths import POSITIVE_INDEX
from covidtl.train import rows_of
from covidtl.trained import load_trained

ROOT = Path(__file__).resolve().parents[1]
FRACTIONS = (0.1, 0.25, 0.5, 0.75, 0.9)


def scored(test: ScoringSet, p: np.ndarray, threshold: float) -> dict[str, float]:
    m = stats.weighted_metrics(test.y, p, np.ones((1, len(p))), threshold)
    return {"AUC": float(m["roc_auc"][0]), "balanced accuracy": float(m["balanced_accuracy"][0]),
            "ECE": float(m["ece"][0]), "mean p(COVID)": float(p.mean()), "called COVID": float((p >= threshold).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", required=True)
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    cfg = load_config(ROOT / "params.yaml", dict(parse_override(s) for s in args.set))
    loaded = load_trained(args.model_uri, cfg)
    split = tables.read_split(cfg, loaded.dataset)
    val, test_rows = rows_of(split, "val"), rows_of(split, "test")
    test = ScoringSet.decode(cfg, loaded, test_rows, "home test split", 32)
    val_x, val_y = model_inputs(cfg, loaded, val), label_indices(val)
    covid, other = np.flatnonzero(val_y == POSITIVE_INDEX), np.flatnonzero(val_y != POSITIVE_INDEX)
    size = int(min(len(covid), len(other)) / max(max(FRACTIONS), 1 - min(FRACTIONS)))
    threshold = loaded.operating_threshold if loaded.operating_threshold is not None else 0.5
    settings = AdaptSettings.of(cfg)
    print(f"{args.model_uri}: pools of {size} validation slices ({len(covid)} COVID, {len(other)} other "
          f"available); scored on {len(test.y)} test slices at the source threshold {threshold:.3f}")
    rows = [{"pool COVID fraction": "unadapted", **scored(test, test.p_covid(loaded.model, 32), threshold)}]
    for fraction in FRACTIONS:
        runs = []
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            n_covid = round(fraction * size)
            pool = np.concatenate([rng.choice(covid, n_covid, replace=False),
                                   rng.choice(other, size - n_covid, replace=False)])
            adapted = adabn(loaded.model, SiteData(val_x[pool], None, pd.DataFrame()), settings, seed)
            runs.append(scored(test, test.p_covid(adapted, 32), threshold))
        rows.append({"pool COVID fraction": f"{fraction:g}",
                     **{k: statistics.median(r[k] for r in runs) for k in runs[0]}})
    table = pd.DataFrame(rows)
    print(f"median over {args.seeds} seeds per fraction")
    print(table.to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
