"""`covidtl adapt`: a trained model adapted to a new hospital site (issue 22).

`methods.METHODS` is the registry (one entry per method); `site` reads the site's images,
`run.adapt` applies one method and `record` writes the adapted model, its card and its MLflow run.
"""
