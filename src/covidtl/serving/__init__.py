"""A trained model in the MLflow Model Registry and served over HTTP (`mlflow models serve`)."""
