"""A Ray cluster as users run one, on loopback: a head (127.0.0.1) and a second node (127.0.0.2)
started with `ray start`, token authentication on, their own temp folders and free ports; jobs
go in with `scpretrain submit` (Ray's job API) and track into an MLflow server. Only the
processes these fixtures started are stopped (by process group, then by their temp folder)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
TINY = ["--recipe", "tiny", "--set", "pretrain.iterations=2", "--set", "pretrain.epochs=4"]
# the fine-tuning and evaluation of the submitted quickstart, cut to two methods at one budget
# (what the job checks is where its runs, model and report go, not the evaluation)
SMALL_EVALUATION = ["--set", 'evaluate.methods=["scpretrain","logreg"]', "--set", "evaluate.budgets=[100]",
                    "--set", "finetune.max_epochs=25",
                    "--set", "evaluate.cluster=false"]


class Cluster:
    """The processes of a loopback cluster and how to reach it."""

    def __init__(self, root: Path, cli):
        self.root, self.cli = root, cli
        self.token = secrets.token_hex(32)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
        self.env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_USAGE_STATS_ENABLED": "0",
                     "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1",
                     # as deploy/mlflow_server.sh: no server-side job runners (MLflow's GenAI jobs)
                     "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.procs: list[subprocess.Popen] = []
        self.temps: list[Path] = []
        self.gcs_port, self.dashboard_port = cli.free_port(), cli.free_port()
        self.gcs = ""

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str], num_cpus: int) -> None:
        temp = Path(tempfile.mkdtemp(prefix="scpc-", dir="/tmp"))  # short: Ray's socket paths
        self.temps.append(temp)
        self.procs.append(self.cli.ray_start(temp, num_cpus, args, self.env, self.root / f"{name}.log"))

    def start(self) -> None:
        self._start("head", ["--head", "--node-ip-address", "127.0.0.1", "--port", str(self.gcs_port),
                             "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                             "--dashboard-port", str(self.dashboard_port), "--resources", '{"head": 1}',
                             "--ray-client-server-port", str(self.cli.free_port())], num_cpus=3)
        self.gcs = self.cli.wait_for_head(self.root / "head.log", self.procs[0])
        self._start("node2", ["--address", self.gcs, "--node-ip-address", "127.0.0.2",
                              "--resources", '{"node2": 1}'], num_cpus=3)
        self.wait_for_nodes(2)

    def api(self, path: str, method: str = "GET", **params) -> dict | list:
        """The dashboard's HTTP API (what Ray's `ray list` and `ray job` commands call), with the
        cluster's token: in this process, where each `ray` command would start an interpreter."""
        query = urllib.parse.urlencode(params, doseq=True)
        req = urllib.request.Request(f"{self.dashboard}{path}" + (f"?{query}" if query else ""), method=method,
                                     headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())

    def state(self, kind: str, **filters: str) -> list[dict]:
        """Ray's state API: the ``kind`` (actors, nodes) whose fields equal ``filters``."""
        body = self.api(f"/api/v0/{kind}", limit=10000, detail="true", filter_keys=list(filters),
                        filter_predicates=["="] * len(filters), filter_values=list(filters.values()))
        if not body["result"]:
            raise RuntimeError(f"Ray's state API failed: {body['msg']}")
        return body["data"]["result"]["result"]

    def jobs(self) -> list[dict]:
        return self.api("/api/jobs/")

    def wait_for_nodes(self, n: int, timeout: float = 90) -> None:
        end = time.time() + timeout
        while time.time() < end:
            try:
                if len(self.state("nodes", state="ALIVE")) >= n:
                    return
            except (OSError, ValueError, KeyError):  # the dashboard is still starting
                pass
            time.sleep(1)
        raise RuntimeError(f"fewer than {n} nodes joined:\n" + (self.root / "node2.log").read_text()[-3000:])

    def scpretrain(self, *args: str, extra_env: dict | None = None, timeout: int = 600, check: bool = True,
                   background: bool = False):
        cmd = [str(BIN / "scpretrain"), *map(str, args)]
        env = self.env | (extra_env or {})
        if background:
            return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"scpretrain {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n"
                                 f"{proc.stderr[-4000:]}")
        return proc

    def stop(self) -> None:
        for p in self.procs:  # `ray start --block` stops its node's processes on SIGTERM
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGTERM)
        end = time.time() + 3  # the tests are over: a short grace, then SIGKILL
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, end - time.time()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
        time.sleep(1)
        for pid in _pids_using(self.temps):  # workers that outlived their raylet
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for temp in self.temps:  # the nodes' session folders (logs, sockets) go with them
            shutil.rmtree(temp, ignore_errors=True)


def _pids_using(temps: list[Path]) -> list[int]:
    """Processes whose command line names one of these temp folders (ours: made by mkdtemp)."""
    return [pid for pid, (_, cmd) in _processes().items() if any(str(t) in cmd for t in temps)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, cli):
    c = Cluster(tmp_path_factory.mktemp("cluster"), cli)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _mlflow_server(root: Path, backend: str, cluster: Cluster, cli) -> tuple[str, subprocess.Popen]:
    """`mlflow server` on 127.0.0.1 over ``backend``, its artifacts under ``root``."""
    port = cli.free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", backend, "--artifacts-destination", str(root / "artifacts")],
        env=cluster.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    cli.wait_for_http(f"{uri}/health", proc, (root / "server.log").read_text)
    return uri, proc


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 3) -> None:
    """A server this module started, by its process group: ``sig``, then SIGKILL after ``grace``
    seconds (the tests are over; nothing of it is read afterwards)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, cluster, cli):
    """An MLflow server with a sqlite backend."""
    root = tmp_path_factory.mktemp("mlflow")
    uri, proc = _mlflow_server(root, f"sqlite:///{root}/mlflow.db", cluster, cli)
    yield {"uri": uri, "db": root / "mlflow.db"}
    _stop(proc)


@pytest.fixture(scope="module")
def postgres_mlflow_server(tmp_path_factory, cluster, cli, postgres):
    """An MLflow server with a PostgreSQL backend."""
    uri, proc = _mlflow_server(tmp_path_factory.mktemp("mlflow-pg"), postgres, cluster, cli)
    yield uri
    _stop(proc)


@pytest.fixture(scope="module")
def postgres(tmp_path_factory, cli):
    """A PostgreSQL server of the system's packages on 127.0.0.1 (run as the `postgres` user when
    this is root, which PostgreSQL refuses to run as); skipped with the reason where it cannot."""
    import importlib.util
    import pwd

    tools = {t: shutil.which(t) for t in ("initdb", "postgres", "pg_isready", "createdb")}
    if not all(tools.values()):
        pytest.skip(f"PostgreSQL is not installed here (missing {[t for t, w in tools.items() if not w]})")
    if importlib.util.find_spec("psycopg2") is None:
        pytest.skip("psycopg2 is not installed (pip install psycopg2-binary, in the dev extra)")
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="scp-pg-", dir="/tmp"))
    if os.geteuid() == 0:
        try:
            pg = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and there is no `postgres` user to run PostgreSQL as")
        os.chown(root, pg.pw_uid, pg.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = cli.free_port()
    subprocess.run([*as_user, tools["initdb"], "-D", str(root / "data"), "-A", "trust", "-U", "scp"],
                   check=True, capture_output=True, timeout=120)
    proc = subprocess.Popen([*as_user, tools["postgres"], "-D", str(root / "data"), "-p", str(port), "-k", str(root),
                             "-c", "listen_addresses=127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        _wait_for("PostgreSQL", lambda: subprocess.run([tools["pg_isready"], "-h", "127.0.0.1", "-p", str(port)],
                                                      capture_output=True).returncode == 0, timeout=60, every=0.5)
        subprocess.run([tools["createdb"], "-h", "127.0.0.1", "-p", str(port), "-U", "scp", "mlflow"], check=True,
                       capture_output=True, timeout=60)
        yield f"postgresql+psycopg2://scp@127.0.0.1:{port}/mlflow"
    finally:
        _stop(proc, signal.SIGINT)  # PostgreSQL's fast shutdown (SIGTERM waits for every client)
        shutil.rmtree(root, ignore_errors=True)


def _train_workers(cluster: Cluster, before: set | None = None) -> list[dict]:
    """The training workers the cluster ran (dead ones included), less those in ``before``."""
    actors = cluster.state("actors", class_name="RayTrainWorker")
    return [a for a in actors if a["actor_id"] not in (before or set())]


def _nodes_per_group(workers: list[dict]) -> dict[str, set[str]]:
    """Placement group (one per iteration's worker group) -> the nodes its workers ran on."""
    groups: dict[str, set[str]] = {}
    for w in workers:
        groups.setdefault(w.get("placement_group_id") or "?", set()).add(w["node_id"])
    return groups


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process we can see."""
    out = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, IndexError, ValueError):
                continue
            out[int(proc.name)] = (ppid, cmd)
    return out


def _cluster_process(cluster: Cluster, *needles: str) -> int | None:
    """A process of this cluster (a descendant of its `ray start`) whose command line holds every
    needle; None when there is none yet."""
    procs = _processes()
    ours = {p.pid for p in cluster.procs}
    for pid, (ppid, cmd) in procs.items():
        seen, up = set(), ppid
        while up not in ours and up in procs and up not in seen and up > 1:
            seen.add(up)
            up = procs[up][0]
        if up in ours and all(n in cmd for n in needles):
            return pid
    return None


def _wait_for(what: str, check, timeout: float = 300, every: float = 0.1):
    end = time.time() + timeout
    while time.time() < end:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def _progress(work: Path) -> dict | None:
    files = list((work / "pretrain").glob("*/progress.json")) if (work / "pretrain").exists() else []
    try:
        return json.loads(files[0].read_text()) if files else None
    except (OSError, json.JSONDecodeError):  # being replaced
        return None


def _encoder(work: Path) -> tuple[dict, dict]:
    from scpretrain_dist.train.pretrain import load_encoder

    [result] = (work / "pretrain").glob("*/result.json")
    res = json.loads(result.read_text())
    return res, load_encoder(res["encoder_path"])


@pytest.fixture(scope="module")
def spread_run(cluster, mlflow_server, tmp_path_factory):
    """The tiny pipeline submitted as a job with SPREAD placement, tracking into the server."""
    work = tmp_path_factory.mktemp("spread") / "shared work"
    before = {a["actor_id"] for a in _train_workers(cluster)}
    t0 = time.time()
    proc = cluster.scpretrain("submit", "--address", cluster.dashboard, "--work-dir", work, "--",
                              "quickstart", *TINY, "--set", "pretrain.placement=SPREAD", *SMALL_EVALUATION,
                              extra_env={"MLFLOW_TRACKING_URI": mlflow_server["uri"]})
    print(f"submitted quickstart (SPREAD): {time.time() - t0:.1f} s")
    return work, proc, _train_workers(cluster, before)


# ---------------------------------------------------------------------------- the tests
def test_submitted_pipeline_spreads_its_workers_and_tracks_into_the_server(spread_run, mlflow_server):
    work, proc, workers = spread_run
    out = proc.stdout
    assert "SUCCEEDED" in out and f"MLflow runs and registry: {mlflow_server['uri']}" in out
    assert f"checkpoints: {work}/ray_results" in out
    # everything the job made is in the shared work dir, none of it in Ray's copy of the code
    assert (work / "report" / "report.json").exists() and any((work / "ray_results").iterdir())
    assert not (work / "mlflow.db").exists()
    # SPREAD: the two training workers of each iteration (one placement group) ran on the two nodes
    groups = _nodes_per_group(workers)
    assert groups and all(len(nodes) == 2 for nodes in groups.values()), groups
    # the runs and the registered model are in the server's store, finished
    db = sqlite3.connect(mlflow_server["db"])
    runs = dict(db.execute("select name, status from runs").fetchall())
    assert {"quickstart", "pretrain", "finetune-evaluate"} <= set(runs) and set(runs.values()) == {"FINISHED"}
    assert db.execute("select count(*) from model_versions where name='scpretrain-annotator'").fetchone()[0] >= 1


def test_killed_worker_actor_and_driver_end_where_an_undisturbed_run_does(cluster, spread_run, tmp_path):
    """The same pretraining (PACK, the default placement; the SPREAD run's atlas) disturbed three
    times as a job of its own: SIGKILL to a training
    worker during the first iteration's training, to a K-means actor as the re-clustering after
    it starts, and to the job's driver once the re-clustering is recorded; the resubmitted job
    resumes after the last iteration the driver recorded and ends with the encoder of the
    undisturbed SPREAD run (placement
    is not in the cache key: same key, same encoder)."""
    work = tmp_path / "disturbed"
    before = {a["actor_id"] for a in _train_workers(cluster)}
    args = ["submit", "--address", cluster.dashboard, "--work-dir", work, "--", "pretrain", *TINY,
            "--exclude", "demo_03", "--set", f'store.uri="{spread_run[0] / "atlas.soma"}"']
    cluster.scpretrain(*args[:5], "--no-wait", *args[5:])
    t0 = time.time()
    worker = _wait_for("a training worker", lambda: _cluster_process(cluster, "ray::RayTrainWorker"))
    time.sleep(1.0)  # inside its training
    os.kill(worker, signal.SIGKILL)
    killed = {"worker": time.time() - t0}
    _wait_for("the first iteration's end", lambda: (_progress(work) or {}).get("iteration") == 0, every=0.05)
    actor = _wait_for("a K-means actor", lambda: _cluster_process(cluster, "ray::KMeansWorker"))
    os.kill(actor, signal.SIGKILL)
    killed["kmeans_actor"] = time.time() - t0
    _wait_for("the re-clustering's end", lambda: (_progress(work) or {}).get("labels_path"), every=0.05)
    # the driver: the Python process of the entrypoint (not the shell Ray runs it in)
    # at once: the second iteration starts as soon as its pseudo-labels are posted (the same Ray
    # Train run goes on) and takes about a second here
    driver = _wait_for("the job's driver", lambda: _cluster_process(cluster, "bin/scpretrain pretrain", str(work)))
    os.kill(driver, signal.SIGKILL)
    killed["driver"] = time.time() - t0
    recorded = _progress(work)["iteration"]  # the last iteration the killed driver recorded
    print("killed at (s after submitting):", killed, "after iteration", recorded)
    assert not list((work / "pretrain").glob("*/result.json")), "the driver was killed after the run ended"
    groups = _nodes_per_group(_train_workers(cluster, before))
    assert groups and all(len(nodes) == 1 for nodes in groups.values()), f"PACK spread a worker group: {groups}"

    rerun = cluster.scpretrain(*args)  # waits for the job: exit 0 only if it succeeded
    assert "SUCCEEDED" in rerun.stdout
    ours, theirs = _encoder(work), _encoder(spread_run[0])
    assert ours[0]["resumed_after_iteration"] == recorded and ours[0]["iterations_run"] == 2
    assert ours[1].keys() == theirs[1].keys()
    for name, value in theirs[1].items():
        np.testing.assert_allclose(ours[1][name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    # the killed driver's run was ended KILLED by the rerun, which names it as its predecessor
    db = sqlite3.connect(work / "mlflow.db")
    runs = db.execute("select run_uuid, status from runs where name = 'pretrain' order by start_time").fetchall()
    assert [r[1] for r in runs] == ["KILLED", "FINISHED"], runs
    tags = dict(db.execute("select key, value from tags where run_uuid = ?", (runs[1][0],)).fetchall())
    assert tags["scpretrain.predecessor"] == runs[0][0] and "scpretrain.ended" in dict(
        db.execute("select key, value from tags where run_uuid = ?", (runs[0][0],)).fetchall())


def test_submit_refuses_bad_input_before_anything_is_submitted(cluster, tmp_path):
    jobs_before = len(cluster.jobs())
    cases = [
        (["--work-dir", "relative/dir", "--", "pretrain"], "must be an absolute path"),
        (["--work-dir", str(tmp_path), "--", "serve"], "give the command the job runs"),
        (["--work-dir", str(tmp_path), "--", "pretrain", "--bogus"], "is not valid"),
        (["--work-dir", str(tmp_path), "--", "pretrain", "--work-dir", "/x"], "give --work-dir to submit"),
        (["--work-dir", str(tmp_path), "--", "pretrain", "--set", "pretrain.epochs=-1"], "pretrain.epochs"),
    ]
    for args, message in cases:
        proc = cluster.scpretrain("submit", "--address", cluster.dashboard, *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
    wrong = cluster.scpretrain("submit", "--address", cluster.dashboard, "--work-dir", tmp_path, "--", "pretrain",
                               extra_env={"RAY_AUTH_TOKEN": "0" * 64}, check=False)
    assert wrong.returncode == 2 and "token" in wrong.stderr, wrong.stderr
    assert len(cluster.jobs()) == jobs_before


def test_a_stopped_job_ends_its_mlflow_runs_killed(cluster, spread_run, postgres, postgres_mlflow_server, tmp_path):
    """Stopping the job (Ray's job API, which `ray job stop` calls) sends the driver SIGTERM: its
    MLflow run, tracked by a server on PostgreSQL, ends KILLED, not RUNNING."""
    import re

    import mlflow

    work = tmp_path / "stopped"
    out = cluster.scpretrain("submit", "--address", cluster.dashboard, "--work-dir", work, "--no-wait", "--",
                             "pretrain", *TINY, "--exclude", "demo_03",
                             "--set", f'store.uri="{spread_run[0] / "atlas.soma"}"',
                             extra_env={"MLFLOW_TRACKING_URI": postgres_mlflow_server}).stdout
    job_id = re.search(r"submitted (\S+) to", out).group(1)
    _wait_for("the pretraining", lambda: _cluster_process(cluster, "ray::RayTrainWorker"))
    assert cluster.api(f"/api/jobs/{job_id}/stop", method="POST")["stopped"]  # as `ray job stop`
    _wait_for("the job to stop", lambda: cluster.api(f"/api/jobs/{job_id}")["status"] == "STOPPED", timeout=120,
              every=0.5)
    assert not (work / "mlflow.db").exists()
    client = mlflow.MlflowClient(tracking_uri=postgres_mlflow_server)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    in_db = mlflow.MlflowClient(tracking_uri=postgres).search_runs([e.experiment_id for e in client.search_experiments()])
    assert [(r.info.run_id, r.info.status) for r in in_db] == [(r.info.run_id, r.info.status) for r in runs]  # in PostgreSQL
    assert [(r.info.run_name, r.info.status) for r in runs] == [("pretrain", "KILLED")], runs
