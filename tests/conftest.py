import os
import shutil
import signal
import tempfile
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

# Test workers, background pipelines and Ray workers share two cores: every process computes on
# one thread (torch, BLAS, faiss), as Ray's own workers do. Several processes' threads spinning
# while they wait for each other made some tests ten times slower. Set before anything imports
# numpy or torch; subprocesses inherit it.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

# One folder for the whole run, shared by every pytest-xdist worker (they inherit the controller's
# environment): what one worker starts for all of them (the background quickstart) lives there.
RUN_SHARED = "SCPRETRAIN_TEST_RUN_DIR"

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "scrna"


_OWNED = pytest.StashKey[Path]()  # the shared folder, in the process that made it


def pytest_configure(config):
    if not hasattr(config, "workerinput") and RUN_SHARED not in os.environ:  # the controller, or a run without -n
        os.environ[RUN_SHARED] = tempfile.mkdtemp(prefix="scp-tests-")
        config.stash[_OWNED] = Path(os.environ[RUN_SHARED])
        # the folder torch makes for its compiler's cache (on making an optimizer) goes with the
        # run's, not into /tmp/torchinductor_<user>
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.environ[RUN_SHARED], "torchinductor"))


def pytest_unconfigure(config):
    """The run is over: processes left running from the shared folder (the run's Ray, a
    quickstart no test waited for) are stopped by their process group (SIGTERM, then SIGKILL
    after a few seconds), then the folder goes, with the temp folders named in it (Ray's)."""
    root = config.stash.get(_OWNED, None)
    if root is None:
        return
    groups = []
    for pid_file in root.glob("*/pid"):
        if not (pid_file.parent / "rc").exists():
            with suppress(ProcessLookupError, PermissionError, ValueError):
                group = int(pid_file.read_text())
                os.killpg(group, signal.SIGTERM)
                groups.append(group)
    end = time.time() + 5
    while groups and time.time() < end:
        groups = [g for g in groups if _alive(g)]
        time.sleep(0.2)
    for group in groups:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    # what outlived its group: Ray starts its workers and actors in process groups of their own,
    # and one busy when its raylet went can stay (a TrainController once did). Every process of
    # this run inherited the shared folder's variable.
    for pid in _processes_of_run(root):
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    for temp in root.glob("*/temp"):
        shutil.rmtree(temp.read_text(), ignore_errors=True)
    from scpretrain_dist.runtime import RAY_TEMP_PREFIX

    for link in root.rglob("ray"):  # the Ray folders of local Rays started from work dirs here
        if link.is_symlink() and link.resolve().name.startswith(RAY_TEMP_PREFIX):
            shutil.rmtree(link.resolve(), ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    os.environ.pop(RUN_SHARED, None)


def _processes_of_run(root: Path) -> list[int]:
    """Processes other than this one whose environment holds this run's shared folder."""
    mark = f"\0{RUN_SHARED}={root}\0".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            with suppress(OSError):
                if mark in b"\0" + (proc / "environ").read_bytes() + b"\0":
                    found.append(int(proc.name))
    return found


def _alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets beside the checkout; tests using them skip when it is absent."""
    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} is absent (real datasets are not part of the repo)")
    return SHARED_DATA


@contextmanager
def _mlflow_uris_restored():
    import mlflow.tracking._model_registry.utils as registry
    import mlflow.tracking._tracking_service.utils as tracking

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    uris = (tracking._tracking_uri, registry._registry_uri)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        tracking._tracking_uri, registry._registry_uri = uris


# MLflow's set_tracking_uri/set_registry_uri set process-wide state and environment variables
# (which every subprocess a later test starts inherits): each module and each test gets the
# MLflow URIs it began with.
@pytest.fixture(autouse=True, scope="module")
def _own_mlflow_uris_per_module():
    with _mlflow_uris_restored():
        yield


@pytest.fixture(autouse=True)
def _own_mlflow_uris():
    with _mlflow_uris_restored():
        yield


@pytest.fixture(autouse=True)
def _quiet_ray(monkeypatch):
    monkeypatch.setenv("RAY_DEDUP_LOGS", "1")
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
