"""Median seconds per epoch of the custom CNN at 200 px: input pipeline alone, then fit.

Separates decode + augmentation (tf.data) from the model's own compute, on synthetic 512 px PNGs
like the CT slices. Usage: python benchmarks/bench_train_custom_cnn.py [--images 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd
from PIL import Image

from covidtl.config import load_config
from covidtl.data.pipeline import make_dataset
from covidtl.models.registry import build_model, get_spec

ROOT = Path(__file__).parents[1]


def synthetic_table(root: Path, n: int, size: int = 512) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        label = "covid" if i % 2 else "non_covid"
        path = root / f"{label}-{i}.png"
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(path)
        rows.append({"path": str(path), "label": label})
    return pd.DataFrame(rows)


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cfg = load_config(ROOT / "params.yaml")
    spec = get_spec("custom_cnn")
    with tempfile.TemporaryDirectory() as tmp:
        table = synthetic_table(Path(tmp), args.images)
        ds = make_dataset(table, spec, cfg, 200, training=True)
        pipeline = timed(lambda: [None for _ in ds], args.repeats)

        model = build_model(spec, "random", cfg.train)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy",
                      metrics=["accuracy"])
        model.fit(ds, epochs=1, verbose=0, shuffle=False)  # warm-up: tracing is not an epoch's cost
        fit = timed(lambda: model.fit(ds, epochs=1, verbose=0, shuffle=False), args.repeats)

    per_image = 1000 / args.images
    print(f"images per epoch: {args.images} (batch {cfg.train.batch_size}, 200 px, online augmentation)")
    print(f"input pipeline only: median {statistics.median(pipeline):.2f} s/epoch "
          f"({statistics.median(pipeline) * per_image:.1f} ms/image)")
    print(f"fit (pipeline + model): median {statistics.median(fit):.2f} s/epoch "
          f"({statistics.median(fit) * per_image:.1f} ms/image)")


if __name__ == "__main__":
    main()
