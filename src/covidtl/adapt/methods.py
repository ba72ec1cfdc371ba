"""The adaptation methods, one registry entry each: what it needs, what it does, its function.

Adding an eighth method is one `Method` in `_METHODS` and one test in tests/test_adapt.py (its
`EFFECT_TESTS` list must name every key here). Each `apply` returns an adapted copy and leaves
the source model as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import keras

from covidtl.adapt import labelled, tuning, unlabelled
from covidtl.adapt.network import batchnorm_layers, plain_network
from covidtl.adapt.settings import AdaptSettings
from covidtl.adapt.site import SiteData
from covidtl.errors import UserError


@dataclass(frozen=True)
class Method:
    name: str
    needs_labels: bool  # reads K labelled site patients (--labelled)
    needs_batchnorm: bool  # refused on a network without BatchNorm layers (VGG16)
    summary: str
    apply: Callable[[keras.Model, SiteData, AdaptSettings, int], keras.Model]
    needs_source: bool = False  # reads the source model's training split (its card's dataset)
    seeded: bool = True  # the result moves with the seed (shuffled steps, a draw, folds); adabn's does not
    check: Callable[[keras.Model], object] | None = None  # its refusal of a network's shape, before any image
    tuned: bool = False  # its learning rate and epochs chosen inside K (covidtl.adapt.tuning)


_METHODS = (
    Method("adabn", False, True, "BatchNorm statistics re-estimated on the site's unlabelled images",
           unlabelled.adabn, seeded=False),
    Method("standardize", False, False, "per-channel input mean/sd of the site mapped onto the source "
           "training split's", unlabelled.standardize, needs_source=True, seeded=False,
           check=unlabelled.check_standardize),
    Method("tent", False, True, "BatchNorm gamma/beta tuned to minimise prediction entropy on the site "
           "(Tent)", unlabelled.tent),
    Method("recalibrate", True, False, "temperature and bias of the log-odds (Platt, slope > 0) and the "
           "threshold, fitted on labelled site images; no ranking changes", labelled.recalibrate),
    Method("head", True, False, "the head's Dense layers fine-tuned on labelled site images, all else "
           "frozen", labelled.head, tuned=True),
    Method("head_bn", True, True, "the head and the BatchNorm layers fine-tuned on labelled site images",
           labelled.head_bn, tuned=True),
    Method("probe_refit", True, False, "a frozen cell's linear probe refitted on source and site "
           "features together", labelled.probe_refit, needs_source=True,
           check=labelled.check_probe_refit),
)
METHODS: dict[str, Method] = {m.name: m for m in _METHODS}
WITHOUT_BATCHNORM = ", ".join(m.name for m in _METHODS if not m.needs_batchnorm)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"--method {name}: unknown; choose one of {', '.join(METHODS)} "
                        "(`covidtl adapt --list` says what each does)")
    return METHODS[name]


def check_method(method: Method, model: keras.Model, model_uri: str, has_labels: bool) -> None:
    """The refusals a method makes before any site image is read."""
    plain_network(model, method.name)
    if method.needs_batchnorm and not batchnorm_layers(model):
        raise UserError(f"{method.name} needs BatchNorm layers; {model_uri} ({model.name}) has none "
                        f"(VGG16 has none): choose {WITHOUT_BATCHNORM}")
    if method.needs_labels and not has_labels:
        raise UserError(f"adapt --method {method.name}: needs labelled site images; give --labelled FOLDER "
                        "(class folders of K site patients), or an unlabelled method "
                        f"({', '.join(m.name for m in _METHODS if not m.needs_labels)})")
    if method.check is not None:
        method.check(model)


def adapted_by(method: Method, model: keras.Model, site: SiteData, settings: AdaptSettings,
               seed: int) -> tuple[keras.Model, tuning.Choice | None]:
    """`method` applied, with its settings first chosen inside K where it tunes them."""
    if not (method.tuned and site.labelled is not None):
        return method.apply(model, site, settings, seed), None
    choice = tuning.choose(method.apply, model, site, settings, seed, method.name)
    return method.apply(model, site, choice.settings, seed), choice
