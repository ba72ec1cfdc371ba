"""covidtl: transfer learning for COVID-19 detection in chest X-rays and CT scans."""

__version__ = "0.1.0"
