"""Typed configuration: `params.yaml` loaded once into dataclasses, then overridden.

Every stage reads its own group (``cfg.split``, ``cfg.train`` ...). Unknown keys, wrong types and
impossible values stop with one line that names the key, so a typo in params.yaml or in a
``-S``/``-P`` override never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from covidtl.errors import UserError

PARAMS_FILE = "params.yaml"


class ConfigError(UserError):
    """A user-fixable problem in params.yaml or in an override."""


@dataclass
class SynthConfig:
    out: str = "data/synth"
    images_per_class: int = 60
    slices_per_patient: int = 10
    size: int = 128
    seed: int = 7


@dataclass
class DatasetConfig:
    path: str
    subdir: str | None = None
    series: bool = False


@dataclass
class DataConfig:
    workdir: str = "data"
    datasets: dict[str, DatasetConfig] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class IngestConfig:
    hash_size: int = 16
    near_duplicate_bits: int = 10
    series_break: float = 0.50
    thumbnail: int = 32


@dataclass
class SplitConfig:
    strategy: Literal["grouped", "random"] = "grouped"
    fractions: dict[str, float] = field(
        default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1}
    )
    seed: int = 42


@dataclass
class AugmentConfig:
    mode: Literal["online", "offline"] = "online"
    rotation: float = 25.0
    zoom: float = 0.2
    horizontal_flip: bool = True
    copies_per_image: int = 2
    max_images: int = 0
    seed: int = 1234


@dataclass
class StopConfig:
    val_accuracy: float = 0.89
    val_loss: float = 0.3


@dataclass
class TrainConfig:
    batch_size: int = 32
    max_epochs: int = 3
    seed: int = 42
    preprocessing: Literal["model", "rescale"] = "model"
    head_units: int = 1000
    dropout: float = 0.0
    finetune_lr_factor: float = 0.1
    stop: StopConfig = field(default_factory=StopConfig)
    image_size: dict[str, int] = field(default_factory=dict)
    max_train_samples: int = 0
    bn_recalibration_batches: int = 20
    run_eagerly: bool = False
    learning_rates: dict[str, float] = field(default_factory=dict)


@dataclass
class StudyConfig:
    models: list[str] = field(default_factory=list)
    inits: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)


@dataclass
class TuneConfig:
    trials: int = 20
    epochs: int = 5
    storage: str = "sqlite:///optuna.db"
    pruner: Literal["median", "halving", "none"] = "median"
    sampler_seed: int = 0
    decades: float = 1.0
    bounds: dict[str, list[float]] = field(default_factory=dict)
    search_batch_size: bool = False
    search_dropout: bool = False
    init: str = "random"
    metric: Literal["val_loss", "val_accuracy"] = "val_loss"
    min_epochs: int = 2
    prune_after: int = 3
    stale_after: int = 120
    out: str = "tuned"


@dataclass
class ReportConfig:
    out: str = "reports"


@dataclass
class Config:
    synth: SynthConfig = field(default_factory=SynthConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def dataset(self, name: str) -> DatasetConfig:
        """The named dataset, or one clear error listing the known names."""
        try:
            return self.data.datasets[name]
        except KeyError:
            known = ", ".join(sorted(self.data.datasets)) or "none"
            raise ConfigError(
                f"data.datasets.{name}: unknown dataset {name!r} (known: {known}); "
                f"add it under data.datasets in {PARAMS_FILE}"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, as logged to MLflow params."""
        return _flatten(self.to_dict())


# --------------------------------------------------------------------------- loading


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> Config:
    """Read params.yaml (or defaults when absent), apply dotted overrides, validate."""
    raw: dict[str, Any] = {}
    path = Path(path) if path is not None else Path(PARAMS_FILE)
    if path.exists():
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc}); fix the file") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of stage groups at the top level")
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """'train.batch_size=16' -> ('train.batch_size', 16); values parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.batch_size=16")
    return key.strip(), yaml.safe_load(value) if value.strip() else None


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part!r} is a value, not a group")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'params'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"{key}: unknown key; known keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            key = f"{where}.{f.name}" if where else f.name
            kwargs[f.name] = _coerce(hints[f.name], raw[f.name], key)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key)
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        ktype, vtype = args
        return {str(k): _coerce(vtype, v, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads 1e-3 (no dot) as a string; accept it as the number it means.
            try:
                return float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def validate(cfg: Config) -> None:
    """Impossible values, each with the key that holds them."""
    fr = cfg.split.fractions
    if set(fr) != {"train", "val", "test"}:
        raise ConfigError(f"split.fractions: needs exactly train, val and test, got {sorted(fr)}")
    for name, value in fr.items():
        if not 0 <= value <= 1:
            raise ConfigError(f"split.fractions.{name}: {value} is outside [0, 1]")
    if not math.isclose(sum(fr.values()), 1.0, abs_tol=1e-6):
        raise ConfigError(f"split.fractions: train + val + test = {sum(fr.values()):.4g}, must be 1")
    for name, rate in cfg.train.learning_rates.items():
        if not rate > 0:
            raise ConfigError(f"train.learning_rates.{name}: {rate} must be > 0")
    positive = {
        "train.batch_size": cfg.train.batch_size,
        "train.max_epochs": cfg.train.max_epochs,
        "train.head_units": cfg.train.head_units,
        "train.finetune_lr_factor": cfg.train.finetune_lr_factor,
        "synth.images_per_class": cfg.synth.images_per_class,
        "synth.slices_per_patient": cfg.synth.slices_per_patient,
        "synth.size": cfg.synth.size,
        "ingest.hash_size": cfg.ingest.hash_size,
        "ingest.thumbnail": cfg.ingest.thumbnail,
        "augment.copies_per_image": cfg.augment.copies_per_image,
        "tune.trials": cfg.tune.trials,
        "tune.epochs": cfg.tune.epochs,
        "tune.decades": cfg.tune.decades,
        "tune.min_epochs": cfg.tune.min_epochs,
        "tune.stale_after": cfg.tune.stale_after,
    }
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{key}: {value} must be > 0")
    non_negative = {
        "train.max_train_samples": cfg.train.max_train_samples,
        "train.bn_recalibration_batches": cfg.train.bn_recalibration_batches,
        "augment.max_images": cfg.augment.max_images,
        "augment.rotation": cfg.augment.rotation,
        "ingest.near_duplicate_bits": cfg.ingest.near_duplicate_bits,
        "tune.prune_after": cfg.tune.prune_after,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key}: {value} must be >= 0")
    if not 0 <= cfg.train.dropout < 1:
        raise ConfigError(f"train.dropout: {cfg.train.dropout} must be in [0, 1)")
    if not 0 <= cfg.augment.zoom < 1:
        raise ConfigError(f"augment.zoom: {cfg.augment.zoom} must be in [0, 1)")
    if not -1 <= cfg.ingest.series_break <= 1:
        raise ConfigError(f"ingest.series_break: {cfg.ingest.series_break} must be in [-1, 1]")
    for model, size in cfg.train.image_size.items():
        if size < 32:
            raise ConfigError(f"train.image_size.{model}: {size} is below 32 px")
    for model, bounds in cfg.tune.bounds.items():
        if len(bounds) != 2:
            raise ConfigError(f"tune.bounds.{model}: expected [low, high], got {bounds}")
        low, high = bounds
        if low <= 0 or high <= 0:
            raise ConfigError(f"tune.bounds.{model}: learning-rate bounds must be > 0, got {bounds}")
        if low >= high:
            raise ConfigError(f"tune.bounds.{model}: lower bound {low} is not below upper {high}")
    for name, cls in cfg.data.labels.items():
        if cls not in ("covid", "non_covid"):
            raise ConfigError(f"data.labels.{name}: {cls!r} must be covid or non_covid")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        full = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            out.update(_flatten(value, full))
        else:
            out[full] = value
    return out
