"""The MLflow pyfunc annotator (gene alignment included) and batch annotation."""
