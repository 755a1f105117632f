"""Where the distributed stages run: starting (or joining) Ray, actors that are restarted when
their process dies, the one scheduler that keeps a pool of actors busy, and process memory.
K-means (``pseudolabel/``) and batch annotation (``serve/``) both run on it."""

from __future__ import annotations

import hashlib
import os
import resource
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from scpretrain_dist import console
from scpretrain_dist.config import ConfigError, RunConfig

# Ray puts its Unix sockets at <temp>/session_<date>_<time>_<pid>/sockets/<name> (about 65
# characters below <temp>), and a socket path may hold at most 107 bytes: the temp folder is kept
# short whatever the work dir's path is.
_SOCKET_TAIL = len("/session_2026-12-03_10-44-12_123456_4194304/sockets/plasma_store")
_SOCKET_PATH_MAX = 107

# glibc gives threads their own heaps; the query buffers TileDB's and the reader's threads
# allocate and free then fragment across up to 8 heaps per core, and a streaming reader's peak
# RSS drifted by hundreds of MiB with the length of the run (not the atlas). Processes this
# package starts (local Ray workers, benchmark children) get this; set it in a cluster job's
# environment too (deploy/submit_pretrain.sh does). It must be set before the process starts.
READER_ENV = {"MALLOC_ARENA_MAX": "2"}


def ray_temp_dir(work_dir: str | Path) -> Path:
    """A short folder of this user's for the Ray sessions of ``work_dir`` (the same one for every
    run there), linked from ``<work_dir>/ray`` for finding its logs."""
    work = Path(work_dir).resolve()
    digest = hashlib.sha1(f"{os.getuid()}:{work}".encode()).hexdigest()[:12]
    roots = [Path("/tmp"), Path(tempfile.gettempdir())]
    for root in roots:
        temp = root / f"scp-ray-{digest}"
        if len(os.fsencode(temp)) + _SOCKET_TAIL > _SOCKET_PATH_MAX or not os.access(root, os.W_OK | os.X_OK):
            continue
        temp.mkdir(mode=0o700, exist_ok=True)
        if temp.stat().st_uid != os.getuid():  # someone else's folder of that name: not ours to use
            continue
        _link(work / "ray", temp)
        return temp
    raise ConfigError(f"no short temporary folder for Ray's sockets: tried {', '.join(map(str, roots))} (a socket "
                      f"path is limited to {_SOCKET_PATH_MAX} bytes); set TMPDIR to a short writable folder")


def _link(link: Path, target: Path) -> None:
    """``link`` -> ``target``, unless something other than a link is there (older runs' folder)."""
    try:
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            if Path(os.readlink(link)) == target:
                return
            link.unlink()
        elif link.exists():
            return
        link.symlink_to(target, target_is_directory=True)
    except OSError:  # a file system without links: the logs are still in ``target``
        pass


def init_ray(cfg: RunConfig) -> None:
    """Connect to ``cfg.ray.address`` or start a local Ray whose temp files live in a short
    folder linked from the work dir (:func:`ray_temp_dir`). A Ray already running in this
    process (a caller's, a test session's) is used as it is."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, log_to_driver=console.verbose(), configure_logging=False)
        return
    # a local Ray: the controller checks on its workers every half second (2 s by default, a
    # wait paid at every start and end of an iteration's training), and no preemption watcher
    # (an extra process polling for spot-instance notices no local machine gets)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    temp = ray_temp_dir(cfg.work_dir)
    num_cpus = cfg.ray.num_cpus or max(4, 2 * (os.cpu_count() or 1))
    ray.init(
        num_cpus=num_cpus,
        _temp_dir=str(temp),
        include_dashboard=False,
        # the workers' own output (Ray Train's reports, its controller's notices) stays in the
        # session's log files, linked from <work-dir>/ray; errors still reach the driver
        log_to_driver=console.verbose(),
        configure_logging=False,
        runtime_env={"env_vars": dict(READER_ENV)},
    )


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


@contextmanager
def ray_scope():
    """A Ray started inside the block (by :func:`init_ray`) ends with it; one that was already
    running in this process (a caller's, a test session's) is left as it was."""
    ray = sys.modules.get("ray")
    running = ray is not None and ray.is_initialized()
    try:
        yield
    finally:
        if not running:
            shutdown_ray()


def on_actors(actors: list, items: Iterable, call: Callable, per_actor: int = 1,
              home: Callable[[object], int | None] | None = None) -> Iterator[tuple[int, object, object]]:
    """Run ``call(actor, item) -> ObjectRef`` for every item on a pool of actors, at most
    ``per_actor`` tasks in flight on each, and yield ``(actor index, item, ref)`` as each task
    finishes (``ray.get(ref)`` gives its result or raises its error). Items are started in their
    order; one whose ``home(item)`` names an actor waits for that actor (its data is cached
    there), the others go to whichever actor is free first."""
    import ray

    queues: list[list] = [[] for _ in actors]
    shared: list = []
    for item in items:
        h = home(item) if home is not None else None
        (queues[h] if h is not None and 0 <= h < len(actors) else shared).append(item)
    running: dict = {}
    load = [0] * len(actors)

    def fill(i: int) -> None:
        while load[i] < per_actor and (queues[i] or shared):
            item = (queues[i] or shared).pop(0)
            running[call(actors[i], item)] = (i, item)
            load[i] += 1

    for i in range(len(actors)):
        fill(i)
    while running:
        [done], _ = ray.wait(list(running), num_returns=1)
        i, item = running.pop(done)
        load[i] -= 1
        yield i, item, done
        fill(i)
