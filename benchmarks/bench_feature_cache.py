"""A frozen ImageNet VGG16 cell with and without the feature cache, side by side in one run.

Usage (the ImageNet file in weights/: ../shared/weights/vgg16-imagenet.sh weights .venv/bin/python):
  python benchmarks/bench_feature_cache.py --workdir /tmp/fcache --data ../shared/data/sarscov2-ct \
      --epochs 10 --size 224 --copies 1 2

Every row is one `covidtl train --model vgg16 --init imagenet` as a user runs it (its own process,
graphs, a fixed budget of --epochs epochs, the paper's augmentation), on the same patient-grouped
split:
  uncached       train.feature_cache=none: the whole network runs on every image in every epoch
                 (its decoded-image cache built first, as a first run builds it)
  cold K=k       an empty feature cache: the frozen base runs once per training image and copy
                 (train.feature_copies=k) and once per validation and test image, then the head trains
  warm K=k       the same command again: every entry read back, only the head runs
Prints wall and CPU seconds (the process's user + system time, all threads), test ROC AUC with its
patient-group bootstrap interval, and each row's speed-up over `uncached`. Reruns reuse nothing
but the split: each row starts from its own empty workdir cache (warm rows from their cold row's).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from covidtl.scores import with_interval

BIN = Path(sys.executable).parent


def covidtl(args, workdir: Path, out: Path, *overrides: str) -> dict:
    """One training run in its own process; (wall s, CPU s, test metrics)."""
    settings = [f"data.workdir={workdir}", f"data.datasets.ct.path={args.data}",
                f"train.image_size.vgg16={args.size}", "train.run_eagerly=false", "train.stop.rule=none",
                f"train.max_epochs={args.epochs}", f"train.head={args.head}", *overrides]
    cmd = [str(BIN / "covidtl"), *sum((["-S", s] for s in settings), []), "train", "--model", "vgg16",
           "--init", "imagenet", "--dataset", "ct", "--out", str(out), "--no-log-model", "--restart"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{args.workdir / 'mlflow.db'}",
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{out.name}: covidtl train failed ({done.returncode}); see {out.with_suffix('.log')}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, **json.loads((out / "metrics.json").read_text())}


def prepared_workdir(args, name: str) -> Path:
    """A workdir holding the shared manifest and split, and no cache of any kind."""
    work = args.workdir / name
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(args.workdir / "split" / "ct", work / "ct")
    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--data", required=True, help="the CT folder (class folders)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--head", default="paper", choices=["paper", "gap"])
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 2], help="train.feature_copies per cold row")
    args = parser.parse_args()
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    split = args.workdir / "split"
    if not (split / "ct" / "split.csv").is_file():  # ingest and split once; every row reads these
        subprocess.run([str(BIN / "covidtl"), "-S", f"data.workdir={split}", "-S", f"data.datasets.ct.path={args.data}",
                        "ingest", "ct", "--quiet"], check=True)
        subprocess.run([str(BIN / "covidtl"), "-S", f"data.workdir={split}", "-S", f"data.datasets.ct.path={args.data}",
                        "split", "ct"], check=True)
    rows = []
    work = prepared_workdir(args, "uncached")
    rows.append(("uncached", covidtl(args, work, args.workdir / "run-uncached", "train.feature_cache=none")))
    print(f"uncached: {rows[-1][1]['wall']:.0f} s", file=sys.stderr, flush=True)
    for k in args.copies:
        work = prepared_workdir(args, f"cached-K{k}")
        for kind in ("cold", "warm"):
            name = f"{kind} K={k}"
            rows.append((name, covidtl(args, work, args.workdir / f"run-{kind}-K{k}", f"train.feature_copies={k}")))
            print(f"{name}: {rows[-1][1]['wall']:.0f} s", file=sys.stderr, flush=True)
    base = rows[0][1]
    print(f"\nFrozen ImageNet VGG16 ({args.head} head), {args.size} px, {args.epochs} epochs, the grouped split of {args.data} "
          f"({base['test_images']:.0f} test slices)\n")
    print("| row | wall s | CPU s | speed-up (wall) | test ROC AUC [95% CI] | test accuracy |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        auc = with_interval(r.get("test_roc_auc"), r.get("test_roc_auc_ci_low"), r.get("test_roc_auc_ci_high"))
        print(f"| {name} | {r['wall']:.0f} | {r['cpu']:.0f} | {base['wall'] / r['wall']:.1f}x | {auc} | "
              f"{r['test_accuracy']:.3f} |")


if __name__ == "__main__":
    main()
