"""Each lever of the stronger recipe, on and off, with the same seeds on one patient-grouped split.

Usage (the real CT set, ingested and split into a workdir first; docs/training.md, "The custom CNN's
stronger recipe"):
  python benchmarks/bench_levers.py --workdir /tmp/lever/data \
      --data ct=../shared/data/sarscov2-ct --seeds 1 2 3 --rows paper base label_smoothing ...

Each (row, seed) is one `covidtl train` as a user runs it (graphs, its own process, its own --out
folder), so a finished run is never repeated: re-running the script picks up where it stopped. A row
is the `base` recipe plus one lever (`LEVERS`); `paper` is the paper's recipe at the same epoch
budget; `ensemble` averages the base seeds' test probabilities (no training); `tta` scores the base
seeds' models with flip test-time augmentation (no training; needs `covidtl evaluate --tta`).
Prints per-seed test ROC AUC and accuracy (argmax, p >= 0.5, as `covidtl cv` reports it),
each row's mean and sd over seeds, and the row's mean minus base's. The test split holds a few
patients: these rows rank levers cheaply; recipes are judged by `covidtl cv`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

BIN = Path(sys.executable).parent
# The recipe every lever row starts from: the GAP head, the best validation-AUC epoch restored,
# patience on it (the paper's stop rule is a threshold on a few patients), graphs.
BASE = ["train.head=gap", "train.select=val_auc", "train.stop.rule=patience", "train.stop.patience=4"]
INTENSITY = ["augment.intensity.brightness=0.1", "augment.intensity.contrast=0.2",
             "augment.intensity.gamma=0.2", "augment.intensity.noise=0.02", "augment.intensity.blur=0.2"]
LEVERS: dict[str, list[str]] = {
    "paper": [],  # the paper's head, stop rule and last epoch, same epoch budget
    "base": BASE,
    "intensity": BASE + INTENSITY,
    "standardize": BASE + ["train.normalize=standardize"],
    "equalize": BASE + ["train.normalize=equalize"],
    "crop": BASE + ["train.crop=body"],
    "label_smoothing": BASE + ["train.label_smoothing=0.1"],
    "weight_decay": BASE + ["train.weight_decay=0.01"],
    "cosine_warmup": BASE + ["train.schedule=cosine", "train.warmup_epochs=1"],
    "best": ["profile=cnn_simclr"],  # the custom CNN's stronger recipe from random weights
    "best_pretrained": ["profile=cnn_simclr"],  # ... from --pretrained FILE (`covidtl pretrain`)
    "pretrained": BASE,  # base from --pretrained FILE: the pretraining lever alone
}
FROM_FILE = ("best_pretrained", "pretrained")  # rows whose runs start from --pretrained
DERIVED = ("ensemble", "tta")  # from the base row's models, no training


def run_dir(out: Path, row: str, seed: int) -> Path:
    return out / f"{row}-seed{seed}"


def train_once(args, row: str, seed: int) -> dict:
    """One `covidtl train` (skipped when its metrics.json exists); its test metrics."""
    folder = run_dir(args.out, row, seed)
    metrics_file = folder / "metrics.json"
    if not metrics_file.exists():
        overrides = [*common_overrides(args), *LEVERS[row]]
        cmd = [str(BIN / "covidtl"), *sum((["-S", o] for o in overrides), []), "train",
               "--model", "custom_cnn", "--dataset", args.dataset, "--seed", str(seed),
               "--epochs", str(args.epochs), "--out", str(folder), "--no-log-model"]
        if row in FROM_FILE:
            if not args.pretrained:
                raise SystemExit(f"--rows {row}: give --pretrained FILE (a `covidtl pretrain` weights file)")
            cmd += ["--init", str(args.pretrained)]
        else:  # random weights whatever the row's profile names (best: train.init pretrained)
            cmd += ["--init", "random"]
        log = args.out / f"{row}-seed{seed}.log"
        started = time.perf_counter()
        with open(log, "w") as sink:
            done = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env(args))
        if done.returncode != 0:
            raise SystemExit(f"{row} seed {seed}: covidtl train failed (exit {done.returncode}); see {log}")
        print(f"  {row} seed {seed}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return json.loads(metrics_file.read_text())


def common_overrides(args) -> list[str]:
    return [f"data.workdir={args.workdir}", f"data.datasets.{args.dataset}.path={args.data}",
            "train.run_eagerly=false", *args.set]


def env(args) -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
            "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{args.out}/mlflow.db")}


def predictions(args, row: str, seed: int) -> pd.DataFrame:
    return pd.read_csv(run_dir(args.out, row, seed) / "predictions.csv")


def y_true(frame: pd.DataFrame) -> np.ndarray:
    return (frame["actual"] == "covid").to_numpy().astype(int)


def ensemble_row(args) -> list[dict]:
    """The base seeds' test probabilities averaged: one figure (an ensemble of all seeds); accuracy
    at p >= 0.5, as test_accuracy is (the operating point is the run's own, chosen on validation)."""
    frames = [predictions(args, "base", s).set_index("path") for s in args.seeds]
    mean_p = (sum(f["p_covid"] for f in frames) / len(frames)).to_numpy()
    truth = y_true(frames[0])
    return [{"seed": "all", "test_roc_auc": roc_auc_score(truth, mean_p),
             "test_accuracy": float(np.mean((mean_p >= 0.5) == truth))}]


def tta_row(args) -> list[dict]:
    """Each base seed's model scored again with flip TTA (same weights)."""
    rows = []
    for seed in args.seeds:
        out = run_dir(args.out, "tta", seed)
        if not (out / "metrics.json").exists():
            model = run_dir(args.out, "base", seed)  # the cell folder: model/model.keras + card
            cmd = [str(BIN / "covidtl"), *sum((["-S", o] for o in common_overrides(args)), []), "evaluate",
                   "--model-uri", str(model), "--data", args.dataset, "--tta", "flip", "--out", str(out)]
            with open(args.out / f"tta-seed{seed}.log", "w") as sink:
                if subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env(args)).returncode:
                    raise SystemExit(f"tta seed {seed}: covidtl evaluate --tta failed; see {sink.name}")
        metrics = json.loads((out / "metrics.json").read_text())
        rows.append({"seed": seed, **{k: metrics.get(k) for k in ("test_roc_auc", "test_accuracy")}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="data.workdir holding <dataset>/split.csv")
    parser.add_argument("--data", required=True, help="the dataset's folder of class folders")
    parser.add_argument("--dataset", default="ct")
    parser.add_argument("--out", type=Path, default=Path("/tmp/covidtl-levers"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--rows", nargs="+", default=["paper", "base", *(
        k for k in LEVERS if k not in ("paper", "base", "best", *FROM_FILE))])
    parser.add_argument("--pretrained", type=Path, default=None,
                        help="weights file of `covidtl pretrain` (same split's training rows) for "
                             f"the rows {', '.join(FROM_FILE)}")
    parser.add_argument("-S", "--set", action="append", default=[], help="an override for every run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    unknown = set(args.rows) - set(LEVERS) - set(DERIVED)
    if unknown:
        raise SystemExit(f"--rows: unknown {sorted(unknown)}; choose from {sorted(LEVERS) + list(DERIVED)}")

    results: dict[str, list[dict]] = {}
    for row in args.rows:
        if row == "ensemble":
            results[row] = ensemble_row(args)
        elif row == "tta":
            results[row] = tta_row(args)
        else:
            results[row] = [{"seed": s, **train_once(args, row, s)} for s in args.seeds]

    print(f"\n{'row':<16} {'seeds':<6} {'AUC per seed':<24} {'AUC mean (sd)':<16} {'dAUC':>6}  "
          f"{'acc per seed':<24} {'acc mean (sd)':<16} {'dacc':>6}  epochs")
    base = results.get("base")
    for row, runs in results.items():
        line = [f"{row:<16}", f"{len(runs):<6}"]
        for key in ("test_roc_auc", "test_accuracy"):
            values = [r[key] for r in runs if r.get(key) is not None]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            delta = (statistics.mean(values) - statistics.mean(r[key] for r in base)) if base and values else float("nan")
            line += [f"{' '.join(f'{v:.3f}' for v in values):<24}", f"{statistics.mean(values):.3f} ({sd:.3f})".ljust(16),
                     f"{delta:+.3f}".rjust(6) + " "]
        line.append(" ".join(str(r.get("epochs_used", "-")) for r in runs))
        print(" ".join(line))
    print(f"\n{args.dataset} test split, seeds {args.seeds}, custom CNN, up to {args.epochs} epochs; "
          f"cores {os.cpu_count()}; load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
