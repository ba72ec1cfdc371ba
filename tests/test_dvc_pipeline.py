"""The study's DVC pipelines as DVC resolves them: each cell depends on what it reads, nothing more."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def stages() -> dict:
    """Every stage of every pipeline file, by its address (`train@vgg16-imagenet-ct`, `augment/dvc.yaml:…`)."""
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
