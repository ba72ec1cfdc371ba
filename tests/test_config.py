"""Bad configuration stops with one line naming the key (exit status 2), through the real CLI."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from conftest import PARAMS, config
from covidtl.cli import main


def run(*args: str):
    return CliRunner().invoke(main, ["--params", str(PARAMS), *args])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("ingest.bogus=1", "Error: ingest.bogus: unknown key; known keys here: hash_size,"),
        ("split.seed=abc", "Error: split.seed: expected an integer, got 'abc'"),
        ("split.fractions.train=0.7", "Error: split.fractions: train + val + test = 0.9, must be 1"),
        ("train.learning_rates.vgg16=-1e-5", "Error: train.learning_rates.vgg16: -1e-05 must be > 0"),
        ("ingest.near_duplicate_bits=-1", "Error: ingest.near_duplicate_bits: -1 must be >= 0"),
        ("split.strategy=stratified", "Error: split.strategy: 'stratified' is not one of grouped, random"),
        ("data.datasets.ct.series=maybe", "Error: data.datasets.ct.series: expected true or false, got 'maybe'"),
        ("eval.bootstrap=50", "Error: eval.bootstrap: 50 must be 0 (no intervals) or >= 100"),
        ("eval.confidence=95", "Error: eval.confidence: 95.0 must be in (0, 1), e.g. 0.95"),
        ("eval.operating_point=sens:0.9", "Error: eval.operating_point: 'sens:0.9' is not a rule; use youden,"),
        ("external.ct=[{name: a, path: x}, {name: a, path: y}]",
         "Error: external.ct[1].name: 'a' is already the name of external.ct[0]"),
        ("external.ct=[{name: ../a, path: x}]", "Error: external.ct[0].name: '../a' is not a folder-safe name"),
        ("external.mri=[{name: a, path: x}]", "Error: external.mri: no dataset 'mri' in data.datasets"),
        ("external.ct=[{path: x}]", "Error: external.ct[0].name: missing from"),
        ("profile=fast", "Error: profile: 'fast' is not defined under profiles in"),
        ("profiles.best={profile: paper}", "Error: profiles.best.profile: a profile cannot choose a profile"),
        ("train.label_smoothing=1.5", "Error: train.label_smoothing: 1.5 must be in [0, 1)"),
        ("cache.max_gb=-1", "Error: cache.max_gb: -1.0 must be >= 0"),
        ("cache.max_gb=lots", "Error: cache.max_gb: expected a number, got 'lots'"),
        ("train.model=resnet9", "Error: train.model: 'resnet9' is not a model; choose one of custom_cnn, "
                                "densenet121, resnet50, inceptionv3, resnet101v2, vgg16"),
        ("train.init=imagenett", "Error: train.init: 'imagenett' is not an init; give random, imagenet, "
                                 "finetune, pretrained, a weights file (.weights.h5 or .h5) or finetune:FILE"),
        ("study.profiles={fast: {models: [vgg16], inits: [random]}}", "Error: study.profiles.fast: not a profile"),
        # A profile naming its model or init is what the study trains of it.
        ("study.profiles.cnn_simclr.models=[vgg16]",
         "Error: study.profiles.cnn_simclr.models: ['vgg16'] disagrees with profiles.cnn_simclr.train.model "
         "('custom_cnn'); set study.profiles.cnn_simclr.models to [custom_cnn] (or [] for no cells), or change "
         "profiles.cnn_simclr.train.model"),
        ("study.profiles.cnn_simclr.inits=[random, pretrained]",
         "Error: study.profiles.cnn_simclr.inits: ['random', 'pretrained'] disagrees with profiles.cnn_simclr.train.init"),
        ("profiles.cnn_simclr={train.model: vgg16}",
         "Error: study.profiles.cnn_simclr.models: ['custom_cnn'] disagrees with profiles.cnn_simclr.train.model ('vgg16')"),
    ],
)
def test_bad_override_is_one_line_and_exit_2(override, message):
    result = run("-S", override, "split", "ct")
    assert result.exit_code == 2
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1
    assert result.stdout == ""


def test_external_sets_default_to_the_second_site_and_take_one_override(tmp_path):
    cfg = config(tmp_path)
    assert [(s.name, s.path, s.series) for s in cfg.external["ct"]] == [("ct-site2", "data/synth/ct-site2", True)]
    assert [s.name for s in cfg.external["xray"]] == ["xray-site2"]
    real = config(tmp_path, **{"external.ct": [{"name": "ct-external", "path": "../shared/data/ct-external"}]})
    assert real.external["ct"][0].series is False  # optional, like a dataset's


def test_bad_params_file_names_the_key(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS.read_text().replace("  thumbnail: 32", "  thumbnial: 32"))
    result = CliRunner().invoke(main, ["--params", str(params), "ingest", "ct"])
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: ingest.thumbnial: unknown key")


def test_unknown_dataset_lists_the_known_ones(tmp_path):
    result = run("-S", f"data.workdir={tmp_path}", "ingest", "mri")
    assert result.exit_code == 2
    assert result.stderr == (
        "Error: data.datasets.mri: unknown dataset 'mri' (known: ct, xray); "
        "add it under data.datasets in params.yaml\n"
    )


def test_params_yaml_defaults_point_at_the_embedded_data(tmp_path):
    cfg = config(tmp_path)
    assert cfg.data.datasets["ct"].path == "data/synth/ct" and cfg.data.datasets["ct"].series
    assert cfg.data.datasets["xray"].path == "data/synth/xray" and not cfg.data.datasets["xray"].series
    assert cfg.split.strategy == "grouped"
    assert cfg.data.labels["viral pneumonia"] == "non_covid" and cfg.data.labels["covid"] == "covid"


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (None, "no such params file"),
        ("", "expected the stage groups of params.yaml"),
        ("train:\n  batch_size: 16\n", "synth: missing from"),
        ("drop train.max_epochs", "train.max_epochs: missing from"),
    ],
)
def test_a_missing_or_incomplete_params_file_is_refused(tmp_path, write, message):
    """Issue 8.9: defaults live in params.yaml alone; nothing falls back to another set of them."""
    params = tmp_path / "other.yaml"
    if write == "drop train.max_epochs":
        params.write_text("".join(line for line in PARAMS.read_text().splitlines(keepends=True)
                                  if not line.startswith("  max_epochs:")))
    elif write is not None:
        params.write_text(write)
    result = CliRunner().invoke(main, ["--params", str(params), "-S", f"data.workdir={tmp_path}", "split", "ct"])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "ct").exists()  # nothing ran on other defaults


def test_config_types_hold_no_second_set_of_defaults():
    """Every value a stage reads comes from the params file: the dataclasses declare no defaults,
    except the optional keys of a dataset entry and of an external set (subdir, series)."""
    import dataclasses

    from covidtl import config as module

    defaulted = [
        f"{cls.__name__}.{f.name}"
        for cls in vars(module).values()
        if dataclasses.is_dataclass(cls) and cls not in (module.DatasetConfig, module.ExternalSet)
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    ]
    assert defaulted == []


def test_numpy_2_is_declared():
    """Issue 8.10: ingest calls np.bitwise_count (NumPy 2); the package must say so."""
    import re
    import tomllib

    deps = tomllib.loads((PARAMS.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    numpy = [d for d in deps if re.match(r"numpy\b", d)]
    assert numpy and re.search(r">=\s*2", numpy[0]), deps


def test_a_profile_sets_its_keys_and_a_command_line_key_still_wins(tmp_path):
    paper = config(tmp_path)
    simclr = config(tmp_path, profile="cnn_simclr")
    assert paper.profile == "paper" and paper.train.head == "paper" and paper.train.select == "last"
    assert simclr.profile == "cnn_simclr" and simclr.train.head == "gap" and simclr.train.stop.rule == "none"
    assert config(tmp_path, profile="cnn_simclr", **{"train.head": "paper"}).train.head == "paper"
    assert "profiles.cnn_simclr.train.head" not in simclr.flat() and simclr.flat()["train.head"] == "gap"


def test_a_profile_cell_is_named_apart_from_the_paper_cell(tmp_path):
    from covidtl.cells import Cell

    assert Cell.of("custom_cnn", "random", "ct").name == "custom_cnn-random-ct"
    assert Cell.of("custom_cnn", "random", "ct", profile="best").name == "custom_cnn-random-ct-best"
    cells = config(tmp_path).study.cells()
    assert ("cnn_simclr", "custom_cnn", "pretrained") in cells and cells[0][0] == "paper"


def test_the_warm_up_leaves_at_least_one_epoch_of_the_schedule(tmp_path):
    from covidtl.optim import learning_rate_schedule

    short = config(tmp_path, profile="cnn_simclr", **{"train.max_epochs": 1}).train
    assert short.warmup_epochs == 1 and learning_rate_schedule(1e-3, short, steps=10)(0) > 0  # no warm-up left
    long = config(tmp_path, profile="cnn_simclr", **{"train.max_epochs": 4}).train
    schedule = learning_rate_schedule(1e-3, long, steps=10)
    assert float(schedule(0)) < float(schedule(9)) <= 1e-3 + 1e-9  # rising over the first epoch
    assert float(schedule(39)) < float(schedule(10))  # then the cosine falls to the last step


@pytest.mark.parametrize("init", ["random", "finetune", "pretrained", "finetune:pretrained",
                                  "data/pretrain/custom_cnn.weights.h5", "finetune:legacy.h5"])
def test_train_init_takes_every_init_the_cli_takes(tmp_path, init):
    cfg = config(tmp_path, **{"train.init": init})
    assert (cfg.train.model, cfg.train.init) == ("custom_cnn", init)  # params.yaml's model


def test_the_best_profile_names_the_recipe_its_study_cells_train(tmp_path):
    best = config(tmp_path, profile="best")
    assert (best.train.model, best.train.init, best.train.image_size["vgg16"]) == ("vgg16", "imagenet", 224)
    assert ("best", "vgg16", "imagenet") in best.study.cells()
    simclr = config(tmp_path, profile="cnn_simclr")
    assert (simclr.train.model, simclr.train.init) == ("custom_cnn", "pretrained")
    assert simclr.study.cells()[-1] == ("cnn_simclr", "custom_cnn", "pretrained")
    # No cells of the profile ([]) stays the way to leave them out.
    assert config(tmp_path, **{"study.profiles.best.models": []}).study.profiles["best"].models == []

