"""Frozen bases on stored features: the same answer as the whole network, every key field, damage."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from covidtl.data.pipeline import make_dataset, readable_rows
from covidtl.features import CLEAN, FeatureCache, View, decode_entry
from covidtl.frozen import BASE, FrozenTraining, cache_cut
from covidtl.models.registry import base_of, build_model, get_spec
from covidtl.train import plan_run
from helpers_train import make_workdir

SIZE = 64


def pre_softmax(model: keras.Model) -> keras.Model:
    """`model` with its softmax output layer made linear: the logits."""
    config = model.get_config()
    for layer in config["layers"]:
        if layer["config"].get("name") == "probabilities":
            layer["config"]["activation"] = "linear"
    logits = keras.Model.from_config(config)
    logits.set_weights(model.get_weights())
    return logits


def donor_file(tmp: Path, seed: int = 0, size: int = SIZE) -> Path:
    """A VGG16 base's weights saved by the test (a stand-in for ImageNet's): frozen as `--init FILE`."""
    keras.utils.set_random_seed(seed)
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(size, size, 3))
    path = tmp / f"vgg16-donor-{seed}.weights.h5"
    base.save_weights(path)
    return path


def frozen_run(tmp: Path, files=None, init: str | None = None, **overrides):
    """(plan, net, FrozenTraining) of a frozen VGG16 on a tiny workdir, features under tmp/cache."""
    cfg, _ = make_workdir(tmp, files=files, **{"train.image_size.vgg16": SIZE, **overrides})
    plan = plan_run(cfg, "vgg16", init or str(donor_file(tmp)), "tiny")
    net = build_model(plan.spec, plan.build_init, cfg.train, plan.image_size)
    return plan, net, FrozenTraining(plan, net, cache_cut(plan), FeatureCache(tmp / "cache"))


@pytest.fixture
def real_ct_files(shared_data):
    """Six real CT slices (three per class): the equivalence is checked on real scans."""
    root = shared_data / "sarscov2-ct"
    return [root / "COVID" / f"Covid ({i}).png" for i in (1, 40, 400)] + \
        [root / "non-COVID" / f"Non-Covid ({i}).png" for i in (1, 50, 500)]


@pytest.mark.parametrize("unfreeze", ["none", "top_block"])
def test_the_top_on_stored_features_is_the_network_on_the_images(real_ct_files, tmp_path, unfreeze):
    plan, net, frozen = frozen_run(tmp_path, files=real_ct_files, **{"train.unfreeze_after": unfreeze})
    assert frozen.parts.cut == (BASE if unfreeze == "none" else "block4_pool")
    rows = readable_rows(plan.table)
    frozen.features(rows)  # computed and written to disk
    # A fresh cache object reads the entries back from their files.
    reread = FrozenTraining(plan, net, frozen.parts.cut, FeatureCache(tmp_path / "cache"))
    stored = reread.features(rows)
    assert reread.cache.counts.read == len(rows) and reread.cache.counts.computed == 0
    images = np.concatenate([np.asarray(x) for x, _ in make_dataset(rows, plan.spec, plan.cfg, SIZE, training=False)])
    whole = np.asarray(pre_softmax(net)(images))
    top = np.asarray(pre_softmax(frozen.parts.top)(stored))
    assert whole.shape == (len(rows), 2)
    np.testing.assert_allclose(top, whole, atol=1e-4, rtol=0)


# Each setting that decides an image's features, changed once: a new view, features computed anew.
KEY_CHANGES = {
    "image_size": {"train.image_size.vgg16": 48},
    "preprocessing": {"train.preprocessing": "rescale"},
    "crop": {"train.crop": "body"},
    "normalize": {"train.normalize": "standardize"},
    "cut layer": {"train.unfreeze_after": "top_block"},
    "augment rotation": {"augment.rotation": 10},
    "augment zoom": {"augment.zoom": 0.1},
    "augment flip": {"augment.horizontal_flip": False},
    "augment intensity": {"augment.intensity.brightness": 0.1},
    "augment seed": {"augment.seed": 99},
}


def _copy_features(tmp: Path, copy: int, init: str | None = None, **overrides):
    plan, net, frozen = frozen_run(tmp, init=init, **overrides)
    rows = readable_rows(plan.train_rows)
    return frozen, frozen.features(rows, copy)


@pytest.mark.parametrize("field", KEY_CHANGES)
def test_every_setting_that_decides_the_features_is_in_the_key(tmp_path, field):
    base, _ = _copy_features(tmp_path, copy=1)
    again, _ = _copy_features(tmp_path, copy=1)
    assert again.view(1) == base.view(1) and again.cache.counts.computed == 0  # the same settings: read
    changed, _ = _copy_features(tmp_path, copy=1, **KEY_CHANGES[field])
    assert changed.view(1).digest() != base.view(1).digest()
    assert changed.cache.counts.computed > 0 and changed.cache.counts.read == 0


def test_the_weights_the_copy_index_the_model_and_the_image_are_in_the_key(tmp_path):
    first, features = _copy_features(tmp_path, copy=1)
    other_weights, _ = _copy_features(tmp_path, copy=1, init=str(donor_file(tmp_path, seed=1)))
    assert other_weights.view(1).weights_sha256 != first.view(1).weights_sha256
    assert other_weights.cache.counts.computed > 0
    second_copy, second = _copy_features(tmp_path, copy=2)
    assert second_copy.view(2).digest() != first.view(1).digest() and second_copy.cache.counts.computed > 0
    assert not np.allclose(second, features)  # another draw of the augmentation
    clean, _ = _copy_features(tmp_path, copy=CLEAN)
    assert clean.view(CLEAN).augment is None and clean.cache.counts.computed > 0
    # Another model with the same settings is another view.
    assert dataclasses.replace(first.view(1), model="resnet50").digest() != first.view(1).digest()
    # An image whose bytes changed is another entry (keyed by its sha256), under the same name.
    plan, _, frozen = frozen_run(tmp_path)
    rows = readable_rows(plan.train_rows).head(1)
    before = frozen.features(rows)  # read: the clean copy above computed it
    computed = frozen.cache.counts.computed
    path = Path(rows["path"].iloc[0])
    Image.fromarray(np.full((48, 48), 200, np.uint8)).save(path)
    after = frozen.features(rows.assign(sha256=hashlib.sha256(path.read_bytes()).hexdigest()))
    assert frozen.cache.counts.computed == computed + 1 and not np.allclose(before, after)


def test_an_augmented_copy_is_the_same_whichever_rows_it_is_computed_with(tmp_path):
    plan, net, frozen = frozen_run(tmp_path)
    rows = readable_rows(plan.train_rows)
    together = frozen.features(rows, 1)
    alone = FrozenTraining(plan, net, frozen.parts.cut, FeatureCache(tmp_path / "other"))
    np.testing.assert_allclose(alone.features(rows.iloc[::-1].head(3), 1), together[::-1][:3], atol=1e-6)


@pytest.mark.parametrize("damage", ["truncate", "flip a byte"])
def test_a_damaged_entry_is_reported_recomputed_and_never_read(tmp_path, caplog, damage):
    plan, net, frozen = frozen_run(tmp_path)
    rows = readable_rows(plan.train_rows).head(4)
    good = frozen.features(rows)
    entry = frozen.cache.entry_path(frozen.view(CLEAN), rows["sha256"].iloc[0])
    data = bytearray(entry.read_bytes())
    if damage == "truncate":
        entry.write_bytes(bytes(data[: len(data) - 7]))
    else:
        data[-3] ^= 0x10  # one bit of the payload
        entry.write_bytes(bytes(data))
    again = FrozenTraining(plan, net, frozen.parts.cut, FeatureCache(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="covidtl.features"):
        np.testing.assert_array_equal(again.features(rows), good)
    assert again.cache.counts.damaged == 1 and again.cache.counts.computed == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "covidtl.features"]
    assert len(lines) == 1 and str(entry) in lines[0]
    assert ("truncated" if damage == "truncate" else "checksum") in lines[0]
    np.testing.assert_array_equal(decode_entry(entry.read_bytes()), good[0])  # rewritten whole


def test_a_cut_needs_a_frozen_base(tmp_path):
    cfg, _ = make_workdir(tmp_path)
    assert cache_cut(plan_run(cfg, "vgg16", "random", "tiny")) is None
    assert cache_cut(plan_run(cfg, "custom_cnn", "random", "tiny")) is None
    donor = str(donor_file(tmp_path, size=32))
    assert cache_cut(plan_run(cfg, "vgg16", "finetune:" + donor, "tiny")) is None
    assert cache_cut(plan_run(cfg, "vgg16", donor, "tiny")) == BASE
    off = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, feature_cache="none"))
    assert cache_cut(plan_run(off, "vgg16", donor, "tiny")) is None


def test_only_the_layers_after_the_cut_train(tmp_path):
    cfg, _ = make_workdir(tmp_path, **{"train.unfreeze_after": "top_block"})
    net = build_model(get_spec("vgg16"), str(donor_file(tmp_path, size=32)), cfg.train, 32)
    trainable = [layer.name for layer in base_of(net).layers if layer.trainable and layer.weights]
    assert trainable == ["block5_conv1", "block5_conv2", "block5_conv3"]


def test_view_digests_every_field():
    view = View(model="vgg16", cut=BASE, weights_sha256="a" * 64, image_size=224, preprocessing="model",
                crop="none", normalize="none", decode="rules")
    seen = {view.digest()}
    for name, value in (("model", "resnet50"), ("cut", "block4_pool"), ("weights_sha256", "b" * 64),
                        ("image_size", 200), ("preprocessing", "rescale"), ("crop", "body"),
                        ("normalize", "equalize"), ("decode", "other rules")):
        seen.add(dataclasses.replace(view, **{name: value}).digest())
    copy = dataclasses.replace(view, copy=1, augment={"rotation": 25.0, "seed": 1})
    seen |= {copy.digest(), dataclasses.replace(copy, copy=2).digest(),
             dataclasses.replace(copy, augment={"rotation": 25.0, "seed": 2}).digest()}
    assert len(seen) == 12
    with pytest.raises(ValueError):
        dataclasses.replace(view, copy=1)  # an augmented copy without its augmentation settings


def test_feature_views_share_the_decode_caches_budget(tmp_path):
    """An older view is pruned when a run's new entries pass cache.max_gb; the run's own views stay."""
    root = tmp_path / "data" / "cache" / "features"  # where a run's config puts them
    plan, net, old = frozen_run(tmp_path)
    old.cache = FeatureCache(root)
    old.features(readable_rows(plan.train_rows), 1)
    old_unit = old.cache.unit(old.view(1))
    os.utime(old_unit / "view.json", (1, 1))  # used long ago
    one_view = sum(f.stat().st_size for f in old_unit.iterdir())
    plan, net, new = frozen_run(tmp_path, **{"cache.max_gb": 1.5 * one_view / 1e9, "augment.seed": 7})
    new.cache = FeatureCache(root)
    new.features(readable_rows(plan.train_rows), 1)  # room for one view, not two
    assert not old_unit.exists()
    assert (new.cache.unit(new.view(1)) / "view.json").is_file()
