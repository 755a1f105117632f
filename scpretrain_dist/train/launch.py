"""Starting Ray: a local cluster inside the run's work directory, or an existing one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from scpretrain_dist.config import RunConfig


def init_ray(cfg: RunConfig) -> None:
    """Connect to ``cfg.ray.address`` or start a local Ray whose temp files live in the work
    dir (or a short temp path when the work dir's path is too long for Ray's sockets)."""
    import ray

    from scpretrain_dist.store.sources import READER_ENV

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, log_to_driver=True)
        return
    temp = Path(cfg.work_dir).resolve() / "ray"
    if len(str(temp)) > 60:  # AF_UNIX paths are limited to ~107 bytes
        temp = Path(tempfile.mkdtemp(prefix="scp-ray-"))
    temp.mkdir(parents=True, exist_ok=True)
    num_cpus = cfg.ray.num_cpus or max(4, 2 * (os.cpu_count() or 1))
    ray.init(
        num_cpus=num_cpus,
        _temp_dir=str(temp),
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=True,
        logging_level="WARNING",
        runtime_env={"env_vars": dict(READER_ENV)},
    )


def restartable(cls, restarts: int, **options):
    """``cls`` as a Ray actor class whose actors, when their process dies (a native crash, a
    lost node), are restarted and their pending tasks run again, up to ``restarts`` times.
    Only for actors whose tasks are safe to run twice."""
    import ray

    restarts = max(0, restarts)
    return ray.remote(max_restarts=restarts, max_task_retries=restarts, **options)(cls)


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
