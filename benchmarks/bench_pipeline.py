"""covidtl against the paper's Keras recipe on the same real images: input pipeline, decode, training, memory.

    pip install -e ".[bench]"   # tf_keras, for the baseline's ImageDataGenerator only
    python benchmarks/bench_pipeline.py [--data ../shared/data/sarscov2-ct] [--quick]

The baseline is the paper's recipe: tf_keras `ImageDataGenerator(rotation_range=25,
horizontal_flip=True, zoom_range=0.2, rescale=1/255).flow_from_dataframe` feeding `fit` of the same
Keras model (graph mode). covidtl is measured as `covidtl train` runs it (`train.fit_datasets`, its
compile settings, the BatchNorm re-estimation), at the paper-scale settings (graphs, native sizes)
and, for the custom CNN, also at the committed default (train.run_eagerly: auto, its row naming the
mode it settled on) and eager. Every measurement runs in its own process, so each peak resident
memory is its own (the backbones: both recipes' steps in one process on one network, its peak shown
once); medians of several repetitions after a warm-up. The data is ingested and split once into
--workdir (reused); the decode cache is rebuilt at the start of each run and its build timed as a
one-off. --quick: the pipelines at 200 px and the custom CNN only. Each section ends with its wall
time and its CPU time (this process and its workers): on a shared machine the wall time is an upper
bound, and CPU time / cores is what an idle machine would take (targets: full mode under 20 min,
--quick under 5).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
COVIDTL = str(Path(sys.executable).parent / "covidtl")
BATCH = 32
MODELS = ["custom_cnn", "densenet121", "resnet50", "inceptionv3", "resnet101v2", "vgg16"]
NATIVE = {"custom_cnn": 200, "inceptionv3": 299}  # the others: 224


# --------------------------------------------------------------------------- workers (one process each)


def config(job: dict):
    from covidtl.config import load_config

    return load_config(ROOT / "params.yaml", {
        "data.workdir": job["workdir"], "data.datasets.ct.path": job["data"],
        "train.image_size": {m: NATIVE.get(m, 224) for m in MODELS},
        "train.run_eagerly": job.get("eager", False), "train.seed": 42,
    })


def rows(job: dict, split: str):
    from covidtl.data import tables
    from covidtl.data.pipeline import readable_rows

    table = tables.read_split(config(job), "ct")
    return readable_rows(table[table["split"] == split]).reset_index(drop=True)


def rate(batches, limit: int | None) -> float:
    """Images per second over one pass (or `limit` batches)."""
    n, start = 0, time.perf_counter()
    for k, batch in enumerate(batches):
        if limit is not None and k >= limit:
            break
        n += len(batch[0])
    return n / (time.perf_counter() - start)


def worker_cache(job: dict) -> dict:
    from covidtl.data.cache import cached_images

    cfg, start = config(job), time.perf_counter()
    n = 0
    for split in ("train", "val"):
        n += len(cached_images(rows(job, split), job["size"], cfg).images)
    return {"seconds": time.perf_counter() - start, "images": n}


def worker_decode(job: dict) -> dict:
    """Every file decoded and resized as training did each epoch before the cache (no augmentation)."""
    import tensorflow as tf

    from covidtl.data.pipeline import decode_image

    paths = rows(job, "train")["path"].astype(str).tolist()
    ds = tf.data.Dataset.from_tensor_slices(paths).map(
        lambda p: (decode_image(p, job["size"]),), num_parallel_calls=tf.data.AUTOTUNE).batch(BATCH).prefetch(2)
    rate(ds, 2)
    return {"rates": [rate(ds, job["batches"]) for _ in range(job["repeats"])]}


def worker_pipe(job: dict) -> dict:
    """Augmented training batches of 32 at job["size"], as each recipe delivers them to fit."""
    if job["recipe"] == "covidtl":
        from covidtl.data.pipeline import make_dataset
        from covidtl.models.registry import get_spec

        ds = make_dataset(rows(job, "train"), get_spec("custom_cnn"), config(job), job["size"], True, cache=True)
        batches = lambda: iter(ds)  # noqa: E731
    else:
        it = baseline_iterator(rows(job, "train"), job["size"], augment=True)
        batches = lambda: (it[i] for i in range(len(it)))  # noqa: E731
    rate(batches(), 2)
    return {"rates": [rate(batches(), job["batches"]) for _ in range(job["repeats"])]}


def baseline_iterator(table, size: int, augment: bool, seed: int = 42):
    from tf_keras.preprocessing.image import ImageDataGenerator

    options = dict(rotation_range=25, horizontal_flip=True, zoom_range=0.2) if augment else {}
    frame = table.assign(filename=table["path"].astype(str), label=table["label"].astype(str))
    return ImageDataGenerator(rescale=1 / 255, **options).flow_from_dataframe(
        frame, x_col="filename", y_col="label", target_size=(size, size), batch_size=BATCH,
        class_mode="categorical", classes=["non_covid", "covid"], shuffle=augment, seed=seed)


class Timer:
    """Seconds per epoch and per training batch (keras callback, made lazily to import keras late)."""

    @staticmethod
    def make():
        import keras

        class _Timer(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.epochs, self.steps = [], []

            def on_epoch_begin(self, epoch, logs=None):
                self.epoch_start = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                self.epochs.append(time.perf_counter() - self.epoch_start)

            def on_train_batch_begin(self, batch, logs=None):
                self.step_start = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                self.steps.append(time.perf_counter() - self.step_start)

        return _Timer()


def seeded_plan(job: dict):
    """The run `covidtl train` would plan for job["model"] on the CT set, with the seed set."""
    import keras

    from covidtl import train as covidtl_train

    cfg = config(job)
    plan = covidtl_train.plan_run(cfg, job["model"], "random", "ct", out_dir=Path(job["workdir"]) / "cell")
    keras.utils.set_random_seed(42)
    return cfg, plan


def worker_train(job: dict) -> dict:
    """Whole epochs with validation (job["epochs"]) or a few training steps (job["steps"])."""
    import keras
    import tensorflow as tf

    from covidtl import train as covidtl_train
    from covidtl.models.registry import build_model

    cfg, plan = seeded_plan(job)
    timer, callbacks = Timer.make(), []
    if job["recipe"] == "covidtl":
        net = build_model(plan.spec, "random", cfg.train, plan.image_size)
        train_ds, val_ds = covidtl_train.fit_datasets(plan)
        callbacks.append(covidtl_train.RecalibrateBatchNorm(train_ds, cfg.train.bn_recalibration_batches))
        eager = plan.run_eagerly  # train.run_eagerly as `covidtl train` settles it (auto included)
    else:
        from dataclasses import replace

        net = build_model(plan.spec, "random", replace(cfg.train, preprocessing="rescale"), plan.image_size)
        train_ds = Sequence.wrap(baseline_iterator(plan.train_rows, plan.image_size, augment=True))
        val_ds = Sequence.wrap(baseline_iterator(plan.rows("val"), plan.image_size, augment=False))
        eager = False
    net.compile(optimizer=keras.optimizers.Adam(plan.learning_rate), loss="categorical_crossentropy",
                metrics=["accuracy"], run_eagerly=eager)
    n_train = len(plan.train_rows)
    if job.get("epochs"):
        net.fit(train_ds, validation_data=val_ds, epochs=1 + job["epochs"], callbacks=[timer, *callbacks],
                verbose=0)
        epochs = timer.epochs[1:]  # the first one traces
        return {"epoch_s": epochs, "images_s": [n_train / s for s in epochs], "n_train": n_train, "eager": eager}
    steps = 1 + job["steps"]
    if job["recipe"] == "covidtl":
        net.fit(train_ds.take(steps), epochs=1, callbacks=[timer], verbose=0)
    else:
        net.fit(train_ds, steps_per_epoch=steps, epochs=1, callbacks=[timer], verbose=0)
    timed = timer.steps[1:]
    del tf
    return {"images_s": [BATCH / s for s in timed], "epoch_s": [n_train * s / BATCH for s in timed],
            "n_train": n_train, "estimated": True, "eager": eager}


def worker_steps(job: dict) -> dict:
    """Both recipes' training steps on one compiled network, job["steps"] timed each.

    For the backbones a step is >99% the model's own compute, and importing, building and
    tracing one of them costs ~45 s on 2 cores: one process and one network measure both recipes
    for half that set-up (two processes made the full benchmark 24.6 min on an idle machine). The
    baseline's batches come from ImageDataGenerator scaled to [0, 1], covidtl's from its cache
    pipeline; the network, its preprocessing layer included, is covidtl's for both: the same work
    per step, fed by each recipe's input pipeline. Peak memory is the process's, both recipes'."""
    import keras

    from covidtl import train as covidtl_train
    from covidtl.models.registry import build_model

    cfg, plan = seeded_plan(job)
    net = build_model(plan.spec, "random", cfg.train, plan.image_size)
    net.compile(optimizer=keras.optimizers.Adam(plan.learning_rate), loss="categorical_crossentropy",
                metrics=["accuracy"], run_eagerly=False)
    ours, _ = covidtl_train.fit_datasets(plan)
    theirs = Sequence.wrap(baseline_iterator(plan.train_rows, plan.image_size, augment=True))
    n_train, result = len(plan.train_rows), {}
    for recipe in ("baseline", "covidtl"):
        timer = Timer.make()
        if recipe == "covidtl":
            # The step is traced already (same input signature): every step is timed, the first
            # with its fresh iterator's warm-up in it (against covidtl, by under a second).
            net.fit(ours.take(job["steps"]), epochs=1, callbacks=[timer], verbose=0)
            timed = timer.steps
        else:  # the first step traces the network: dropped
            net.fit(theirs, steps_per_epoch=1 + job["steps"], epochs=1, callbacks=[timer], verbose=0)
            timed = timer.steps[1:]
        result[recipe] = {"images_s": [BATCH / s for s in timed], "epoch_s": [n_train * s / BATCH for s in timed],
                          "estimated": True}
    return result


class Sequence:
    @staticmethod
    def wrap(iterator):
        """The tf_keras iterator as a Keras 3 PyDataset (one worker, as the paper's fit_generator)."""
        import keras

        class Wrapped(keras.utils.PyDataset):
            def __len__(self):
                return len(iterator)

            def __getitem__(self, i):
                return iterator[i]

            def on_epoch_end(self):
                iterator.on_epoch_end()

        return Wrapped()


WORKERS = {"cache": worker_cache, "decode": worker_decode, "pipe": worker_pipe, "train": worker_train,
           "steps": worker_steps}


def run_worker(spec: str) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    job = json.loads(spec)
    result = WORKERS[job["kind"]](job)
    result["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- the parent: plan, run, table


def measure(job: dict) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True,
                          text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"benchmark worker {job} failed:\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall_s"] = time.perf_counter() - start
    return result


def prepare(data: Path, workdir: Path) -> float | None:
    """Ingest and split once into workdir (seconds taken, or None when reused)."""
    if (workdir / "ct" / "split.csv").exists():
        return None
    common = ["--params", str(ROOT / "params.yaml"), "-S", f"data.workdir={workdir}",
              "-S", f"data.datasets.ct.path={data}"]
    start = time.perf_counter()
    for step in (["ingest", "ct", "--quiet"], ["split", "ct"]):
        subprocess.run([COVIDTL, *common, *step], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


class Clock:
    """Wall and CPU time (user + sys of this process and its finished workers), per section and in all."""

    def __init__(self):
        self.began = self.mark = (time.perf_counter(), self.cpu())

    @staticmethod
    def cpu() -> float:
        own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime

    def lap(self, section: str) -> None:
        now = (time.perf_counter(), self.cpu())
        print(f"\n_{section}: {self.line(self.mark, now)}_", flush=True)
        self.mark = now

    def total(self) -> str:
        return self.line(self.began, (time.perf_counter(), self.cpu()))

    @staticmethod
    def line(start, end) -> str:
        wall, cpu = end[0] - start[0], end[1] - start[1]
        return (f"wall {wall / 60:.1f} min, CPU {cpu / 60:.1f} min "
                f"(CPU / {os.cpu_count()} cores = {cpu / 60 / os.cpu_count():.1f} min)")


def med(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / ".." / "shared" / "data" / "sarscov2-ct"))
    parser.add_argument("--workdir", default=str(ROOT / "data" / "bench"),
                        help="ingest, split and decode cache of the benchmark (git-ignored)")
    parser.add_argument("--quick", action="store_true", help="pipelines and the custom CNN only, < 5 min")
    parser.add_argument("--repeats", type=int, default=None, help="repetitions after the warm-up")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_worker(args.worker)
    data, workdir = Path(args.data).resolve(), Path(args.workdir).resolve()
    if not data.is_dir():
        sys.exit(f"{data}: no dataset there; pass --data PATH (a folder with COVID/ and non-COVID/)")
    quick = args.quick
    repeats = args.repeats or 3
    models = ["custom_cnn"] if quick else args.models.split(",")
    base = {"data": str(data), "workdir": str(workdir), "repeats": repeats}
    clock = Clock()
    print(f"# covidtl benchmark{' (--quick)' if quick else ''}: {data}")
    print(f"cores {os.cpu_count()}, {platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"load average at start {', '.join(f'{x:.2f}' for x in os.getloadavg())}")

    prepared = prepare(data, workdir)
    shutil.rmtree(workdir / "cache", ignore_errors=True)
    print("\n## One-off work (not in any figure below)\n")
    print("| step | seconds | note |\n|---|---:|---|")
    print(f"| ingest + split | {'reused' if prepared is None else f'{prepared:.1f}'} | {workdir / 'ct'} |")
    sizes = [200] if quick else sorted({200, 224} | {NATIVE.get(m, 224) for m in models})
    for size in sizes:
        built = measure({**base, "kind": "cache", "size": size})
        print(f"| decode cache {size} px | {built['seconds']:.1f} | {built['images']} train+val images, "
              f"{built['images'] / built['seconds']:.0f} images/s, peak {built['rss_mib']:.0f} MiB |")

    clock.lap("one-off work")
    print(f"\n## Input pipeline: augmented batches of {BATCH} (images/s, median of {repeats} after a warm-up)\n")
    print("| size | decode only | baseline ImageDataGenerator | covidtl | covidtl / baseline | "
          "peak MiB baseline / covidtl |\n|---:|---:|---:|---:|---:|---:|")
    pipeline_rate = {}
    for size in sizes:
        limit = 12  # 384 images a repetition: whole passes (1390) only added minutes, not precision
        decode = measure({**base, "kind": "decode", "size": size, "batches": limit})
        idg = measure({**base, "kind": "pipe", "recipe": "baseline", "size": size, "batches": limit})
        ours = measure({**base, "kind": "pipe", "recipe": "covidtl", "size": size, "batches": limit})
        pipeline_rate[size] = med(ours["rates"])
        print(f"| {size} | {med(decode['rates']):.0f} | {med(idg['rates']):.0f} | {med(ours['rates']):.0f} | "
              f"{med(ours['rates']) / med(idg['rates']):.1f}x | {idg['rss_mib']:.0f} / {ours['rss_mib']:.0f} |")

    clock.lap("input pipeline")
    print("\n## Training (images/s and s/epoch, median; ratio = covidtl / baseline speed)\n")
    print("| model | px | covidtl setting | measured | baseline img/s | covidtl img/s | baseline s/epoch | "
          "covidtl s/epoch | ratio | peak MiB baseline / covidtl |\n|---|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for model in models:
        size = NATIVE.get(model, 224)
        if model != "custom_cnn":
            pair = measure({**base, "kind": "steps", "model": model, "steps": repeats})
            baseline, ours = pair["baseline"], pair["covidtl"]
            print(f"| {model} | {size} | paper-scale (graph) | {len(ours['images_s'])} steps each after the traced one, on "
                  f"one network, s/epoch extrapolated | {med(baseline['images_s']):.1f} | {med(ours['images_s']):.1f} | "
                  f"{med(baseline['epoch_s']):.1f} | {med(ours['epoch_s']):.1f} | "
                  f"{med(ours['images_s']) / med(baseline['images_s']):.2f}x | {pair['rss_mib']:.0f} (one process) |",
                  flush=True)
            continue
        how = {"steps": 4} if quick else {"epochs": repeats}
        # The committed default is train.run_eagerly: auto (graphs above a few batches an epoch);
        # its row names the mode it settled on. Eager epochs take minutes: forced eager is timed
        # on a few steps.
        settings = [("paper-scale (graph)", False), ("committed default (auto)", "auto"), ("eager", True)]
        job = {**base, "kind": "train", "model": model, **how}
        baseline = measure({**job, "recipe": "baseline"})
        for name, eager in settings:
            ours = measure({**job, "recipe": "covidtl", "eager": eager,
                            **({"epochs": None, "steps": 4} if eager is True else {})})
            if eager == "auto":
                name = f"committed default (auto: {'eager' if ours['eager'] else 'graphs'})"
            what = ("whole epochs + validation" if ours.get("estimated") is None
                    else f"{len(ours['images_s'])} steps after the traced one, s/epoch extrapolated")
            if ours.get("estimated") != baseline.get("estimated"):
                what += " (baseline: " + ("steps" if baseline.get("estimated") else "whole epochs") + ")"
            print(f"| {model} | {size} | {name} | {what} | {med(baseline['images_s']):.1f} | "
                  f"{med(ours['images_s']):.1f} | {med(baseline['epoch_s']):.1f} | {med(ours['epoch_s']):.1f} | "
                  f"{med(ours['images_s']) / med(baseline['images_s']):.2f}x | "
                  f"{baseline['rss_mib']:.0f} / {ours['rss_mib']:.0f} |")
    print(f"\ncovidtl pipeline images/s by size (the ceiling it sets on any step): "
          f"{', '.join(f'{s} px {r:.0f}' for s, r in pipeline_rate.items())}")
    clock.lap("training")
    print(f"\nload average at end {', '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"the whole benchmark: {clock.total()}")


if __name__ == "__main__":
    main()
