"""Where the distributed stages run: starting (or joining) Ray, actors that are restarted when
their process dies, the one scheduler that keeps a pool of actors busy, and process memory.
K-means (``pseudolabel/``) and batch annotation (``serve/``) both run on it."""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from scpretrain_dist import console
from scpretrain_dist.config import JOB_ADDRESS_PREFIXES, ConfigError, RunConfig

# Ray puts its Unix sockets at <temp>/session_<date>_<time>_<pid>/sockets/<name> (about 65
# characters below <temp>), and a socket path may hold at most 107 bytes: the temp folder is kept
# short whatever the work dir's path is.
_SOCKET_TAIL = len("/session_2026-12-03_10-44-12_123456_4194304/sockets/plasma_store")
_SOCKET_PATH_MAX = 107

# glibc gives threads their own heaps; the query buffers TileDB's and the reader's threads
# allocate and free then fragment across up to 8 heaps per core, and a streaming reader's peak
# RSS drifted by hundreds of MiB with the length of the run (not the atlas). Processes this
# package starts (local Ray workers, benchmark children) get this; set it in a cluster job's
# environment too (`scpretrain submit` does, runtime.JOB_ENV). It must be set before the process starts.
READER_ENV = {"MALLOC_ARENA_MAX": "2"}
# a work dir's Ray folder: this prefix, then a digest of the user and the work dir
RAY_TEMP_PREFIX = "scp-ray-"


def ray_temp_dir(work_dir: str | Path) -> Path:
    """A short folder of this user's for the Ray sessions of ``work_dir`` (the same one for every
    run there), linked from ``<work_dir>/ray`` for finding its logs."""
    work = Path(work_dir).resolve()
    digest = hashlib.sha1(f"{os.getuid()}:{work}".encode()).hexdigest()[:12]
    roots = [Path("/tmp"), Path(tempfile.gettempdir())]
    for root in roots:
        temp = root / f"{RAY_TEMP_PREFIX}{digest}"
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

    console.quiet_libraries()
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    with _signal_handlers_kept():
        _init(ray, cfg)


@contextmanager
def _signal_handlers_kept():
    """ray.init puts its own SIGTERM handler (an exit) over the caller's: a caller's handler (the
    CLI's, which unwinds like Ctrl-C so MLflow runs end KILLED) is put back."""
    handler = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if callable(handler) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)


def local_ray_env() -> dict[str, str]:
    """What a local Ray's processes are set up with (its raylet, and so every worker and actor,
    inherits the environment of the process that starts it)."""
    env = {
        # the controller checks on its workers every half second (2 s by default, a wait paid at
        # every start and end of an iteration's training), and no preemption watcher (an extra
        # process polling for spot-instance notices no local machine gets)
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        # no idle workers started ahead: those started with the node lack this job's environment
        # (READER_ENV), so no task of the job could use them, and the job's own actors each ask
        # for a worker of their own size anyway
        "RAY_num_prestart_python_workers": "0",
        "RAY_prestart_worker_first_driver": "0",
    }
    if not console.verbose():
        # the workers' output stays in their log files: the log monitor, which tails those files
        # for the driver, looks for new ones every 5 s instead of every 0.1 s (half its CPU,
        # about 1% of a core per local Ray, with a hundred files)
        env |= {"RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0", "LOG_NAME_UPDATE_INTERVAL_S": "5"}
    return env


def _init(ray, cfg: RunConfig) -> None:
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, log_to_driver=console.verbose(), configure_logging=False)
        return
    for key, value in local_ray_env().items():
        os.environ.setdefault(key, value)
    temp = ray_temp_dir(cfg.work_dir)
    num_cpus = cfg.ray.num_cpus or max(4, 2 * (os.cpu_count() or 1))
    # a RAY_ADDRESS of http:// is where `ray job submit` goes, not a cluster to join (any other
    # is in cfg.ray.address, recipes.from_environment): ray.init would read it and refuse to size
    # a local Ray
    if os.environ.get("RAY_ADDRESS", "").startswith(JOB_ADDRESS_PREFIXES):
        del os.environ["RAY_ADDRESS"]
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
    """Peak resident set size of this process so far, MiB: Linux's VmHWM, the high-water mark of
    the memory of this program since it started. Not ``ru_maxrss``: Linux carries that across
    exec, so a child started from a large parent reports the parent's peak as its own."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)


@contextmanager
def intra_op_threads(n: int):
    """torch's intra-op threads capped at ``n`` (0: no cap) inside the block, restored after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(n, before)) if n > 0 else before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


# ---------------------------------------------------------------------------- Ray jobs
# what a submitted job's processes get: the reader's allocator setting and Ray Train's v2 API
JOB_ENV = READER_ENV | {"RAY_TRAIN_V2_ENABLED": "1"}
# passed on from the submitting shell when set there
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                 "MLFLOW_TRACKING_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "MLFLOW_S3_ENDPOINT_URL")


def job_entrypoint(command: list[str], work_dir: str) -> str:
    """The shell line a Ray job runs: ``scpretrain <command> --work-dir <work_dir>``."""
    import shlex

    return shlex.join(["scpretrain", *command, "--work-dir", work_dir])


def submit_job(address: str, cfg: RunConfig, command: list[str], wait: bool = True,
               working_dir: str | None = None, log=console.say) -> int:
    """Submit ``scpretrain <command>`` as a Ray job to the cluster at ``address`` (its dashboard,
    ``http://HEAD:8265``) with ``cfg.work_dir`` (absolute, on storage every node mounts) as its
    work dir; print where its runs (``cfg``'s tracking URI, as the job resolves it), checkpoints
    and report go; with ``wait`` follow its log to the end.
    Returns the exit code: 0 succeeded, 1 failed or stopped (the job keeps running when not
    waiting, or when the wait is interrupted)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    runtime_env: dict = {"env_vars": JOB_ENV | {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}}
    if working_dir:  # a checkout: its code, without environments, work dirs and benchmark output
        runtime_env |= {"working_dir": working_dir,
                        "excludes": [".git", ".venv*", "runs", "scpretrain_work", "bench_out", "*.h5ad"]}
    try:
        client = JobSubmissionClient(address)
    except Exception as e:  # unreachable, refused, or a token the cluster does not accept
        raise ConfigError(f"cannot reach the Ray cluster at {address}: {str(e).strip().splitlines()[-1]} (is its "
                          "dashboard on that address, and do RAY_AUTH_MODE and the token match the cluster's? "
                          "see deploy/README.md)") from None
    work_dir = cfg.work_dir
    entrypoint = job_entrypoint(command, work_dir)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    log(f"submitted {job_id} to {address}: {entrypoint}")
    log(f"  MLflow runs and registry: {cfg.tracking_uri}")
    log(f"  checkpoints: {work_dir}/ray_results    pseudo-labels, results: {work_dir}/pretrain")
    log(f"  report: {work_dir}/report    logs: ray job logs {job_id} --address {address}")
    if not wait:
        log(f"follow it with: ray job logs -f {job_id} --address {address}")
        return 0
    shown = 0
    try:
        while True:
            status = client.get_job_status(job_id)
            text = client.get_job_logs(job_id)
            if len(text) > shown:
                print(text[shown:], end="", flush=True)
                shown = len(text)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                break
            time.sleep(1.0)
    except KeyboardInterrupt:
        log(f"stopped following; the job keeps running (ray job stop {job_id} --address {address} ends it)")
        raise
    info = client.get_job_info(job_id)
    log(f"job {job_id}: {status.value}" + (f" ({info.message})" if status != JobStatus.SUCCEEDED and info.message else ""))
    return 0 if status == JobStatus.SUCCEEDED else 1
