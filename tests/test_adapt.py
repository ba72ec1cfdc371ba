"""`covidtl adapt`: each method's effect on a tiny network, its refusals, and the command end to end
on the synthetic second site (a custom CNN saved untrained: adaptation needs no trained weights)."""

from __future__ import annotations

import dataclasses
import json

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy.stats import rankdata

from covidtl.adapt import network, tuning
from covidtl.adapt.features import BodyFeatures, model_p_covid
from covidtl.adapt.methods import METHODS, adapted_by
from covidtl.adapt.settings import AdaptSettings
from covidtl.adapt.site import Labelled, SiteData, SourceSplit
from covidtl.adapt.unlabelled import channel_statistics
from covidtl.cli import main
from covidtl.data import synth
from covidtl.models.registry import build_model, get_spec
from covidtl.paths import POSITIVE_INDEX
from conftest import PARAMS, config
from helpers_train import write_images

# One effect test per registry entry: adding a method without its test fails here.
EFFECT_TESTS = ["adabn", "standardize", "tent", "recalibrate", "head", "head_bn", "probe_refit"]
SETTINGS = AdaptSettings(batch_size=8, learning_rate=1e-2, epochs=3, tent_steps=5, tent_learning_rate=1e-2,
                         operating_point="youden", c_grid=(0.1, 1.0), folds=2)
SIDE = 16


def test_every_method_has_an_effect_test():
    assert EFFECT_TESTS == list(METHODS)


def tiny_bn_net() -> keras.Model:
    keras.utils.set_random_seed(1)
    image = keras.Input((SIDE, SIDE, 3), name="image")
    x = keras.layers.Conv2D(4, 3, activation="relu")(image)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(8, activation="relu", name="hidden")(x)
    out = keras.layers.Dense(2, activation="softmax", name="probabilities", dtype="float32")(x)
    return keras.Model(image, out, name="custom_cnn")


def tiny_frozen_cell() -> keras.Model:
    """A frozen base inside (a nested model, as the registry's), pooled, Dense(2): a gap cell."""
    keras.utils.set_random_seed(2)
    inner = keras.Input((SIDE, SIDE, 3))
    base = keras.Model(inner, keras.layers.Conv2D(6, 3, activation="relu")(inner), name="base")
    base.trainable = False
    image = keras.Input((SIDE, SIDE, 3), name="image")
    x = keras.layers.GlobalAveragePooling2D()(base(image, training=False))
    out = keras.layers.Dense(2, activation="softmax", name="probabilities", dtype="float32")(x)
    return keras.Model(image, out, name="vgg16_imagenet")


def site(n: int = 24, labelled: int = 16, seed: int = 0) -> SiteData:
    rng = np.random.default_rng(seed)
    pool = rng.normal(0.7, 0.4, (n, SIDE, SIDE, 3)).astype("float32")  # shifted from the source's N(0, 1)
    x = rng.normal(0.5, 0.5, (labelled, SIDE, SIDE, 3)).astype("float32")
    y = np.arange(labelled) % 2
    x[y == 1, 4:12, 4:12, :] += 1.5  # COVID: a bright patch
    source_x = rng.normal(0, 1, (20, SIDE, SIDE, 3)).astype("float32")
    source_y = np.arange(20) % 2
    source_x[source_y == 1, 4:12, 4:12, :] += 1.5
    source = SourceSplit(lambda size: iter([(source_x[i:i + size], source_y[i:i + size]) for i in range(0, 20, size)]),
                         np.array([f"s{i // 2}" for i in range(20)]))
    return SiteData(pool, Labelled(x, y, np.array([f"g{i // 2}" for i in range(labelled)])), pd.DataFrame(), source)


def weights_by_layer(model: keras.Model) -> dict[str, list[np.ndarray]]:
    found = {}
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.update({f"{layer.name}/{k}": v for k, v in weights_by_layer(layer).items()})
        elif layer.weights:
            found[layer.name] = [np.array(w) for w in layer.weights]
    return found


def changed(before: keras.Model, after: keras.Model) -> set[str]:
    """Layers with any weight not bit-identical."""
    a, b = weights_by_layer(before), weights_by_layer(after)
    assert a.keys() == b.keys()
    return {name for name in a if any(not np.array_equal(x, y) for x, y in zip(a[name], b[name]))}


def applied(method: str, model: keras.Model, data: SiteData) -> keras.Model:
    before = weights_by_layer(model)
    adapted = METHODS[method].apply(model, data, SETTINGS, 0)
    after = weights_by_layer(model)
    assert all(all(np.array_equal(x, y) for x, y in zip(before[k], after[k])) for k in before)  # source untouched
    return adapted


def bn_names(model):
    return {bn.name for bn in network.batchnorm_layers(model)}


def test_adabn_sets_each_batchnorm_to_its_inputs_statistics_over_the_site_pool():
    model, data = tiny_bn_net(), site()
    adapted = applied("adabn", model, data)
    assert changed(model, adapted) == bn_names(model)
    for bn in network.batchnorm_layers(adapted):
        inputs = np.asarray(keras.Model(adapted.input, bn.input)(data.pool, training=False), np.float64)
        np.testing.assert_allclose(np.asarray(bn.moving_mean), inputs.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.asarray(bn.moving_variance), inputs.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    # The pool's order (the seed) does not matter: population statistics, not a running average.
    reordered = dataclasses.replace(data, pool=data.pool[::-1].copy())
    again = METHODS["adabn"].apply(model, reordered, SETTINGS, 5)
    for a, b in zip(network.batchnorm_layers(adapted), network.batchnorm_layers(again)):
        np.testing.assert_allclose(np.asarray(a.moving_mean), np.asarray(b.moving_mean), rtol=1e-5, atol=1e-7)


def test_standardize_gives_the_site_inputs_the_source_splits_channel_statistics():
    model, data = tiny_bn_net(), site()
    adapted = applied("standardize", model, data)
    affine = adapted.get_layer("site_standardize")
    mapped = np.asarray(affine(data.pool))
    source_mean, source_sd = channel_statistics(x for x, _ in data.source.batches(8))
    mean, sd = channel_statistics([mapped])
    np.testing.assert_allclose(mean, source_mean, atol=1e-4)
    np.testing.assert_allclose(sd, source_sd, rtol=1e-4)
    # The network after the map is the source's: identical weights, layer for layer.
    assert [np.array_equal(a, b) for a, b in zip(model.get_weights(), adapted.get_weights())] == \
        [True] * len(model.get_weights())


def test_tent_moves_only_batchnorm_layers_and_their_gamma_and_beta():
    model, data = tiny_bn_net(), site()
    adapted = applied("tent", model, data)
    assert changed(model, adapted) == bn_names(model)
    moved = [not np.array_equal(a.gamma, b.gamma) or not np.array_equal(a.beta, b.beta)
             for a, b in zip(network.batchnorm_layers(model), network.batchnorm_layers(adapted))]
    assert all(moved)


def test_recalibrate_keeps_every_ranking_and_changes_the_probabilities():
    model, data = tiny_bn_net(), site()
    adapted = applied("recalibrate", model, data)
    assert changed(model, adapted) == {"probabilities"}
    images = np.concatenate([data.pool, data.labelled.x])
    before = np.asarray(model(images))[:, POSITIVE_INDEX]
    after = np.asarray(adapted(images))[:, POSITIVE_INDEX]
    assert np.array_equal(rankdata(before), rankdata(after))
    assert not np.allclose(before, after, atol=1e-3)


def test_head_changes_the_head_and_nothing_else():
    model, data = tiny_bn_net(), site()
    adapted = applied("head", model, data)
    assert {layer.name for layer in network.head_layers(model)} == {"hidden", "probabilities"}
    assert changed(model, adapted) == {"hidden", "probabilities"}


def test_head_bn_changes_the_head_and_the_batchnorm_layers_only():
    model, data = tiny_bn_net(), site()
    adapted = applied("head_bn", model, data)
    assert changed(model, adapted) == {"hidden", "probabilities"} | bn_names(model)


def test_probe_refit_refits_a_frozen_cells_read_out_only():
    model, data = tiny_frozen_cell(), site()
    adapted = applied("probe_refit", model, data)
    assert changed(model, adapted) == {"probabilities"}


def with_features(data: SiteData, model: keras.Model) -> SiteData:
    return dataclasses.replace(data, features=BodyFeatures(model, SETTINGS.batch_size))


@pytest.mark.parametrize("method", ["head", "recalibrate", "probe_refit"])
def test_a_method_on_stored_base_features_gives_the_model_the_whole_network_gives(method):
    """The curve's memo of the source's base (covidtl.adapt.features) changes speed, not results."""
    model, data = tiny_frozen_cell(), site()
    whole = METHODS[method].apply(model, data, SETTINGS, 0)
    stored = with_features(data, model)
    memo = METHODS[method].apply(model, stored, SETTINGS, 0)
    assert stored.features.computed > 0  # the memo was read: this is not the whole network twice
    for a, b in zip(whole.get_weights(), memo.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    x = data.labelled.x
    np.testing.assert_allclose(model_p_covid(memo, x, 8, stored.features), model_p_covid(whole, x, 8), atol=1e-5)


def test_stored_features_are_computed_once_per_image_and_refused_for_a_changed_base():
    model, data = tiny_bn_net(), site()
    features = BodyFeatures(model, 8)
    first = features.of(data.pool)
    again = features.of(np.concatenate([data.pool[5:9], data.pool[:3]]))  # the same images, drawn again
    assert features.computed == len(data.pool)
    np.testing.assert_array_equal(again, np.concatenate([first[5:9], first[:3]]))
    assert features.fits(model) and features.fits(network.copy_of(model))
    adapted = applied("adabn", model, data)  # its BatchNorm statistics (weights before the head) moved
    assert not features.fits(adapted)
    np.testing.assert_allclose(model_p_covid(adapted, data.pool, 8, features), model_p_covid(adapted, data.pool, 8))


def test_head_tunes_its_rate_and_epochs_inside_the_labelled_groups_only():
    model, data = tiny_frozen_cell(), site(labelled=24)
    settings = dataclasses.replace(SETTINGS, tune_learning_rates=(1e-4, 1e-1), tune_epochs=(1, 4), tune_folds=3)
    seen = []

    def spy(net, part, candidate, seed):
        seen.append((set(part.labelled.groups), candidate.learning_rate, candidate.epochs))
        return METHODS["head"].apply(net, part, candidate, seed)
    choice = tuning.choose(spy, model, data, settings, 0, "head")
    assert choice.tuned and len(choice.scores) == 4
    best = min(choice.scores.values())
    assert choice.scores[f"lr={choice.settings.learning_rate:g},epochs={choice.settings.epochs}"] == best
    groups = set(data.labelled.groups)
    assert len(seen) == 4 * 3 and all(trained < groups for trained, _, _ in seen)  # a group held out each fold
    folds = tuning.grouped_folds(data.labelled, 3, 0)
    for train, held in folds:
        assert not set(data.labelled.groups[train]) & set(data.labelled.groups[held])
    # One group per class (K = 1): no grouped fold trains on both classes; the committed settings stand.
    one = dataclasses.replace(data, labelled=Labelled(data.labelled.x[:4], data.labelled.y[:4],
                                                      np.array(["a", "b", "a", "b"])))
    fallback = tuning.choose(spy, model, one, settings, 0, "head")
    assert not fallback.tuned and fallback.settings == settings
    adapted, chosen = adapted_by(METHODS["head"], model, data, settings, 0)
    assert chosen.settings == choice.settings and changed(model, adapted) == {"probabilities"}


def test_batchnorm_methods_refuse_a_network_without_it(tmp_path):
    from covidtl.adapt.methods import check_method
    from covidtl.errors import UserError

    for name in ("adabn", "tent", "head_bn"):
        with pytest.raises(UserError, match=f"^{name} needs BatchNorm layers; vgg16 .* has none"):
            check_method(METHODS[name], tiny_frozen_cell(), "vgg16", True)


# ---- the command, on the synthetic second site


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """(tmp, cfg) with a custom CNN saved at models/cnn/model.keras and the synthetic ct-site2."""
    tmp = tmp_path_factory.mktemp("adapt")
    cfg = config(tmp / "data")
    synth.write_ct_site2(dataclasses.replace(cfg.synth, site2_images_per_class=10), tmp / "site2")
    keras.utils.set_random_seed(0)
    model = build_model(get_spec("custom_cnn"), "random", cfg.train)
    (tmp / "models" / "cnn").mkdir(parents=True)
    model.save(tmp / "models" / "cnn" / "model.keras")
    return tmp


def invoke(tmp, monkeypatch, *args):
    monkeypatch.chdir(tmp)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
    return CliRunner().invoke(main, ["--params", str(PARAMS), *args])


def test_adapt_writes_a_model_that_evaluate_and_predict_score(study, monkeypatch):
    out = invoke(study, monkeypatch, "adapt", "--model-uri", "models/cnn/model.keras", "--site", "site2",
                 "--labelled", "none", "--method", "adabn", "--out", "adapted/adabn")
    assert out.exit_code == 0, out.output
    card = json.loads((study / "adapted/adabn/card.json").read_text())
    assert card["adapted"]["method"] == "adabn" and card["model"] == "custom_cnn"
    images = pd.read_csv(study / "adapted/adabn/site_images.csv")
    assert len(images) == 20 and set(images["role"]) == {"pool"} and images["sha256"].str.len().eq(64).all()
    assert not images["path"].str.startswith("/").any()  # portable: relative to the site folder

    run = mlflow.get_run(card["run_id"])
    assert run.data.tags["kind"] == "adapt" and run.data.params["method"] == "adabn"
    assert run.data.params["pool_images"] == "20"

    scored = invoke(study, monkeypatch, "evaluate", "--model-uri", "adapted/adabn", "--data", "site2")
    assert scored.exit_code == 0, scored.output
    predicted = invoke(study, monkeypatch, "predict", "--model-uri", "adapted/adabn", "site2/COVID")
    assert predicted.exit_code == 0 and "10 images scored" in predicted.output, predicted.output


def test_a_labelled_method_chooses_its_threshold_on_the_labelled_images(study, monkeypatch):
    out = invoke(study, monkeypatch, "adapt", "--model-uri", "models/cnn", "--site", "site2", "--labelled",
                 "site2", "--method", "recalibrate", "--out", "adapted/recal", "--no-log-model")
    assert out.exit_code == 0, out.output
    card = json.loads((study / "adapted/recal/card.json").read_text())
    assert card["operating_point"]["chosen_on"] == "labelled site images"
    assert card["adapted"]["site"]["labelled_images"] == 20 and card["adapted"]["site"]["labelled_groups"] >= 2


def refused(study, monkeypatch, *args) -> str:
    out = invoke(study, monkeypatch, "adapt", "--model-uri", "models/cnn", "--out", "adapted/refused",
                 "--no-log-model", *args)
    assert out.exit_code == 2, out.output
    assert not (study / "adapted/refused").exists()
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


def test_refusals_are_one_line_and_write_nothing(study, monkeypatch):
    one_class = study / "one-class"
    write_images(one_class, per_class=3, size=128)
    for path in (one_class / "non-COVID").iterdir():
        path.unlink()
    (one_class / "non-COVID").rmdir()
    assert "holds covid images only" in refused(study, monkeypatch, "--site", "site2", "--labelled",
                                                str(one_class), "--method", "head")
    small = study / "small"
    write_images(small, per_class=3, size=40)
    assert "below 100 px" in refused(study, monkeypatch, "--site", str(small), "--method", "adabn")
    leak = study / "scored.txt"
    leak.write_text(str((study / "site2" / "COVID" / "img0.jpg").resolve()) + "\n")
    assert "a leak" in refused(study, monkeypatch, "--site", "site2", "--labelled", "site2", "--method",
                               "recalibrate", "--exclude", str(leak))
    assert "needs labelled site images" in refused(study, monkeypatch, "--site", "site2", "--labelled",
                                                   "none", "--method", "head")
    no_bn = study / "models" / "vgg.keras"
    tiny_frozen_cell().save(no_bn)
    line = refused(study, monkeypatch, "--model-uri", str(no_bn), "--site", "site2", "--method", "adabn")
    assert line.startswith("Error: adabn needs BatchNorm layers;") and "(VGG16 has none)" in line
