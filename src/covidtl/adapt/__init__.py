"""`covidtl adapt` and `covidtl adapt-curve`: a trained model adapted to a new hospital site.

`methods.METHODS` is the registry (one entry per method); `site` reads the site's images,
`run.adapt` applies one method and `record` writes the adapted model, its card and its MLflow run.
`curve.adapt_curve` measures the methods as a learning curve over K labelled patient groups per
class (`protocol`: the halves, the draws and the bootstrap; `held_out`: the images scored).
"""
