"""Make a dataset's split table when it is missing, so `covidtl train` works on a fresh clone.

The same steps as `dvc repro split@<dataset>` (synth for the embedded data, ingest, split), run
through the same modules; an existing split table is never touched.
"""

from __future__ import annotations

import logging
from pathlib import Path

from covidtl import paths
from covidtl.config import Config
from covidtl.data import ingest, split, synth

log = logging.getLogger(__name__)


def ensure_split(cfg: Config, dataset: str) -> Path:
    """The split table of `dataset`, made first (with its manifest) if it does not exist."""
    table = paths.split_path(cfg, dataset)
    if table.is_file():
        return table
    root = Path(cfg.dataset(dataset).path)
    if not root.exists() and root.resolve().is_relative_to(Path(cfg.synth.out).resolve()):
        log.info(f"{root} is missing: writing the embedded synthetic data (covidtl synth)")
        synth.generate(cfg.synth)
    if not paths.manifest_path(cfg, dataset).is_file():
        log.info(f"{paths.manifest_path(cfg, dataset)} is missing: ingesting {root} (covidtl ingest {dataset})")
        for folder, count in ingest.run(cfg, dataset, progress=False).unmapped.items():
            log.warning(f"Warning: {ingest.unmapped_warning(folder, count)}")
    log.info(f"{table} is missing: splitting ({cfg.split.strategy}; covidtl split {dataset})")
    split.run(cfg, dataset)
    return table
