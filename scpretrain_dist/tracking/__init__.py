"""MLflow: the tracking store and stage runs (mlflow_runs.py), the model registry (registry.py).
Every MLflow call of the package but the pyfunc flavour and its scoring server (serve/) is here."""
