"""Does this machine train the study's six models, and how fast? No TensorFlow needed.

Builds each registry model (covidtl.models.registry) at its native size with the paper's head
(Flatten -> Dense(1000) -> Dense(2), float32 output) and trains a few steps on in-memory images
with mixed precision, on whatever Keras 3 backend is installed (KERAS_BACKEND=jax|torch|tensorflow).
It prints the backend, the devices, whether TensorFlow was imported, and one row per model: the
first (compiling) step and the images/s of the steps after it (median of --repeats timings).

On JAX with several devices, the batch is split across them with Keras' own data parallelism
(keras.distribution.DataParallel): the multi-GPU path of a machine without TensorFlow.

    KERAS_BACKEND=jax python benchmarks/gpu_check.py            # native sizes, mixed_float16
    KERAS_BACKEND=jax python benchmarks/gpu_check.py --quick    # tiny sizes: a CPU smoke run
    # several (simulated) devices on a CPU:
    XLA_FLAGS=--xla_force_host_platform_device_count=2 KERAS_BACKEND=jax \
        python benchmarks/gpu_check.py --quick
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
# From a checkout without `pip install -e .` (which would bring TensorFlow): the registry is in src/.
sys.path.insert(1, str(ROOT / "src"))

import keras  # noqa: E402 - after the environment it reads
import numpy as np  # noqa: E402

from covidtl.config import load_config  # noqa: E402
from covidtl.models.registry import MODELS, build_model  # noqa: E402


def devices() -> list[str]:
    """The backend's devices, as it names them."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return [f"{d.platform}:{d.id} {getattr(d, 'device_kind', '')}".strip() for d in jax.devices()]
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
        return ["cpu"]
    if backend == "tensorflow":
        import tensorflow as tf

        return [d.name for d in tf.config.list_logical_devices() if d.device_type in ("GPU", "CPU")]
    return [backend]


def data_parallel(mode: str) -> int:
    """Split each batch across the backend's devices (JAX only); the number of devices used."""
    if keras.backend.backend() != "jax":
        return 1
    found = keras.distribution.list_devices()
    if mode == "off" or (mode == "auto" and len(found) < 2):
        return 1
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=found))
    return len(found)


def time_model(name: str, size: int, batch: int, steps: int, repeats: int, train_cfg) -> dict:
    """Build `name` at `size`, one compiling step, then `repeats` timings of `steps` steps."""
    spec = MODELS[name]
    # No keras.utils.set_random_seed: it would import TensorFlow to seed it; any weights will do.
    model = build_model(spec, "random", train_cfg, size)  # random: no ImageNet file needed
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="categorical_crossentropy")
    rng = np.random.default_rng(0)
    images = spec.preprocess_input(rng.uniform(0, 255, (batch, size, size, 3)).astype("float32"))
    labels = np.eye(2, dtype="float32")[rng.integers(0, 2, batch)]

    started = time.perf_counter()
    model.train_on_batch(images, labels)  # traces and compiles the step
    first = time.perf_counter() - started
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(steps):
            loss = model.train_on_batch(images, labels)  # returns host floats: the step has finished
        rates.append(batch * steps / (time.perf_counter() - started))
    return {"model": name, "size": size, "params": model.count_params(), "first_s": first,
            "images_s": statistics.median(rates), "loss": float(np.ravel(loss)[0]),
            "policy": model.dtype_policy.name}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="params.yaml's quick default sizes (train.image_size), 2 steps: a CPU smoke run")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated registry names")
    parser.add_argument("--batch", type=int, default=None, help="images per device and step (32; quick 4)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per repeat (10; quick 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="mixed_float16",
                        choices=["mixed_float16", "mixed_bfloat16", "float32"])
    parser.add_argument("--data-parallel", default="auto", choices=["auto", "on", "off"],
                        help="JAX: split batches across devices (auto: when there are several)")
    args = parser.parse_args(argv)

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        print(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(MODELS)}", file=sys.stderr)
        return 2
    train_cfg = load_config(ROOT / "params.yaml").train  # the paper's head: head_units, dropout
    per_device = args.batch or (4 if args.quick else 32)
    steps = args.steps or (2 if args.quick else 10)

    keras.mixed_precision.set_global_policy(args.precision)
    replicas = data_parallel(args.data_parallel)
    batch = per_device * replicas
    print(f"backend: {keras.backend.backend()} (Keras {keras.__version__}), python {platform.python_version()}")
    print(f"devices: {', '.join(devices())}")
    print(f"data parallel: {'keras.distribution.DataParallel over ' + str(replicas) + ' devices' if replicas > 1 else 'off'}"
          f"; batch {batch} ({per_device} per device); precision {args.precision}")
    print(f"{'model':<12} {'size':>5} {'params':>11} {'policy':>15} {'first step s':>13} {'images/s':>9} {'loss':>8}")
    for name in names:
        size = int(train_cfg.image_size[name]) if args.quick else MODELS[name].input_size
        row = time_model(name, size, batch, steps, args.repeats, train_cfg)
        print(f"{row['model']:<12} {row['size']:>5} {row['params']:>11,} {row['policy']:>15} "
              f"{row['first_s']:>13.1f} {row['images_s']:>9.1f} {row['loss']:>8.4f}", flush=True)
    print(f"tensorflow imported: {'yes' if 'tensorflow' in sys.modules else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
