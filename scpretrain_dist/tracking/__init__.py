"""MLflow: experiment set-up, config logging, the registered annotator and its lineage."""
