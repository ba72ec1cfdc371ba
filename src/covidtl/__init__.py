"""covidtl: transfer learning for COVID-19 detection in chest X-rays and CT scans."""

import logging

__version__ = "0.1.0"

# The modules log under `covidtl`; used as a library, they print nothing unless the caller
# configures logging. The CLI says the lines itself (covidtl.cli.echo_logging).
logging.getLogger(__name__).addHandler(logging.NullHandler())
