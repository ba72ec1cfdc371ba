"""Typed configuration: `params.yaml` loaded once into dataclasses, then overridden.

params.yaml is the one source of defaults: the dataclasses below declare types, not values, so a
key missing from the file is an error, never a silent fallback to a second set of defaults. Every
stage reads its own group (``cfg.split``, ``cfg.train`` ...). Unknown or missing keys, wrong types
and impossible values stop with one line that names the key.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from covidtl.cells import is_init
from covidtl.errors import UserError
from covidtl.catalog import MODEL_NAMES

PARAMS_FILE = "params.yaml"


class ConfigError(UserError):
    """A user-fixable problem in params.yaml or in an override."""


@dataclass
class SynthConfig:
    out: str
    images_per_class: int
    slices_per_patient: int
    size: int
    seed: int
    site2_images_per_class: int


@dataclass
class DatasetConfig:
    path: str
    subdir: str | None = None
    series: bool = False
    # Slices share a fixed frame (full-field CT): compare them without it (see data.groups).
    shared_frame: bool = False
    # A known limit of the data that every model card trained on it repeats (e.g. a shortcut).
    caution: str | None = None


@dataclass
class ExternalSet:
    """One external test folder of a dataset: scored, never trained or selected on."""

    name: str
    path: str
    series: bool = False
    shared_frame: bool = False  # as DatasetConfig.shared_frame


@dataclass
class DataConfig:
    workdir: str
    datasets: dict[str, DatasetConfig]
    labels: dict[str, str]


@dataclass
class CacheConfig:
    """The caches under <data.workdir>/cache (decoded images, backbone features): one budget."""
    max_gb: float  # least recently used caches are removed past this total; 0 = no limit


@dataclass
class IngestConfig:
    hash_size: int
    near_duplicate_bits: int
    series_break: float
    thumbnail: int
    # Pillow's decompression-bomb guard in every reader (covidtl.data.images.set_pixel_limit).
    max_megapixels: float


@dataclass
class SplitConfig:
    strategy: Literal["grouped", "random"]
    fractions: dict[str, float]
    seed: int


@dataclass
class IntensityConfig:
    """Photometric augmentation beside the paper's geometric one; 0 switches each off."""
    brightness: float  # added offset, uniform in +/- this fraction of the [0, 1] range
    contrast: float  # contrast factor uniform in [1 - c, 1 + c] about the image mean
    gamma: float  # gamma uniform in [1 - g, 1 + g] on [0, 1] values
    noise: float  # Gaussian noise, standard deviation as a fraction of the [0, 1] range
    blur: float  # probability of a 3x3 Gaussian blur


@dataclass
class AugmentConfig:
    mode: Literal["online", "offline"]
    rotation: float
    zoom: float
    horizontal_flip: bool
    copies_per_image: int
    max_images: int
    seed: int
    intensity: IntensityConfig


@dataclass
class StopConfig:
    rule: Literal["paper", "patience", "none"]
    val_accuracy: float
    val_loss: float
    patience: int


@dataclass
class LinearProbeConfig:
    """`train.head: linear_probe`: L2 logistic regression on pooled frozen features."""
    c_grid: list[float]  # inverse regularisation strengths tried
    folds: int  # patient-grouped folds inside the training rows that choose C


@dataclass
class TrainConfig:
    # The recipe's model and init: what --model / --init auto (the CLI's default) resolve to.
    model: str
    init: str
    batch_size: int
    max_epochs: int
    seed: int
    preprocessing: Literal["model", "rescale"]
    head: Literal["paper", "gap", "linear_probe"]
    head_units: int
    dropout: float
    finetune_lr_factor: float
    stop: StopConfig
    select: Literal["last", "val_auc", "val_loss"]
    image_size: dict[str, int]
    max_train_samples: int
    bn_recalibration_batches: int
    # auto: eager for a training split of a few batches, graphs above (covidtl.distribute.eager_for)
    run_eagerly: Literal["auto", True, False]
    learning_rates: dict[str, float]
    # Where and how precisely it runs (covidtl.distribute; docs/gpus.md).
    precision: Literal["auto", "float32", "mixed_float16", "mixed_bfloat16"]
    strategy: Literal["auto", "default", "mirrored", "multiworker"]
    lr_scaling: Literal["none", "linear", "sqrt"]
    # The stronger recipe's levers (docs/training.md "Input levers that travel with the model" and
    # "The custom CNN's stronger recipe"); the defaults are the paper's.
    crop: Literal["none", "body"]  # body: crop to the body's bounding box inside the model
    normalize: Literal["none", "standardize", "equalize"]  # per image, inside the model
    label_smoothing: float
    weight_decay: float  # > 0: AdamW with this decoupled decay instead of Adam
    schedule: Literal["constant", "cosine"]  # cosine: decays to 0 at max_epochs
    warmup_epochs: int  # linear warm-up from 0 over this many epochs (0: none)
    tta: Literal["none", "flip", "flip_zoom"]  # test-time augmentation the saved model applies itself
    # Frozen parts computed once per image (covidtl.features, covidtl.frozen).
    feature_cache: Literal["auto", "none"]
    feature_copies: int  # augmented copies stored per training image (0: the images as decoded)
    unfreeze_after: str  # none | top_block | a layer of the base: the layers after it train
    linear_probe: LinearProbeConfig


@dataclass
class PretrainConfig:
    """`covidtl pretrain`: a self-supervised (SimCLR) backbone from the training splits' images."""
    epochs: int
    batch_size: int  # images per step; each gives two views, so 2 x this many in the loss
    temperature: float  # NT-Xent's softmax temperature
    learning_rate: float  # the optimiser's (Adam, or AdamW when train.weight_decay > 0)
    datasets: list[str]  # whose training split (never val, test or external) it learns from
    out: str  # folder: <out>/<model>.weights.h5 and <model>.json
    seed: int


@dataclass
class CVConfig:
    folds: int
    seed: int
    out: str


@dataclass
class ProfileCells:
    """The cells trained with a named profile beside the paper's (on every study dataset)."""
    models: list[str]
    inits: list[str]


@dataclass
class StudyConfig:
    models: list[str]
    inits: list[str]
    datasets: list[str]
    profiles: dict[str, ProfileCells]

    def cells(self) -> list[tuple[str, str, str]]:
        """(profile, model, init) of every cell per dataset: the paper's matrix, then each profile's."""
        paper = [("paper", m, i) for m in self.models for i in self.inits]
        return paper + [(p, m, i) for p, c in self.profiles.items() for m in c.models for i in c.inits]


@dataclass
class TuneConfig:
    trials: int
    epochs: int
    storage: str
    pruner: Literal["median", "halving", "none"]
    sampler_seed: int
    decades: float
    bounds: dict[str, list[float]]
    search_batch_size: bool
    search_dropout: bool
    init: str
    metric: Literal["val_loss", "val_accuracy"]
    min_epochs: int
    prune_after: int
    stale_after: int
    out: str


@dataclass
class ReportConfig:
    out: str


@dataclass
class EvalConfig:
    bootstrap: int
    confidence: float
    seed: int
    operating_point: str


@dataclass
class Config:
    synth: SynthConfig
    data: DataConfig
    cache: CacheConfig
    ingest: IngestConfig
    split: SplitConfig
    augment: AugmentConfig
    train: TrainConfig
    study: StudyConfig
    tune: TuneConfig
    pretrain: PretrainConfig
    cv: CVConfig
    external: dict[str, list[ExternalSet]]
    report: ReportConfig
    eval: EvalConfig
    # A named set of overrides from `profiles` (params.yaml < profile < -S/CLI options).
    profile: str
    profiles: dict[str, dict[str, Any]]

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

    def with_recipe(self, model: str, init: str | None = None) -> Config:
        """This config with train.model (and train.init) set to what runs: what config.yaml and
        MLflow then record, whatever --model / --init said."""
        recipe = {"model": model} if init is None else {"model": model, "init": init}
        return dataclasses.replace(self, train=dataclasses.replace(self.train, **recipe))

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, as logged to MLflow params (the chosen profile's values are in
        the fields it set; the other profiles are not this run's parameters)."""
        d = self.to_dict()
        d.pop("profiles")
        return _flatten(d)


# --------------------------------------------------------------------------- loading


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> Config:
    """Read a complete params file, apply dotted overrides, validate."""
    path = Path(path) if path is not None else Path(PARAMS_FILE)
    if not path.is_file():
        raise ConfigError(
            f"{path}: no such params file; run from the project root (where {PARAMS_FILE} is) "
            f"or pass --params with a complete copy of {PARAMS_FILE}"
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix the file") from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: expected the stage groups of {PARAMS_FILE} (synth, data, train ...) at the "
            "top level; copy params.yaml and edit it"
        )
    overrides = dict(overrides or {})
    if "profile" in overrides:
        raw["profile"] = overrides.pop("profile")
    for key in [k for k in overrides if k.split(".")[0] == "profiles"]:  # a profile edited on the
        _set_dotted(raw, key, overrides.pop(key))                         # command line applies too
    _apply_profile(raw, path)
    for key, value in overrides.items():
        _set_dotted(raw, key, value)
    cfg = _build(Config, raw, "", source=path)
    validate(cfg)
    return cfg


def _apply_profile(raw: dict[str, Any], path: Path) -> None:
    """Set the dotted keys of `profiles[profile]` in `raw` (the paper's profile sets none)."""
    name = raw.get("profile")
    profiles = raw.get("profiles") or {}
    if not isinstance(profiles, dict):
        raise ConfigError(f"profiles: expected a mapping of profile name -> overrides in {path}")
    for known_name, overrides in profiles.items():  # every profile, not only the chosen one
        if not isinstance(overrides or {}, dict):
            raise ConfigError(f"profiles.{known_name}: expected a mapping of dotted keys -> values")
        for key in overrides or {}:
            if str(key).split(".")[0] in ("profile", "profiles"):
                raise ConfigError(f"profiles.{known_name}.{key}: a profile cannot choose a profile")
    if name is None:
        return
    if name not in profiles:
        known = ", ".join(sorted(map(str, profiles))) or "none"
        raise ConfigError(f"profile: {name!r} is not defined under profiles in {path} (known: {known})")
    for key, value in (profiles[name] or {}).items():
        _set_dotted(raw, str(key), value)


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


def _build(cls: type, raw: Any, where: str, source: Path = Path(PARAMS_FILE)) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'params'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"{key}: unknown key; known keys here: {', '.join(sorted(names))}")
    required = [
        f.name for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in raw]
    if missing:
        key = f"{where}.{missing[0]}" if where else missing[0]
        raise ConfigError(
            f"{key}: missing from {source}; every key has its one default in {PARAMS_FILE}: "
            "copy it from there"
        )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            key = f"{where}.{f.name}" if where else f.name
            kwargs[f.name] = _coerce(hints[f.name], raw[f.name], key, source)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str, source: Path = Path(PARAMS_FILE)) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key, source)
    if origin is Literal:
        # By type too: 1 == True in Python, but 1 is not a choice of a true/false/auto key.
        if not any(type(value) is type(a) and value == a for a in args):
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(_yaml_word, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key, source)
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        ktype, vtype = args
        return {str(k): _coerce(vtype, v, f"{key}.{k}", source) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value)]
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


def _yaml_word(value: Any) -> str:
    """A choice as params.yaml spells it (true, not True)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


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
        "synth.site2_images_per_class": cfg.synth.site2_images_per_class,
        "ingest.hash_size": cfg.ingest.hash_size,
        "ingest.thumbnail": cfg.ingest.thumbnail,
        "ingest.max_megapixels": cfg.ingest.max_megapixels,
        "augment.copies_per_image": cfg.augment.copies_per_image,
        "tune.trials": cfg.tune.trials,
        "tune.epochs": cfg.tune.epochs,
        "tune.decades": cfg.tune.decades,
        "tune.min_epochs": cfg.tune.min_epochs,
        "tune.stale_after": cfg.tune.stale_after,
        "train.stop.patience": cfg.train.stop.patience,
        "pretrain.epochs": cfg.pretrain.epochs,
        "pretrain.temperature": cfg.pretrain.temperature,
        "pretrain.learning_rate": cfg.pretrain.learning_rate,
    }
    unit_interval = {
        "train.label_smoothing": cfg.train.label_smoothing,
        "augment.intensity.brightness": cfg.augment.intensity.brightness,
        "augment.intensity.contrast": cfg.augment.intensity.contrast,
        "augment.intensity.gamma": cfg.augment.intensity.gamma,
        "augment.intensity.noise": cfg.augment.intensity.noise,
        "augment.intensity.blur": cfg.augment.intensity.blur,
    }
    for key, value in unit_interval.items():
        if not 0 <= value < 1 and not (key.endswith("blur") and value == 1):
            raise ConfigError(f"{key}: {value} must be in [0, 1)" + (" or 1" if key.endswith("blur") else ""))
    if cfg.train.weight_decay < 0 or cfg.train.warmup_epochs < 0:
        raise ConfigError("train.weight_decay and train.warmup_epochs must be >= 0, got "
                          f"{cfg.train.weight_decay} and {cfg.train.warmup_epochs}")

    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{key}: {value} must be > 0")
    if cfg.train.stop.rule == "patience" and cfg.train.select == "last":
        raise ConfigError("train.stop.rule: patience waits for `train.select` to improve, but "
                          "train.select is last; set train.select to val_auc or val_loss")
    if cfg.train.feature_copies < 0:
        raise ConfigError(f"train.feature_copies: {cfg.train.feature_copies} must be >= 0 "
                          "(0 trains on the images as decoded)")
    probe = cfg.train.linear_probe
    if not probe.c_grid or any(not c > 0 for c in probe.c_grid):
        raise ConfigError(f"train.linear_probe.c_grid: {probe.c_grid} must be a non-empty list of numbers > 0")
    if probe.folds < 2:
        raise ConfigError(f"train.linear_probe.folds: {probe.folds} must be at least 2")
    if cfg.pretrain.batch_size < 2:
        raise ConfigError(f"pretrain.batch_size: {cfg.pretrain.batch_size} must be at least 2 "
                          "(each image's other view is told apart from the rest of its batch)")
    if not cfg.cv.folds >= 2:
        raise ConfigError(f"cv.folds: {cfg.cv.folds} must be at least 2")
    non_negative = {
        "train.max_train_samples": cfg.train.max_train_samples,
        "train.bn_recalibration_batches": cfg.train.bn_recalibration_batches,
        "augment.max_images": cfg.augment.max_images,
        "augment.rotation": cfg.augment.rotation,
        "ingest.near_duplicate_bits": cfg.ingest.near_duplicate_bits,
        "tune.prune_after": cfg.tune.prune_after,
        "cache.max_gb": cfg.cache.max_gb,
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
    if cfg.eval.bootstrap != 0 and cfg.eval.bootstrap < 100:
        # The 2.5% tail of fewer resamples is two or three values: an interval of noise.
        raise ConfigError(f"eval.bootstrap: {cfg.eval.bootstrap} must be 0 (no intervals) or >= 100")
    if not 0 < cfg.eval.confidence < 1:
        raise ConfigError(f"eval.confidence: {cfg.eval.confidence} must be in (0, 1), e.g. 0.95")
    from covidtl.stats import parse_rule  # here, not above: stats imports paths, which imports this module

    try:
        parse_rule(cfg.eval.operating_point, where="eval.operating_point")
    except UserError as exc:
        raise ConfigError(str(exc)) from None
    for name, cls in cfg.data.labels.items():
        if cls not in ("covid", "non_covid"):
            raise ConfigError(f"data.labels.{name}: {cls!r} must be covid or non_covid")
    _validate_external(cfg)
    _validate_recipe(cfg)
    for name in cfg.study.profiles:
        if name == "paper" or name not in cfg.profiles:
            raise ConfigError(f"study.profiles.{name}: not a profile of `profiles` other than paper "
                              f"(known: {', '.join(sorted(set(cfg.profiles) - {'paper'})) or 'none'})")
    _validate_profile_cells(cfg)


def _validate_profile_cells(cfg: Config) -> None:
    """A profile that names its model or init is what the study trains of it: checked, not hand-kept."""
    for name, cells in cfg.study.profiles.items():
        recipe = cfg.profiles.get(name) or {}
        for key, field in (("train.model", "models"), ("train.init", "inits")):
            listed = getattr(cells, field)
            # []: the documented way to run no cells of a profile (dvc.yaml, pretrain_best).
            if key in recipe and listed not in ([], [recipe[key]]):
                raise ConfigError(
                    f"study.profiles.{name}.{field}: {listed} disagrees with profiles.{name}.{key} "
                    f"({recipe[key]!r}); set study.profiles.{name}.{field} to [{recipe[key]}] (or [] "
                    f"for no cells), or change profiles.{name}.{key}")


def _validate_recipe(cfg: Config) -> None:
    """train.model: a model of the registry; train.init: an init `--init` takes."""
    if cfg.train.model not in MODEL_NAMES:  # the registry's names, without importing TensorFlow
        raise ConfigError(f"train.model: {cfg.train.model!r} is not a model; choose one of "
                          f"{', '.join(MODEL_NAMES)}")
    if not is_init(cfg.train.init):
        raise ConfigError(f"train.init: {cfg.train.init!r} is not an init; give random, imagenet, finetune, "
                          "pretrained, a weights file (.weights.h5 or .h5) or finetune:FILE")


# An external set's name is a folder name (external/<dataset>/<cell>/<name>/) and an MLflow tag.
EXTERNAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _validate_external(cfg: Config) -> None:
    seen: dict[str, str] = {}
    for dataset, sets in cfg.external.items():
        if dataset not in cfg.data.datasets:
            known = ", ".join(sorted(cfg.data.datasets)) or "none"
            raise ConfigError(f"external.{dataset}: no dataset {dataset!r} in data.datasets (known: {known})")
        for i, entry in enumerate(sets):
            key = f"external.{dataset}[{i}].name"
            if not EXTERNAL_NAME.fullmatch(entry.name):
                raise ConfigError(
                    f"{key}: {entry.name!r} is not a folder-safe name; use letters, digits, '.', '_' "
                    "and '-', starting with a letter or digit (e.g. ct-external)"
                )
            if entry.name in seen:
                raise ConfigError(f"{key}: {entry.name!r} is already the name of {seen[entry.name]}; "
                                  "give each external set its own name")
            seen[entry.name] = f"external.{dataset}[{i}]"
            if not entry.path:
                raise ConfigError(f"external.{dataset}[{i}].path: empty; give the folder of class folders")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        full = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            out.update(_flatten(value, full))
        else:
            out[full] = value
    return out
