"""Shared fixtures: the real datasets by path, the embedded synthetic data, one ingest per real set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covidtl.config import load_config

ROOT = Path(__file__).parents[1]
PARAMS = ROOT / "params.yaml"
SHARED_DATA = ROOT / ".." / "shared" / "data"


@pytest.fixture(autouse=True)
def _no_inherited_mlflow_experiment(monkeypatch):
    """Each test starts with no active MLflow experiment or run.

    `mlflow.set_experiment` (called in-process by training, the report ...) also exports
    MLFLOW_EXPERIMENT_ID "so that subprocesses inherit it": a later test's fresh store, or a
    subprocess it starts, would then look for an experiment id of another test's store.
    """
    import mlflow.tracking.fluent as fluent

    for name in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(fluent, "_active_experiment_id", None)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets beside the repository (../shared/data), or skip saying where they belong."""
    path = SHARED_DATA.resolve()
    if not path.is_dir():
        pytest.skip(f"real datasets not found at {path} (the repo root's sibling shared/data)")
    return path


def config(workdir: Path, **overrides):
    """params.yaml with derived files under workdir and the given dotted overrides."""
    return load_config(PARAMS, {"data.workdir": str(workdir), **overrides})


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """The embedded synthetic datasets (ct/, xray/), generated once per test session."""
    from covidtl.data import synth

    out = tmp_path_factory.mktemp("synth")
    synth.generate(load_config(PARAMS).synth, out)
    return out


def _ingested(tmp_path_factory, shared: Path, dataset: str, folder: str):
    from covidtl.data import ingest

    work = tmp_path_factory.mktemp(f"real-{dataset}")
    cfg = config(work, **{f"data.datasets.{dataset}.path": str(shared / folder)})
    return cfg, ingest.run(cfg, dataset, progress=False)


@pytest.fixture(scope="session")
def real_ct(tmp_path_factory, shared_data):
    """(cfg, IngestResult) of ../shared/data/sarscov2-ct, ingested once for every test that needs it."""
    return _ingested(tmp_path_factory, shared_data, "ct", "sarscov2-ct")


@pytest.fixture(scope="session")
def real_xray(tmp_path_factory, shared_data):
    """(cfg, IngestResult) of ../shared/data/covid19-xray, ingested once."""
    return _ingested(tmp_path_factory, shared_data, "xray", "covid19-xray")


def write_image(path: Path, seed: int, size=(48, 40), mode: str = "L", fmt: str | None = None) -> Path:
    """A small random-texture image (distinct per seed) saved in the given mode."""
    rng = np.random.default_rng(seed)
    grey = Image.fromarray(rng.integers(0, 256, (size[1] // 4, size[0] // 4), dtype=np.uint8))
    image = grey.resize(size, Image.BILINEAR).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path


@pytest.fixture
def image_folder(tmp_path):
    """Factory: {"COVID": 3, "non-COVID": 3} -> a dataset folder of small distinct PNGs."""

    def make(counts: dict[str, int], root: Path | None = None) -> Path:
        root = root or tmp_path / "dataset"
        seed = 0
        for folder, n in counts.items():
            (root / folder).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                seed += 1
                write_image(root / folder / f"img ({i + 1}).png", seed)
        return root

    return make
