"""Where one covidtl epoch of a model goes: training steps, BatchNorm re-estimation, validation, and
the same model's step on batches already in memory (the ceiling any input pipeline can reach).

    python benchmarks/profile_epoch.py [MODEL] [--workdir data/bench]   # after bench_pipeline.py
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="custom_cnn")
    parser.add_argument("--workdir", default=str(ROOT / "data" / "bench"))
    parser.add_argument("--data", default=str(ROOT / ".." / "shared" / "data" / "sarscov2-ct"))
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per part")
    args = parser.parse_args()
    import keras
    import tensorflow as tf

    from bench_pipeline import MODELS, NATIVE, config
    from covidtl import train as covidtl_train
    from covidtl.models.registry import build_model

    cfg = config({"workdir": args.workdir, "data": str(Path(args.data).resolve())})
    plan = covidtl_train.plan_run(cfg, args.model, "random", "ct", out_dir=Path(args.workdir) / "cell")
    net = build_model(plan.spec, "random", cfg.train, plan.image_size)
    net.compile(optimizer=keras.optimizers.Adam(plan.learning_rate), loss="categorical_crossentropy",
                metrics=["accuracy"], run_eagerly=False)
    train_ds, val_ds = covidtl_train.fit_datasets(plan)
    x, y = next(iter(train_ds))
    net.train_on_batch(x, y)  # traces

    def per_image(fn, images):
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) / images

    n = args.steps
    in_memory = per_image(lambda: [net.train_on_batch(x, y) for _ in range(n)], n * len(x))
    from_pipeline = per_image(lambda: [net.train_on_batch(a, b) for a, b in train_ds.take(n)], n * len(x))
    pipeline_only = per_image(lambda: [None for _ in train_ds.take(n)], n * len(x))
    recal = covidtl_train.RecalibrateBatchNorm(train_ds, cfg.train.bn_recalibration_batches)
    recal.set_model(net)
    recal.on_test_begin()  # traces
    bn = per_image(recal.on_test_begin, 1)
    val_images = len(plan.rows("val"))
    net.evaluate(val_ds, verbose=0)
    val = per_image(lambda: net.evaluate(val_ds, verbose=0), 1)
    n_train = len(plan.train_rows)
    train_s = n_train * from_pipeline
    total = train_s + bn + val
    print(f"{args.model} {plan.image_size} px, {n_train} training / {val_images} validation images, "
          f"cores {os.cpu_count()}, load {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("| part of one epoch | seconds | share |\n|---|---:|---:|")
    for name, s in (("training steps, batches from the pipeline", train_s),
                    (f"BatchNorm re-estimation ({cfg.train.bn_recalibration_batches} batches)", bn),
                    ("validation", val)):
        print(f"| {name} | {s:.1f} | {100 * s / total:.0f}% |")
    print(f"| epoch | {total:.1f} | |")
    print(f"\nstep on in-memory batches {1 / in_memory:.1f} images/s; fed by the pipeline {1 / from_pipeline:.1f} "
          f"images/s (the model's own compute is {100 * in_memory / from_pipeline:.0f}% of the step); "
          f"pipeline alone {1 / pipeline_only:.0f} images/s")
    del tf, MODELS, NATIVE


if __name__ == "__main__":
    main()
