"""MLflow runs and the Model Registry. Only the driver (or rank 0) calls these."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from scpretrain_dist.config import RunConfig


def setup(cfg: RunConfig) -> str:
    """Point MLflow at the run's tracking store (which is also its model registry); create the
    experiment; return its id."""
    import mlflow

    Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_registry_uri(cfg.tracking_uri)
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        kwargs = {} if cfg.tracking.tracking_uri else {"artifact_location": cfg.artifact_location}
        exp_id = mlflow.create_experiment(cfg.tracking.experiment, **kwargs)
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def log_config(cfg: RunConfig) -> None:
    """The resolved config: as params (flattened) and as config.json."""
    import mlflow

    mlflow.log_params(_flatten(cfg.to_dict()))
    mlflow.log_text(cfg.to_json(), "config.json")


def log_annotator(
    model,
    genes: np.ndarray,
    classes: np.ndarray,
    example: pd.DataFrame,  # noqa: F821
    lineage: dict,
    registered_model: str,
    alias: str,
) -> tuple[str, int]:
    """Log the pyfunc annotator in the active run, register it, set the alias and the lineage
    tags on the version. Returns (model name, version)."""
    import mlflow
    from mlflow import MlflowClient

    import scpretrain_dist
    from scpretrain_dist.serve.pyfunc import AnnotatorPyfunc, export_annotator, signature

    with tempfile.TemporaryDirectory() as tmp:
        artifacts = export_annotator(model, genes, classes, tmp, lineage=lineage)
        info = mlflow.pyfunc.log_model(
            name="annotator",
            python_model=AnnotatorPyfunc(),
            artifacts=artifacts,
            code_paths=[str(Path(scpretrain_dist.__file__).parent)],
            signature=signature(),
            input_example=example,
            pip_requirements=["mlflow", "numpy", "pandas", "scipy"],
        )
    version = mlflow.register_model(info.model_uri, registered_model)
    client = MlflowClient()
    client.set_registered_model_alias(registered_model, alias, version.version)
    for k, v in lineage.items():
        client.set_model_version_tag(registered_model, version.version, k, v if isinstance(v, str) else json.dumps(v))
    return registered_model, int(version.version)
