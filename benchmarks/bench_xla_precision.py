"""XLA (`jit_compile`) and `mixed_bfloat16` against plain float32, per model, on this CPU.

    nice -n 10 python benchmarks/bench_xla_precision.py [--models custom_cnn,densenet121] [--batch 4]

Each of the six registry models (random weights, the paper's head, its native size) is built four
times in one process — float32 or mixed_bfloat16 (float32 output layer, as covidtl builds it) x
jit_compile off or on — and trained with Adam on the same in-memory batch. After each variant's
first (traced or compiled) step, the timed steps run interleaved (A B C D, A B C D, ...), so a load
that changes during the run hits every variant alike. Prints the median step time per variant, its
ratio to float32 without XLA, and the one-off first-step time. Each model runs in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import bench_pipeline as bp

VARIANTS = [("float32", False), ("float32", True), ("mixed_bfloat16", False), ("mixed_bfloat16", True)]


def worker(job: dict) -> dict:
    import keras
    import numpy as np

    from covidtl.models.registry import build_model, get_spec

    cfg = bp.config(job)
    spec, size = get_spec(job["model"]), bp.NATIVE.get(job["model"], 224)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (job["batch"], size, size, 3)).astype("float32")
    y = np.eye(2, dtype="float32")[rng.integers(0, 2, job["batch"])]
    variants = [VARIANTS[k] for k in job["variants"]]
    nets, first = [], []
    for precision, xla in variants:
        keras.mixed_precision.set_global_policy(precision)
        keras.utils.set_random_seed(0)
        net = build_model(spec, "random", cfg.train, size)
        net.compile(optimizer=keras.optimizers.Adam(1e-4), loss="categorical_crossentropy", jit_compile=xla)
        start = time.perf_counter()
        net.train_on_batch(x, y)
        first.append(time.perf_counter() - start)
        nets.append(net)
    keras.mixed_precision.set_global_policy("float32")
    steps: list[list[float]] = [[] for _ in variants]
    for _ in range(job["steps"]):
        for k, net in enumerate(nets):
            start = time.perf_counter()
            net.train_on_batch(x, y)
            steps[k].append(time.perf_counter() - start)
    return {"first_s": first, "steps_s": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(bp.MODELS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant after the first")
    parser.add_argument("--no-xla", action="store_true",
                        help="float32 against mixed_bfloat16 only (XLA's compile of a large backbone takes minutes)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    began = time.perf_counter()
    print(f"# XLA and mixed_bfloat16 per model: batch {args.batch}, {args.steps} interleaved timed steps each")
    print(f"cores {os.cpu_count()}, load average at start {', '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    chosen = [k for k, (_, xla) in enumerate(VARIANTS) if not (xla and args.no_xla)]
    names = [f"{p}{' + XLA' if xla else ''}" for p, xla in (VARIANTS[k] for k in chosen)]
    print("| model | px | " + " | ".join(f"{n} step s (ratio)" for n in names) + " | first step s (each) | CPU s |")
    print("|---|---:|" + "---:|" * len(names) + "---|---:|", flush=True)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore"}
    for model in args.models.split(","):
        job = {"model": model, "batch": args.batch, "steps": args.steps, "variants": chosen, "data": "",
               "workdir": "/tmp"}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True,
                              text=True, env=env)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            print(f"| {model} | failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else '?'} |")
            continue
        r = json.loads(lines[-1][len("RESULT "):])
        medians = [statistics.median(s) for s in r["steps_s"]]
        cells = [f"{m:.3f} ({medians[0] / m:.2f}x)" for m in medians]
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        print(f"| {model} | {bp.NATIVE.get(model, 224)} | " + " | ".join(cells) +
              f" | {' / '.join(f'{f:.1f}' for f in r['first_s'])} | {cpu:.0f} |", flush=True)
    print(f"\n(ratio: float32 step time / this variant's: above 1 is faster.) load average at end "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}; took {(time.perf_counter() - began) / 60:.1f} min")


if __name__ == "__main__":
    main()
