"""One training step of the custom CNN as `covidtl train` takes it, on a fixed batch; weights to .npz.

Run by tests/test_distribute.py in its own process, because TensorFlow's devices and collectives
are fixed when it starts:  python distribute_step.py OUT.npz --strategy S --per-replica N
[--cpus 2] [--init WEIGHTS.npz]. The global batch is N x replicas images (the same images for
every strategy: the first N x replicas of a seeded set).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
IMAGES = 16
SIZE = 200  # the custom CNN's smallest working input
LR = 0.1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--per-replica", type=int, required=True)
    parser.add_argument("--cpus", type=int, default=1, help="logical CPU devices (replicas of mirrored)")
    parser.add_argument("--init", help="start from these weights (.npz) instead of the seeded ones")
    parser.add_argument("--graph", action="store_true", help="train.run_eagerly=false (paper scale)")
    parser.add_argument("--hold", action="store_true",
                        help="exit only after a line on stdin: the chief, which must outlive the workers")
    args = parser.parse_args()

    import tensorflow as tf

    if args.cpus > 1:  # before TensorFlow initialises its devices
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(args.cpus)])

    import keras
    import numpy as np

    from covidtl import distribute, train
    from covidtl.config import load_config
    from covidtl.models.registry import build_model, get_spec

    cfg = load_config(ROOT / "params.yaml", {
        "train.strategy": args.strategy, "train.precision": "float32",
        "train.batch_size": args.per_replica, "train.run_eagerly": not args.graph,
    })
    dist = distribute.setup(cfg.train)
    data_cfg = dist.data_config(cfg)
    keras.utils.set_random_seed(cfg.train.seed)
    net = dist.build(lambda: build_model(get_spec("custom_cnn"), "random", data_cfg.train, SIZE))
    if args.init:
        stored = np.load(args.init)
        net.set_weights([stored[f"w{i}"] for i in range(len(stored.files))])
    initial = net.get_weights()
    # Plain SGD: the weights then show the averaged gradient itself (Adam's first step is about
    # lr x sign(gradient), which float noise flips where a gradient is near zero).
    train.compile_model(net, lambda: keras.optimizers.SGD(LR), dist.run_eagerly(cfg.train.run_eagerly, batches=1))

    rng = np.random.default_rng(0)
    # Centred like a backbone's preprocess_input. Keras' synchronised BatchNorm computes the variance
    # as E[x^2] - E[x]^2: on [0, 1] noise, whose features' mean dwarfs their spread, the order of the
    # cross-replica sums alone moved the step by 1-2%; centred inputs match to 1e-5.
    images = rng.normal(0, 1, (IMAGES, SIZE, SIZE, 3)).astype("float32")
    labels = np.eye(2, dtype="float32")[rng.integers(0, 2, IMAGES)]
    batch = data_cfg.train.batch_size
    ds = tf.data.Dataset.from_tensor_slices((images[:batch], labels[:batch])).batch(batch)
    loss = net.fit(ds, epochs=1, verbose=0, shuffle=False).history["loss"][0]

    np.savez(args.out, **{f"w{i}": w for i, w in enumerate(net.get_weights())})
    np.savez(Path(args.out).with_suffix(".init.npz"), **{f"w{i}": w for i, w in enumerate(initial)})
    print(f"strategy={dist.kind} replicas={dist.replicas} global_batch={batch} chief={dist.is_chief} "
          f"loss={loss!r}", flush=True)
    if args.hold:  # task 0 hosts TensorFlow's coordination service: the other workers need it to exit
        sys.stdin.readline()


if __name__ == "__main__":
    sys.exit(main())
