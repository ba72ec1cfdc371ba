"""The model code MLflow logs with a registered model (models-from-code): no pickled class.

It only names the package's wrapper; loading the model imports the installed `covidtl`.
"""

from mlflow.models import set_model

from covidtl.serving.model import ImageModel

set_model(ImageModel())
