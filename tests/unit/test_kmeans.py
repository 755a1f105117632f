"""K-means pseudo-labels: recovery of clear clusters, sharded Lloyd steps, bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from scpretrain_dist.pseudolabel.kmeans import (
    CPU_DEFAULT_ENGINE,
    LloydPartial,
    cluster_cells,
    engine,
    lloyd,
    n_clusters,
    plusplus_inits,
)
from scpretrain_dist.pseudolabel.pool import PseudoLabels, agreement


def blobs(n_per=80, k=4, d=10, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 6, (k, d))
    x = np.concatenate([c + rng.normal(0, spread, (n_per, d)) for c in centers])
    y = np.repeat(np.arange(k), n_per)
    perm = rng.permutation(len(y))
    return x[perm].astype(np.float32), y[perm]


ENGINES = ["blas", "faiss", "torch"]  # every backend of the one engine, on this CPU
BLAS = engine("blas")


@pytest.mark.parametrize("name", ENGINES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_recovers_separated_blobs(seed, name):
    x, y = blobs(seed=seed)
    labels, stats = cluster_cells(x, [4], niter=20, seed=seed, eng=engine(name))
    assert labels.shape == (len(y), 1) and labels.dtype == np.int64
    assert adjusted_rand_score(y, labels[:, 0]) > 0.95
    # the objective is the summed squared distance to the assigned centroid (the cluster mean)
    centroids = np.stack([x[labels[:, 0] == c].mean(0) for c in range(4)])
    d2 = ((x - centroids[labels[:, 0]]) ** 2).sum()
    assert stats["objectives"][0] == pytest.approx(d2, rel=1e-3)
    assert 1 <= stats["lloyd_iterations"][0] <= 20 and stats["lloyd_seconds"] >= 0


def test_kmeans_is_deterministic_by_seed():
    x, _ = blobs(k=6, spread=2.0)
    a, _ = cluster_cells(x, [6], niter=10, seed=3)
    b, _ = cluster_cells(x, [6], niter=10, seed=3)
    np.testing.assert_array_equal(a, b)


def test_the_engines_agree_on_the_same_start():
    """Identical starts and iterations give the same labels on every backend (all exact)."""
    x, _ = blobs(n_per=60, k=5, d=6, spread=1.5)
    inits = plusplus_inits(x, [5, 3], seed=0)
    runs = {name: lloyd(x, inits, niter=8, seed=0, eng=engine(name), stop_at_fixed_point=False) for name in ENGINES}
    for name in ENGINES[1:]:
        assert (runs[name][0] == runs["blas"][0]).mean() > 0.99
        assert runs[name][3] == [8, 8]


def test_the_engine_is_chosen_in_one_place():
    assert engine("auto") == engine(CPU_DEFAULT_ENGINE)
    with pytest.raises(ValueError, match="auto, blas, faiss or torch"):
        engine("sklearn")
    with pytest.raises(ValueError, match="runs on CPUs"):
        engine("blas", gpu=True)


def test_n_clusters():
    assert n_clusters(1000, (50, 100, 200), 2) == [20, 10, 5]
    assert n_clusters(600, (50, 100, 200), 2) == [12, 6, 3]
    assert n_clusters(150, (50, 100, 200), 2) == [3, 2, 2]
    assert n_clusters(60, (50, 100, 200), 2) == [2, 2, 2]  # never below min_k
    assert n_clusters(1, (50, 100, 200), 2) == [1, 1, 1]  # never above the number of cells
    assert n_clusters(300, (50, 100, 200), 5) == [6, 5, 5]
    ks = n_clusters(12345, (50, 100, 200), 2)
    assert all(isinstance(k, int) for k in ks)
    assert ks == sorted(ks, reverse=True)


def test_partial_steps_over_shards_equal_one_pass():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    centroids = [x[[0, 50, 100, 150, 200]].copy()]
    eng = engine("blas")
    labels = eng.assign(x, centroids)[0][:, 0]
    whole = eng.partial_step(x, centroids)
    sums, counts = whole.sums[0], whole.counts[0]
    assert counts.sum() == len(x) and (counts > 0).all()
    # the update is the mean of the points assigned to each centroid
    for c in range(5):
        np.testing.assert_allclose(sums[c] / counts[c], x[labels == c].mean(0), rtol=1e-5, atol=1e-6)
    shards = np.split(x, [100, 220])  # 3 shards of unequal size
    total = LloydPartial.reduce([eng.partial_step(s, centroids) for s in shards])
    np.testing.assert_array_equal(np.concatenate([eng.assign(s, centroids)[0][:, 0] for s in shards]), labels)
    np.testing.assert_array_equal(total.counts[0], counts)
    np.testing.assert_allclose(total.sums[0], sums, rtol=1e-10, atol=1e-10)
    assert total.objective[0] == pytest.approx(whole.objective[0], rel=1e-5)


def test_every_partition_of_a_dataset_at_once():
    x, y = blobs(n_per=40, k=5, d=6)
    ks = [5, 3, 2]
    labels, stats = cluster_cells(x, ks, niter=10, seed=0)
    objectives = stats["objectives"]
    assert labels.shape == (len(x), len(ks)) and labels.dtype == np.int64
    for p, k in enumerate(ks):
        assert labels[:, p].min() >= 0 and labels[:, p].max() < k
        assert len(np.unique(labels[:, p])) == k
    assert len(objectives) == len(ks) and all(np.isfinite(objectives))
    assert objectives[0] < objectives[-1]  # more clusters fit better
    assert adjusted_rand_score(y, labels[:, 0]) > 0.95


def _pl(labels: dict, version=0, space="expression"):
    return PseudoLabels(version, labels, {d: [int(v.max()) + 1 for v in lab.T] for d, lab in labels.items()}, space)


def test_agreement_of_identical_and_relabelled_partitions():
    rng = np.random.default_rng(0)
    a = {"d1": rng.integers(0, 5, (200, 2)), "d2": rng.integers(0, 3, (120, 2))}
    out = agreement(_pl(a), _pl({k: v.copy() for k, v in a.items()}))
    assert set(out) == {"d1/p0", "d1/p1", "d2/p0", "d2/p1", "mean", "min"}
    assert all(v == pytest.approx(1.0) for v in out.values())
    # renaming clusters does not change the agreement
    relabelled = {d: (v + 7) * 3 for d, v in a.items()}
    assert agreement(_pl(a), _pl(relabelled))["min"] == pytest.approx(1.0)
    # unrelated labels agree poorly; datasets missing before are skipped
    other = {"d1": rng.integers(0, 5, (200, 2)), "new": rng.integers(0, 3, (50, 2))}
    out = agreement(_pl(a), _pl(other))
    assert set(out) == {"d1/p0", "d1/p1", "mean", "min"}
    assert out["mean"] < 0.2


def test_pseudo_labels_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    labels = {
        "demo_00": rng.integers(0, 12, (60, 3)).astype(np.int64),
        "mouse.v2-b": rng.integers(0, 6, (25, 3)).astype(np.int64),
    }
    ks = {"demo_00": [12, 6, 3], "mouse.v2-b": [6, 2, 2]}
    pl = PseudoLabels(4, labels, ks, "embedding", stats={"demo_00": {"n_cells": 60}})
    path = pl.save(tmp_path / "sub" / "labels.npz")
    assert path.exists()
    back = PseudoLabels.load(path)
    assert back.version == 4
    assert back.space == "embedding"
    assert back.ks == ks
    assert set(back.labels) == set(labels)
    for d in labels:
        np.testing.assert_array_equal(back.labels[d], labels[d])
        assert back.labels[d].dtype == np.int64


# ------------------------------------------------------------------ sharded Lloyd
from scpretrain_dist.pseudolabel.features import Projection, fit_pca  # noqa: E402
from scpretrain_dist.pseudolabel.kmeans import (  # noqa: E402
    init_sample,
    lloyd_flops,
    run_lloyd,
    update_centroids,
)


@pytest.mark.parametrize("n_shards", [2, 3, 7])
def test_sharded_lloyd_equals_single_process_lloyd(n_shards):
    x, _ = blobs(n_per=150, k=6, d=12, spread=2.5, seed=4)
    ks = [12, 6, 3]
    inits = plusplus_inits(x, ks, seed=0)
    inits[0][1] = inits[0][0]  # a duplicated start: one cluster empties and is re-seeded
    labels, centroids, objectives, iterations = lloyd(x, inits, niter=15, seed=0)
    shards = np.array_split(x, n_shards)  # unequal sizes
    sharded, sharded_iterations = run_lloyd(lambda c: [BLAS.partial_step(s, c) for s in shards], inits, niter=15, seed=0)
    assert sharded_iterations == iterations
    for a, b in zip(centroids, sharded):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    sharded_labels = np.concatenate([BLAS.assign(s, sharded)[0] for s in shards])
    np.testing.assert_array_equal(sharded_labels, labels)
    assert labels.shape == (len(x), 3)
    for p, k in enumerate(ks):
        assert len(np.unique(labels[:, p])) == k  # the empty cluster was re-seeded
        d2 = ((x - centroids[p][labels[:, p]]) ** 2).sum()
        assert objectives[p] == pytest.approx(d2, rel=1e-4)


def test_partials_reduce_to_the_whole():
    x, _ = blobs(n_per=50, k=3, d=5)
    c = [x[:4].copy(), x[10:12].copy()]
    whole = BLAS.partial_step(x, c)
    parts = LloydPartial.reduce([BLAS.partial_step(s, c) for s in np.array_split(x, 4)])
    for p in range(2):
        np.testing.assert_array_equal(parts.counts[p], whole.counts[p])
        np.testing.assert_allclose(parts.sums[p], whole.sums[p], rtol=1e-12)
        assert parts.objective[p] == pytest.approx(whole.objective[p], rel=1e-6)
        assert whole.counts[p].sum() == len(x)


def test_update_splits_an_empty_cluster_like_faiss():
    prev = [np.array([[1.0, 2.0], [5.0, 5.0], [9.0, 9.0]], dtype=np.float32)]
    total = LloydPartial([np.array([[10.0, 20.0], [0.0, 0.0], [90.0, 90.0]])],
                         [np.array([10, 0, 1])], [0.0])
    new = update_centroids(prev, total, seed=0, iteration=0)[0]
    np.testing.assert_allclose(new[2], [90.0, 90.0])  # a plain mean
    # the empty cluster 1 took half of cluster 0 (the only one with more than one cell)
    np.testing.assert_allclose(new[1], [1.0 * (1 + 1 / 1024), 2.0 * (1 - 1 / 1024)], rtol=1e-6)
    np.testing.assert_allclose(new[0], [1.0 * (1 - 1 / 1024), 2.0 * (1 + 1 / 1024)], rtol=1e-6)
    again = update_centroids(prev, total, seed=0, iteration=0)[0]
    np.testing.assert_array_equal(new, again)


def test_init_sample():
    np.testing.assert_array_equal(init_sample(10, 100, 0), np.arange(10))
    s = init_sample(1000, 100, 3)
    assert len(s) == 100 == len(np.unique(s)) and (np.diff(s) > 0).all() and s.max() < 1000
    np.testing.assert_array_equal(s, init_sample(1000, 100, 3))


def test_lloyd_flops():
    assert lloyd_flops(100, [10, 5], 4, 2) == 2 * (2 * 100 * 15 * 4 + 2 * 100 * 4) + 2 * 100 * 15 * 4
    # per-partition iteration counts: the one that stopped after 1 costs one pass less
    assert lloyd_flops(100, [10, 5], 4, [2, 1]) == lloyd_flops(100, [10, 5], 4, 2) - (2 * 100 * 5 * 4 + 100 * 4)


def _every_iteration(x, inits, niter, seed):
    """Lloyd without the fixed-point stop: ``niter`` full iterations of every partition."""
    centroids = [np.asarray(c, np.float32) for c in inits]
    for it in range(niter):
        centroids = update_centroids(centroids, BLAS.partial_step(x, centroids), seed, it)
    return centroids


def test_lloyd_stops_a_partition_at_its_fixed_point_with_the_same_result():
    x, _ = blobs(n_per=120, k=5, d=8, spread=2.0, seed=7)
    ks = [40, 5, 2]
    inits = plusplus_inits(x, ks, seed=1)
    inits[0][1] = inits[0][0]  # an empty cluster on the first pass: the generator is drawn from
    stepped = []

    def step(c):
        stepped.append(len(c))
        return [BLAS.partial_step(x, c)]

    centroids, iterations = run_lloyd(step, inits, niter=60, seed=0)
    full = _every_iteration(x, inits, 60, seed=0)
    for a, b in zip(centroids, full):
        np.testing.assert_array_equal(a, b)  # bitwise: stopping changed nothing
    assert all(1 <= i < 60 for i in iterations)  # each partition reached its fixed point early
    assert len(set(iterations)) > 1  # ... at its own iteration
    assert stepped[0] == 3 and stepped[-1] == 1 and len(stepped) == max(iterations)
    labels, _, _, its = lloyd(x, inits, niter=60, seed=0)
    assert its == iterations
    np.testing.assert_array_equal(labels, BLAS.assign(x, full)[0])


def test_sparse_pca_matches_dense_pca():
    import scipy.sparse as sp
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    latent = rng.normal(size=(300, 4)) * np.array([10, 6, 4, 3])
    dense = np.maximum(latent @ rng.normal(size=(4, 80)) + rng.normal(0, 0.3, (300, 80)), 0)
    X = sp.csr_matrix(dense.astype(np.float32))
    proj = fit_pca(X, dims=4, seed=0)
    assert isinstance(proj, Projection) and proj.components.shape == (80, 4)
    ref = PCA(4).fit(dense)
    # same subspace: the singular values of V_ours^T V_ref are all ~1
    cos = np.linalg.svd(proj.components.T @ ref.components_.T, compute_uv=False)
    assert cos.min() > 0.999
    z = proj.apply(X)
    assert z.dtype == np.float32 and z.shape == (300, 4)
    np.testing.assert_allclose(np.abs(z), np.abs(ref.transform(dense)), rtol=1e-3, atol=1e-3)


def test_column_moments_equal_the_dense_float64_moments():
    import scipy.sparse as sp

    from scpretrain_dist.pseudolabel.features import column_moments

    rng = np.random.default_rng(3)
    dense = (rng.random((200, 30)) < 0.1) * rng.gamma(2.0, 3.0, (200, 30))
    dense[:, 7] = 0  # a gene never measured
    X = sp.csr_matrix(dense.astype(np.float32))
    mean, var = column_moments(X)
    ref = dense.astype(np.float32).astype(np.float64)
    assert mean.dtype == var.dtype == np.float64
    np.testing.assert_allclose(mean, ref.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(var, ref.var(0), rtol=1e-9, atol=1e-12)
    assert mean[7] == var[7] == 0


def test_select_genes_equals_column_selection():
    import scipy.sparse as sp

    from scpretrain_dist.pseudolabel.features import select_genes

    rng = np.random.default_rng(5)
    mask = rng.random(40) < 0.5
    dense = (rng.random((30, 40)) < 0.3) * rng.gamma(2.0, 1.0, (30, 40))
    for outside in (False, True):  # values only in kept columns (renumbered), or also outside
        d = dense * (mask | outside)
        X = sp.csr_matrix(d.astype(np.float32))
        Y = select_genes(X, mask)
        ref = X[:, np.flatnonzero(mask)]
        assert Y.shape == ref.shape == (30, int(mask.sum()))
        np.testing.assert_array_equal(Y.toarray(), ref.toarray())
        np.testing.assert_array_equal(Y.indptr, ref.indptr)
        assert np.shares_memory(Y.data, X.data) is not outside  # shared only when renumbered


def test_gpu_request_without_faiss_gpu_is_a_clear_error():
    import faiss

    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("faiss sees a GPU here")
    x, _ = blobs()
    with pytest.raises(RuntimeError, match="faiss-gpu-cu12"):
        cluster_cells(x, [4], niter=2, seed=0, eng=engine("auto", gpu=True))


def test_pca_runs_on_the_most_variable_genes():
    import scipy.sparse as sp

    from scpretrain_dist.pseudolabel.features import most_variable_genes

    rng = np.random.default_rng(1)
    dense = rng.uniform(0, 0.1, (200, 30))
    loud = [3, 11, 17, 29]
    dense[:, loud] += rng.normal(0, 3, (200, 4)) ** 2  # high variance
    X = sp.csr_matrix(dense.astype(np.float32))
    np.testing.assert_array_equal(most_variable_genes(X, 4), loud)
    np.testing.assert_array_equal(most_variable_genes(X, 99), np.arange(30))
    proj = fit_pca(X, dims=2, seed=0, n_genes=4)
    np.testing.assert_array_equal(proj.genes, loud)
    z = proj.apply(X)
    assert z.shape == (200, 2)
    # the projection ignores every other gene
    noisy = X.toarray()
    noisy[:, [0, 1, 2]] += 100.0
    np.testing.assert_allclose(proj.apply(sp.csr_matrix(noisy)), z, rtol=1e-5, atol=1e-4)


def test_kmeans_plusplus_start_spreads_over_separated_blobs():
    from scpretrain_dist.pseudolabel.kmeans import kmeans_plusplus_init

    x, y = blobs(n_per=60, k=5, d=8, spread=0.2, seed=7)
    for seed in range(3):
        c = kmeans_plusplus_init(x, 5, seed)
        assert c.shape == (5, 8) and c.dtype == np.float32
        # every centre is a data point, and each blob got exactly one
        idx = [int(np.flatnonzero((x == row).all(1))[0]) for row in c]
        assert sorted(y[idx].tolist()) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(kmeans_plusplus_init(x, 5, 1), kmeans_plusplus_init(x, 5, 1))
    # more centres than distinct points still returns k centres
    dup = np.repeat(x[:3], 4, axis=0)
    assert kmeans_plusplus_init(dup, 6, 0).shape == (6, 8)


@pytest.mark.parametrize("gemm", ["numpy", "torch"])
def test_cpu_assignment_matches_exact_faiss_search_across_blocks_and_chunks(gemm):
    import faiss

    from scpretrain_dist.pseudolabel import kmeans as km

    rng = np.random.default_rng(7)
    x = rng.normal(size=(3 * km.CPU_BLOCK_ROWS + 17, 20)).astype(np.float32)  # a ragged last block
    # one partition in 3 chunks (the last one padded), one exactly a chunk, small ones
    ks = (2 * km.CPU_CHUNK_COLS + 37, km.CPU_CHUNK_COLS, 40, 9, 2)
    centroids = [x[rng.choice(len(x), k, replace=False)] + 0.1 for k in ks]
    labels, dist = km._assign_blas(x, centroids, gemm)
    assert labels.shape == dist.shape == (len(x), len(ks))
    for p, c in enumerate(centroids):
        index = faiss.IndexFlatL2(c.shape[1])
        index.add(c)
        d_ref, i_ref = index.search(x, 1)
        exact = ((x[:, None, :] - c[None]) ** 2).sum(-1)
        # the same nearest centroid (up to float32 ties) and its squared distance
        assert labels[:, p].max() < len(c)
        np.testing.assert_allclose(exact[np.arange(len(x)), labels[:, p]], exact.min(1), rtol=1e-5, atol=1e-5)
        assert (labels[:, p] == i_ref[:, 0]).mean() > 0.999
        np.testing.assert_allclose(dist[:, p], d_ref[:, 0], rtol=1e-4, atol=1e-4)


def test_cpu_gemm_choice_can_be_set_and_rejects_unknown_values(monkeypatch):
    from scpretrain_dist.pseudolabel import kmeans as km

    assert km.cpu_gemm() in ("numpy", "torch")
    monkeypatch.setenv("SCPRETRAIN_CPU_GEMM", "torch")
    assert km.cpu_gemm() == "torch"
    monkeypatch.setenv("SCPRETRAIN_CPU_GEMM", "blis")
    with pytest.raises(ValueError, match="SCPRETRAIN_CPU_GEMM='blis'"):
        km.cpu_gemm()


def test_kmeans_parallel_start_covers_many_blobs_like_the_greedy_start():
    from scpretrain_dist.pseudolabel.kmeans import kmeans_parallel_init, kmeans_plusplus_init

    x, y = blobs(n_per=40, k=300, d=16, spread=0.05, seed=3)
    for init in (kmeans_parallel_init, kmeans_plusplus_init):
        c = init(x, 300, seed=0)
        assert c.shape == (300, 16)
        nearest_blob = y[((c[:, None, :] - x[None]) ** 2).sum(-1).argmin(1)]
        assert len(np.unique(nearest_blob)) >= 285  # almost every blob gets a centre
    np.testing.assert_array_equal(kmeans_parallel_init(x, 300, 1), kmeans_parallel_init(x, 300, 1))


def test_partitions_share_kmeans_parallel_candidates_and_each_start_spreads():
    """Above PARALLEL_INIT_K every partition reduces the candidates drawn for the largest k:
    each start still puts its centres in distinct blobs, and the largest partition's start is
    k-means|| on its own."""
    from scpretrain_dist.pseudolabel.kmeans import PARALLEL_INIT_K, kmeans_parallel_init

    x, y = blobs(n_per=40, k=300, d=16, spread=0.05, seed=5)
    ks = [300, 150, 40]
    assert max(ks) > PARALLEL_INIT_K >= ks[1]
    inits = plusplus_inits(x, ks, seed=0)
    np.testing.assert_array_equal(inits[0], kmeans_parallel_init(x, 300, 0))
    for k, c in zip(ks, inits):
        assert c.shape == (k, 16)
        nearest_blob = y[((c[:, None, :] - x[None]) ** 2).sum(-1).argmin(1)]
        assert len(np.unique(nearest_blob)) >= 0.95 * k
    for a, b in zip(inits, plusplus_inits(x, ks, seed=0)):
        np.testing.assert_array_equal(a, b)


def test_embedding_of_sparse_cells_equals_the_dense_product_across_blocks():
    """The actors' embedding (embedding_bag per block of cells) is sigmoid(x W + b) exactly as a
    dense product gives it, empty cells included and across block boundaries."""
    import scipy.sparse as sp

    from scpretrain_dist.pseudolabel.features import embed

    rng = np.random.default_rng(3)
    X = sp.random(37, 50, density=0.1, format="lil", dtype=np.float32, random_state=4)
    X[5] = 0  # a cell with no measured value
    X = X.tocsr()
    enc = {"weight": rng.standard_normal((50, 8)).astype(np.float32), "bias": rng.standard_normal(8).astype(np.float32)}
    want = 1.0 / (1.0 + np.exp(-(X.toarray().astype(np.float64) @ enc["weight"] + enc["bias"])))
    got = embed(X, enc, block=16)
    assert got.shape == (37, 8) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[5], 1.0 / (1.0 + np.exp(-enc["bias"])), rtol=1e-6)


# ------------------------------------------------------------------ the torch (GPU) Lloyd
def _torch_case():
    import torch

    x, _ = blobs(n_per=300, k=6, d=12, seed=3)
    cents = [x[:6].copy(), x[50:70].copy()]
    return torch, x, cents


def test_torch_lloyd_step_equals_the_blas_step():
    """The GPU backend's arithmetic, run on a CPU tensor: same labels, counts and sums."""
    from scpretrain_dist.pseudolabel import kmeans as km

    torch, x, cents = _torch_case()
    ref, got = km.engine("blas").partial_step(x, cents), km.partial_step_torch(torch.from_numpy(x), cents)
    for p in range(len(cents)):
        np.testing.assert_array_equal(ref.counts[p], got.counts[p])
        np.testing.assert_allclose(ref.sums[p], got.sums[p], rtol=1e-6, atol=1e-6)
        assert got.objective[p] == pytest.approx(ref.objective[p], rel=1e-5)
    (l1, d1), (l2, d2) = km.engine("blas").assign(x, cents), km.assign_torch(torch.from_numpy(x), cents)
    np.testing.assert_array_equal(l1, l2)
    np.testing.assert_allclose(d1, d2, rtol=1e-4, atol=1e-3)


def test_lloyd_on_a_tensor_runs_on_its_device_and_matches_numpy():
    from scpretrain_dist.pseudolabel import kmeans as km

    torch, x, _ = _torch_case()
    inits = plusplus_inits(x, [6, 20], seed=0)
    lab_np, cent_np, obj_np, _ = lloyd(x, inits, niter=10, seed=0)
    lab_t, cent_t, obj_t, _ = lloyd(torch.from_numpy(x), inits, niter=10, seed=0, eng=km.engine("torch"))
    # the two GEMMs sum in different orders: a cell equidistant to two centres may go either way
    assert (lab_np == lab_t).mean() > 0.999
    assert obj_t == pytest.approx(obj_np, rel=1e-4)


def test_use_gpu_without_a_gpu_says_what_to_do():
    import torch

    from scpretrain_dist.pseudolabel.kmeans import gpu_backend

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="pseudolabel.use_gpu=false"):
        gpu_backend()


@pytest.mark.gpu
def test_gpu_lloyd_matches_the_cpu_result():
    import torch

    from scpretrain_dist.pseudolabel import kmeans as km

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    x, _ = blobs(n_per=2000, k=8, d=32, spread=1.0, seed=4)
    cents = [x[:40].copy(), x[100:120].copy()]
    ref, got = km.engine("blas").partial_step(x, cents), km.engine("auto", gpu=True).partial_step(x, cents)
    for p in range(len(cents)):  # one step: the same assignment up to near-ties
        assert np.abs(ref.counts[p] - got.counts[p]).sum() <= 0.002 * len(x)
        assert got.objective[p] == pytest.approx(ref.objective[p], rel=1e-4)
    # whole runs may part at a tie and converge elsewhere: as good a fit, not the same labels
    obj_cpu = km.cluster_cells(x, [40, 20], niter=15, seed=0)[1]["objectives"]
    obj_gpu = km.cluster_cells(x, [40, 20], niter=15, seed=0, eng=km.engine("auto", gpu=True))[1]["objectives"]
    assert obj_gpu == pytest.approx(obj_cpu, rel=0.02)


@pytest.mark.gpu
def test_gpu_actor_slice_keeps_its_cells_on_the_device(demo_store):
    """A K-means actor's slice with use_gpu: the same partial sums as the CPU actor, and the
    cells copied to the GPU once for every iteration."""
    import dataclasses

    import torch

    from scpretrain_dist.config import PseudoLabelConfig
    from scpretrain_dist.pseudolabel.pool import KMeansWorker

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    name = demo_store.datasets()[0].name
    cpu = KMeansWorker(demo_store.locator, PseudoLabelConfig())
    gpu = KMeansWorker(demo_store.locator, dataclasses.replace(PseudoLabelConfig(), use_gpu=True))
    for w in (cpu, gpu):
        w.load_shard(name, 0, 40, None, "expression")
    cents = [gpu.sample(name, np.arange(5)).astype(np.float32)]
    a, b = cpu.step(name, cents), gpu.step(name, cents)
    assert gpu._shards[name]["xt"].is_cuda
    np.testing.assert_array_equal(a.counts[0], b.counts[0])
    np.testing.assert_allclose(a.sums[0], b.sums[0], rtol=1e-5, atol=1e-5)
    (la, da), (lb, db) = cpu.final(name, cents), gpu.final(name, cents)
    np.testing.assert_array_equal(la, lb)
    np.testing.assert_allclose(da, db, rtol=1e-4)
