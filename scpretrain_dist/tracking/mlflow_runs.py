"""MLflow runs: the tracking store of a run, stage runs nested under a parent, and what the
stages log. Only the driver (or rank 0) calls these."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

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


@contextmanager
def stage_run(name: str, cfg: RunConfig, timings: dict | None = None):
    """An MLflow run for a stage, nested under the active run if there is one; its wall time is
    logged as ``stage_seconds`` (and put in ``timings[name]``)."""
    import mlflow

    setup(cfg)
    t0 = time.perf_counter()
    nested = mlflow.active_run() is not None
    with mlflow.start_run(run_name=name, nested=nested) as run:
        mlflow.set_tag("stage", name)
        if not nested:
            log_config(cfg)
        yield run
        seconds = time.perf_counter() - t0
        mlflow.log_metric("stage_seconds", seconds)
    if timings is not None:
        timings[name] = seconds


def active_run_id() -> str | None:
    import mlflow

    run = mlflow.active_run()
    return run.info.run_id if run else None


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Metrics of the active run, if there is one (MLflow's names allow no '+': it becomes '_')."""
    import mlflow

    if mlflow.active_run():
        mlflow.log_metrics({k.replace("+", "_"): float(v) for k, v in metrics.items()}, step=step)


def log_params(params: dict) -> None:
    import mlflow

    if mlflow.active_run():
        mlflow.log_params(params)


def log_artifacts(paths, folder: str) -> None:
    import mlflow

    if mlflow.active_run():
        for path in paths:
            mlflow.log_artifact(str(path), folder)


def log_dict(d: dict, name: str) -> None:
    import mlflow

    if mlflow.active_run():
        mlflow.log_dict(d, name)


class RunLog:
    """Logging into a given run from another process (a training worker, a pool's driver loop):
    a no-op without a run id."""

    def __init__(self, run_id: str | None, tracking_uri: str):
        self.run_id = run_id
        self._client = None
        if run_id:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def metric(self, key: str, value: float, step: int | None = None) -> None:
        if self._client is not None:
            self._client.log_metric(self.run_id, key, float(value), step=step)

    def artifact(self, path: str | Path, folder: str) -> None:
        if self._client is not None:
            self._client.log_artifact(self.run_id, str(path), folder)


def find_run(param: str, value: str) -> str | None:
    """The newest run, in any experiment of the current tracking store, with ``params.param``
    equal to ``value`` (e.g. the run that trained the encoder of a pretraining key)."""
    import mlflow

    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"params.{param} = '{value}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None
