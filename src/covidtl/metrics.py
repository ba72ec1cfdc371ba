"""Deprecated alias of `covidtl.confusion` (the old name read like the metrics of `covidtl.stats` and
`covidtl.scores`); it goes in the next release."""

import sys
import warnings

from covidtl import confusion

warnings.warn("covidtl.metrics is covidtl.confusion now; this alias goes in the next release",
              DeprecationWarning, stacklevel=2)
# The same module object under both names: what a caller sets or patches on one is seen by the other.
sys.modules[__name__] = confusion
