"""`covidtl adapt-curve`: how many labelled patients of its own a site needs, as a learning curve.

The site is ingested once and its patient groups halved by the split seed (`protocol`); the halves
are written before any model is scored. K = 0: the source model and each unlabelled method on the
adaptation half's images; K > 0: each labelled method on K groups per class drawn from the
adaptation half, several seeds per K, its threshold chosen on those images. Every adapted model is
scored on the scoring half only (`held_out`), and on the source's home test split where it has one.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from covidtl import paths, tracking
from covidtl.adapt.curve_files import CurveDir
from covidtl.adapt.curve_plot import SOURCE, curve_figure
from covidtl.adapt.held_out import ScoringSet
from covidtl.adapt.features import BodyFeatures
from covidtl.adapt.methods import METHODS, Method, adapted_by, check_method, get_method
from covidtl.adapt.network import head_layers
from covidtl.adapt.protocol import (CURVE_METRICS, Halves, SeedScores, curve_point, draw_labelled, refuse_leaks,
                                    split_halves)
from covidtl.adapt.record import EXPERIMENT
from covidtl.adapt.run import operating_point
from covidtl.adapt.settings import AdaptSettings
from covidtl.adapt.tuning import Choice
from covidtl.adapt.site import Labelled, SiteData, check_sizes, site_data, site_rows, source_split
from covidtl.config import Config
from covidtl.data import tables
from covidtl.data.pipeline import label_indices
from covidtl.errors import UserError
from covidtl.train import rows_of
from covidtl.trained import LoadedModel, load_trained

log = logging.getLogger(__name__)
HOME_METRICS = ("roc_auc", "balanced_accuracy")


@dataclass(frozen=True)
class CurveRequest:
    model_uri: str
    site: str
    methods: str  # "auto": every method the model takes; else names, comma-separated
    ks: tuple[int, ...]
    seeds: int
    split_seed: int
    out: Path
    home: bool | None  # None: where the source model's card names a dataset with a split


@dataclass(frozen=True)
class Curve:
    out: CurveDir
    run_id: str
    table: pd.DataFrame
    skipped: dict[str, str]  # method -> why the model refused it


def chosen_methods(cfg: Config, loaded: LoadedModel, request: CurveRequest) -> tuple[list[Method], dict[str, str]]:
    """The methods to run and, under `auto`, those the model refuses (each logged in one line);
    a method named outright and refused is the run's one-line error."""
    auto = request.methods == "auto"
    names = list(METHODS) if auto else [n.strip() for n in request.methods.split(",") if n.strip()]
    chosen, skipped = [], {}
    for method in map(get_method, names):
        try:
            if method.needs_labels and not any(k > 0 for k in request.ks):
                raise UserError(f"{method.name} needs labelled groups: add a K > 0 to --k")
            if not method.needs_labels and 0 not in request.ks:
                raise UserError(f"{method.name} reads no labels and is the curve's K = 0 point: add 0 to --k")
            check_method(method, loaded.model, request.model_uri, has_labels=True)
            if method.needs_source:
                source_split(cfg, loaded, method.name)  # refuses a model whose training split is unknown
        except UserError as refusal:
            if not auto:
                raise
            log.warning("adapt-curve: %s skipped: %s", method.name, refusal)
            skipped[method.name] = str(refusal)
            continue
        chosen.append(method)
    return chosen, skipped


def home_rows(cfg: Config, loaded: LoadedModel, home: bool | None) -> pd.DataFrame | None:
    """The test split of the dataset the source model was trained on, where wanted and known."""
    known = loaded.dataset in cfg.data.datasets and paths.split_path(cfg, loaded.dataset).is_file()
    if home and not known:
        raise UserError(f"--home: the source model's card names no dataset of params.yaml with a split "
                        f"({loaded.dataset}); give --no-home, or a model trained here (models/<cell>)")
    return rows_of(tables.read_split(cfg, loaded.dataset), "test") if known and home is not False else None


def labelled_draws(halves: Halves, ks, seeds: int) -> dict[tuple[int, int], pd.DataFrame]:
    """Every (K, seed) draw from the adaptation half, made (and refused) before anything is written."""
    draws = {(k, s): draw_labelled(halves.adaptation, k, s) for k in ks if k > 0 for s in range(seeds)}
    for drawn in draws.values():
        refuse_leaks(drawn, halves.scoring)
        refuse_leaks(drawn, halves.scoring, key="sha256")  # a copy of a scored image under another name
    return draws


def with_labelled(pool: SiteData, adaptation: pd.DataFrame, drawn: pd.DataFrame) -> SiteData:
    """The pool's data with the drawn groups as its labelled images (decoded once, with the pool)."""
    at = {path: i for i, path in enumerate(adaptation["path"])}
    rows = [at[path] for path in drawn["path"]]
    labelled = Labelled(pool.pool[rows], label_indices(drawn), drawn["group"].astype(str).to_numpy())
    record = pd.concat([pool.images, drawn.assign(role="labelled")[pool.images.columns]], ignore_index=True)
    return dataclasses.replace(pool, labelled=labelled, images=record)


def adapt_curve(cfg: Config, request: CurveRequest) -> Curve:
    """Every refusal first; then the halves written, the adaptation half decoded for the methods and
    the scoring half for scoring, each (method, K, seed) adapted, scored and logged."""
    loaded = load_trained(request.model_uri, cfg)
    methods, skipped = chosen_methods(cfg, loaded, request)
    home = home_rows(cfg, loaded, request.home)
    with tempfile.TemporaryDirectory(prefix="covidtl-adapt-curve-") as work:
        site = site_rows(cfg, request.site, Path(work) / "site", "--site", cfg.adapt.series, cfg.adapt.shared_frame)
    if site["label"].isna().any():
        raise UserError(f"--site {request.site}: a learning curve scores labelled images; give class folders "
                        "(COVID/ and non-COVID/)")
    check_sizes(site, int(loaded.model.input_shape[1]), "--site")
    halves = split_halves(site, request.split_seed)
    draws = labelled_draws(halves, request.ks, request.seeds)
    folder = CurveDir(Path(request.out))
    folder.fix_halves(halves, request.site)  # the split is on disk before the first score

    settings = AdaptSettings.of(cfg)
    size = settings.batch_size
    needs_source = next((m for m in methods if m.needs_source), None)
    pool = site_data(cfg, loaded, halves.adaptation, None,
                     source=source_split(cfg, loaded, needs_source.name) if needs_source else None)
    features = BodyFeatures(loaded.model, size) if head_layers(loaded.model) else None
    pool = dataclasses.replace(pool, features=features)
    scoring = ScoringSet.decode(cfg, loaded, halves.scoring, "scoring half", size)
    home_set = ScoringSet.decode(cfg, loaded, home, f"home test split of {loaded.dataset}", size) \
        if home is not None else None
    log.info("adapt-curve: %d scoring and %d adaptation images (%d and %d groups); methods %s",
             len(halves.scoring), len(halves.adaptation), halves.scoring["group"].nunique(),
             halves.adaptation["group"].nunique(), ", ".join(m.name for m in methods))

    def run_point(method: Method | None, k: int, seeds: range) -> dict:
        scores, home_scores, chosen = [], [], []
        for seed in seeds:
            data = pool if k == 0 else with_labelled(pool, halves.adaptation, draws[(k, seed)])
            model, choice = (loaded.model, None) if method is None else adapted_by(method, loaded.model, data,
                                                                                 settings, seed)
            threshold = operating_point(model, data, loaded, settings.operating_point, size)["threshold"]
            p = scoring.p_covid(model, size, features)
            metrics = {f"scoring_{m}": v for m, v in scoring.metrics(p, threshold).items()}
            if choice is not None:
                chosen.append(f"{choice.settings.learning_rate:g}x{choice.settings.epochs}"
                              + ("" if choice.tuned else " (default)"))
            if home_set is not None:
                at_home = home_set.metrics(home_set.p_covid(model, size, features), threshold)
                home_scores.append([at_home[m] for m in HOME_METRICS])
                metrics.update({f"home_{m}": at_home[m] for m in HOME_METRICS})
            name = SOURCE if method is None else method.name
            log_seed_run(name, k, seed, threshold, metrics, 0 if k == 0 else len(draws[(k, seed)]), choice)
            scores.append(SeedScores(p, threshold))
        point = curve_point(k, scoring.y, scoring.groups, scores, resamples=cfg.adapt.curve_resamples,
                            confidence=cfg.eval.confidence, seed=cfg.eval.seed)
        row = {"method": SOURCE if method is None else method.name, "k": k, "seeds": point.seeds,
               "chosen": ", ".join(chosen)}  # a tuned method's rate x epochs per seed
        for m in CURVE_METRICS:
            row.update({m: point.mean[m], f"{m}_low": point.interval[m][0], f"{m}_high": point.interval[m][1]})
        home_mean = np.mean(home_scores, axis=0) if home_scores else [np.nan] * len(HOME_METRICS)
        return {**row, **{f"home_{m}": float(v) for m, v in zip(HOME_METRICS, home_mean)}}

    tracking.use_experiment(EXPERIMENT)
    with mlflow.start_run(run_name="adapt-curve") as parent:
        about = {"source_model": request.model_uri, "site": str(request.site), "split_seed": request.split_seed,
                 "ks": list(request.ks), "seeds": request.seeds, "methods": [m.name for m in methods],
                 "skipped": skipped, "resamples": cfg.adapt.curve_resamples, "confidence": cfg.eval.confidence,
                 "home": loaded.dataset if home_set is not None else None,
                 "scoring": {"images": len(halves.scoring), "groups": int(halves.scoring["group"].nunique())},
                 "adaptation": {"images": len(halves.adaptation),
                                "groups": int(halves.adaptation["group"].nunique())}}
        mlflow.set_tags({"kind": "adapt", "adapt_kind": "curve", "git_commit": tracking.git_commit(),
                         **tracking.experiment_tags()})
        mlflow.log_params({**{k: v for k, v in about.items() if k not in ("scoring", "adaptation", "skipped")},
                           "skipped": ",".join(skipped) or "none", "scoring_images": about["scoring"]["images"],
                           "adaptation_images": about["adaptation"]["images"],
                           **{f"adapt.{k}": v for k, v in settings.as_dict().items()}})
        rows = [run_point(None, 0, range(1))]
        for method in methods:
            if not method.needs_labels:
                rows.append(run_point(method, 0, range(request.seeds if method.seeded else 1)))
            else:
                rows.extend(run_point(method, k, range(request.seeds)) for k in request.ks if k > 0)
        table = pd.DataFrame(rows)
        folder.write(rows, about, curve_figure(table, f"{request.model_uri} on {request.site}"))
        for file in folder.files():
            mlflow.log_artifact(str(file))
    return Curve(folder, parent.info.run_id, table, skipped)


def log_seed_run(method: str, k: int, seed: int, threshold: float, metrics: dict, labelled: int,
                 choice: Choice | None = None) -> None:
    """One nested run per (method, K, seed): its scores on the scoring half (and at home), and
    the settings a tuned method chose inside K."""
    with mlflow.start_run(run_name=f"{method}-k{k}-seed{seed}", nested=True):
        mlflow.set_tags({"kind": "adapt", "adapt_kind": "curve_point", "method": method,
                         **({"tuning": choice.why[:5000]} if choice is not None else {})})
        mlflow.log_params({"method": method, "k": k, "seed": seed, "labelled_images": labelled,
                           **(choice.as_params() if choice is not None else {})})
        tracking.log_metrics({**metrics, "threshold": threshold})
