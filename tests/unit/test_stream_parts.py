"""Pure parts of the atlas-scale path: chunked DDP shards, run bookkeeping, the synthetic
generator. No store, no Ray."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from scpretrain_dist.config import ConfigError, DemoDataConfig
from scpretrain_dist.data.normalize import keep_columns, normalize_rows
from scpretrain_dist.data.sharding import _cut, ranges_to_positions, shard_ranges
from scpretrain_dist.demo import (
    CHUNK_CELLS,
    dataset_model,
    iter_dataset_blocks,
    plan_atlas,
    simulate_chunk,
)
from scpretrain_dist.store.sources import coo_run, runs, stack_runs

# (cells, world, chunk): ranks with fewer cells than a chunk, worlds larger than the atlas,
# chunk sizes that do and do not divide the atlas
CASES = [
    (1, 1, 1), (1, 4, 8), (3, 8, 2), (7, 8, 3), (8, 8, 8), (9, 8, 4), (10, 3, 4), (100, 7, 16),
    (101, 2, 64), (255, 16, 5), (256, 16, 16), (1000, 3, 256), (17, 32, 1), (5000, 6, 512),
    (4097, 4, 4096), (12345, 8, 100),
]


@pytest.mark.parametrize("n, world, chunk", CASES)
def test_chunked_shards_are_equal_disjoint_and_complete(n, world, chunk):
    shards = [ranges_to_positions(*shard_ranges(n, r, world, seed=4, chunk_cells=chunk)) for r in range(world)]
    per_rank = -(-n // world)
    assert [len(s) for s in shards] == [per_rank] * world, "every rank gets ceil(n / world) cells"
    allpos = np.concatenate(shards)
    assert allpos.min() >= 0 and allpos.max() < n
    counts = np.bincount(allpos, minlength=n)
    assert (counts >= 1).all(), "the union covers every cell"
    padding = per_rank * world - n
    assert counts.sum() - n == padding, "cells repeat only to pad the last shards"
    if n >= world:
        assert counts.max() <= 2


@pytest.mark.parametrize("n, world, chunk", [(5000, 4, 64), (12345, 3, 100)])
def test_chunked_shards_keep_chunks_contiguous_and_depend_on_the_seed(n, world, chunk):
    starts, stops = shard_ranges(n, 1, world, seed=0, chunk_cells=chunk)
    assert (stops - starts <= chunk).all() and (stops > starts).all()
    # whole chunks, except where a rank's piece begins or ends
    assert ((starts % chunk == 0)[1:-1]).all()
    again = shard_ranges(n, 1, world, seed=0, chunk_cells=chunk)
    np.testing.assert_array_equal(starts, again[0])
    other = shard_ranges(n, 1, world, seed=1, chunk_cells=chunk)
    assert not np.array_equal(ranges_to_positions(starts, stops), ranges_to_positions(*other))


def test_shard_ranges_refuse_bad_arguments():
    for args in [(10, 4, 4, 0, 8), (10, -1, 4, 0, 8), (0, 0, 1, 0, 8), (10, 0, 1, 0, 0)]:
        with pytest.raises(ValueError):
            shard_ranges(*args)


def test_cut_and_positions():
    starts, stops = np.array([10, 0, 50]), np.array([14, 3, 52])  # cells 10..13, 0..2, 50..51
    seq = ranges_to_positions(starts, stops)
    np.testing.assert_array_equal(seq, [10, 11, 12, 13, 0, 1, 2, 50, 51])
    for lo in range(len(seq) + 1):
        for hi in range(lo, len(seq) + 1):
            np.testing.assert_array_equal(ranges_to_positions(*_cut(starts, stops, lo, hi)), seq[lo:hi])
    with pytest.raises(ValueError):
        _cut(starts, stops, 3, 10)


def test_runs_of_sorted_joinids():
    starts, stops = runs(np.array([3, 4, 5, 9, 11, 12]))
    np.testing.assert_array_equal(starts, [3, 9, 11])
    np.testing.assert_array_equal(stops, [6, 10, 13])
    assert runs(np.array([], dtype=np.int64))[0].size == 0
    with pytest.raises(ValueError, match="sorted"):
        runs(np.array([4, 3]))
    with pytest.raises(ValueError, match="sorted"):
        runs(np.array([3, 3]))


def test_coo_runs_become_csr_in_request_order_even_when_a_store_returns_them_unsorted():
    rng = np.random.default_rng(0)
    dense = (rng.random((12, 9)) < 0.4) * rng.integers(1, 9, (12, 9)).astype(np.float32)
    coo = sp.coo_matrix(dense)
    parts = []
    for a, b in [(2, 5), (7, 12)]:
        sel = (coo.row >= a) & (coo.row < b)
        order = rng.permutation(sel.sum())  # cells out of order, as a multi-fragment read gives
        parts.append(coo_run(coo.row[sel][order], coo.col[sel][order], coo.data[sel][order], a, b))
    X = stack_runs(parts, 9)
    np.testing.assert_array_equal(X.toarray(), dense[[2, 3, 4, 7, 8, 9, 10, 11]])
    assert X.has_sorted_indices or all(np.all(np.diff(X.indices[X.indptr[i]:X.indptr[i + 1]]) > 0)
                                       for i in range(X.shape[0])), "genes of a cell stay in order"
    assert stack_runs([], 9).shape == (0, 9)


def test_normalize_in_place_matches_the_copy():
    rng = np.random.default_rng(1)
    X = sp.random(50, 30, density=0.3, format="csr", dtype=np.float32, random_state=1)
    X.data = rng.integers(1, 20, X.nnz).astype(np.float32)
    ref = normalize_rows(X, "counts")
    out = normalize_rows(X.copy(), "counts", copy=False)
    np.testing.assert_array_equal(out.toarray(), ref.toarray())


# ---------------------------------------------------------------------------- synthetic atlas

CFG = DemoDataConfig(n_cells=20_000, n_datasets=7, n_genes=3000, n_types=5, markers_per_type=20, seed=3)


@pytest.mark.parametrize("index", [np.int32, np.int64])
@pytest.mark.parametrize("value", [np.float32, np.float64, np.int64])
def test_keep_columns_is_a_renumbered_column_subset_with_repeats_summed_by_the_caller(index, value):
    rng = np.random.default_rng(3)
    X = sp.random(300, 400, density=0.2, format="csr", random_state=4) * 50
    X = sp.csr_matrix((X.data.astype(value), X.indices.astype(index), X.indptr.astype(index)), shape=X.shape)
    new = np.full(400, -1)
    cols = rng.choice(400, 60, replace=False)
    new[cols] = rng.permutation(60)
    Y = keep_columns(X, new, 60)
    assert Y.shape == (300, 60) and Y.dtype == np.float32
    expected = np.zeros((300, 60), np.float32)
    expected[:, new[cols]] = X.toarray()[:, cols]
    np.testing.assert_array_equal(Y.toarray(), expected)
    # two input columns on one output column: both values kept, in the input's order
    new[cols[1]] = new[cols[0]]
    Y = keep_columns(X, new, 60)
    Y.sum_duplicates()
    np.testing.assert_allclose(Y.toarray()[:, new[cols[0]]], X.toarray()[:, cols[:2]].sum(1), rtol=1e-6)
    empty = keep_columns(sp.csr_matrix((3, 400), dtype=value), new, 60)
    assert empty.shape == (3, 60) and empty.nnz == 0 and list(empty.indptr) == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="399"):
        keep_columns(X[:, :399], new, 60)


def test_plan_sizes_are_exact_uneven_and_seeded():
    plan = plan_atlas(CFG)
    assert plan.n_cells == CFG.n_cells and (plan.sizes >= 1).all()
    assert plan.sizes.max() > 2 * plan.sizes.min(), "log-normal sizes are uneven"
    np.testing.assert_array_equal(plan.sizes, plan_atlas(CFG).sizes)
    assert list(plan.names) == [f"demo_{d:02d}" for d in range(7)]
    tiny = plan_atlas(DemoDataConfig(n_cells=7, n_datasets=7, n_genes=100, markers_per_type=5))
    assert (tiny.sizes == 1).all()


@pytest.mark.parametrize("bad", [
    dict(n_cells=3, n_datasets=4), dict(n_cells=10, n_datasets=0), dict(n_cells=10, n_genes=10),
    dict(n_cells=10, genes_kept=0.0), dict(n_cells=10, n_types=0),
])
def test_plan_refuses_impossible_atlases(bad):
    with pytest.raises(ConfigError):
        plan_atlas(DemoDataConfig(**{**dict(n_datasets=2, n_genes=200, markers_per_type=10), **bad}))


def test_chunks_are_sparse_counts_regenerable_and_restricted_to_measured_genes():
    plan = plan_atlas(CFG)
    d = int(np.argmax(plan.sizes))
    model = dataset_model(plan, d)
    labels, X = simulate_chunk(plan, model, 0)
    assert X.shape == (min(CHUNK_CELLS, plan.sizes[d]), CFG.n_genes) and X.dtype == np.float32
    nnz = np.diff(X.indptr)
    assert 100 <= np.median(nnz) <= 2000 and nnz.min() >= 20, "hundreds to thousands of genes per cell"
    assert np.all(X.data >= 1) and np.all(X.data == np.round(X.data)), "counts"
    assert set(np.unique(X.indices)) <= set(model.genes.tolist()), "only the dataset's measured genes"
    assert X.has_canonical_format
    labels2, X2 = simulate_chunk(plan, model, 0)  # any chunk regenerates on its own
    np.testing.assert_array_equal(labels, labels2)
    assert (X != X2).nnz == 0
    # blocks are the chunks back to back
    lo, blabels, B = next(iter_dataset_blocks(plan, d, block_cells=2 * CHUNK_CELLS))
    assert lo == 0
    np.testing.assert_array_equal(blabels[: len(labels)], labels)
    assert (B[: X.shape[0]] != X).nnz == 0
    with pytest.raises(ValueError):
        simulate_chunk(plan, model, 10**6)


def test_cell_types_are_marker_programs():
    """Mean expression of a type's markers is higher in that type: K-means can find them."""
    plan = plan_atlas(CFG)
    model = dataset_model(plan, 0)
    labels, X = simulate_chunk(plan, model, 0)
    Xn = normalize_rows(X, "counts").toarray()
    for t in range(CFG.n_types):
        markers = np.flatnonzero(plan.lfc[t] > 0)
        own = Xn[labels == t][:, markers].mean()
        rest = Xn[labels != t][:, markers].mean()
        if (labels == t).sum() >= 20:
            assert own > 1.5 * rest


def test_stacking_grows_from_a_small_size_hint_and_keeps_every_run_in_order():
    rng = np.random.default_rng(1)
    X = sp.random(300, 40, density=0.3, format="csr", random_state=2, dtype=np.float32)
    cuts = np.sort(rng.choice(np.arange(1, 300), 20, replace=False))
    bounds = list(zip(np.r_[0, cuts], np.r_[cuts, 300]))

    def pieces():  # arrives one run at a time, as a reader yields them
        for a, b in bounds:
            part = X[a:b]
            yield part.indptr.astype(np.int64), part.indices, part.data

    for hint in (0, 10, X.nnz, 10 * X.nnz):
        out = stack_runs(pieces(), 40, nnz_hint=hint)
        np.testing.assert_array_equal(out.toarray(), X.toarray())
        assert out.nnz == X.nnz and out.shape == (300, 40)
        assert len(out.indices) == X.nnz and len(out.data) == X.nnz, "no slack left in the arrays"
