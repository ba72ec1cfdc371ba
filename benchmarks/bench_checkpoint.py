"""Median seconds and size of one per-epoch checkpoint (the model with Adam's state, saved atomically).

Usage: python benchmarks/bench_checkpoint.py MODEL [IMAGE_SIZE] [--repeats 3]
e.g. custom_cnn 200, densenet121 224, resnet101v2 224 (the largest: ~145 M parameters).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import keras
import numpy as np

from covidtl.cells import Cell
from covidtl.config import load_config
from covidtl.models.registry import build_model, get_spec

ROOT = Path(__file__).parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("image_size", type=int, nargs="?", default=224)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = load_config(ROOT / "params.yaml")
    net = build_model(get_spec(args.model), "random", cfg.train, args.image_size)  # every weight trainable
    net.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy", metrics=["accuracy"])
    x = np.random.default_rng(0).random((2, args.image_size, args.image_size, 3), dtype="float32")
    net.train_on_batch(x, keras.utils.to_categorical([0, 1], 2))  # Adam's moments exist
    with tempfile.TemporaryDirectory() as tmp:
        cell, seconds = Cell(Path(tmp)), []
        for epoch in range(1, args.repeats + 1):
            started = time.perf_counter()
            cell.save_checkpoint(net.save, {"run_id": "-", "digest": "-", "epochs_done": epoch, "history": {}})
            seconds.append(time.perf_counter() - started)
        size = next(cell.checkpoint_dir.glob("epoch-*.keras")).stat().st_size
    print(f"{args.model} {args.image_size} px, {net.count_params():,} parameters: checkpoint {size / 1e6:.1f} MB, "
          f"save {statistics.median(seconds):.2f} s (median of {', '.join(f'{s:.2f}' for s in seconds)})")


if __name__ == "__main__":
    main()
