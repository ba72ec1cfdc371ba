"""Where training runs and in what precision: one device, every GPU of a machine, or several machines.

`setup(train_cfg)` resolves params.yaml's `train.precision`, `train.strategy` and `train.lr_scaling`
against what this process sees (its GPUs, `TF_CONFIG`) into a `Distribution`: the tf.distribute
strategy, the Keras dtype policy, the global batch and the learning rate that then run. A run's plan
(`covidtl.train.plan_run`) asks it for its rate, eager mode and record; `train()` builds the model
with `Distribution.build` and batches its data with `Distribution.data_config`.

`train.batch_size` is the batch of one replica (one GPU, or the CPU); a step reads
`batch_size x replicas` images. BatchNorm statistics are synchronised across replicas, so a step on
N replicas computes what one device computes on the same global batch (tests/test_distribute.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import keras
import mlflow
import tensorflow as tf
from keras.src.backend.tensorflow import trainer

from covidtl.config import Config, TrainConfig
from covidtl.errors import UserError

# train.run_eagerly auto: eager up to this many training batches an epoch, graphs above. Eager skips
# tracing the train and test steps but pays per op on every step; here DenseNet121's trace took
# ~75 s against ~3.7 s more per eager step, so eager wins below ~20 steps in all: about 8 batches an
# epoch over the quick defaults' 2-3 epochs. The demo's splits are 3 batches (96 images of 32), the
# real CT set's 44 (the custom CNN, 3 epochs: 43 s eager, 18 s in graphs).
EAGER_MAX_BATCHES = 8


def eager_for(setting: bool | str, batches: int) -> bool:
    """Whether a loop of `batches` steps an epoch runs eagerly: train.run_eagerly true or false as
    given, auto only up to EAGER_MAX_BATCHES."""
    return batches <= EAGER_MAX_BATCHES if setting == "auto" else bool(setting)


def visible_gpus() -> int:
    return len(tf.config.list_physical_devices("GPU"))


def resolve_precision(setting: str, gpus: int) -> str:
    """auto: float16 compute on a GPU (its tensor cores), float32 on a CPU.

    On this project's 2-core CPU mixed_bfloat16 gave no clear gain (docs/performance.md): auto keeps float32
    there; `mixed_bfloat16` remains a choice for CPUs with AMX and for TPUs.
    """
    if setting == "auto":
        return "mixed_float16" if gpus else "float32"
    return setting


def tf_config_workers(env: dict[str, str] | None = None) -> int:
    """How many workers TF_CONFIG names (0 when it is unset); one line if it is not valid JSON."""
    text = (os.environ if env is None else env).get("TF_CONFIG", "")
    if not text.strip():
        return 0
    try:
        cluster = json.loads(text).get("cluster", {})
    except (json.JSONDecodeError, AttributeError):
        raise UserError(
            "TF_CONFIG: not a JSON object; give e.g. "
            '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}'
        ) from None
    return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


def resolve_strategy(setting: str, gpus: int, workers: int) -> str:
    """auto: multiworker when TF_CONFIG names workers, mirrored over more than one GPU, else default."""
    if setting != "auto":
        return setting
    if workers:
        return "multiworker"
    return "mirrored" if gpus > 1 else "default"


def make_strategy(kind: str) -> tf.distribute.Strategy:
    if kind == "mirrored":
        # Every visible GPU; with none, the logical CPUs (the tests' two CPU replicas), else the CPU.
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    if kind == "multiworker":
        if not tf_config_workers():
            raise UserError(
                "train.strategy=multiworker: TF_CONFIG is not set; set it on every machine "
                "(docs/gpus.md, \"Several machines\") or use train.strategy=auto"
            )
        return multiworker_strategy()
    return tf.distribute.get_strategy()


@functools.cache
def multiworker_strategy() -> tf.distribute.Strategy:
    # TensorFlow configures collectives once per process: a study or tune run reuses this one.
    reduce_scalar_logs_across_workers()
    return tf.distribute.MultiWorkerMirroredStrategy()


def reduce_scalar_logs_across_workers() -> None:
    """Work around Keras 3's fit on several workers (seen with Keras 3.15, TensorFlow 2.21).

    Each step's logs (loss, accuracy: scalars) are averaged across workers with
    `strategy.reduce("MEAN", value, axis=0)`, which fails on a scalar ("Invalid reduction
    dimension 0 for input with 0 dimensions"). Scalars are reduced with axis=None instead.
    """
    keras_reduce = trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean") or not trainer._collective_all_reduce_multi_worker(strategy):
            return keras_reduce(values, strategy, reduction)

        def mean(value):
            rank = strategy.experimental_local_results(value)[0].shape.rank
            return strategy.reduce("MEAN", value, axis=0 if rank else None)

        return keras.tree.map_structure(mean, values)

    trainer.reduce_per_replica = reduce_per_replica


def scaled_rate(rate: float, replicas: int, rule: str) -> float:
    """The learning rate for `replicas` times the batch: unchanged (none), x replicas (linear,
    Goyal et al. 2017) or x sqrt(replicas) (sqrt, the usual rule for Adam)."""
    if rule == "linear":
        return rate * replicas
    if rule == "sqrt":
        return rate * math.sqrt(replicas)
    return rate


@dataclass
class Distribution:
    """The strategy and precision of one run, and what follows from them."""

    strategy: tf.distribute.Strategy
    kind: str  # default | mirrored | multiworker
    precision: str  # float32 | mixed_float16 | mixed_bfloat16
    lr_scaling: str

    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)

    @property
    def is_chief(self) -> bool:
        """Whether this process writes the run's files (every worker but the chief trains only)."""
        resolver = getattr(self.strategy, "cluster_resolver", None)
        if self.kind != "multiworker" or resolver is None:
            return True
        task_type, task_id = resolver.task_type, resolver.task_id
        return task_type == "chief" or (task_type == "worker" and task_id == 0
                                        and "chief" not in resolver.cluster_spec().as_dict())

    def global_batch(self, per_replica: int) -> int:
        return per_replica * self.replicas

    def learning_rate(self, rate: float) -> float:
        return scaled_rate(rate, self.replicas, self.lr_scaling)

    def run_eagerly(self, setting: bool | str, batches: int) -> bool:
        """`eager_for`, except on several workers: Keras' eager step cannot take their
        per-replica batches (it fails converting a PerReplica value), so they run graphs."""
        return eager_for(setting, batches) and self.kind != "multiworker"

    def data_config(self, cfg: Config) -> Config:
        """`cfg` with train.batch_size the global batch: what one step reads, split across replicas."""
        train = dataclasses.replace(cfg.train, batch_size=self.global_batch(cfg.train.batch_size))
        return dataclasses.replace(cfg, train=train)

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Layers made here compute in the run's precision; variables are mirrored across replicas."""
        previous = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy(self.precision)
        try:
            with self.strategy.scope():
                yield
        finally:
            keras.mixed_precision.set_global_policy(previous)

    def build(self, make_model: Callable[[], keras.Model]) -> keras.Model:
        """`make_model()` inside `scope()`; BatchNorm statistics over the global batch."""
        with self.scope():
            model = make_model()
        if self.replicas > 1:
            synchronise_batchnorm(model)
        if self.kind == "multiworker":
            reduce_build_batch_per_tensor(model)
        return model

    def record(self) -> dict[str, Any]:
        """What ran, for MLflow params and the model card."""
        return {"precision": self.precision, "strategy": self.kind, "replicas": self.replicas,
                "lr_scaling": self.lr_scaling}


def synchronise_batchnorm(model: keras.Model) -> None:
    """Batch statistics over all replicas' images: the same as one device on the global batch.

    Per-replica statistics (Keras' default) would make results depend on the replica count; the
    cost is one small all-reduce per BatchNorm layer and step. Outside a replica (the precise-BatchNorm
    re-estimation calls the model directly) Keras falls back to the local batch.
    """
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            synchronise_batchnorm(layer)
        elif isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True


def worker_scratch() -> Path:
    """A throw-away cell folder and MLflow store for a worker that is not the chief.

    Every worker runs the same `covidtl train`; only the chief's files and MLflow run are the
    record (a second run per worker in a shared tracking server would count the cell twice).
    """
    scratch = Path(tempfile.mkdtemp(prefix="covidtl-worker-"))
    mlflow.set_tracking_uri(f"sqlite:///{scratch / 'mlflow.db'}")
    return scratch / "cell"


def reduce_build_batch_per_tensor(model: keras.Model) -> None:
    """Work around Keras 3's fit on several workers (seen with Keras 3.15, TensorFlow 2.21).

    Before its first step, fit builds the metrics from one batch reduced across replicas with a
    single `strategy.reduce` of the whole (x, y) tuple; MultiWorkerMirroredStrategy reduces one
    distributed value per call and fails converting the tuple ("Attempt to convert a value
    (PerReplica..."). This reduces each tensor on its own, then lets Keras build as before.
    """
    strategy = model.distribute_strategy
    build = model._maybe_symbolic_build

    def reduce_one(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.reduce("MEAN", value, axis=None)
        return value

    def per_tensor(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = tuple(reduce_one(v) for v in next(batches))
                break
        return build(data_batch=data_batch)

    model._maybe_symbolic_build = per_tensor


def setup(train_cfg: TrainConfig) -> Distribution:
    """The run's Distribution from params and from what this process sees."""
    gpus = visible_gpus()
    kind = resolve_strategy(train_cfg.strategy, gpus, tf_config_workers())
    return Distribution(
        strategy=make_strategy(kind),
        kind=kind,
        precision=resolve_precision(train_cfg.precision, gpus),
        lr_scaling=train_cfg.lr_scaling,
    )
