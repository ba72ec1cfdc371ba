"""Inference cost of test-time augmentation and of an ensemble against the plain network.

    python benchmarks/bench_tta_ensemble.py [--model custom_cnn] [--size 200] [--members 3]

Each variant is called as evaluate, predict and the server call a loaded model (`model(x,
training=False)`, eagerly, batches of --batch); images/s is the median of --repeats passes of
--batches batches after one warm-up pass. Weights are untrained: the cost does not depend on them.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np


def images_per_second(model, x, batches: int) -> float:
    started = time.perf_counter()
    for _ in range(batches):
        np.asarray(model(x, training=False))
    return batches * len(x) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="custom_cnn")
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import keras

    from covidtl.config import load_config
    from covidtl.models.registry import build_model, get_spec
    from covidtl.models.wrappers import ensemble_of, with_tta

    cfg = load_config("params.yaml")
    spec = get_spec(args.model)

    def network(seed: int):
        keras.utils.set_random_seed(seed)
        return build_model(spec, "random", cfg.train, args.size)

    plain = network(0)
    variants = {
        "plain": plain,
        "tta flip (2 views)": with_tta(plain, "flip"),
        "tta flip_zoom (4 views)": with_tta(plain, "flip_zoom"),
        f"ensemble of {args.members}": ensemble_of([network(i) for i in range(args.members)], "ensemble"),
    }
    x = np.random.default_rng(0).uniform(0, 1, (args.batch, args.size, args.size, 3)).astype("float32")
    print(f"{args.model} at {args.size} px, batch {args.batch}, median of {args.repeats} x {args.batches} "
          f"batches; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"keras {keras.__version__} ({keras.backend.backend()})")
    base = None
    for name, model in variants.items():
        images_per_second(model, x, 1)  # warm-up: the first call builds and traces
        rate = statistics.median(images_per_second(model, x, args.batches) for _ in range(args.repeats))
        base = base or rate
        print(f"{name:<26} {rate:8.1f} images/s   {base / rate:4.2f}x the plain network's time")


if __name__ == "__main__":
    main()
