"""Deprecated alias of `covidtl.tracking_server` (the old name read like `covidtl.serving`'s); it goes
in the next release."""

import sys
import warnings

from covidtl import tracking_server

warnings.warn("covidtl.server is covidtl.tracking_server now; this alias goes in the next release",
              DeprecationWarning, stacklevel=2)
# The same module object under both names: what a caller sets or patches on one is seen by the other.
sys.modules[__name__] = tracking_server
