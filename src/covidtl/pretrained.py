"""Deprecated alias of `covidtl.weight_records` (the old name read like `covidtl.pretrain`'s); it
goes in the next release."""

import sys
import warnings

from covidtl import weight_records

warnings.warn("covidtl.pretrained is covidtl.weight_records now; this alias goes in the next release",
              DeprecationWarning, stacklevel=2)
# The same module object under both names: what a caller sets or patches on one is seen by the other.
sys.modules[__name__] = weight_records
