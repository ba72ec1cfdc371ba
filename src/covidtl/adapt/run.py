"""`covidtl adapt`: one method applied to a trained model on a site's images, recorded.

The pieces a learning curve calls on its own draws: `check_method` (before reading images),
`site.site_data` (the drawn rows, decoded), `Method.apply`, and `operating_point`.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import keras
import numpy as np

from covidtl import stats
from covidtl.adapt.features import model_p_covid
from covidtl.adapt.methods import adapted_by, check_method, get_method
from covidtl.adapt.record import AdaptedDir, adapted_card, log_adapt_run
from covidtl.adapt.settings import AdaptSettings
from covidtl.adapt.site import SiteData, relative_paths, site_data, site_rows, source_split
from covidtl.config import Config
from covidtl.trained import LoadedModel, load_trained

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Adapted:
    out: AdaptedDir
    run_id: str
    model_uri: str | None
    threshold: float
    images: int


def operating_point(adapted: keras.Model, site: SiteData, source: LoadedModel, rule: str,
                    batch_size: int) -> dict:
    """Labelled methods: the threshold `rule` picks on the labelled images, scored by the adapted
    model (chosen inside K, as its fit). Unlabelled ones keep the source model's threshold."""
    if site.labelled is None:
        threshold = source.operating_threshold if source.operating_threshold is not None else 0.5
        return {"rule": "source model's", "threshold": float(threshold), "chosen_on": "source model"}
    p = model_p_covid(adapted, site.labelled.x, batch_size, site.features)
    return {"rule": rule, "threshold": stats.operating_point(site.labelled.y, p, rule),
            "chosen_on": "labelled site images"}


def adapt(cfg: Config, model_uri: str, method_name: str, site: str, labelled: str | None, out: str | Path,
          seed: int, exclude: Iterable[str] = (), log_model: bool = True) -> Adapted:
    """Load, check, read the site, apply the method, write the folder and the run (nothing is
    written before every refusal has had its say)."""
    method = get_method(method_name)
    source = load_trained(model_uri, cfg)
    check_method(method, source.model, model_uri, labelled is not None)
    if labelled is not None and not method.needs_labels:
        log.info("adapt --method %s reads no labels: --labelled %s is not used", method.name, labelled)
        labelled = None
    settings = AdaptSettings.of(cfg)
    with tempfile.TemporaryDirectory(prefix="covidtl-adapt-") as work:
        a = cfg.adapt
        pool = site_rows(cfg, site, Path(work) / "site", "--site", a.series, a.shared_frame)
        rows = (site_rows(cfg, labelled, Path(work) / "labelled", "--labelled", a.series, a.shared_frame)
                if labelled is not None else None)
    split = source_split(cfg, source, method.name) if method.needs_source else None
    data = site_data(cfg, source, pool, rows, exclude, split)
    log.info("adapt %s: %s on %d unlabelled and %d labelled site images", model_uri, method.name,
             len(data.pool), 0 if data.labelled is None else len(data.labelled.y))
    adapted, choice = adapted_by(method, source.model, data, settings, seed)
    if choice is not None:
        settings = choice.settings  # what the model was fitted with, on the card and the run
    operating = operating_point(adapted, data, source, settings.operating_point, settings.batch_size)

    folder = AdaptedDir(Path(out))
    images = relative_paths(data.images, {"pool": Path(site), "labelled": Path(labelled or site)})
    counts = {"pool_images": len(data.pool), "labelled_images": 0 if rows is None else len(rows),
              "labelled_groups": 0 if rows is None else int(rows["group"].nunique())}
    params = {"source_model": model_uri, "site": str(site), "labelled": str(labelled), "method": method.name,
              "seed": seed, **counts, **{f"adapt.{k}": v for k, v in settings.as_dict().items()},
              **({"tuned": choice.tuned, "tuning": choice.why} if choice is not None else {})}
    with tempfile.TemporaryDirectory(prefix="covidtl-adapt-") as work:  # the run first: its id is on the card
        images_file = Path(work) / folder.images_file.name
        images.to_csv(images_file, index=False)
        run_id, logged = log_adapt_run(adapted, params, images_file, log_model, data.pool[:1])
    site_about = {"folder": str(site), "labelled": labelled, **counts}
    used = {**settings.as_dict(), **({"tuning": choice.why} if choice is not None else {})}
    folder.write(adapted, adapted_card(source, model_uri, method.name, used, seed, site_about,
                                       operating, run_id), images)
    return Adapted(folder, run_id, logged, operating["threshold"], len(images))
