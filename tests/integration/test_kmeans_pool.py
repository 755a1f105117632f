"""The K-means actor pool on a real local Ray and a SOMA store on disk: datasets clustered by
sharded Lloyd over the actors equal the whole-dataset result, killed actors restart and give the
same labels, and later refreshes embed the cells the actors kept."""

from __future__ import annotations

import dataclasses
import os
import signal

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow


def test_sharded_refresh_equals_whole_dataset_refresh(ray_atlas, tmp_path):
    """In PCA space and in an encoder's embedding, each from the store (no cells kept between
    refreshes): the same labels from one actor clustering whole datasets, from two actors each
    holding half of every dataset, and from this process."""
    from scpretrain_dist.pseudolabel.features import read_encoder
    from scpretrain_dist.pseudolabel.pool import KMeansPool, cluster_dataset

    cfg, store = ray_atlas
    locator = store.locator.pinned()
    datasets = [r.name for r in store.datasets()]
    gen = torch.Generator().manual_seed(0)
    encoder = str(tmp_path / "encoder.pt")
    torch.save({"weight": torch.randn(len(store.genes()), 16, generator=gen) * 0.1, "bias": torch.zeros(16)}, encoder)
    whole_cfg = dataclasses.replace(cfg.pseudolabel, phase1_space="pca", num_actors=2, init_sample_cells=250,
                                    cache_bytes=0)
    # every dataset is "too large": each is split over both actors; the k-means++ sample is
    # smaller than a dataset, so the driver gathers it from the actors
    sharded_cfg = dataclasses.replace(whole_cfg, shard_threshold_cells=100)
    with KMeansPool(locator, whole_cfg, n_actors=1) as whole_pool, KMeansPool(locator, sharded_cfg) as sharded_pool:
        for space, enc_path in (("pca", None), ("embedding", encoder)):
            whole, sharded = whole_pool.refresh(datasets, 0, enc_path), sharded_pool.refresh(datasets, 0, enc_path)
            assert whole.space == sharded.space == space
            for d in datasets:
                assert not whole.stats[d]["cells_cached"] and not sharded.stats[d]["cells_cached"]
                assert whole.stats[d]["shards"] == 1 and sharded.stats[d]["shards"] == 2
                assert whole.ks[d] == sharded.ks[d] == [6, 3, 2]
                np.testing.assert_array_equal(sharded.labels[d], whole.labels[d])
                np.testing.assert_allclose(sharded.stats[d]["objectives"], whole.stats[d]["objectives"], rtol=1e-5)
            # and both equal clustering the dataset in this process
            local, _, _ = cluster_dataset(locator.atlas(), datasets[0], whole_cfg, space,
                                          read_encoder(enc_path) if enc_path else None)
            np.testing.assert_array_equal(local, whole.labels[datasets[0]])


def _kill_actor(actor) -> None:
    """SIGKILL to an actor's process, as a native crash or the OOM killer would."""

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
    with KMeansPool(locator, whole_cfg, n_actors=1) as pool:
        undisturbed = pool.refresh(datasets, 0)
        _kill_actor(pool.actors[0])
        again = pool.refresh(datasets, 0)
        assert _restarts(pool.actors[0]) == 1
    for d in datasets:
        np.testing.assert_array_equal(again.labels[d], undisturbed.labels[d])
    with KMeansPool(locator, dataclasses.replace(whole_cfg, actor_restarts=0), n_actors=1) as pool:
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
        with KMeansPool(locator, dataclasses.replace(pcfg, phase1_space=phase1), n_actors=1) as pool:
            assert pool.refresh(datasets, 0).space == phase1
            after_phase1 = pool.refresh(datasets, 1, encoder)
        assert all(after_phase1.stats[d]["cells_cached"] for d in datasets)
        for d in datasets:
            np.testing.assert_array_equal(after_phase1.labels[d], first.labels[d])
    with KMeansPool(locator, dataclasses.replace(pcfg, cache_bytes=0), n_actors=1) as pool:
        pool.refresh(datasets, 0, encoder)
        again = pool.refresh(datasets, 1, encoder)
        assert not any(again.stats[d]["cells_cached"] for d in datasets)
        assert ray.get([a.cached_bytes.remote() for a in pool.actors]) == [0]
