"""What one run is, fixed before it starts (`plan_run`), and whether a checkpoint continues it.

The learning rate is settled here once (`settle_learning_rate`), with where it came from: every
record of the run (config.yaml, MLflow, the card) and the optimiser read it from the plan.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from covidtl import distribute, optim, paths, tracking
from covidtl.cells import Cell, cell_name
from covidtl.config import Config
from covidtl.data import tables
from covidtl.errors import UserError
from covidtl.files import file_sha256
from covidtl.inits import Init
from covidtl.models.registry import ModelSpec, get_spec, learning_rate_for, trainable_image_size
from covidtl.pretrain import resolve_init


def rows_of(table: pd.DataFrame, split: str) -> pd.DataFrame:
    return table if split == "all" else table[table["split"] == split]


@dataclass(frozen=True)
class LearningRate:
    """The run's rate: `base` the model's (recorded as train.learning_rates.<model>), `rate` what
    the optimiser runs, `source` where the base came from (params | --lr | a tuned-rate file)."""

    base: float
    rate: float
    source: str


def settle_learning_rate(
    cfg: Config, spec: ModelSpec, init: Init, on: distribute.Distribution,
    lr: float | None = None, lr_source: str | None = None,
) -> tuple[Config, LearningRate]:
    """The base rate (`lr` if given, else params'), x train.finetune_lr_factor when fine-tuning
    (pre-trained weights move at the lower rate), x the replicas' train.lr_scaling; and the config
    with the base rate in it, as config.yaml and MLflow then record it."""
    if lr is not None:
        if not lr > 0:
            raise UserError(f"--lr {lr:g}: the learning rate must be > 0; give e.g. 1e-4, or auto")
        rates = {**cfg.train.learning_rates, spec.lr_key: float(lr)}
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, learning_rates=rates))
    base = learning_rate_for(spec, cfg.train)
    rate = base * cfg.train.finetune_lr_factor if init.finetune else base
    source = lr_source or ("params" if lr is None else "--lr")
    return cfg, LearningRate(base=base, rate=on.learning_rate(rate), source=source)


@dataclass
class Plan:
    """What one run is, fixed before it starts; every record of the run is written from this."""

    cfg: Config  # train.learning_rates.<model> holds the base rate that ran (--lr included)
    spec: ModelSpec
    model: str
    start: Init  # --init as given
    dataset: str
    image_size: int
    lr: LearningRate
    table: pd.DataFrame
    train_rows: pd.DataFrame
    cell: Cell
    split_file: Path  # where `table` came from: the dataset's split.csv, or a cross-validation fold's
    build_init: Init  # what the network is built from: `start`, with `pretrained` as its file's path
    on: distribute.Distribution  # where it runs: strategy, replicas, precision
    run_eagerly: bool  # train.run_eagerly settled for the training batches an epoch (auto: a few)

    @property
    def init(self) -> str:
        """The init as given: what the card and MLflow's `init` param record."""
        return self.start.text

    @property
    def learning_rate(self) -> float:
        """The optimiser's rate (Adam; AdamW when train.weight_decay > 0)."""
        return self.lr.rate

    @property
    def lr_source(self) -> str:
        return self.lr.source

    @property
    def run_on(self) -> dict[str, object]:
        """Where it ran, for MLflow params and the card: precision, strategy, replicas, lr_scaling,
        global_batch_size."""
        return {**self.on.record(), "global_batch_size": self.on.global_batch(self.cfg.train.batch_size)}

    @property
    def name(self) -> str:
        return cell_name(self.model, self.start, self.dataset, self.cfg.profile)

    def rows(self, split: str) -> pd.DataFrame:
        return self.train_rows if split == "train" else rows_of(self.table, split)


def plan_run(
    cfg: Config,
    model: str,
    init: Init | str,
    dataset: str,
    *,
    lr: float | None = None,
    lr_source: str | None = None,
    out_dir: str | Path | None = None,
    split_file: str | Path | None = None,
) -> Plan:
    """Resolve where the run trains, its data, input size and learning rate; refuse what cannot train."""
    on = distribute.setup(cfg.train)  # before any TensorFlow op: TF_CONFIG's workers connect here
    spec = get_spec(model)
    start = Init.of(init)
    cfg, rate = settle_learning_rate(cfg.with_recipe(model, start.text), spec, start, on, lr, lr_source)
    split_file = Path(split_file) if split_file is not None else paths.split_path(cfg, dataset)
    table = tables.read_split(cfg, dataset, split_file)
    train_rows = rows_of(table, "train")
    if cfg.train.max_train_samples and len(train_rows) > cfg.train.max_train_samples:
        train_rows = train_rows.sample(cfg.train.max_train_samples, random_state=cfg.train.seed)
    for name, rows in (("train", train_rows), ("val", rows_of(table, "val"))):
        if rows.empty:
            raise UserError(f"{split_file}: the {name} split is empty; "
                            "re-split with more images or other split.fractions")
    cell = Cell(Path(out_dir)) if out_dir is not None else Cell.of(model, start, dataset, profile=cfg.profile)
    batches = optim.steps_per_epoch(len(train_rows), on.global_batch(cfg.train.batch_size))
    return Plan(
        cfg=cfg, spec=spec, model=model, start=start, dataset=dataset,
        image_size=trainable_image_size(spec, cfg.train), lr=rate,
        table=table, train_rows=train_rows, cell=cell, split_file=split_file,
        build_init=resolve_init(cfg, model, start), on=on,
        run_eagerly=on.run_eagerly(cfg.train.run_eagerly, batches),
    )


# --------------------------------------------------------------------------- resume


@dataclass
class Resume:
    """A checkpoint of this same run: where to continue from."""

    run_id: str
    epochs_done: int
    history: dict[str, list[float]]
    stopped_epoch: int | None
    seconds: float
    model_file: Path | None  # None: killed in the first epoch, the run continues from scratch
    stopped_by: str | None = None  # the rule that ended training, if one did (paper_rule | patience)
    best_epoch: int | None = None  # train.select's best epoch so far, its weights in best_file
    best_file: str | None = None


def run_digest(plan: Plan) -> str:
    """What must not change for a checkpoint to continue: the resolved config, the cell and its data."""
    cfg = plan.cfg
    parts = [
        tracking.settings_yaml(cfg), plan.model, plan.init, plan.dataset, repr(plan.learning_rate),
        file_sha256(plan.split_file),
        file_sha256(paths.manifest_path(cfg, plan.dataset)),
        *sorted(map(str, plan.train_rows["path"])),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def checkpoint_to_resume(plan: Plan, restart: bool = False) -> Resume | None:
    """The cell's checkpoint if it is of this same run; `restart` drops it; other settings refuse."""
    if restart:
        plan.cell.remove_checkpoint()
        return None
    found = plan.cell.read_checkpoint()
    if found is None:
        return None
    state, model_file = found
    if state.get("digest") != run_digest(plan):
        raise UserError(
            f"{plan.cell.checkpoint_dir}: the settings or data changed since this checkpoint (epoch "
            f"{state.get('epochs_done')} of run {state.get('run_id')}); delete it or pass --restart")
    return Resume(run_id=state["run_id"], epochs_done=int(state["epochs_done"]),
                  history={k: [float(v) for v in vals] for k, vals in state["history"].items()},
                  stopped_epoch=state.get("stopped_epoch"),
                  stopped_by=state.get("stopped_by") or ("paper_rule" if state.get("stopped_epoch") else None),
                  seconds=float(state.get("seconds", 0.0)), model_file=model_file,
                  best_epoch=state.get("best_epoch"), best_file=state.get("best_file"))
