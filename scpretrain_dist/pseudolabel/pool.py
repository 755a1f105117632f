"""Refresh pseudo-labels with a pool of Ray actors, one dataset per task, largest first.

Each actor reads its dataset from the store itself (only a locator travels) and, after the
first phase, embeds the cells with the current encoder next to the data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from scpretrain_dist.config import PseudoLabelConfig
from scpretrain_dist.pseudolabel.kmeans import cluster_partitions, n_clusters
from scpretrain_dist.store.soma import AtlasLocator, AtlasStore


@dataclass
class PseudoLabels:
    """Labels of every pretraining cell for every partition, plus the k of each."""

    version: int
    labels: dict[str, np.ndarray]  # dataset -> (n_cells, n_partitions) int64
    ks: dict[str, list[int]]
    space: str
    stats: dict[str, dict] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"labels/{d}": v for d, v in self.labels.items()}
        arrays.update({f"ks/{d}": np.asarray(k) for d, k in self.ks.items()})
        np.savez_compressed(path, version=self.version, space=self.space, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> PseudoLabels:
        z = np.load(path, allow_pickle=False)
        labels = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("labels/")}
        ks = {k.split("/", 1)[1]: z[k].tolist() for k in z.files if k.startswith("ks/")}
        return cls(int(z["version"]), labels, ks, str(z["space"]))


def embed(X: sp.csr_matrix, encoder: dict[str, np.ndarray], block: int = 8192) -> np.ndarray:
    """sigmoid(X W + b) for a cells x atlas-genes matrix, in blocks."""
    W, b = encoder["weight"], encoder["bias"]
    out = np.empty((X.shape[0], W.shape[1]), dtype=np.float32)
    for lo in range(0, X.shape[0], block):
        z = X[lo : lo + block] @ W + b
        out[lo : lo + block] = 1.0 / (1.0 + np.exp(-z))
    return out


def clustering_features(
    store: AtlasStore,
    dataset: str,
    space: str,
    encoder: dict[str, np.ndarray] | None,
    pca_dims: int,
    seed: int,
) -> np.ndarray:
    """The matrix K-means runs on: embeddings when an encoder is given, else (normalised or
    raw) expression over the dataset's own genes, optionally PCA-projected."""
    rec = store.dataset(dataset)
    if encoder is not None:
        X = store.read_rows(rec.joinids, rec.value_type, normalize=True)
        return embed(X, encoder)
    X = store.read_rows(rec.joinids, rec.value_type, normalize=(space != "raw"))
    mask = store.dataset_gene_mask(dataset)
    # Genes a dataset never measured are zero in all its cells: dropping them leaves every
    # distance unchanged and shrinks the problem to the dataset's own genes.
    X = X[:, np.flatnonzero(mask)]
    if space == "pca":
        from sklearn.decomposition import TruncatedSVD

        dims = min(pca_dims, X.shape[1] - 1, X.shape[0] - 1)
        centered = X.toarray() - np.asarray(X.mean(0))
        return TruncatedSVD(dims, random_state=seed).fit_transform(centered).astype(np.float32)
    return X.toarray()


class KMeansWorker:
    """Clusters whole datasets. Wrapped as a Ray actor by :func:`refresh_pseudo_labels`."""

    def __init__(self, locator: AtlasLocator, cfg: PseudoLabelConfig):
        self.store = AtlasStore(locator.uri, locator.timestamp_ms)
        self.cfg = cfg

    def cluster(self, dataset: str, encoder: dict | None, space: str) -> tuple[str, np.ndarray, list[int], dict]:
        t0 = time.perf_counter()
        x = clustering_features(
            self.store, dataset, space, encoder, self.cfg.pca_dims, self.cfg.seed
        )
        t_read = time.perf_counter() - t0
        ks = n_clusters(x.shape[0], self.cfg.cluster_sizes, self.cfg.min_k)
        labels, objectives = cluster_partitions(
            x, ks, self.cfg.niter, self.cfg.seed, gpu=self.cfg.use_gpu
        )
        stats = {
            "n_cells": int(x.shape[0]),
            "dims": int(x.shape[1]),
            "read_seconds": t_read,
            "kmeans_seconds": time.perf_counter() - t0 - t_read,
            "objectives": objectives,
        }
        return dataset, labels, ks, stats


def refresh_pseudo_labels(
    locator: AtlasLocator,
    datasets: list[str],
    cfg: PseudoLabelConfig,
    version: int,
    encoder: dict[str, np.ndarray] | None = None,
) -> PseudoLabels:
    """Cluster every dataset at every partition on a pool of Ray actors (Ray must be up)."""
    import ray
    from ray.util import ActorPool

    store = AtlasStore(locator.uri, locator.timestamp_ms)
    sizes = {r.name: r.n_cells for r in store.datasets()}
    order = sorted(datasets, key=lambda d: -sizes[d])  # largest first: shortest makespan
    space = "embedding" if encoder is not None else cfg.phase1_space
    Actor = ray.remote(num_cpus=cfg.cpus_per_actor, num_gpus=1 if cfg.use_gpu else 0)(KMeansWorker)
    actors = [Actor.remote(locator, cfg) for _ in range(max(1, min(cfg.num_actors, len(order))))]
    encoder_ref = ray.put(encoder) if encoder is not None else None
    pool = ActorPool(actors)
    labels, ks, stats = {}, {}, {}
    for name, lab, k, st in pool.map_unordered(
        lambda a, d: a.cluster.remote(d, encoder_ref, space), order
    ):
        labels[name], ks[name], stats[name] = lab, k, st
    for a in actors:
        ray.kill(a)
    return PseudoLabels(version, {d: labels[d] for d in datasets}, {d: ks[d] for d in datasets}, space, stats)


def agreement(previous: PseudoLabels, current: PseudoLabels) -> dict[str, float]:
    """NMI between consecutive pseudo-labels, per dataset and partition, and their mean."""
    from sklearn.metrics import normalized_mutual_info_score

    out = {}
    for d, lab in current.labels.items():
        if d not in previous.labels:
            continue
        for p in range(lab.shape[1]):
            out[f"{d}/p{p}"] = float(normalized_mutual_info_score(previous.labels[d][:, p], lab[:, p]))
    out["mean"] = float(np.mean(list(out.values()))) if out else float("nan")
    out["min"] = float(np.min([v for k, v in out.items() if k != "mean"])) if len(out) > 1 else float("nan")
    return out
