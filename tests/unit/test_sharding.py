"""DDP-safe sharding: equal shard lengths, complete coverage, disjointness, per-epoch shuffles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scpretrain_dist.data.dataset import CellShard, GeneShardedCells
from scpretrain_dist.data.normalize import normalized_rows
from scpretrain_dist.data.sharding import epoch_batches, shard_positions, steps_per_epoch
from scpretrain_dist.pseudolabel.pool import PseudoLabels
from scpretrain_dist.store import open_atlas

CASES = [
    (1, 1), (1, 4), (3, 8), (7, 8), (8, 8), (9, 8), (10, 3), (12, 4), (13, 4),
    (64, 8), (100, 7), (101, 2), (255, 16), (256, 16), (1000, 3), (17, 32),
]


@pytest.mark.parametrize("n, world", CASES)
def test_shards_are_equal_complete_and_disjoint(n, world):
    seed = 11
    shards = [shard_positions(n, r, world, seed) for r in range(world)]
    per_rank = -(-n // world)
    assert all(len(s) == per_rank for s in shards), "every rank gets the same number of cells"
    allpos = np.concatenate(shards)
    assert allpos.min() >= 0 and allpos.max() < n
    assert set(allpos.tolist()) == set(range(n)), "the union covers every cell"
    for s in shards:
        assert len(np.unique(s)) == len(s), "no cell twice within one rank"
    counts = np.bincount(allpos, minlength=n)
    padding = per_rank * world - n
    if n % world == 0:
        assert padding == 0
        assert (counts == 1).all(), "shards are disjoint"
    else:
        # overlap only from the wrap-around padding: exactly `padding` extra copies
        assert counts.sum() - n == padding
        assert (counts >= 1).all()
        assert counts.max() <= -(-per_rank * world // n)
        if n >= world:
            assert (counts > 1).sum() == padding
            assert counts.max() == 2


@pytest.mark.parametrize("n, world", CASES)
@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_every_rank_runs_the_same_number_of_steps(n, world, batch_size):
    expected = steps_per_epoch(n, world, batch_size)
    assert expected >= 1
    for rank in range(world):
        local = len(shard_positions(n, rank, world, seed=3))
        for epoch in (0, 1):
            assert len(epoch_batches(local, batch_size, seed=3, epoch=epoch)) == expected


def test_shards_depend_on_the_seed_only():
    a = shard_positions(500, 1, 4, seed=0)
    np.testing.assert_array_equal(a, shard_positions(500, 1, 4, seed=0))
    assert not np.array_equal(a, shard_positions(500, 1, 4, seed=1))


def test_invalid_arguments():
    with pytest.raises(ValueError):
        shard_positions(10, 4, 4, 0)
    with pytest.raises(ValueError):
        shard_positions(10, -1, 4, 0)
    with pytest.raises(ValueError):
        shard_positions(0, 0, 1, 0)


def test_epoch_batches_reshuffle_per_epoch():
    n, bs = 103, 10
    epochs = [epoch_batches(n, bs, seed=5, epoch=e) for e in range(4)]
    orders = [np.concatenate(b) for b in epochs]
    for batches, order in zip(epochs, orders):
        assert sorted(order.tolist()) == list(range(n)), "each epoch visits every cell once"
        assert [len(b) for b in batches] == [10] * 10 + [3]
    for i in range(len(orders)):
        for j in range(i + 1, len(orders)):
            assert not np.array_equal(orders[i], orders[j]), "a fresh shuffle every epoch"
    np.testing.assert_array_equal(orders[2], np.concatenate(epoch_batches(n, bs, seed=5, epoch=2)))
    assert not np.array_equal(orders[0], np.concatenate(epoch_batches(n, bs, seed=6, epoch=0)))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_batches_mix_datasets(world):
    per_dataset = 400
    dataset_of = np.repeat(np.arange(3), per_dataset)  # block by block, as in the atlas
    n = len(dataset_of)
    for rank in range(world):
        pos = shard_positions(n, rank, world, seed=0)
        pos = np.sort(pos)  # CellShard reads its cells back in joinid order
        for epoch in range(3):
            batches = epoch_batches(len(pos), 64, seed=0, epoch=epoch)
            assert len(batches) >= 2
            for b in batches:
                assert len(np.unique(dataset_of[pos[b]])) >= 2


def _cyclic_labels(records) -> PseudoLabels:
    """Pseudo-labels of two partitions: a cell's position in its dataset modulo 3 and 2."""
    return PseudoLabels(
        version=0,
        labels={r.name: np.stack([np.arange(r.n_cells) % 3, np.arange(r.n_cells) % 2], 1) for r in records},
        ks={r.name: [3, 2] for r in records},
        space="expression",
    )


def test_cell_shard_from_the_store(demo_store):
    records = demo_store.datasets()
    names = [r.name for r in records]
    labels = _cyclic_labels(records)
    n_total = sum(r.n_cells for r in records)
    world = 2
    shards = [
        CellShard.load(demo_store.locator, names, labels, rank, world, seed=0, block_cells=50)
        for rank in range(world)
    ]
    assert [len(s) for s in shards] == [-(-n_total // world)] * world
    all_ids = np.concatenate([s.joinids for s in shards])
    assert set(all_ids.tolist()) == set(range(n_total))
    joinid_to_ds = np.concatenate([np.full(r.n_cells, i) for i, r in enumerate(records)])
    store = open_atlas(demo_store.uri)
    for shard in shards:
        np.testing.assert_array_equal(shard.dataset_idx, joinid_to_ds[shard.joinids])
        local = shard.joinids - np.array([records[d].joinid_start for d in shard.dataset_idx])
        np.testing.assert_array_equal(shard.labels[:, 0], local % 3)
        vt = np.array([records[d].value_type for d in shard.dataset_idx], dtype=object)
        expected = normalized_rows(store, shard.joinids, vt).toarray()
        np.testing.assert_allclose(shard.X.toarray(), expected, rtol=1e-6)
        n_batches = 0
        for x, didx, lab in shard.batches(64, seed=0, epoch=0):
            n_batches += 1
            assert len(x) == len(didx) == lab.shape[0]
            assert len(np.unique(didx.numpy())) >= 2
        assert n_batches == steps_per_epoch(n_total, world, 64)


@pytest.mark.parametrize("world", [2, 3])
def test_gene_sharded_cells_give_every_ranks_batch_over_its_genes(demo_store, world):
    """Step t of a gene-sharded rank is every rank's CellShard batch t (rank order) with the
    other ranks' genes dropped; its dataset indices and labels are its own batch's."""
    records = demo_store.datasets()
    names = [r.name for r in records]
    labels = _cyclic_labels(records)
    shards = [CellShard.load(demo_store.locator, names, labels, r, world, seed=4, block_cells=50) for r in range(world)]
    n_genes = shards[0].X.shape[1]
    for rank in range(world):
        cols = GeneShardedCells.load(demo_store.locator, names, labels, rank, world, seed=4, block_cells=70)
        assert len(cols) == len(shards[rank])
        owned = np.arange(n_genes) % world == rank
        steps = 0
        per_rank = [list(s.batches(32, seed=4, epoch=1)) for s in shards]
        for t, (x, didx, lab) in enumerate(cols.batches(32, seed=4, epoch=1)):
            batches = [p[t] for p in per_rank]
            assert x.cells_per_rank == tuple(len(b[1]) for b in batches)
            expect = np.vstack([_dense(b[0], n_genes) for b in batches]) * owned
            np.testing.assert_array_equal(_dense(x, n_genes), expect)
            assert set(x.genes.tolist()) <= set(np.flatnonzero(owned).tolist())
            assert torch.equal(didx, batches[rank][1]) and torch.equal(lab, batches[rank][2])
            steps += 1
        assert steps == len(per_rank[0]) > 1


def _dense(x, n_genes):
    counts = np.diff(np.append(x.offsets.numpy(), len(x.indices)))
    out = np.zeros((len(x), n_genes), dtype=np.float32)
    np.add.at(out, (np.repeat(np.arange(len(x)), counts), x.indices.numpy()), x.values.numpy())
    return out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_device_shard_gives_the_host_shard_batches(device):
    """A shard moved to the device makes the same batches, in the same order, without the host."""
    import scipy.sparse as sp
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    rng = np.random.default_rng(0)
    X = sp.random(700, 400, density=0.04, format="lil", random_state=1, dtype=np.float32)
    X[5] = 0  # a cell with no detected gene
    X = X.tocsr()
    X.eliminate_zeros()
    X.sort_indices()
    assert X[5].nnz == 0
    host = CellShard(X, rng.integers(0, 5, 700), rng.integers(0, 9, (700, 3)), np.arange(700))
    dev = host.to_device(device)
    assert len(dev) == len(host)
    n = 0
    for (a, da, la), (b, db, lb) in zip(host.batches(64, 7, 3), dev.batches(64, 7, 3), strict=True):
        for field in ("indices", "offsets", "values", "genes", "local_indices"):
            assert torch.equal(getattr(a, field), getattr(b, field).cpu()), field
        assert torch.equal(da, db.cpu()) and torch.equal(la.long(), lb.cpu())
        n += len(da)
    assert n == 700
