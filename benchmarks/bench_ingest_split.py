"""Time `covidtl ingest` + `covidtl split` on the real CT set (median of 3) and print the leakage figures.

    python benchmarks/bench_ingest_split.py [--data ../shared/data/sarscov2-ct] [--repeats 3]

Runs the real commands in subprocesses (as a user would), writing under a temporary data.workdir.
Target: under 2 minutes per ingest + split on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
COVIDTL = [str(Path(sys.executable).parent / "covidtl")]


def run(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([*COVIDTL, "--params", str(ROOT / "params.yaml"), *args], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / ".." / "shared" / "data" / "sarscov2-ct"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    data = Path(args.data).resolve()
    if not data.is_dir():
        sys.exit(f"no dataset at {data}; pass --data")

    with tempfile.TemporaryDirectory() as work:
        common = ["-S", f"data.workdir={work}", "-S", f"data.datasets.ct.path={data}"]
        ingest_s, split_s = [], []
        for _ in range(args.repeats):
            ingest_s.append(run(*common, "ingest", "ct", "--quiet"))
            split_s.append(run(*common, "split", "ct", "--strategy", "grouped"))
        grouped = json.loads((Path(work) / "ct" / "leakage.json").read_text())
        run(*common, "split", "ct", "--strategy", "random")
        random_ = json.loads((Path(work) / "ct" / "leakage.json").read_text())
        quarantined = sum(1 for _ in open(Path(work) / "ct" / "quarantine.csv")) - 1

    total = [i + s for i, s in zip(ingest_s, split_s)]
    print(f"dataset: {data} ({grouped['images']} images)")
    print(f"ingest  s: {' '.join(f'{t:.1f}' for t in ingest_s)}  median {statistics.median(ingest_s):.1f}")
    print(f"split   s: {' '.join(f'{t:.1f}' for t in split_s)}  median {statistics.median(split_s):.1f}")
    print(f"ingest+split median {statistics.median(total):.1f} s (target < 120 s)")
    print(f"quarantined: {quarantined}")
    print(f"groups: {json.dumps(grouped['groups'])}")
    for report in (random_, grouped):
        crossing = report["crossing_pairs"]
        print(
            f"{report['strategy']:>7}: crossing same-group pairs {json.dumps(crossing['same_group'])} "
            f"(total {crossing['same_group_total']}), near-duplicate pairs crossing "
            f"{crossing['near_duplicate_total']} of {report['near_duplicate_pairs']}, "
            f"groups split across {report['groups_split_across']}; counts {json.dumps(report['counts'])}"
        )


if __name__ == "__main__":
    main()
