"""Pretraining on a real local Ray and a SOMA store on disk: an interrupted pretraining (a
crashed driver, a killed training worker) ends where an undisturbed one does. (Two training
workers keeping identical replicas with sparse row updates: test_loader_pretrain.py.)"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time

import numpy as np
import pytest

from scpretrain_dist.config import resolve

pytestmark = pytest.mark.slow


class Crash(RuntimeError):
    """Raised from the run's log at a chosen line, as a crash there would stop it."""


SMALL_PRETRAINING = ["pretrain.iterations=2", "pretrain.epochs=6", "pretrain.num_workers=1", "pretrain.nmi_stop=1.01",
                     'pseudolabel.phase1_space="pca"', "model.embedding_dim=16"]


def _pretrain_small(cfg, store, work, log=lambda m: None, mlflow_run_id=None):
    from scpretrain_dist.train.pretrain import pretrain

    c = resolve(cfg, overrides=[f'work_dir="{work}"', f'store.uri="{store.uri}"', *SMALL_PRETRAINING])
    return pretrain(c, [r.name for r in store.datasets()], tag="t", log=log, mlflow_run_id=mlflow_run_id)


@pytest.fixture(scope="module")
def undisturbed_work(tmp_path_factory):
    return tmp_path_factory.mktemp("undisturbed")


@pytest.fixture(scope="module")
def undisturbed(ray_atlas, undisturbed_work):
    """An uninterrupted pretraining of SMALL_PRETRAINING: what interrupted ones must end with."""
    result = _pretrain_small(*ray_atlas, undisturbed_work)
    assert result.iterations_run == 2 and result.resumed_after_iteration is None
    return result


@pytest.fixture(scope="module")
def first_labels(undisturbed, undisturbed_work):
    """The undisturbed run's first pseudo-labels (phase 1, PCA, of the test atlas): training
    tests start from them instead of a K-means pool of their own (the pool has its own tests)."""
    from scpretrain_dist.train.pretrain import labels_file

    path = labels_file(undisturbed_work / "pretrain" / "t", 0)
    assert path.is_file()
    return path


def test_interrupted_pretraining_resumes_after_its_last_finished_step(ray_atlas, undisturbed, tmp_path):
    """A rerun continues an interrupted pretraining from its progress file: after a crash between
    training and re-clustering, and after one between the last iteration and the result. It
    ends with the encoder an uninterrupted run makes, and trains no finished iteration again."""
    from scpretrain_dist.train.pretrain import PROGRESS_FILE, load_encoder

    def run(work, crash_at=None):
        lines: list[str] = []

        def log(msg):
            lines.append(msg)
            if crash_at and msg.startswith(crash_at):
                raise Crash(msg)

        return _pretrain_small(*ray_atlas, work, log=log), lines

    work = tmp_path / "interrupted"
    with pytest.raises(Crash):
        run(work, crash_at="  iteration 0:")  # trained, not yet re-clustered
    state = json.loads((work / "pretrain" / "t" / PROGRESS_FILE).read_text())
    assert state["iteration"] == 0 and state["labels_path"] is None
    it0 = state["encoder_path"]
    with pytest.raises(Crash):
        run(work, crash_at="  iteration 1:")  # the last iteration trained, no result written yet
    result, lines = run(work)
    assert any(m.startswith("  resuming after iteration 1") for m in lines)
    assert not any(m.startswith("  iteration") for m in lines), "a finished iteration was trained again"
    assert result.resumed_after_iteration == 1 and result.iterations_run == 2
    assert result.history[0]["checkpoint"] in it0  # iteration 0 is the first attempt's
    assert [h["iteration"] for h in result.history] == [0, 1]
    assert "nmi_min" in result.history[0]  # the re-clustering done on resuming was scored
    ours, theirs = load_encoder(result.encoder_path), load_encoder(undisturbed.encoder_path)
    np.testing.assert_allclose(ours["weight"], theirs["weight"], rtol=1e-5, atol=1e-6)


def test_a_worker_killed_in_a_later_iteration_resumes_after_the_last_reported_one(ray_atlas, undisturbed, tmp_path,
                                                                                  monkeypatch, cli):
    """Both iterations are one Ray Train run. SIGKILL to its worker once iteration 0 is recorded
    (while the driver re-clusters, or early in iteration 1): the new worker group starts from
    iteration 0's checkpoint, trains iteration 1 and ends where an undisturbed run does;
    iteration 0 is not trained again. The work dir is given relative, as `make quickstart` does
    (the workers run in another folder)."""
    import mlflow

    from scpretrain_dist.tracking.mlflow_runs import setup
    from scpretrain_dist.train.pretrain import PROGRESS_FILE, load_encoder

    cfg, store = ray_atlas
    monkeypatch.chdir(tmp_path)
    cfg = resolve(cfg, overrides=['work_dir="work"', "pretrain.max_failures=1"])
    setup(cfg)
    client = mlflow.MlflowClient(cfg.tracking_uri)
    epochs = 6
    progress = tmp_path / "work" / "pretrain" / "t" / PROGRESS_FILE

    def iteration_0_recorded() -> bool:
        try:
            return json.loads(progress.read_text())["iteration"] == 0
        except (OSError, ValueError):
            return False

    with mlflow.start_run() as run, _kill_a_training_worker_once(iteration_0_recorded, cli.job_actors) as killed:
        result = _pretrain_small(cfg, store, "work", mlflow_run_id=run.info.run_id)
    assert len(killed) == 2 and killed[-1] >= 2, "a training worker was killed after iteration 0 and one took over"
    assert result.iterations_run == 2 and [h["iteration"] for h in result.history] == [0, 1]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "pretrain_loss")]
    assert sorted(s for s in steps if s < epochs) == list(range(epochs)), "iteration 0 was trained again"
    assert max(steps) == 2 * epochs - 1
    ours, theirs = load_encoder(result.encoder_path), load_encoder(undisturbed.encoder_path)
    np.testing.assert_allclose(ours["weight"], theirs["weight"], rtol=1e-5, atol=1e-6)


@contextlib.contextmanager
def _kill_a_training_worker_once(when, job_actors):
    """SIGKILL to a Ray Train worker started inside the block, once ``when()`` holds (as a native
    crash or the OOM killer would); yields the list the killed actor's id lands in, which ends
    with how many training workers the block started. ``job_actors``: ``cli.job_actors``."""

    def train_workers() -> dict:
        return {a["ActorID"]: a for a in job_actors("RayTrainWorker")}

    before, killed, stop = set(train_workers()), [], threading.Event()

    def kill_once():
        while not stop.is_set() and not killed:
            if when():
                alive = [a for i, a in train_workers().items() if i not in before and a["State"] == "ALIVE"]
                if alive:
                    os.kill(alive[0]["Pid"], signal.SIGKILL)
                    killed.append(alive[0]["ActorID"])
            time.sleep(0.2)

    killer = threading.Thread(target=kill_once)
    killer.start()
    try:
        yield killed
    finally:
        stop.set()
        killer.join()
        killed.append(len(set(train_workers()) - before))


def test_a_training_worker_killed_without_retries_fails_the_training(ray_atlas, first_labels, tmp_path, cli):
    """SIGKILL to the training worker once its first epoch is logged, with pretrain.max_failures
    = 0: the training fails, naming the worker. (With retries: the test above.)"""
    import mlflow
    from ray.train import TrainingFailedError

    from scpretrain_dist.tracking.mlflow_runs import setup
    from scpretrain_dist.train.pretrain import loop_config, train_iterations

    cfg, store = ray_atlas
    # enough epochs that the kill (polled, after the first epoch is logged) lands before the
    # training ends on a busy machine; the training stops at the kill, so they cost nothing
    cfg = resolve(cfg, overrides=[f'work_dir="{tmp_path}"', f'store.uri="{store.uri}"', "pretrain.epochs=60",
                                  "pretrain.num_workers=1", "model.embedding_dim=16",
                                  "pretrain.max_failures=0"])
    locator = store.locator.pinned()
    datasets = [r.name for r in store.datasets()]
    setup(cfg)
    client = mlflow.MlflowClient(cfg.tracking_uri)
    with mlflow.start_run() as run:
        worker_cfg = loop_config(cfg, locator, datasets, first_labels, len(store.genes()), mlflow_run_id=run.info.run_id)
        with _kill_a_training_worker_once(lambda: client.get_metric_history(run.info.run_id, "pretrain_loss"),
                                          cli.job_actors) as killed:
            with pytest.raises(TrainingFailedError, match="worker"):
                train_iterations(cfg, worker_cfg, "kill-fail")
    assert len(killed) == 2, "the training worker was killed"
