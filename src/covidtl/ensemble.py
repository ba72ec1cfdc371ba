"""`covidtl ensemble`: several trained models of one dataset as one model that averages their
probabilities, saved, scored and logged like a trained model (an MLflow run with kind=ensemble).

The ensemble is a Keras model holding its members (`covidtl.models.wrappers.ensemble_of`), written
as an ordinary cell folder (model/model.keras, model/card.json, metrics.json ...), so evaluate,
predict, explain and the server take it like any model. Its operating point is chosen on the
validation split, as training chooses a single model's; its test figures are the split's test rows.

Members must see the same input: one dataset, one input size, one preprocessing; anything else is
refused in one line, naming the member. The fold models of a `covidtl cv` run (`--cv DIR`) make
an ensemble too: there every image was in some fold's training data, so its operating point is
chosen on the cv run's pooled out-of-fold predictions and it has no test split of its own (score it
with `covidtl evaluate` on data none of the folds saw, e.g. an external set).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import mlflow
import numpy as np
import pandas as pd

from covidtl import cv_records, paths, tracking
from covidtl.cards import ensemble_card
from covidtl.cells import Cell
from covidtl.config import Config
from covidtl.data import tables
from covidtl.data.pipeline import make_dataset, readable_rows
from covidtl.errors import UserError
from covidtl.files import file_sha256
from covidtl.models.registry import get_spec, preprocess_for
from covidtl.models.wrappers import ensemble_of, tta_of
from covidtl.scores import choose_operating_point
from covidtl.trained import LoadedModel, load_trained, score_rows, scoring_config
from covidtl.train import example_batch

RUN_ID = re.compile(r"^[0-9a-f]{32}$")

log = logging.getLogger(__name__)


@dataclass
class Member:
    source: str  # as the user gave it
    loaded: LoadedModel

    @property
    def size(self) -> int:
        return int(self.loaded.model.input_shape[1])

    def about(self) -> dict[str, Any]:
        """The member as the card names it."""
        return {"source": self.source, "run_id": self.loaded.source_run_id, "model": self.loaded.name,
                "init": self.loaded.init, "tta": tta_of(self.loaded.model),
                "operating_threshold": self.loaded.operating_threshold}


@dataclass
class EnsembleResult:
    run_id: str
    model_path: Path
    members: list[Member]
    operating: dict[str, Any]
    metrics: dict[str, float]  # test_* figures (empty for a cv ensemble)


def member_location(source: str) -> str:
    """What `load_trained` reads for a member given as a path, a model URI or a bare MLflow run id.

    A run id is the model file its run wrote (card.json beside it), else the model it logged."""
    if not RUN_ID.match(source) or Path(source).exists():
        return source
    mlflow.set_tracking_uri(tracking.tracking_uri())
    try:
        tags = mlflow.get_run(source).data.tags
    except Exception as exc:  # noqa: BLE001 - an unknown run id is the user's value
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise UserError(f"member {source}: no such run in {tracking.tracking_uri()} ({first}); "
                        "give a run id of `covidtl train`, a runs:/ URI or a model.keras") from None
    path = tags.get("model_path")
    if path and Path(path).is_file():
        return path
    if tags.get("model_uri"):
        return tags["model_uri"]
    raise UserError(f"member {source}: its run names no model on this disk or in MLflow (tags "
                    "model_path, model_uri); give the model.keras or cell folder itself")


def check_members(members: list[Member]) -> str:
    """The members' one dataset; one line naming the first member that differs from the first."""
    if len(members) < 2:
        raise UserError(f"an ensemble needs at least two members, got {len(members)}")
    first = members[0]
    for m in members:
        if m.loaded.dataset is None:
            raise UserError(f"member {m.source}: cannot tell which dataset it was trained on (no "
                            "card.json beside it, no run params); give its cell folder or run id")
    for m in members[1:]:
        what = None
        if m.loaded.dataset != first.loaded.dataset:
            what = f"was trained on {m.loaded.dataset}, {first.source} on {first.loaded.dataset}"
        elif m.size != first.size:
            what = f"takes {m.size} px images, {first.source} {first.size} px"
        elif preprocessing_of(m) is not preprocessing_of(first):
            what = (f"preprocesses as {m.loaded.name}/{m.loaded.preprocessing}, {first.source} as "
                    f"{first.loaded.name}/{first.loaded.preprocessing}")
        if what:
            raise UserError(f"member {m.source} {what}; an ensemble averages models that see the same "
                            "input: give members of one dataset, input size and preprocessing")
    return first.loaded.dataset


def preprocessing_of(member: Member) -> Callable:
    return preprocess_for(get_spec(member.loaded.name), member.loaded.preprocessing)


def build_ensemble(
    cfg: Config,
    sources: list[str],
    out_dir: str | Path,
    *,
    cv_dir: str | Path | None = None,
    run_name: str | None = None,
    log_model: bool = True,
) -> EnsembleResult:
    """Load and check the members, average them in one model, pick its operating point, score its
    test split, write its cell folder and log one kind=ensemble MLflow run."""
    tracking.tracking_uri()  # a tracking server that does not answer: refused before loading
    sources = [*sources, *(cv_records.members(cv_dir) if cv_dir is not None else [])]
    members = [Member(s, load_trained(member_location(s), cfg)) for s in sources]
    dataset = check_members(members)
    first = members[0].loaded
    model = ensemble_of([m.loaded.model for m in members], name=f"{first.name}_ensemble")
    loaded = LoadedModel(model, first.name, "ensemble", first.preprocessing, None, None, dataset)

    if cv_dir is not None:
        operating, scored, example_rows = cv_operating_point(cfg, cv_dir), None, None
    else:
        table = tables.read_split(cfg, dataset)
        val_rows, test_rows = table[table["split"] == "val"], table[table["split"] == "test"]
        val = score_rows(cfg, loaded, val_rows) if len(val_rows) else None
        operating = choose_operating_point(val.scores if val else None, cfg.eval.operating_point)
        scored = score_rows(cfg, loaded, test_rows) if len(test_rows) else None
        example_rows = val_rows if len(val_rows) else test_rows
    log.info(f"ensemble of {len(members)} on {dataset}: threshold {operating['threshold']:.4g} "
             f"(chosen on: {operating['chosen_on']})")
    metrics = scored.scores.summary("test", cfg.eval, operating["threshold"]) if scored else {}

    cell = Cell(Path(out_dir))
    cell.begin()
    tracking.use_experiment(dataset)
    with mlflow.start_run(run_name=run_name or f"ensemble {first.name} x{len(members)} {dataset}") as run:
        run_id = run.info.run_id
        mlflow.set_tags({
            "model": first.name, "init": "ensemble", "dataset": dataset, "kind": "ensemble",
            "members": ",".join(m.loaded.source_run_id or m.source for m in members),
            "git_commit": tracking.git_commit(),
            "manifest_sha256": file_sha256(paths.manifest_path(cfg, dataset)),
            **tracking.experiment_tags(),
        })
        tracking.log_config(cfg)
        mlflow.log_params({"ensemble_members": len(members), "image_size": members[0].size,
                           "member_sources": " ".join(sources)[:6000]})
        mlflow.log_metric("operating_threshold", operating["threshold"])
        if scored is not None:
            tracking.log_metrics(metrics)
            tracking.log_evaluation(scored.scores.y_true, scored.scores.p_covid, prefix="test")
            tracking.log_curves(scored.scores, prefix="test")
        card = ensemble_card([m.about() for m in members], model=first.name, image_size=members[0].size,
                             preprocessing=first.preprocessing, dataset=dataset, operating=operating,
                             run_id=run_id)
        model_path = cell.save_model(model.save)
        root = tables.dataset_root(cfg, dataset)
        cell.write_results(
            metrics={"status": "ok", **metrics, "operating_threshold": operating["threshold"],
                     "run_id": run_id, "members": len(members)},
            history={},
            predictions=scored.predictions(root) if scored else None,
            config_yaml=tracking.config_yaml(cfg),
            card=card,
        )
        mlflow.log_dict(card, "card.json")
        model_uri = None
        if log_model:
            model_uri = tracking.log_keras_model(model, input_example(cfg, first, dataset, members[0].size,
                                                                      example_rows))
        mlflow.set_tags(tracking.model_tags(model_path, model_uri))
    return EnsembleResult(run_id, model_path, members, operating, metrics)


def input_example(cfg: Config, loaded: LoadedModel, dataset: str, size: int,
                  rows: pd.DataFrame | None = None) -> np.ndarray:
    """One image of `rows` (default: the dataset's manifest), as the model takes it: MLflow's input example."""
    rows = readable_rows(rows if rows is not None else tables.read_manifest(cfg, dataset)).head(1)
    return example_batch(make_dataset(rows, get_spec(loaded.name), scoring_config(cfg, loaded), size,
                                      training=False))


def cv_operating_point(cfg: Config, cv_dir: str | Path) -> dict[str, Any]:
    """The threshold the rule picks on the cv run's pooled out-of-fold predictions: each image
    scored by the one fold that never saw it (no ensemble output exists for unseen data)."""
    pooled = cv_records.read_pooled(cv_dir)
    chosen = choose_operating_point(cv_records.pooled_scores(pooled), cfg.eval.operating_point)
    if chosen["chosen_on"] == "validation":
        chosen["chosen_on"] = "the cv run's pooled out-of-fold predictions"
    return chosen
