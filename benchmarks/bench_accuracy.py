"""Accuracy parity: the paper's Keras recipe against `covidtl train`, three seeds each, one grouped split.

    pip install -e ".[bench]"   # tf_keras, for the baseline's ImageDataGenerator only
    nice -n 10 python benchmarks/bench_accuracy.py [--data ../shared/data/sarscov2-ct] [--epochs 10]

Both recipes train the custom CNN at 200 px from random weights on the same patient-grouped split
(ingested and split once into --workdir, reused) for the same epoch budget, with seeds 1, 2, 3:

- baseline: the paper's recipe as `bench_pipeline.py` builds it (tf_keras `ImageDataGenerator(
  rotation_range=25, horizontal_flip=True, zoom_range=0.2, rescale=1/255).flow_from_dataframe` +
  `fit`, Adam 1e-3, batch 32, graphs), exactly --epochs epochs, no BatchNorm re-estimation;
- covidtl: `covidtl train` as a user runs it (`-S train.run_eagerly=false`, the committed head,
  stop rule and BatchNorm re-estimation), `--epochs` as its cap (the paper's rule may stop earlier:
  the table says how many epochs each run used).

Each run is its own process. Both are scored on the same test rows: accuracy at p(COVID) >= 0.5 and
ROC AUC of p(COVID). Prints per-seed figures, mean and sd per recipe, seconds per epoch (the whole
fit, first traced epoch and validation included, over the epochs run), and whether each recipe's
mean lies within the other's seed range. Finished runs are kept in --out and not repeated.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import bench_pipeline as bp  # the baseline recipe's code: one copy, shared with the speed benchmark

SEEDS = [1, 2, 3]


# --------------------------------------------------------------------------- the baseline (own process)


def worker_baseline(job: dict) -> dict:
    import keras
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from covidtl import train as covidtl_train
    from covidtl.models.registry import build_model
    from dataclasses import replace

    cfg = bp.config(job)
    plan = covidtl_train.plan_run(cfg, "custom_cnn", "random", "ct", out_dir=Path(job["out"]) / "unused")
    keras.utils.set_random_seed(job["seed"])
    net = build_model(plan.spec, "random", replace(cfg.train, preprocessing="rescale"), plan.image_size)
    net.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy", metrics=["accuracy"])
    train = bp.Sequence.wrap(bp.baseline_iterator(plan.train_rows, plan.image_size, True, seed=job["seed"]))
    val = bp.Sequence.wrap(bp.baseline_iterator(plan.rows("val"), plan.image_size, False))
    timer = bp.Timer.make()
    start = time.perf_counter()
    net.fit(train, validation_data=val, epochs=job["epochs"], callbacks=[timer], verbose=0)
    fit_s = time.perf_counter() - start
    test = bp.baseline_iterator(bp.rows(job, "test"), plan.image_size, False)
    truth, prob = [], []
    for i in range(len(test)):
        x, y = test[i]
        prob.append(np.asarray(net.predict_on_batch(x))[:, 1])
        truth.append(y[:, 1])
    truth, prob = np.concatenate(truth), np.concatenate(prob)
    return {"test_accuracy": float(np.mean((prob >= 0.5) == (truth == 1))),
            "test_roc_auc": float(roc_auc_score(truth, prob)), "epochs": len(timer.epochs),
            "fit_s": fit_s, "n_test": int(len(truth))}


# --------------------------------------------------------------------------- covidtl train (own process)


def run_covidtl(args, seed: int, folder: Path) -> dict:
    overrides = [f"data.workdir={args.workdir}", f"data.datasets.ct.path={args.data}", "train.run_eagerly=false"]
    cmd = [bp.COVIDTL, *sum((["-S", o] for o in overrides), []), "train", "--model", "custom_cnn",
           "--init", "random", "--dataset", "ct", "--image-size", "200", "--seed", str(seed),
           "--epochs", str(args.epochs), "--out", str(folder), "--no-log-model", "--restart"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
           "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{args.out}/mlflow.db")}
    log = folder.with_suffix(".log")
    with open(log, "w") as sink:
        if subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env).returncode:
            sys.exit(f"covidtl seed {seed}: `covidtl train` failed; see {log}")
    said = re.search(r"(\d+) epochs in (\d+) s", log.read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    return {"test_accuracy": metrics["test_accuracy"], "test_roc_auc": metrics["test_roc_auc"],
            "epochs": int(said.group(1)), "fit_s": float(said.group(2))}


def run_baseline(args, seed: int, folder: Path) -> dict:
    job = {"data": str(args.data), "workdir": str(args.workdir), "seed": seed, "epochs": args.epochs,
           "out": str(args.out)}
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True,
                          text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"baseline seed {seed} failed:\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    (folder / "metrics.json").write_text(json.dumps(result))
    return result


RECIPES = {"baseline": run_baseline, "covidtl": run_covidtl}


def once(args, recipe: str, seed: int) -> dict:
    """One run's figures, from its metrics file when an earlier invocation finished it."""
    folder = args.out / f"{recipe}-{args.epochs}ep-seed{seed}"
    record = folder.with_suffix(".json")
    if record.exists():
        return json.loads(record.read_text())
    before, start = _child_cpu(), time.perf_counter()
    result = RECIPES[recipe](args, seed, folder)
    result.update(wall_s=time.perf_counter() - start, cpu_s=_child_cpu() - before)
    record.write_text(json.dumps(result))
    return result


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=bp.ROOT / ".." / "shared" / "data" / "sarscov2-ct")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/covidtl-accuracy/data"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/covidtl-accuracy/runs"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker_baseline(json.loads(args.worker))
        print("RESULT " + json.dumps(result), flush=True)
        return
    args.data, args.workdir = args.data.resolve(), args.workdir.resolve()
    if not args.data.is_dir():
        sys.exit(f"{args.data}: no dataset there; pass --data PATH (a folder with COVID/ and non-COVID/)")
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    print(f"# accuracy parity: custom CNN, 200 px, {args.epochs} epochs, seeds {args.seeds}, {args.data}")
    print(f"cores {os.cpu_count()}, load average at start {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    bp.prepare(args.data, args.workdir)

    print("\n| recipe | seed | epochs | test accuracy | test ROC AUC | s/epoch | wall s | CPU s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    results: dict[str, list[dict]] = {r: [] for r in RECIPES}
    for seed in args.seeds:  # interleaved, so a changing load hits both recipes alike
        for recipe in RECIPES:
            r = once(args, recipe, seed)
            results[recipe].append(r)
            print(f"| {recipe} | {seed} | {r['epochs']} | {r['test_accuracy']:.3f} | {r['test_roc_auc']:.3f} | "
                  f"{r['fit_s'] / r['epochs']:.1f} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} |", flush=True)

    print("\n| recipe | test accuracy mean ± sd | test ROC AUC mean ± sd | s/epoch (median) | "
          "accuracy mean within the other's seed range | AUC mean within the other's seed range |")
    print("|---|---:|---:|---:|---|---|")
    for recipe, other in (("baseline", "covidtl"), ("covidtl", "baseline")):
        mine, theirs = results[recipe], results[other]
        within = []
        for key in ("test_accuracy", "test_roc_auc"):
            mean = statistics.mean(r[key] for r in mine)
            low, high = min(r[key] for r in theirs), max(r[key] for r in theirs)
            within.append(f"{'yes' if low <= mean <= high else 'no'} ({mean:.3f} in [{low:.3f}, {high:.3f}])")
        print(f"| {recipe} | {spread([r['test_accuracy'] for r in mine])} | "
              f"{spread([r['test_roc_auc'] for r in mine])} | "
              f"{statistics.median(r['fit_s'] / r['epochs'] for r in mine):.1f} | {within[0]} | {within[1]} |")
    print(f"\nload average at end {', '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"took {(time.perf_counter() - began) / 60:.1f} min")


if __name__ == "__main__":
    main()
