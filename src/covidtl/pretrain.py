"""Self-supervised pretraining (SimCLR): a backbone learnt from unlabelled training images.

Transfer learning without ImageNet: the registry model's body (the custom CNN up to its head,
or a keras.applications base) learns, from two augmented views of each image, to tell the views
of one image apart from the other images of its batch (NT-Xent loss). It reads the `train` rows
of each dataset's split table only, never their labels, and never a val, test or external image.

    <pretrain.out>/<model>.weights.h5   what `covidtl train --init FILE` (or finetune:FILE) loads:
                                        the custom CNN's whole classifier (body pretrained, head
                                        freshly initialised), or a backbone's base
    <pretrain.out>/<model>.json         the record: images read (by split table and file), epochs,
                                        loss per epoch, the weights file's sha256, the MLflow run
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import pandas as pd
import tensorflow as tf
from keras import layers

from covidtl import locks, paths, tracking
from covidtl.config import Config
from covidtl.data import cache, tables
from covidtl.data.pipeline import augment_batch, readable_rows
from covidtl.distribute import eager_for
from covidtl.errors import UserError
from covidtl.files import atomic_path, file_sha256
from covidtl.inits import PRETRAINED, Init
from covidtl.models import weights
from covidtl.models.registry import build_model, get_spec, preprocess_for, trainable_image_size
from covidtl.optim import steps_per_epoch

# The projection head SimCLR trains and then discards: Dense(PROJECTION_UNITS, relu) -> Dense(OUT).
PROJECTION_UNITS = 256
PROJECTION_OUT = 128
# The views' augmentation beyond the pipeline's geometric one (augment_batch): a random crop of at
# least this share of each side, resized back, and strong intensity jitter. Intensity is the
# only colour a CT or X-ray has, so it is what stops the encoder matching views by grey level.
MIN_CROP_SIDE = 0.6
BRIGHTNESS = 0.3  # offset in +/- this fraction of [0, 255]
CONTRAST = 0.4  # factor in [1 - c, 1 + c] about each image's mean
NOISE = 0.03  # Gaussian noise sd, fraction of [0, 255]

log = logging.getLogger(__name__)


def default_out(cfg: Config, model: str) -> Path:
    return Path(cfg.pretrain.out) / f"{model}.weights.h5"


def resolve_init(cfg: Config, model: str, init: Init | str) -> Init:
    """`pretrained` (`finetune:pretrained`) as the file `covidtl pretrain --model M` writes with
    these params, which must exist; any other init as given."""
    init = Init.of(init)
    if init.source != PRETRAINED:
        return init
    path = default_out(cfg, model)
    if not path.is_file():
        raise UserError(f"--init {init}: {path} does not exist; run `covidtl pretrain --model {model}` "
                        f"with the same -S options first (the study: `dvc repro pretrain_{cfg.profile}@{model}`)")
    return init.with_file(str(path))


def training_images(cfg: Config, datasets: list[str],
                    split_files: dict[str, Path] | None = None) -> pd.DataFrame:
    """The `train` rows of each dataset's split table (a cv fold's when `split_files` names it),
    with a `dataset` column; labels are dropped: pretraining never sees them."""
    frames = []
    for name in datasets:
        split_file = Path((split_files or {}).get(name) or paths.split_path(cfg, name))
        table = tables.read_split(cfg, name, split_file)
        rows = table[table["split"] == "train"][["path"] + (["sha256"] if "sha256" in table else [])]
        if rows.empty:
            raise UserError(f"{split_file}: no training rows to pretrain on; re-split {name}")
        frames.append(rows.assign(dataset=name, split_file=str(split_file)))
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------- the network


def encoder_parts(spec, cfg: Config, image_size: int):
    """(what the weights file holds, the body whose features are learnt): the custom CNN's whole
    classifier and its layers up to the head; a backbone's base, twice."""
    if spec.backbone is not None:
        base = spec.backbone(include_top=False, weights=None, input_shape=(image_size, image_size, 3))
        return base, base
    # The classifier `train --init FILE` builds, so the file's layers match it one for one.
    classifier = build_model(spec, "random", cfg.train, image_size)
    head = next(layer for layer in classifier.layers
                if isinstance(layer, (keras.layers.GlobalAveragePooling2D, keras.layers.Flatten)))
    return classifier, keras.Model(classifier.input, head.input, name="custom_cnn_body")


def simclr_network(body):
    """body -> global average pooling -> the projection head: the network NT-Xent trains."""
    x = layers.GlobalAveragePooling2D()(body.output)
    x = layers.Dense(PROJECTION_UNITS, activation="relu")(x)
    z = layers.Dense(PROJECTION_OUT, dtype="float32")(x)
    return keras.Model(body.input, z, name="simclr")


def nt_xent(z, temperature: float):
    """SimCLR's loss: rows i and i + n of z are two views of one image; every other row of the
    2n is a negative. Cross-entropy of cosine similarities / temperature."""
    z = tf.math.l2_normalize(tf.cast(z, tf.float32), axis=1)
    n2 = tf.shape(z)[0]
    n = n2 // 2
    logits = tf.matmul(z, z, transpose_b=True) / temperature
    logits = logits - 1e9 * tf.eye(n2)  # an image's view is not its own positive
    positives = tf.concat([tf.range(n, n2), tf.range(0, n)], axis=0)
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(positives, logits))


# --------------------------------------------------------------------------- the views


def view(images, cfg: Config, seed):
    """One SimCLR view of a uint8 batch: the pipeline's rotation/zoom/flip, a random crop resized
    back, brightness, contrast and noise; float32 in [0, 255]."""
    seeds = tf.random.experimental.stateless_split(seed, 6)
    x = tf.cast(augment_batch(images, cfg.augment, seeds[0]), tf.float32)
    n, size = tf.shape(x)[0], x.shape[1]

    def uniform(i, shape, low, high):
        return tf.random.stateless_uniform(shape, seeds[i], low, high)

    side = uniform(1, (n, 1), MIN_CROP_SIDE, 1.0)
    corner = uniform(2, (n, 2), 0.0, 1.0) * (1.0 - side)
    boxes = tf.concat([corner, corner + side], axis=1)  # y1, x1, y2, x2 in [0, 1]
    x = tf.image.crop_and_resize(x, boxes, tf.range(n), (size, size))
    factor = uniform(3, (n, 1, 1, 1), 1.0 - CONTRAST, 1.0 + CONTRAST)
    offset = uniform(5, (n, 1, 1, 1), -BRIGHTNESS, BRIGHTNESS) * 255.0
    mean = tf.reduce_mean(x, axis=(1, 2, 3), keepdims=True)
    x = (x - mean) * factor + mean + offset
    x = x + tf.random.stateless_normal(tf.shape(x), seeds[4], stddev=NOISE * 255.0)
    return tf.clip_by_value(x, 0.0, 255.0)


def view_pairs(images: np.ndarray, spec, cfg: Config):
    """Shuffled batches of (view 1, view 2), each preprocessed as training preprocesses its input."""
    batch = min(cfg.pretrain.batch_size, len(images))
    if batch < 2:
        raise UserError("pretrain: fewer than 2 readable training images; add images or datasets")
    preprocess = preprocess_for(spec, cfg.train.preprocessing)
    size = images.shape[1]

    def gather(index):
        x = tf.numpy_function(lambda i: images[np.sort(i)], [index], tf.uint8, stateful=False)
        x.set_shape((None, size, size, 3))
        return x

    def two_views(x, s):
        seed = tf.stack([s, tf.constant(1, tf.int64)])
        pair = tf.random.experimental.stateless_split(seed, 2)
        return preprocess(view(x, cfg, pair[0])), preprocess(view(x, cfg, pair[1]))

    ds = tf.data.Dataset.range(len(images)).shuffle(
        len(images), seed=cfg.pretrain.seed, reshuffle_each_iteration=True)
    # Whole batches only: NT-Xent's negatives are the rest of the batch.
    ds = ds.batch(batch, drop_remainder=True).map(gather, num_parallel_calls=tf.data.AUTOTUNE)
    seeds = tf.data.Dataset.random(seed=cfg.pretrain.seed, rerandomize_each_iteration=True)
    ds = tf.data.Dataset.zip(ds, seeds).map(two_views, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------- the run


@dataclass
class PretrainResult:
    weights_file: Path
    record_file: Path
    losses: list[float]
    run_id: str
    images: int


def pretrain(
    cfg: Config, model: str, *, out: str | Path | None = None,
    split_files: dict[str, Path] | None = None, nested: bool = False,
) -> PretrainResult:
    """SimCLR on the training splits of `cfg.pretrain.datasets`; one MLflow run (kind=pretrain)."""
    pc = cfg.pretrain
    spec = get_spec(model)
    cfg = cfg.with_recipe(model)
    size = trainable_image_size(spec, cfg.train)
    out = Path(out) if out is not None else default_out(cfg, model)
    if not out.name.endswith(".weights.h5"):
        raise UserError(f"--out {out}: Keras writes weights only to a name ending in .weights.h5")
    with locks.hold(out, "covidtl pretrain"):  # one writer of the weights file and its record
        if not pc.datasets:
            raise UserError("pretrain.datasets: empty; name at least one dataset, e.g. [ct, xray]")
        for name in pc.datasets:  # checked here, not at load: a project without one of them still runs
            cfg.dataset(name)     # everything else; an unknown name is the one line listing the known ones
        rows = readable_rows(training_images(cfg, pc.datasets, split_files)).reset_index(drop=True)
        # The same decoded uint8 images training reads (one cache per dataset's training rows).
        parts, kept_rows = [], []
        for name, group in rows.groupby("dataset", sort=False):
            cached = cache.cached_images(group.reset_index(drop=True), size, cfg)
            parts.append(np.asarray(cached.images))
            kept_rows.append(group.reset_index(drop=True)[cached.kept])
        images = np.concatenate(parts)
        used = pd.concat(kept_rows, ignore_index=True)
        log.info(f"pretrain {model}: {len(images)} training images of {', '.join(pc.datasets)} at {size} px, "
                 f"{pc.epochs} epochs")

        keras.utils.set_random_seed(pc.seed)
        saved, body = encoder_parts(spec, cfg, size)
        net = simclr_network(body)
        optimizer = keras.optimizers.Adam(pc.learning_rate)
        variables = net.trainable_variables
        optimizer.build(variables)

        def step(v1, v2):
            with tf.GradientTape() as tape:
                loss = nt_xent(net(tf.concat([v1, v2], axis=0), training=True), pc.temperature)
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
            return loss

        eager = eager_for(cfg.train.run_eagerly, steps_per_epoch(len(images), pc.batch_size))
        step = step if eager else tf.function(step)
        ds = view_pairs(images, spec, cfg)

        if not nested:  # a cv fold's pretraining stays in its parent run's experiment
            tracking.use_experiment("pretrain")
        with mlflow.start_run(run_name=f"pretrain {model}", nested=nested) as run:
            mlflow.set_tags({"kind": "pretrain", "model": model, "datasets": ",".join(pc.datasets),
                             "git_commit": tracking.git_commit(), **tracking.experiment_tags()})
            tracking.log_config(cfg)
            mlflow.log_params({"pretrain_model": model, "pretrain_images": len(images), "image_size": size,
                               "run_eagerly_used": eager})
            losses: list[float] = []
            start = time.monotonic()
            for epoch in range(1, pc.epochs + 1):
                total, steps = 0.0, 0
                for v1, v2 in ds:
                    total += float(step(v1, v2))
                    steps += 1
                losses.append(total / max(steps, 1))
                if not math.isfinite(losses[-1]):
                    raise UserError(f"pretrain: the loss became {losses[-1]} at epoch {epoch}; lower "
                                    "pretrain.learning_rate or raise pretrain.temperature")
                mlflow.log_metric("pretrain_loss", losses[-1], step=epoch)
                log.info(f"pretrain epoch {epoch}/{pc.epochs}: loss {losses[-1]:.4f} ({time.monotonic() - start:.0f} s)")
            weights_file = _save_weights(saved, out)
            record = _record(cfg, model, size, used, losses, weights_file, run.info.run_id,
                             time.monotonic() - start)
            record_file = weights.write_pretrain_record(out, record)
            mlflow.log_metric("pretrain_seconds", record["seconds"])
            mlflow.log_artifact(str(weights_file))
            mlflow.log_artifact(str(record_file))
        return PretrainResult(weights_file, record_file, losses, run.info.run_id, len(images))


def _save_weights(model, out: Path) -> Path:
    """The weights file, whole or not at all."""
    with atomic_path(out) as tmp:
        model.save_weights(str(tmp))
    return out


def settings(cfg: Config, model: str, size: int) -> dict[str, Any]:
    """What a weights file is made with besides its images: recorded, and compared before reuse.
    The views' augmentation and the custom CNN's input layers and dropout shape what it learns."""
    return {
        "model": model, "method": "simclr", "image_size": size, "head": cfg.train.head,
        "epochs": cfg.pretrain.epochs, "batch_size": cfg.pretrain.batch_size,
        "temperature": cfg.pretrain.temperature, "learning_rate": cfg.pretrain.learning_rate,
        "seed": cfg.pretrain.seed, "preprocessing": cfg.train.preprocessing,
        "crop": cfg.train.crop, "normalize": cfg.train.normalize, "dropout": cfg.train.dropout,
        "augment": asdict(cfg.augment),
    }


def reuse_problem(cfg: Config, model: str, weights_file: str | Path,
                  split_files: dict[str, Path] | None = None) -> str | None:
    """Why `weights_file` is not the file `pretrain` would make now from these params and split
    tables (its record says otherwise, or it is missing); None when it is, and can be reused."""
    weights_file = Path(weights_file)
    try:
        record = weights.read_pretrain_record(weights_file) if weights_file.is_file() else None
    except UserError:
        record = None
    record_name = weights.pretrain_record_path(weights_file).name
    if record is None:
        return f"{weights_file}: missing, or without its record {record_name}"
    if record.get("weights_sha256") != file_sha256(weights_file):
        return f"{weights_file}: not the file its record describes"
    now = settings(cfg, model, trainable_image_size(get_spec(model), cfg.train))
    for key, value in now.items():
        if record.get(key) != value:
            return f"{record_name}: {key} was {record.get(key)}, now {value}"
    made_from = record.get("datasets", {})
    if sorted(made_from) != sorted(cfg.pretrain.datasets):
        return f"{record_name}: made from {sorted(made_from)}, now {sorted(cfg.pretrain.datasets)}"
    for name in cfg.pretrain.datasets:
        split_file = Path((split_files or {}).get(name) or paths.split_path(cfg, name))
        if made_from[name].get("split_sha256") != file_sha256(split_file):
            return f"{name}'s split table {split_file} is not the one it was made from"
    return None


def _record(cfg: Config, model: str, size: int, used: pd.DataFrame, losses: list[float],
            weights_file: Path, run_id: str, seconds: float) -> dict[str, Any]:
    """Which images (split table, sha256, files) and settings made the weights file."""
    datasets = {}
    for name, group in used.groupby("dataset", sort=False):
        split_file = Path(group["split_file"].iloc[0])
        root = tables.dataset_root(cfg, name)
        datasets[name] = {
            "split_file": str(split_file), "split_sha256": file_sha256(split_file),
            "split": "train", "images": int(len(group)),
            "files": sorted(paths.relative_to_root(p, root) for p in group["path"]),
        }
    return {
        **settings(cfg, model, size),
        "weights_file": weights_file.name, "weights_sha256": file_sha256(weights_file),
        "holds": "classifier (head untrained)" if model == "custom_cnn" else "base",
        "loss": losses, "final_loss": losses[-1] if losses else None, "seconds": round(seconds, 1),
        "images": int(len(used)), "datasets": datasets, "run_id": run_id,
        "git_commit": tracking.git_commit(),
    }


def check_not_leaking(init_path: str | Path, dataset: str) -> None:
    """Cross-validation: refuse a pretrained file that learnt from `dataset`'s split table, whose
    training rows hold other folds' test patients (pretrain inside each fold: `cv --pretrain`)."""
    record = weights.read_pretrain_record(init_path)
    if record and dataset in record.get("datasets", {}):
        raise UserError(
            f"{init_path}: pretrained on {record['datasets'][dataset]['split_file']}, whose training "
            f"rows include patients the folds of {dataset} test; pass --pretrain to pretrain inside "
            f"each fold, or a file pretrained without {dataset} (-S 'pretrain.datasets=[...]')")
