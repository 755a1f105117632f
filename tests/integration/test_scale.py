"""Scale paths on a real local Ray and a SOMA store on disk: datasets clustered by sharded
Lloyd over the K-means actors equal the whole-dataset result, and pretraining with sparse
row updates over 2 Ray Train workers keeps the replicas identical."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from scpretrain_dist import recipes
from scpretrain_dist.catalog import load_catalog
from scpretrain_dist.config import DemoDataConfig, resolve
from scpretrain_dist.demo import write_demo_atlas
from scpretrain_dist.store import open_atlas

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_atlas(tmp_path_factory, ray_session):
    """A 3-dataset demo atlas, on the session's Ray."""
    work = tmp_path_factory.mktemp("scale")
    demo = DemoDataConfig(n_datasets=3, cells_per_dataset=300, n_genes=400, n_types=4,
                          markers_per_type=15, seed=1)
    write_demo_atlas(work / "demo", demo)
    store = open_atlas(work / "atlas.soma")
    store.ingest(load_catalog(work / "demo" / "catalog.toml"), log=lambda m: None)
    cfg = resolve(recipes.tiny(), overrides=[f'work_dir="{work}"', "pseudolabel.niter=8"])
    return cfg, store


@pytest.mark.parametrize("space", ["pca", "embedding"])
def test_sharded_refresh_equals_whole_dataset_refresh(ray_atlas, space, tmp_path):
    from scpretrain_dist.pseudolabel.pool import KMeansPool, cluster_dataset

    cfg, store = ray_atlas
    locator = store.locator.pinned()
    datasets = [r.name for r in store.datasets()]
    encoder = None
    if space == "embedding":
        gen = torch.Generator().manual_seed(0)
        n_genes = len(store.genes())
        encoder = str(tmp_path / "encoder.pt")
        torch.save({"weight": torch.randn(n_genes, 16, generator=gen) * 0.1,
                    "bias": torch.zeros(16)}, encoder)
    whole_cfg = dataclasses.replace(cfg.pseudolabel, phase1_space="pca", num_actors=2)
    # every dataset is "too large": each is split over both actors; the k-means++ sample is
    # smaller than a dataset, so the driver gathers it from the actors
    sharded_cfg = dataclasses.replace(whole_cfg, shard_threshold_cells=100, init_sample_cells=250)
    with KMeansPool(locator, dataclasses.replace(whole_cfg, init_sample_cells=250)) as pool:
        whole = pool.refresh(datasets, 0, encoder)
    with KMeansPool(locator, sharded_cfg) as pool:
        sharded = pool.refresh(datasets, 0, encoder)
    assert whole.space == sharded.space == space
    for d in datasets:
        assert whole.stats[d]["shards"] == 1 and sharded.stats[d]["shards"] == 2
        assert whole.ks[d] == sharded.ks[d] == [6, 3, 2]
        np.testing.assert_array_equal(sharded.labels[d], whole.labels[d])
        np.testing.assert_allclose(sharded.stats[d]["objectives"], whole.stats[d]["objectives"], rtol=1e-5)
    # and both equal clustering the dataset in this process
    enc = None
    if encoder:
        from scpretrain_dist.pseudolabel.features import read_encoder

        enc = read_encoder(encoder)
    local, ks, _ = cluster_dataset(locator.atlas(), datasets[0],
                                   dataclasses.replace(whole_cfg, init_sample_cells=250), space, enc)
    np.testing.assert_array_equal(local, whole.labels[datasets[0]])


def _kill_actor(actor) -> None:
    """SIGKILL to an actor's process, as a native crash or the OOM killer would."""
    import os
    import signal

    from ray._private import state

    info = state.actors()[actor._actor_id.hex()]
    os.kill(info["Pid"], signal.SIGKILL)


def _restarts(actor) -> int:
    from ray._private import state

    return state.actors()[actor._actor_id.hex()]["NumRestarts"]


def test_killed_kmeans_actors_restart_and_the_refresh_gives_the_same_labels(ray_atlas, monkeypatch):
    """A K-means actor killed between refreshes is restarted by the next one; an actor killed
    after loading its slice of a sharded dataset makes that dataset start over. Same labels as
    undisturbed refreshes either way."""
    from scpretrain_dist.pseudolabel import pool as pool_module
    from scpretrain_dist.pseudolabel.pool import KMeansPool

    cfg, store = ray_atlas
    locator = store.locator.pinned()
    datasets = [r.name for r in store.datasets()]
    whole_cfg = dataclasses.replace(cfg.pseudolabel, phase1_space="pca", num_actors=2, init_sample_cells=250)
    sharded_cfg = dataclasses.replace(whole_cfg, shard_threshold_cells=100)
    with KMeansPool(locator, whole_cfg) as pool:
        undisturbed = pool.refresh(datasets, 0)
        _kill_actor(pool.actors[0])
        again = pool.refresh(datasets, 0)
        assert _restarts(pool.actors[0]) == 1
    for d in datasets:
        np.testing.assert_array_equal(again.labels[d], undisturbed.labels[d])
    with KMeansPool(locator, dataclasses.replace(whole_cfg, actor_restarts=0)) as pool:
        pool.warm_up()
        _kill_actor(pool.actors[0])
        with pytest.raises(pool_module.PoolError, match=r"died after 0 restart.*rerun the same command"):
            pool.refresh(datasets, 0)

    run_lloyd, killed = pool_module.run_lloyd, []

    def kill_before_the_first_step(step, inits, niter, seed):
        if not killed:  # every actor holds its slice now
            _kill_actor(pool.actors[1])
            killed.append(True)
        return run_lloyd(step, inits, niter, seed)

    monkeypatch.setattr(pool_module, "run_lloyd", kill_before_the_first_step)
    with KMeansPool(locator, sharded_cfg) as pool:
        sharded = pool.refresh(datasets, 0)
        assert _restarts(pool.actors[1]) == 1
    assert killed
    attempts = [sharded.stats[d]["attempts"] for d in sorted(datasets, key=lambda d: -store.dataset(d).n_cells)]
    assert attempts[0] == 2 and attempts[1:] == [1] * (len(datasets) - 1)  # the first dataset started over
    for d in datasets:
        np.testing.assert_array_equal(sharded.labels[d], undisturbed.labels[d])


def test_later_refreshes_embed_cells_the_actors_kept(ray_atlas, tmp_path):
    """A refresh in the embedding space sends each dataset back to the actor that clustered it
    before, which embeds the cells it kept instead of reading the store: same labels, and no
    dataset's cells kept twice. With no cache every refresh reads."""
    import ray

    from scpretrain_dist.pseudolabel.features import read_cells
    from scpretrain_dist.pseudolabel.pool import KMeansPool

    cfg, store = ray_atlas
    locator = store.locator.pinned()
    datasets = [r.name for r in store.datasets()]
    encoder = str(tmp_path / "encoder.pt")
    torch.save({"weight": torch.randn(len(store.genes()), 16, generator=torch.Generator().manual_seed(1)) * 0.1,
                "bias": torch.zeros(16)}, encoder)
    pcfg = dataclasses.replace(cfg.pseudolabel, num_actors=2)
    with KMeansPool(locator, pcfg) as pool:
        first = pool.refresh(datasets, 0, encoder)
        homes = dict(pool.home)
        second = pool.refresh(datasets, 1, encoder)
        assert pool.home == homes and set(homes) == set(datasets)
        assert not any(first.stats[d]["cells_cached"] for d in datasets)
        assert all(second.stats[d]["cells_cached"] for d in datasets)
        for d in datasets:
            np.testing.assert_array_equal(second.labels[d], first.labels[d])
        cached = ray.get([a.cached_bytes.remote() for a in pool.actors])
        whole = sum(X.data.nbytes + X.indices.nbytes + X.indptr.nbytes for X in (
            read_cells(store, d, 0, store.dataset(d).n_cells, "embedding") for d in datasets))
        assert sum(cached) == whole
    # the first phase's reads (normalised expression over each dataset's genes) fill the cache:
    # the first embedding refresh reads nothing and gives the labels of one that read
    for phase1 in ("pca", "expression"):
        with KMeansPool(locator, dataclasses.replace(pcfg, phase1_space=phase1)) as pool:
            assert pool.refresh(datasets, 0).space == phase1
            after_phase1 = pool.refresh(datasets, 1, encoder)
        assert all(after_phase1.stats[d]["cells_cached"] for d in datasets)
        for d in datasets:
            np.testing.assert_array_equal(after_phase1.labels[d], first.labels[d])
    with KMeansPool(locator, dataclasses.replace(pcfg, cache_bytes=0)) as pool:
        pool.refresh(datasets, 0, encoder)
        again = pool.refresh(datasets, 1, encoder)
        assert not any(again.stats[d]["cells_cached"] for d in datasets)
        assert ray.get([a.cached_bytes.remote() for a in pool.actors]) == [0, 0]


def test_pretraining_with_sparse_updates_on_two_ray_workers(ray_atlas):
    from scpretrain_dist.pseudolabel.pool import refresh_pseudo_labels
    from scpretrain_dist.train.pretrain import load_encoder, loop_config, train_iterations

    cfg, store = ray_atlas
    cfg = resolve(cfg, overrides=["pretrain.epochs=2", "pretrain.num_workers=2", "pretrain.sparse_updates=true",
                                  'pseudolabel.phase1_space="pca"', "model.embedding_dim=32"])
    locator = store.locator.pinned()
    datasets = [r.name for r in store.datasets()]
    labels = refresh_pseudo_labels(locator, datasets, cfg.pseudolabel, 0)
    path = labels.save(f"{cfg.work_dir}/labels.npz")
    n_genes = len(store.genes())
    worker_cfg = loop_config(cfg, locator, datasets, path, n_genes, final_eval=True, check_replicas=True)
    ckpt, epochs = train_iterations(cfg, worker_cfg, "scale-test")
    last = epochs[-1]
    assert last["replica_max_diff"] == 0.0  # both workers hold the same model after every step
    uniform = sum(math.log(k) for k in labels.ks[datasets[0]])  # loss of a uniform prediction
    assert last["final_eval_loss"] < uniform
    assert len(last["peak_rss_mib_per_worker"]) == 2 and min(last["peak_rss_mib_per_worker"]) > 0
    enc = load_encoder(f"{ckpt}/encoder.pt")
    assert enc["weight"].shape == (n_genes, 32) and np.isfinite(enc["weight"]).all()


class Crash(RuntimeError):
    """Raised from the run's log at a chosen line, as a crash there would stop it."""


SMALL_PRETRAINING = ["pretrain.iterations=2", "pretrain.epochs=6", "pretrain.num_workers=1", "pretrain.nmi_stop=1.01",
                     'pseudolabel.phase1_space="pca"', "model.embedding_dim=16"]


def _pretrain_small(cfg, store, work, log=lambda m: None, mlflow_run_id=None):
    from scpretrain_dist.train.pretrain import pretrain

    c = resolve(cfg, overrides=[f'work_dir="{work}"', f'store.uri="{store.uri}"', *SMALL_PRETRAINING])
    return pretrain(c, [r.name for r in store.datasets()], tag="t", log=log, mlflow_run_id=mlflow_run_id)


@pytest.fixture(scope="module")
def undisturbed(ray_atlas, tmp_path_factory):
    """An uninterrupted pretraining of SMALL_PRETRAINING: what interrupted ones must end with."""
    result = _pretrain_small(*ray_atlas, tmp_path_factory.mktemp("undisturbed"))
    assert result.iterations_run == 2 and result.resumed_after_iteration is None
    return result


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
                                                                                  monkeypatch):
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

    with mlflow.start_run() as run, _kill_a_training_worker_once(iteration_0_recorded) as killed:
        result = _pretrain_small(cfg, store, "work", mlflow_run_id=run.info.run_id)
    assert len(killed) == 2 and killed[-1] >= 2, "a training worker was killed after iteration 0 and one took over"
    assert result.iterations_run == 2 and [h["iteration"] for h in result.history] == [0, 1]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "pretrain_loss")]
    assert sorted(s for s in steps if s < epochs) == list(range(epochs)), "iteration 0 was trained again"
    assert max(steps) == 2 * epochs - 1
    ours, theirs = load_encoder(result.encoder_path), load_encoder(undisturbed.encoder_path)
    np.testing.assert_allclose(ours["weight"], theirs["weight"], rtol=1e-5, atol=1e-6)


@contextlib.contextmanager
def _kill_a_training_worker_once(when):
    """SIGKILL to a Ray Train worker started inside the block, once ``when()`` holds (as a native
    crash or the OOM killer would); yields the list the killed actor's id lands in, which ends
    with how many training workers the block started."""
    from ray._private import state

    def train_workers() -> dict:
        return {a["ActorID"]: a for a in state.actors().values() if a["ActorClassName"].endswith("RayTrainWorker")}

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


def test_a_training_worker_killed_without_retries_fails_the_training(ray_atlas, tmp_path):
    """SIGKILL to the training worker once its first epoch is logged, with pretrain.max_failures
    = 0: the training fails, naming the worker. (With retries: the test above.)"""
    import mlflow
    from ray.train import TrainingFailedError

    from scpretrain_dist.pseudolabel.pool import refresh_pseudo_labels
    from scpretrain_dist.tracking.mlflow_runs import setup
    from scpretrain_dist.train.pretrain import loop_config, train_iterations

    cfg, store = ray_atlas
    cfg = resolve(cfg, overrides=[f'work_dir="{tmp_path}"', f'store.uri="{store.uri}"', "pretrain.epochs=6",
                                  "pretrain.num_workers=1", 'pseudolabel.phase1_space="pca"', "model.embedding_dim=16",
                                  "pretrain.max_failures=0"])
    locator = store.locator.pinned()
    datasets = [r.name for r in store.datasets()]
    path = refresh_pseudo_labels(locator, datasets, cfg.pseudolabel, 0).save(tmp_path / "labels.npz")
    setup(cfg)
    client = mlflow.MlflowClient(cfg.tracking_uri)
    with mlflow.start_run() as run:
        worker_cfg = loop_config(cfg, locator, datasets, path, len(store.genes()), mlflow_run_id=run.info.run_id)
        with _kill_a_training_worker_once(lambda: client.get_metric_history(run.info.run_id, "pretrain_loss")) as killed:
            with pytest.raises(TrainingFailedError, match="worker"):
                train_iterations(cfg, worker_cfg, "kill-fail")
    assert len(killed) == 2, "the training worker was killed"
