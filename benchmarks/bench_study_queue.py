"""Wall time of the study run as queued DVC experiments: one worker (--jobs 1) against several.

Usage: python benchmarks/bench_study_queue.py [--jobs 2] [--slice MODELS ...] [-S KEY=VALUE ...]
e.g. the default study's CT half in two slices of three models:
  python benchmarks/bench_study_queue.py --jobs 2 -S 'study.datasets=[ct]' \
      --slice custom_cnn,densenet121,resnet101v2 --slice vgg16,resnet50,inceptionv3

For each worker count, a fresh throwaway copy of the project (its git files, in a temp folder, so
no DVC run-cache is shared between the two) runs the data stages once and commits them; then one
`dvc exp run --queue -S study.models=[...]` per slice, `dvc queue start --jobs J`, and the time until
the queue is empty. Prints wall seconds, their ratio, the trained runs each experiment logged into
the copy's own mlflow.db (none may be lost in DVC's temporary workspaces), and load averages.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
DEFAULT_SLICES = ["custom_cnn,densenet121,resnet101v2", "vgg16,resnet50,inceptionv3"]


def sh(cwd: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", TF_CPP_MIN_LOG_LEVEL="2",
               KERAS_HOME=str(cwd.parent / "keras-empty"),  # no ImageNet files: those cells skip
               GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="b@b", GIT_COMMITTER_NAME="bench",
               GIT_COMMITTER_EMAIL="b@b")
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return result.stdout


def make_copy(dest: Path, overrides: list[str]) -> Path:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    for item in overrides:
        key, value = item.split("=", 1)
        node = params
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = yaml.safe_load(value)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(dest, "git", "init", "-q")
    sh(dest, "dvc", "repro", *[f"split@{d}" for d in params["data"]["datasets"]])  # the shared baseline
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-qm", "baseline: data stages done")
    return dest


def queue_and_wait(repo: Path, slices: list[str], jobs: int) -> tuple[float, list[str]]:
    names = []
    for i, models in enumerate(slices):
        name = f"jobs{jobs}-slice{i}"
        sh(repo, "dvc", "exp", "run", "--queue", "-n", name, "-S", f"study.models=[{models}]")
        names.append(name)
    started = time.perf_counter()
    sh(repo, "dvc", "queue", "start", "--jobs", str(jobs))
    while True:
        time.sleep(5)
        status = sh(repo, "dvc", "queue", "status")
        if not any(word in status for word in ("Queued", "Running")):
            break
    seconds = time.perf_counter() - started
    failed = [line for line in status.splitlines() if "Failed" in line]
    if failed:
        sys.exit("failed experiments:\n" + "\n".join(failed) + "\n(see `dvc queue logs NAME` in " + str(repo) + ")")
    return seconds, names


def trained_runs(repo: Path, name: str) -> int:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments() if e.name.startswith("covidtl-")]
    return len(client.search_runs(experiments, f"tags.kind = 'train' AND tags.dvc_experiment = '{name}'"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--slice", dest="slices", action="append", help="comma-separated models (repeatable)")
    parser.add_argument("-S", dest="overrides", action="append", default=[], help="params.yaml KEY=VALUE")
    parser.add_argument("--keep", action="store_true", help="keep the copies (printed) to inspect")
    args = parser.parse_args()
    slices = args.slices or DEFAULT_SLICES
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-queue-"))
    try:
        for jobs in (1, args.jobs):
            repo = make_copy(tmp / f"jobs{jobs}" / "repo", args.overrides)
            before = os.getloadavg()
            seconds, names = queue_and_wait(repo, slices, jobs)
            rows.append((jobs, seconds, {n: trained_runs(repo, n) for n in names}, before, os.getloadavg()))
            print(f"--jobs {jobs}: {seconds:.0f} s", flush=True)
    finally:
        if args.keep:
            print(f"copies kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nslices: {' | '.join(slices)}; overrides: {' '.join(args.overrides) or 'none'}")
    print(f"{'jobs':>4}  {'wall s':>7}  {'trained runs per experiment':<40}  load avg 1/5/15 min before -> after")
    for jobs, seconds, runs, before, after in rows:
        counts = ", ".join(f"{n}: {c}" for n, c in runs.items())
        print(f"{jobs:>4}  {seconds:>7.0f}  {counts:<40}  {'/'.join(f'{x:.1f}' for x in before)} -> "
              f"{'/'.join(f'{x:.1f}' for x in after)}")
    print(f"serial / parallel: {rows[0][1] / rows[1][1]:.2f}x")


if __name__ == "__main__":
    main()
