"""MLflow runs: the tracking store of a run, stage runs nested under a parent, and what the
stages log. Only the driver (or rank 0) calls these."""

from __future__ import annotations

import json
import os
import socket
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


# tags of every run: where its process runs, so that a later run can tell a run whose process
# was killed (kill -9, a lost node) from one still running
HOST_TAG, PID_TAG, PREDECESSOR_TAG = "scpretrain.host", "scpretrain.pid", "scpretrain.predecessor"


@contextmanager
def stage_run(name: str, cfg: RunConfig, timings: dict | None = None):
    """An MLflow run for a stage, nested under the active run if there is one; its wall time is
    logged as ``stage_seconds`` (and put in ``timings[name]``). It ends FINISHED, FAILED on an
    error, KILLED on an interrupt or SIGTERM (the CLI turns that into an interrupt). A top-level
    run first ends, as KILLED, this host's runs left RUNNING by processes that are gone, and
    names the newest unfinished run of the same name as its predecessor (the run it resumes)."""
    import mlflow

    experiment_id = setup(cfg)
    t0 = time.perf_counter()
    nested = mlflow.active_run() is not None
    predecessor = None if nested else _end_orphaned_runs(experiment_id, name)
    run = mlflow.start_run(run_name=name, nested=nested,
                           tags={"stage": name, HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
                           | ({PREDECESSOR_TAG: predecessor} if predecessor else {}))
    try:
        if not nested:
            log_config(cfg)
        yield run
        seconds = time.perf_counter() - t0
        mlflow.log_metric("stage_seconds", seconds)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, SIGTERM (the CLI's interrupt, or Ray's exit)
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")
    if timings is not None:
        timings[name] = seconds


def _end_orphaned_runs(experiment_id: str, name: str) -> str | None:
    """End as KILLED the RUNNING runs of this experiment started on this host by processes that
    no longer exist; return the id of the newest unfinished (KILLED/FAILED) top-level run named
    ``name``, if it is newer than its last finished one."""
    import mlflow
    from mlflow.entities import RunStatus

    client = mlflow.MlflowClient()
    host = socket.gethostname()
    for r in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        pid = r.data.tags.get(PID_TAG)
        if r.data.tags.get(HOST_TAG) == host and pid and pid.isdigit() and not _alive(int(pid)):
            client.set_tag(r.info.run_id, "scpretrain.ended", "its process was gone when a later run started")
            client.set_terminated(r.info.run_id, RunStatus.to_string(RunStatus.KILLED))
    last = client.search_runs([experiment_id], filter_string=f"attributes.run_name = '{name}'",
                              order_by=["attributes.start_time DESC"], max_results=20)
    for r in last:
        if "mlflow.parentRunId" in r.data.tags:
            continue
        return r.info.run_id if r.info.status in ("KILLED", "FAILED") else None
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process of that number
        return True
    return True


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
