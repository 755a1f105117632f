"""Pure K-means: arrays in, labels and stats out. faiss Lloyd iterations from a k-means++ start."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class KMeansResult:
    labels: np.ndarray  # (n,) int64
    centroids: np.ndarray  # (k, d) float32
    objective: float  # sum of squared distances to the assigned centroid
    seconds: float


def n_clusters(n_cells: int, cluster_sizes: tuple[int, ...], min_k: int = 2) -> list[int]:
    """One k per partition: mean cluster size s gives k = n / s, at least ``min_k``, at most n."""
    return [int(min(n_cells, max(min_k, round(n_cells / s)))) for s in cluster_sizes]


def kmeans_plusplus_init(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import kmeans_plusplus

    centers, _ = kmeans_plusplus(x, k, random_state=seed)
    return np.ascontiguousarray(centers, dtype=np.float32)


def kmeans(
    x: np.ndarray, k: int, niter: int = 30, seed: int = 0, gpu: bool = False
) -> KMeansResult:
    """Lloyd's algorithm in faiss, started from k-means++ centroids (a random start fits much
    worse on expression data)."""
    import time

    import faiss

    t0 = time.perf_counter()
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must lie between 1 and the number of points ({n})")
    init = kmeans_plusplus_init(x, k, seed)
    km = faiss.Kmeans(
        d, k, niter=niter, seed=seed, gpu=gpu, min_points_per_centroid=1,
        max_points_per_centroid=max(256, n // k + 1), verbose=False,
    )
    km.train(x, init_centroids=init)
    dist, labels = km.index.search(x, 1)
    return KMeansResult(
        labels=labels.ravel().astype(np.int64),
        centroids=km.centroids.copy(),
        objective=float(dist.sum()),
        seconds=time.perf_counter() - t0,
    )


def lloyd_step(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """One assignment pass over a shard: (labels, per-centroid sums, counts, objective).

    Sharded Lloyd iterations reduce the sums and counts of every shard, then divide.
    """
    import faiss

    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    dist, labels = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    labels = labels.ravel()
    k = centroids.shape[0]
    sums = np.zeros_like(centroids, dtype=np.float64)
    np.add.at(sums, labels, x)
    counts = np.bincount(labels, minlength=k)
    return labels, sums, counts, float(dist.sum())


def cluster_partitions(
    x: np.ndarray, ks: list[int], niter: int, seed: int, gpu: bool = False
) -> tuple[np.ndarray, list[float]]:
    """All partitions of one dataset: labels (n, len(ks)) and each partition's objective."""
    labels = np.empty((x.shape[0], len(ks)), dtype=np.int64)
    objectives = []
    for p, k in enumerate(ks):
        res = kmeans(x, k, niter=niter, seed=seed + p, gpu=gpu)
        labels[:, p] = res.labels
        objectives.append(res.objective)
    return labels, objectives
