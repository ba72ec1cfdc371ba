"""The study's DVC pipelines as DVC resolves them: each cell depends on what it reads, nothing more."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from import_closure import closure, imports_of, package_modules, source_files

ROOT = Path(__file__).parents[1]
PACKAGE = "src/covidtl"


@pytest.fixture(scope="module")
def stages() -> dict:
    """Every stage of every pipeline file by address (`train@vgg16-imagenet-ct`, `augment/dvc.yaml:…`)."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        return {stage.addressing: stage for stage in repo.index.stages}


def in_file(stages: dict, dvcfile: str) -> dict:
    return {name: s for name, s in stages.items() if s.dvcfile.relpath == dvcfile}


def params_of(stage) -> list[str]:
    return [key for dep in stage.deps if hasattr(dep, "params") for key in dep.params]


def paths_of(stage) -> list[str]:
    return [d.def_path for d in stage.deps if not hasattr(d, "params")] + [o.def_path for o in stage.outs]


def declares(stage, key: str) -> bool:
    """Whether a change of params.yaml's `key` changes `stage` (the key or a group holding it)."""
    return any(key == p or key.startswith(p + ".") for p in params_of(stage))


def test_default_study_neither_writes_nor_reads_the_augmented_set(stages):
    root = in_file(stages, "dvc.yaml")
    cells = {name: s for name, s in root.items() if name.startswith("train@")}
    assert len(cells) == 24
    for name, stage in root.items():
        assert not [p for p in paths_of(stage) if "augmented" in Path(p).parts], name
        # So changing the offline set's size leaves every stage of `dvc repro` up to date.
        for key in ("augment.copies_per_image", "augment.max_images", "augment.mode"):
            assert not declares(stage, key), f"{name} declares {key}"
    for name, cell in cells.items():
        assert "-S augment.mode=online train " in cell.cmd, name  # whatever params.yaml says
        for key in ("augment.rotation", "augment.zoom", "augment.horizontal_flip", "augment.seed"):
            assert declares(cell, key), f"{name} reads {key} but does not declare it"


def profile_cells(root, params, profile: str) -> set[str]:
    cells = params["study"]["profiles"][profile]
    expected = {f"train_{profile}@{m}-{i}-{d}" for m in cells["models"] for i in cells["inits"]
                for d in params["study"]["datasets"]}
    assert {name for name in root if name.startswith(f"train_{profile}@")} == expected
    for name in expected:
        cell = root[name]
        assert f"-S profile={profile} -S augment.mode=online train " in cell.cmd, name
        model, init, dataset = name.split("@")[1].split("-")
        assert f"models/{model}-{init}-{dataset}-{profile}/model" in [o.def_path for o in cell.outs]
        for key in (f"profiles.{profile}", "train.head", "train.crop", "augment.intensity.noise"):
            assert declares(cell, key), f"{name} reads {key} but does not declare it"
    return expected


def test_the_best_profile_cells_run_beside_the_paper_cells(stages):
    root = in_file(stages, "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    # The chosen recipe starts from Keras' ImageNet file, watched in weights/ as the weights stages watch it.
    for name in profile_cells(root, params, "best"):
        assert "weights" in paths_of(root[name])
        assert not [p for p in paths_of(root[name]) if p.startswith("data/pretrain")]
    # The custom CNN's SimCLR recipe starts from the profile's own pretraining.
    for name in profile_cells(root, params, "cnn_simclr"):
        model = name.split("@")[1].split("-")[0]
        cell = root[name]
        pretrained = root[f"pretrain_cnn_simclr@{model}"]
        assert f"data/pretrain/cnn_simclr/{model}.weights.h5" in paths_of(cell)
        assert f"data/pretrain/cnn_simclr/{model}.weights.h5" in [o.def_path for o in pretrained.outs]
        assert params["profiles"]["cnn_simclr"]["pretrain.out"] == "data/pretrain/cnn_simclr"
        assert "-S profile=cnn_simclr pretrain " in pretrained.cmd
        for key in ("profiles.cnn_simclr", "pretrain.epochs", "train.crop", "train.image_size.custom_cnn"):
            assert declares(pretrained, key), f"pretrain_cnn_simclr@{model} reads {key} but does not declare it"
        # Pretraining reads training splits only, never a cell's val/test predictions or models.
        assert not [p for p in paths_of(pretrained) if p.startswith("models")]
    root_names = set(root)
    assert not {n for n in root_names if n.startswith("pretrain_best")}  # the chosen recipe pretrains nothing
    for name, cell in root.items():  # the paper's cells train the paper's profile whatever params.yaml says
        if name.startswith("train@"):
            assert "-S profile=paper " in cell.cmd, name


def test_offline_study_is_its_own_pipeline_with_its_own_outputs(stages):
    offline = in_file(stages, "augment/dvc.yaml")
    assert {n for n in offline if "@" in n and n.split(":")[1].startswith("augment@")} == {
        "augment/dvc.yaml:augment@ct", "augment/dvc.yaml:augment@xray"}
    assert "data/ct/augmented" in paths_of(offline["augment/dvc.yaml:augment@ct"])
    assert declares(offline["augment/dvc.yaml:augment@ct"], "augment.copies_per_image")
    cell = offline["augment/dvc.yaml:train@vgg16-random-ct"]
    assert "-S augment.mode=offline train " in cell.cmd
    assert "data/ct/augmented" in paths_of(cell)
    assert all(o.def_path.startswith("models-offline/vgg16-random-ct/") for o in cell.outs)


def test_each_cell_depends_on_its_own_weights_record_and_weights_watch_the_folder(stages):
    root = in_file(stages, "dvc.yaml")
    study = yaml.safe_load((ROOT / "params.yaml").read_text())["study"]
    weights = {name for name in root if name.startswith("weights@")}
    assert weights == {f"weights@{m}-{i}" for m in study["models"] for i in study["inits"]}
    for name in weights:
        stage = root[name]
        assert stage.cmd.startswith("covidtl weights ")
        assert "weights" in paths_of(stage)  # the folder where a user drops Keras' file
        assert [o.def_path for o in stage.outs] == [f"data/weights/{name.split('@')[1]}.json"]
    for name, cell in root.items():
        if not name.startswith("train@"):
            continue
        model, init, _ = name.split("@")[1].split("-")
        records = [p for p in paths_of(cell) if p.startswith(("data/weights", "weights"))]
        assert records == [f"data/weights/{model}-{init}.json"], name
    assert not [name for name, s in root.items() if s.always_changed]  # `dvc status` can be clean

    ignored = subprocess.run(["git", "check-ignore", "-q", "weights/vgg16.h5"], cwd=ROOT)
    kept = subprocess.run(["git", "check-ignore", "-q", "weights/README.md"], cwd=ROOT)
    assert (ignored.returncode, kept.returncode) == (0, 1)  # the files stay out of git


def test_external_stage_per_dataset_reads_the_cells_and_writes_only_its_folder(stages):
    root = in_file(stages, "dvc.yaml")
    stage = root["external@ct"]
    assert stage.cmd == "covidtl external ct --quiet"
    assert [o.def_path for o in stage.outs] == ["external/ct"]  # not into models/<cell>/
    assert {"models", "data/synth"} <= set(paths_of(stage))  # its code: test_every_stage_depends_on_...
    assert declares(stage, "external.ct") and not declares(stage, "external.xray")
    assert declares(stage, "study.models") and declares(stage, "ingest.series_break")
    assert "external" in paths_of(root["report"])


def code_deps(stage) -> set[str]:
    """The stage's dependencies in the package's source, relative to the repository root."""
    found = {Path(d.fs_path).relative_to(ROOT).as_posix() for d in stage.deps if not hasattr(d, "params")}
    return {path for path in found if path == PACKAGE or path.startswith(PACKAGE + "/")}


def test_every_stage_depends_on_the_code_its_command_runs(stages):
    # A module the command runs but the stage does not declare changes results without a re-run:
    # data/cache.py's decode rules, scores.py, config.py ... were missing from the train cells.
    package = len(package_modules())
    wrong: dict[str, str] = {}  # one line per stage definition (its first cell), not per cell
    for name, stage in stages.items():
        assert stage.cmd.startswith("covidtl "), name  # a stage only calls the CLI
        if name.split("@")[0] in wrong:
            continue
        modules = closure(stage.cmd)
        files, deps = source_files(modules), code_deps(stage)
        if deps == {PACKAGE}:
            # The whole package where the command runs a large part of it, more than a third of its
            # modules (dvc.yaml's comment on code); below that the stage lists its modules.
            if len(modules) <= package / 3:
                wrong[name.split("@")[0]] = (f"{name}: its command runs {len(modules)} of the package's "
                                             f"{package} modules; depend on those instead of {PACKAGE}: {sorted(files)}")
            continue
        missing = {f for f in files if not any(f == d or f.startswith(d + "/") for d in deps)}
        unused = {d for d in deps if not any(f == d or f.startswith(d + "/") for f in files)}
        if missing or unused:
            wrong[name.split("@")[0]] = (f"{name}: deps miss {sorted(missing)} and name {sorted(unused)}, "
                                         f"which its command does not run; it runs exactly {sorted(files)}")
    assert not wrong, "\n".join(wrong.values())


def test_a_train_cell_runs_the_modules_the_hand_lists_missed():
    train = closure("covidtl -S profile=paper train --model vgg16 --init imagenet --dataset ct")
    assert {"covidtl.data.cache", "covidtl.config", "covidtl.cli.train", "covidtl.cli", "covidtl"} <= train
    assert "covidtl.report" not in train and "covidtl.cli.report" not in train  # later stages' code
    synth = closure("covidtl synth")
    assert "covidtl.data.synth" in synth and "covidtl.data.ingest" not in synth  # another command of its file


def test_the_closure_follows_function_imports_and_skips_what_never_runs(tmp_path):
    (tmp_path / "covidtl" / "sub").mkdir(parents=True)
    for name in ("__init__", "a", "b", "c", "d", "e", "sub/__init__", "sub/f", "sub/g"):
        (tmp_path / "covidtl" / f"{name}.py").write_text("")
    (tmp_path / "covidtl" / "sub" / "f.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "import covidtl.a\n"
        "from covidtl import b, not_a_module\n"
        "from . import g\n"
        "if TYPE_CHECKING:\n"
        "    import covidtl.c  # never runs\n"
        "def helper():\n"
        "    from covidtl.d import something  # runs when helper does\n"
        "def other_command():\n"
        "    import covidtl.e  # runs only when that command is invoked\n")
    imported = imports_of("covidtl.sub.f", frozenset({"other_command"}), tmp_path)
    assert imported == {"covidtl", "covidtl.a", "covidtl.b", "covidtl.sub", "covidtl.sub.g", "covidtl.d"}


def test_changing_one_models_rate_re_runs_only_its_cells(stages):
    cells = {name: s for name, s in stages.items() if " train --model " in s.cmd}
    assert {"train@vgg16-random-ct", "train_best@vgg16-imagenet-ct", "augment/dvc.yaml:train@vgg16-random-ct",
            "train_cnn_simclr@custom_cnn-pretrained-ct"} <= set(cells)
    models = yaml.safe_load((ROOT / "params.yaml").read_text())["study"]["models"]
    for model in models:
        for key in (f"train.learning_rates.{model}", f"train.image_size.{model}"):
            rerun = {name for name, cell in cells.items() if declares(cell, key)}
            assert rerun == {name for name, cell in cells.items() if f"--model {model} " in cell.cmd}, key
    for name, cell in cells.items():  # a new default model or init re-runs no cell: each names its own
        assert not declares(cell, "train.model") and not declares(cell, "train.init"), name
        assert declares(cell, "eval.operating_point") and declares(cell, "train.stop.patience"), name
