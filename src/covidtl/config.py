"""Typed configuration: `params.yaml` loaded once into dataclasses, then overridden.

params.yaml is the one source of defaults: the dataclasses below declare types, not values, so a
key missing from the file is an error, never a silent fallback to a second set of defaults. Every
stage reads its own group (``cfg.split``, ``cfg.train`` ...). pydantic checks the loaded file
against these types (`load_config`): unknown or missing keys, wrong types and impossible values
stop with one line that names the key.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, TypeVar

import pydantic
import yaml
from pydantic import ConfigDict, StrictBool, StrictInt, StrictStr, TypeAdapter, ValidationError, with_config
from pydantic_core import ErrorDetails, PydanticCustomError

from covidtl.inits import is_init
from covidtl.errors import UserError
from covidtl.catalog import MODEL_NAMES

PARAMS_FILE = "params.yaml"


class ConfigError(UserError):
    """A user-fixable problem in params.yaml or in an override."""


# --------------------------------------------------------------------------- value types
# get_type_hints() drops the Annotated checks: code that reads these types sees int, float, dict ...

T = TypeVar("T")


@typing.dataclass_transform(frozen_default=True)
def group(cls: type[T]) -> type[T]:
    """A group of params.yaml: a frozen dataclass whose unknown keys pydantic refuses."""
    return with_config(ConfigDict(extra="forbid"))(dataclass(frozen=True)(cls))


def _by_name(value: Any) -> Any:
    """An empty YAML key is no entries; a numeric YAML key (a folder named 0) is a name like any other."""
    if value is None:
        return {}
    return {str(k): v for k, v in value.items()} if isinstance(value, dict) else value


ByName = Annotated[dict[str, T], pydantic.BeforeValidator(_by_name)]


def _check(holds: Callable[[Any], Any], message: str) -> pydantic.AfterValidator:
    """Refuses a value for which `holds` is false, with `message` (formatted with the value)."""

    def check(value: Any) -> Any:
        if not holds(value):
            raise ValueError(message.format(value=value))
        return value

    return pydantic.AfterValidator(check)


PositiveInt = Annotated[StrictInt, _check(lambda v: v > 0, "{value} must be > 0")]
PositiveFloat = Annotated[float, _check(lambda v: v > 0, "{value} must be > 0")]
NonNegativeInt = Annotated[StrictInt, _check(lambda v: v >= 0, "{value} must be >= 0")]
NonNegativeFloat = Annotated[float, _check(lambda v: v >= 0, "{value} must be >= 0")]
Fraction = Annotated[float, _check(lambda v: 0 <= v < 1, "{value} must be in [0, 1)")]
Probability = Annotated[float, _check(lambda v: 0 <= v <= 1, "{value} must be in [0, 1]")]
Folds = Annotated[StrictInt, _check(lambda v: v >= 2, "{value} must be at least 2")]


def _not_a_number(value: Any) -> Any:
    """1 == True in Python, but 1 is not a choice of a true/false/auto key."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        raise PydanticCustomError("literal_error", "not a choice")
    return value


# An external set's name is a folder name (external/<dataset>/<cell>/<name>/) and an MLflow tag.
EXTERNAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
FolderName = Annotated[StrictStr, _check(
    EXTERNAL_NAME.fullmatch, "{value!r} is not a folder-safe name; use letters, digits, '.', '_' and '-', "
    "starting with a letter or digit (e.g. ct-external)")]


def _fractions(fractions: dict[str, float]) -> dict[str, float]:
    if set(fractions) != {"train", "val", "test"}:
        raise ValueError(f"needs exactly train, val and test, got {sorted(fractions)}")
    if not math.isclose(sum(fractions.values()), 1.0, abs_tol=1e-6):
        raise ValueError(f"train + val + test = {sum(fractions.values()):.4g}, must be 1")
    return fractions


def _bounds(bounds: list[float]) -> list[float]:
    if len(bounds) != 2:
        raise ValueError(f"expected [low, high], got {bounds}")
    low, high = bounds
    if low <= 0 or high <= 0:
        raise ValueError(f"learning-rate bounds must be > 0, got {bounds}")
    if low >= high:
        raise ValueError(f"lower bound {low} is not below upper {high}")
    return bounds


def parse_rule(text: str, where: str = "operating point") -> tuple[str, float | None]:
    """'youden' -> ('youden', None); 'sensitivity:0.95' -> ('sensitivity', 0.95); else one ConfigError
    line (a rule is a value of eval.operating_point)."""
    name, sep, value = str(text).strip().lower().partition(":")
    if name == "youden" and not sep:
        return ("youden", None)
    if name in ("sensitivity", "specificity") and sep:
        try:
            target = float(value)
        except ValueError:
            target = math.nan
        if 0 < target <= 1:
            return (name, target)
    raise ConfigError(
        f"{where}: {text!r} is not a rule; use youden, sensitivity:X or specificity:X "
        "with 0 < X <= 1 (e.g. sensitivity:0.95)"
    )


def _operating_rule(rule: str) -> str:
    parse_rule(rule, where="eval.operating_point")
    return rule


# --------------------------------------------------------------------------- groups


@group
class SynthConfig:
    out: StrictStr
    images_per_class: PositiveInt
    slices_per_patient: PositiveInt
    size: PositiveInt
    seed: StrictInt
    site2_images_per_class: PositiveInt


@group
class DatasetConfig:
    path: StrictStr
    subdir: StrictStr | None = None
    series: StrictBool = False
    # Slices share a fixed frame (full-field CT): compare them without it (see data.groups).
    shared_frame: StrictBool = False
    # A known limit of the data that every model card trained on it repeats (e.g. a shortcut).
    caution: StrictStr | None = None


@group
class ExternalSet:
    """One external test folder of a dataset: scored, never trained or selected on."""

    name: FolderName
    path: Annotated[StrictStr, _check(bool, "empty; give the folder of class folders")]
    series: StrictBool = False
    shared_frame: StrictBool = False  # as DatasetConfig.shared_frame


@group
class DataConfig:
    workdir: StrictStr
    datasets: ByName[DatasetConfig]
    labels: ByName[Literal["covid", "non_covid"]]


@group
class CacheConfig:
    """The caches under <data.workdir>/cache (decoded images, backbone features): one budget."""
    max_gb: NonNegativeFloat  # least recently used caches are removed past this total; 0 = no limit


@group
class IngestConfig:
    hash_size: PositiveInt
    near_duplicate_bits: NonNegativeInt
    series_break: Annotated[float, _check(lambda v: -1 <= v <= 1, "{value} must be in [-1, 1]")]
    thumbnail: PositiveInt
    # Pillow's decompression-bomb guard in every reader (covidtl.data.images.set_pixel_limit).
    max_megapixels: PositiveFloat


@group
class SplitConfig:
    strategy: Literal["grouped", "random"]
    fractions: Annotated[ByName[Probability], pydantic.AfterValidator(_fractions)]
    seed: StrictInt


@group
class IntensityConfig:
    """Photometric augmentation beside the paper's geometric one; 0 switches each off."""
    brightness: Fraction  # added offset, uniform in +/- this fraction of the [0, 1] range
    contrast: Fraction  # contrast factor uniform in [1 - c, 1 + c] about the image mean
    gamma: Fraction  # gamma uniform in [1 - g, 1 + g] on [0, 1] values
    noise: Fraction  # Gaussian noise, standard deviation as a fraction of the [0, 1] range
    blur: Probability  # probability of a 3x3 Gaussian blur


@group
class AugmentConfig:
    mode: Literal["online", "offline"]
    rotation: NonNegativeFloat
    zoom: Fraction
    horizontal_flip: StrictBool
    copies_per_image: PositiveInt
    max_images: NonNegativeInt
    seed: StrictInt
    intensity: IntensityConfig


@group
class StopConfig:
    rule: Literal["paper", "patience", "none"]
    val_accuracy: float
    val_loss: float
    patience: PositiveInt


@group
class LinearProbeConfig:
    """`train.head: linear_probe`: L2 logistic regression on pooled frozen features."""
    # inverse regularisation strengths tried
    c_grid: Annotated[list[PositiveFloat], _check(len, "{value} must be a non-empty list of numbers > 0")]
    folds: Folds  # patient-grouped folds inside the training rows that choose C


@group
class TrainConfig:
    # The recipe's model and init: what --model / --init auto (the CLI's default) resolve to.
    model: StrictStr
    init: StrictStr
    batch_size: PositiveInt
    max_epochs: PositiveInt
    seed: StrictInt
    preprocessing: Literal["model", "rescale"]
    head: Literal["paper", "gap", "linear_probe"]
    head_units: PositiveInt
    dropout: Fraction
    finetune_lr_factor: PositiveFloat
    stop: StopConfig
    select: Literal["last", "val_auc", "val_loss"]
    image_size: ByName[Annotated[StrictInt, _check(lambda v: v >= 32, "{value} is below 32 px")]]
    max_train_samples: NonNegativeInt
    bn_recalibration_batches: NonNegativeInt
    # auto: eager for a training split of a few batches, graphs above (covidtl.distribute.eager_for)
    run_eagerly: Annotated[Literal["auto", True, False], pydantic.BeforeValidator(_not_a_number)]
    learning_rates: ByName[PositiveFloat]
    # Where and how precisely it runs (covidtl.distribute; docs/gpus.md).
    precision: Literal["auto", "float32", "mixed_float16", "mixed_bfloat16"]
    strategy: Literal["auto", "default", "mirrored", "multiworker"]
    lr_scaling: Literal["none", "linear", "sqrt"]
    # The stronger recipe's levers (docs/training.md "Input levers that travel with the model" and
    # "The custom CNN's stronger recipe"); the defaults are the paper's.
    crop: Literal["none", "body"]  # body: crop to the body's bounding box inside the model
    normalize: Literal["none", "standardize", "equalize"]  # per image, inside the model
    label_smoothing: Fraction
    weight_decay: NonNegativeFloat  # > 0: AdamW with this decoupled decay instead of Adam
    schedule: Literal["constant", "cosine"]  # cosine: decays to 0 at max_epochs
    warmup_epochs: NonNegativeInt  # linear warm-up from 0 over this many epochs (0: none)
    tta: Literal["none", "flip", "flip_zoom"]  # test-time augmentation the saved model applies itself
    # Frozen parts computed once per image (covidtl.features, covidtl.frozen).
    feature_cache: Literal["auto", "none"]
    # augmented copies stored per training image (0: the images as decoded)
    feature_copies: Annotated[StrictInt, _check(
        lambda v: v >= 0, "{value} must be >= 0 (0 trains on the images as decoded)")]
    unfreeze_after: StrictStr  # none | top_block | a layer of the base: the layers after it train
    linear_probe: LinearProbeConfig


@group
class PretrainConfig:
    """`covidtl pretrain`: a self-supervised (SimCLR) backbone from the training splits' images."""
    epochs: PositiveInt
    # images per step; each gives two views, so 2 x this many in the loss
    batch_size: Annotated[StrictInt, _check(lambda v: v >= 2, "{value} must be at least 2 (each image's "
                                            "other view is told apart from the rest of its batch)")]
    temperature: PositiveFloat  # NT-Xent's softmax temperature
    learning_rate: PositiveFloat  # the optimiser's (Adam, or AdamW when train.weight_decay > 0)
    datasets: list[StrictStr]  # whose training split (never val, test or external) it learns from
    out: StrictStr  # folder: <out>/<model>.weights.h5 and <model>.json
    seed: StrictInt


@group
class CVConfig:
    folds: Folds
    seed: StrictInt
    out: StrictStr


@group
class ProfileCells:
    """The cells trained with a named profile beside the paper's (on every study dataset)."""
    models: list[StrictStr]
    inits: list[StrictStr]


@group
class StudyConfig:
    models: list[StrictStr]
    inits: list[StrictStr]
    datasets: list[StrictStr]
    profiles: ByName[ProfileCells]

    def cells(self) -> list[tuple[str, str, str]]:
        """(profile, model, init) of every cell per dataset: the paper's matrix, then each profile's."""
        paper = [("paper", m, i) for m in self.models for i in self.inits]
        return paper + [(p, m, i) for p, c in self.profiles.items() for m in c.models for i in c.inits]


@group
class TuneConfig:
    trials: PositiveInt
    epochs: PositiveInt
    storage: StrictStr
    pruner: Literal["median", "halving", "none"]
    sampler_seed: StrictInt
    decades: PositiveFloat
    bounds: ByName[Annotated[list[float], pydantic.AfterValidator(_bounds)]]
    search_batch_size: StrictBool
    search_dropout: StrictBool
    init: StrictStr
    metric: Literal["val_loss", "val_accuracy"]
    min_epochs: PositiveInt
    prune_after: NonNegativeInt
    stale_after: PositiveInt
    out: StrictStr


@group
class ReportConfig:
    out: StrictStr


@group
class EvalConfig:
    # The 2.5% tail of fewer resamples is two or three values: an interval of noise.
    bootstrap: Annotated[StrictInt, _check(lambda v: v == 0 or v >= 100,
                                           "{value} must be 0 (no intervals) or >= 100")]
    confidence: Annotated[float, _check(lambda v: 0 < v < 1, "{value} must be in (0, 1), e.g. 0.95")]
    seed: StrictInt
    operating_point: Annotated[StrictStr, pydantic.AfterValidator(_operating_rule)]


@group
class AdaptConfig:
    """`covidtl adapt` (its DVC stage and entry point): the source model, the site and the method's settings."""
    model: StrictStr  # the source model (a .keras file, a cell folder or an MLflow URI)
    site: StrictStr  # the site's unlabelled images
    labelled: StrictStr | None  # K labelled site patients (class folders); None: unlabelled methods only
    method: StrictStr
    out: StrictStr
    seed: StrictInt
    series: StrictBool  # the site's file numbers are CT series (ingest's patient groups)
    shared_frame: StrictBool
    batch_size: PositiveInt
    learning_rate: PositiveFloat
    epochs: PositiveInt
    tent_steps: PositiveInt
    tent_learning_rate: PositiveFloat
    # head / head_bn tuned inside K (covidtl.adapt.tuning): a grid of rates and epochs, grouped folds
    tune_learning_rates: list[PositiveFloat]  # either list empty: no tuning (learning_rate, epochs)
    tune_epochs: list[PositiveInt]
    tune_folds: Annotated[StrictInt, _check(lambda v: v >= 2, "{value} must be at least 2")]
    # `covidtl adapt-curve`: the learning curve over K labelled patient groups per class.
    split_seed: StrictInt  # halves the site's groups into scoring and adaptation, once per site
    curve_methods: StrictStr  # "auto" (every method the source model takes) or "adabn,head,..."
    curve_ks: Annotated[list[NonNegativeInt], _check(len, "{value} must be a non-empty list of K >= 0")]
    curve_seeds: PositiveInt  # draws (and method seeds) per K
    curve_resamples: PositiveInt  # two-level bootstrap replicates per interval
    curve_out: StrictStr


@group
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
    external: ByName[list[ExternalSet]]
    report: ReportConfig
    eval: EvalConfig
    adapt: AdaptConfig
    # A named set of overrides from `profiles` (params.yaml < profile < -S/CLI options).
    profile: StrictStr
    profiles: ByName[ByName[Any]]

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
    try:
        return _adapter().validate_python(raw)
    except ValidationError as exc:
        # An unknown key first: a misspelt key is also a missing one, and the misspelling is the news.
        first = min(exc.errors(include_url=False), key=lambda e: e["type"] != "unexpected_keyword_argument")
        raise ConfigError(_one_line(first, path)) from None


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


# --------------------------------------------------------------------------- checks


@functools.cache
def _adapter() -> TypeAdapter:
    """Built on first use: a command that never loads params does not pay for pydantic's schema."""
    return TypeAdapter(Annotated[Config, pydantic.AfterValidator(_check_across_groups)])


def _check_across_groups(cfg: Config) -> Config:
    """The rules that tie keys together, once each key has its type."""
    if cfg.train.stop.rule == "patience" and cfg.train.select == "last":
        raise ConfigError("train.stop.rule: patience waits for `train.select` to improve, but "
                          "train.select is last; set train.select to val_auc or val_loss")
    _validate_external(cfg)
    _validate_recipe(cfg)
    for name in cfg.study.profiles:
        if name == "paper" or name not in cfg.profiles:
            raise ConfigError(f"study.profiles.{name}: not a profile of `profiles` other than paper "
                              f"(known: {', '.join(sorted(set(cfg.profiles) - {'paper'})) or 'none'})")
    _validate_profile_cells(cfg)
    return cfg


_EXPECTED = {"int_type": "an integer", "bool_type": "true or false", "float_type": "a number",
             "float_parsing": "a number", "string_type": "a string", "dict_type": "a mapping",
             "dataclass_type": f"the group's keys as in {PARAMS_FILE}", "list_type": "a list"}


def _one_line(error: ErrorDetails, source: Path) -> str:
    """pydantic's complaint as the project's line: the dotted key, what is wrong, the fix."""
    loc, kind, value = error["loc"], error["type"], error["input"]
    key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    if kind == "unexpected_keyword_argument":
        known = sorted(f.name for f in dataclasses.fields(_type_at(loc[:-1])))
        return f"{key}: unknown key; known keys here: {', '.join(known)}"
    if kind == "missing":
        return (f"{key}: missing from {source}; every key has its one default in {PARAMS_FILE}: "
                "copy it from there")
    if kind == "literal_error":
        return f"{key}: {value!r} is not one of {', '.join(map(_yaml_word, typing.get_args(_type_at(loc))))}"
    if kind == "value_error":
        return f"{key}: {error['ctx']['error']}"
    if kind in _EXPECTED:
        return f"{key}: expected {_EXPECTED[kind]}, got {value!r}"
    return f"{key}: {error['msg']} (got {value!r})"


def _type_at(loc: tuple[str | int, ...]) -> Any:
    """The declared type at an error's location: a group's dataclass, a choice's Literal."""
    tp: Any = Config
    for part in loc:
        # A group's field, else a dict's values or a list's items.
        tp = typing.get_type_hints(tp)[part] if dataclasses.is_dataclass(tp) else typing.get_args(tp)[-1]
    return tp


def _yaml_word(value: Any) -> str:
    """A choice as params.yaml spells it (true, not True)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


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


def _validate_external(cfg: Config) -> None:
    seen: dict[str, str] = {}
    for dataset, sets in cfg.external.items():
        if dataset not in cfg.data.datasets:
            known = ", ".join(sorted(cfg.data.datasets)) or "none"
            raise ConfigError(f"external.{dataset}: no dataset {dataset!r} in data.datasets (known: {known})")
        for i, entry in enumerate(sets):
            if entry.name in seen:
                raise ConfigError(f"external.{dataset}[{i}].name: {entry.name!r} is already the name of "
                                  f"{seen[entry.name]}; give each external set its own name")
            seen[entry.name] = f"external.{dataset}[{i}]"


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        full = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            out.update(_flatten(value, full))
        else:
            out[full] = value
    return out
