"""Shared fixtures of the integration tests: one local Ray for the whole session, one way to run
the CLI (in this process, or as a user does in a fresh one), and one snapshot of files on disk."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

BIN = Path(sys.executable).parent
# what a Ray node listens on besides its GCS port: each gets a free port, so that nodes of
# several clusters (this run's, other runs', users') share the machine
RAY_NODE_PORTS = ("node-manager-port", "object-manager-port", "runtime-env-agent-port", "dashboard-agent-grpc-port",
                  "dashboard-agent-listen-port", "metrics-export-port")


def ray_start(temp: Path, num_cpus: int, args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`ray start --block` of a node in its own process group, with its own temp folder (short:
    Ray's socket paths) and free ports; SIGTERM to the group stops its processes. The node's
    processes write their other temporary files there too (``TMPDIR``), so that what one leaves
    (a killed training worker's checkpoint folder, the dashboard's multiprocessing folder) goes
    with the folder."""
    env = env | {"TMPDIR": str(temp)}
    cmd = [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", "--temp-dir", str(temp),
           "--num-cpus", str(num_cpus), *args,
           *(a for n, port in zip(RAY_NODE_PORTS, free_ports(len(RAY_NODE_PORTS))) for a in (f"--{n}", str(port)))]
    with open(log, "w") as out:  # the node writes to its own copy of the file
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_head(log: Path, proc: subprocess.Popen, timeout: float = 90) -> str:
    """The address a head started by :func:`ray_start` tells other nodes and drivers to join."""
    end = time.time() + timeout
    while time.time() < end:
        for line in log.read_text().splitlines():
            if "ray start --address='" in line:
                return line.split("ray start --address='")[1].split("'")[0]
        if proc.poll() is not None:
            raise RuntimeError(f"the Ray head did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    raise RuntimeError(f"the Ray head did not start in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _shared_ray() -> str:
    """One local Ray for every pytest-xdist worker of the run: the first worker to ask starts its
    head, set up as init_ray sets up a local Ray (runtime.local_ray_env, a job's environment);
    the others join it. The run's controller stops it at the end (tests/conftest.py)."""
    from scpretrain_dist.runtime import JOB_ENV, local_ray_env

    folder = Path(os.environ["SCPRETRAIN_TEST_RUN_DIR"]) / "ray"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # the head and every driver agree
    with open(folder.parent / "ray.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "address").exists():
            if folder.exists():  # a worker before this one tried and failed
                raise RuntimeError("the run's Ray head did not start: the first test that needed it failed with its log")
            folder.mkdir()
            temp = Path(tempfile.mkdtemp(prefix="scpt-", dir="/tmp"))
            (folder / "temp").write_text(str(temp))
            env = os.environ | local_ray_env() | JOB_ENV | {"RAY_USAGE_STATS_ENABLED": "0"}
            proc = ray_start(temp, 24, ["--head", "--node-ip-address", "127.0.0.1", "--port", str(free_port()),
                                        "--include-dashboard", "false", "--ray-client-server-port", str(free_port())],
                             env, folder / "head.log")
            (folder / "pid").write_text(str(proc.pid))
            (folder / "address").write_text(wait_for_head(folder / "head.log", proc))
        return (folder / "address").read_text()


def job_actors(class_suffix: str) -> list[dict]:
    """The actors of this test worker's Ray job whose class name ends with ``class_suffix``, dead
    ones included (the run's Ray serves the other test workers' jobs too)."""
    import ray
    from ray._private import state

    job = ray.get_runtime_context().get_job_id()
    return [a for a in state.actors().values() if a["ActorClassName"].endswith(class_suffix) and a["JobID"] == job]


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """The run's one local Ray (:func:`_shared_ray`), joined by this worker for every in-process
    test that needs one; 24 logical CPUs and fractional CPUs per worker and actor, so training
    workers, K-means actors and annotation actors of three test workers never starve each other.
    Commands run in this process leave it running. Tests that look actors up keep to their
    worker's job (``ray.get_runtime_context().get_job_id()``)."""
    from scpretrain_dist import recipes
    from scpretrain_dist.runtime import init_ray, shutdown_ray

    init_ray(recipes.configure("tiny", work_dir=str(tmp_path_factory.mktemp("ray")), ray={"address": _shared_ray()}))
    yield
    shutdown_ray()


@pytest.fixture(scope="module")
def ray_atlas(tmp_path_factory, ray_session):
    """A 3-dataset demo atlas (SOMA) and tiny settings working there, on the session's Ray; one
    per module that asks for it."""
    from scpretrain_dist import recipes
    from scpretrain_dist.catalog import load_catalog
    from scpretrain_dist.config import DemoDataConfig, resolve
    from scpretrain_dist.demo import write_demo_atlas
    from scpretrain_dist.store import open_atlas

    work = tmp_path_factory.mktemp("scale")
    demo = DemoDataConfig(n_datasets=3, cells_per_dataset=300, n_genes=400, n_types=4,
                          markers_per_type=15, seed=1)
    write_demo_atlas(work / "demo", demo)
    store = open_atlas(work / "atlas.soma")
    store.ingest(load_catalog(work / "demo" / "catalog.toml"), log=lambda m: None)
    cfg = resolve(recipes.tiny(), overrides=[f'work_dir="{work}"', "pseudolabel.niter=8"])
    return cfg, store


def tree_digest(path: Path) -> str:
    """Content, names and permission bits of every file below ``path`` (or of the file): equal
    digests mean nothing there was written, added, removed or re-permissioned."""
    h = hashlib.sha256()
    path = Path(path)
    if not path.exists():
        return "absent"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        h.update(oct(stat.S_IMODE(f.stat().st_mode)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def run_cli(*args: str) -> SimpleNamespace:
    """``scpretrain ARGS`` in this process (no interpreter start-up): returncode, stdout, stderr."""
    from scpretrain_dist.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's usage errors
            code = e.code
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def run_process(*args: str, check: bool = True, timeout: int = 900, cwd=None) -> subprocess.CompletedProcess:
    """``scpretrain ARGS`` in a fresh process, as a user runs it (its own Ray, its own MLflow)."""
    proc = subprocess.run([sys.executable, "-m", "scpretrain_dist.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"scpretrain {args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


# The quickstart as a user runs it (a fresh process, its own Ray and MLflow) takes about a minute,
# mostly waiting on process start-ups; it starts in the background as soon as the tests are
# collected, while the other modules run, and the tests that read it wait for it. Under
# pytest-xdist every worker collects every test: the first to take the lock starts it, in the
# run's shared folder, and any worker can wait for it there (its exit code lands in a file).
_RUN_IN_BACKGROUND = 'cd "$SCP_RUN" && "$@" >stdout 2>stderr; echo $? >rc.tmp && mv rc.tmp rc'


def _quickstart_folder() -> Path:
    return Path(os.environ["SCPRETRAIN_TEST_RUN_DIR"]) / "quickstart"  # made by tests/conftest.py


def _work_dir() -> Path:
    """A work dir as users have them: 120 characters, a space, non-ASCII letters."""
    stem = str(_quickstart_folder() / "wörk dïr ")
    return Path(stem + "x" * max(0, 120 - len(stem)))


def _start_quickstart() -> None:
    """Start the quickstart unless a process of this run (any worker) already has."""
    folder = _quickstart_folder()
    with open(folder.parent / "quickstart.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if folder.exists():
            return
        folder.mkdir()
        cmd = [sys.executable, "-m", "scpretrain_dist.cli", "quickstart", "--work-dir", str(_work_dir())]
        proc = subprocess.Popen(["/bin/sh", "-c", _RUN_IN_BACKGROUND, "sh", *cmd], env=os.environ | {"SCP_RUN": str(folder)},
                                stdin=subprocess.DEVNULL, start_new_session=True)
        (folder / "pid").write_text(str(proc.pid))


# Modules that run longest, or wait longest (on the quickstart), go to the pytest-xdist workers
# first (`--dist loadfile --no-loadscope-reorder`; each worker starts with two modules, so a shorter
# one pairs with each long one), then the longest unit modules; the short rest follow in the order
# collected and fill the end, so the workers finish together.
LONG_FIRST = ("test_cluster.py", "test_quickstart.py", "test_scale.py", "test_kmeans_pool.py", "test_annotate.py",
              "test_loader.py", "test_experiment.py", "test_ray_paths.py", "test_loader_pretrain.py", "test_serve.py",
              "test_store.py", "test_sparse_training.py")


def pytest_collection_modifyitems(session, config, items):
    if any(item.path.name == "test_quickstart.py" for item in items):
        _start_quickstart()
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module's tests keep their order


def quickstart_run(timeout: int = 900) -> tuple[Path, subprocess.CompletedProcess]:
    """The background quickstart's work dir and its finished process (stdout, stderr)."""
    folder = _quickstart_folder()
    if not (folder / "pid").exists():
        raise RuntimeError("the quickstart was not started: its module was not collected")
    end = time.time() + timeout
    while not (folder / "rc").exists():
        if time.time() > end:
            raise AssertionError(f"the quickstart did not finish in {timeout} s")
        time.sleep(0.5)
    done = subprocess.CompletedProcess(["quickstart"], int((folder / "rc").read_text()),
                                       (folder / "stdout").read_text(), (folder / "stderr").read_text())
    if done.returncode != 0:
        raise AssertionError(f"the quickstart failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return _work_dir(), done


_GIVEN: set[int] = set()  # every port free_ports handed out in this process


def free_ports(n: int) -> list[int]:
    """``n`` TCP ports on 127.0.0.1 that nothing listens on now, none handed out before by this
    process (the system may give back a port it just gave: the ports of one Ray node, or of a
    head and its node, must differ). The sockets stay open until all are picked."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        while len(ports) < n:
            s = stack.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            if s.getsockname()[1] not in _GIVEN:
                ports.append(s.getsockname()[1])
        _GIVEN.update(ports)
        return ports


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    return free_ports(1)[0]


def wait_for_http(url: str, proc: subprocess.Popen, output, timeout: float = 120) -> None:
    """Until ``url`` answers; if ``proc`` (the server) exits first or time runs out, fail with
    its ``output()``."""
    end = time.time() + timeout
    while time.time() < end:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(f"the server for {url} exited:\n{output()[-3000:]}") from None
            time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"{url} did not answer in {timeout:.0f} s:\n{output()[-3000:]}")


@pytest.fixture(scope="session")
def cli():
    """The helpers above, as a fixture (tests never import conftest directly)."""
    return SimpleNamespace(run=run_cli, process=run_process, digest=tree_digest, quickstart=quickstart_run,
                           free_port=free_port, wait_for_http=wait_for_http, ray_start=ray_start,
                           wait_for_head=wait_for_head, job_actors=job_actors)
