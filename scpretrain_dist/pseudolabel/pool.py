"""Refresh pseudo-labels with a pool of Ray actors.

Datasets go one per task to a pool of actors, largest first. A dataset larger than
``shard_threshold_cells`` is split instead: every actor reads and featurises its own slice of
the dataset's cells, and the driver runs Lloyd iterations by reducing the actors' partial sums
(the same k-means++ start and the same result as one process, see ``kmeans.py``). Actors read
from the store themselves (only a locator and an encoder checkpoint path travel) and embed
their cells with the current encoder next to the data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from scpretrain_dist.config import ConfigError, PseudoLabelConfig
from scpretrain_dist.pseudolabel.features import (
    Projection,
    embed,
    featurize,
    fit_pca,
    read_cells,
    read_encoder,
)
from scpretrain_dist.pseudolabel.kmeans import (
    LloydPartial,
    cluster_cells,
    engine,
    init_sample,
    lloyd_flops,
    n_clusters,
    plusplus_inits,
    run_lloyd,
)
from scpretrain_dist.store.atlas import Atlas, Locator
from scpretrain_dist.store.files import save_npz_whole
from scpretrain_dist.store.sources import csr_nbytes

__all__ = ["KMeansPool", "KMeansWorker", "PseudoLabels", "agreement", "cluster_dataset", "cluster_sharded", "embed",
           "refresh_pseudo_labels"]


@dataclass
class PseudoLabels:
    """Labels of every pretraining cell for every partition, plus the k of each."""

    version: int
    labels: dict[str, np.ndarray]  # dataset -> (n_cells, n_partitions) int64
    ks: dict[str, list[int]]
    space: str
    stats: dict[str, dict] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Written whole or not at all (:mod:`scpretrain_dist.store.files`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"labels/{d}": v for d, v in self.labels.items()}
        arrays.update({f"ks/{d}": np.asarray(k) for d, k in self.ks.items()})
        return save_npz_whole(path, compressed=True, version=self.version, space=self.space, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> PseudoLabels:
        z = np.load(path, allow_pickle=False)
        labels = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("labels/")}
        ks = {k.split("/", 1)[1]: z[k].tolist() for k in z.files if k.startswith("ks/")}
        return cls(int(z["version"]), labels, ks, str(z["space"]))


Encoder = dict[str, np.ndarray] | str | None  # arrays, or the path of an encoder.pt checkpoint


def cluster_dataset(
    store: Atlas, dataset: str, cfg: PseudoLabelConfig, space: str, encoder: dict | None = None,
    X: sp.csr_matrix | None = None,
) -> tuple[np.ndarray, list[int], dict]:
    """All partitions of one dataset in this process: (labels (n, P), ks, stats). ``X``: its
    cells as :func:`read_cells` gives them, when already read."""
    t0 = time.perf_counter()
    n = store.dataset(dataset).n_cells
    X = read_cells(store, dataset, 0, n, space) if X is None else X
    t_read = time.perf_counter()
    projection, x = None, None
    if space == "pca":
        fit_rows = init_sample(n, min(cfg.pca_fit_cells, cfg.init_sample_cells), cfg.seed)
        if len(fit_rows) == n:  # fitted on every cell: their coordinates come with the fit
            projection, x = fit_pca(X, cfg.pca_dims, cfg.seed, cfg.pca_genes, return_fitted=True)
        else:
            projection = fit_pca(X[fit_rows], cfg.pca_dims, cfg.seed, cfg.pca_genes)
    if x is None:
        x = featurize(X, space, encoder, projection)
    del X
    t_feat = time.perf_counter()
    ks = n_clusters(n, cfg.cluster_sizes, cfg.min_k)
    labels, kstats = cluster_cells(x, ks, cfg.niter, cfg.seed, cfg.init_sample_cells, engine(cfg.engine, cfg.use_gpu))
    stats = {"n_cells": n, "dims": int(x.shape[1]), "ks": ks, "shards": 1, "read_seconds": t_read - t0,
             "feature_seconds": t_feat - t_read, "kmeans_seconds": time.perf_counter() - t_feat, **kstats}
    return labels, ks, stats


class PoolError(RuntimeError):
    """The K-means actor pool lost an actor for good."""


class ShardLost(RuntimeError):
    """An actor was asked for a slice of a dataset it does not hold (it was restarted)."""


class KMeansWorker:
    """Clusters whole datasets, or holds one slice of a large dataset's cells for sharded Lloyd
    iterations driven by :func:`cluster_sharded`. Wrapped as a Ray actor by
    :func:`refresh_pseudo_labels`; every method is plain compute on what the actor read."""

    def __init__(self, locator: Locator, cfg: PseudoLabelConfig):
        self.store = locator.atlas()
        self.cfg = cfg
        self._encoders: dict[str, dict] = {}
        self._shards: dict[str, dict] = {}
        self._cells: dict[tuple[str, int, int], sp.csr_matrix] = {}  # (dataset, lo, hi) -> cells

    def _read(self, dataset: str, lo: int, hi: int, space: str) -> tuple[sp.csr_matrix, bool]:
        """Cells ``lo:hi`` of a dataset and whether they came from this actor's cache. The cells
        the embedding space needs (every refresh after the first clusters there) are kept while
        their total stays within ``cfg.cache_bytes``: from a read for that space, or from a
        first-phase read of normalised expression (the same values over the dataset's own
        genes), so even the first embedding refresh reads nothing."""
        key = (dataset, lo, hi)
        if space == "embedding" and key in self._cells:
            return self._cells[key], True
        X = read_cells(self.store, dataset, lo, hi, space)
        if space in ("embedding", "expression", "pca") and key not in self._cells:
            kept = X if space == "embedding" else self._over_atlas_genes(dataset, X)
            if self.cached_bytes() + csr_nbytes(kept) <= self.cfg.cache_bytes:
                self._cells[key] = kept
        return X, False

    def _over_atlas_genes(self, dataset: str, X: sp.csr_matrix) -> sp.csr_matrix:
        """Cells read over a dataset's own genes as the same cells over the atlas genes (what
        the embedding space reads): the genes it never measured are zero in all its cells and
        normalisation is per cell, so only the column numbers change (values shared, not copied)."""
        mask = self.store.dataset_gene_mask(dataset)
        genes = np.flatnonzero(mask).astype(X.indices.dtype)
        return sp.csr_matrix((X.data, genes[X.indices], X.indptr), shape=(X.shape[0], len(mask)))

    def cached_bytes(self) -> int:
        return sum(csr_nbytes(X) for X in self._cells.values())

    def peak_rss_mib(self) -> float:
        """This actor's peak resident set size so far, MiB."""
        from scpretrain_dist.runtime import peak_rss_mib

        return peak_rss_mib()

    def _encoder(self, encoder: Encoder) -> dict | None:
        if isinstance(encoder, str):
            if encoder not in self._encoders:
                self._encoders[encoder] = read_encoder(encoder)
            return self._encoders[encoder]
        return encoder

    def warm_up(self) -> bool:
        import faiss  # noqa: F401
        import torch  # noqa: F401  (the assignment's GEMM, and the embedding)

        self.store.datasets()
        return True

    def cluster(self, dataset: str, encoder: Encoder, space: str) -> tuple[str, np.ndarray, list[int], dict]:
        t0 = time.perf_counter()
        X, cached = self._read(dataset, 0, self.store.dataset(dataset).n_cells, space)
        t_read = time.perf_counter() - t0
        labels, ks, stats = cluster_dataset(self.store, dataset, self.cfg, space, self._encoder(encoder), X)
        stats.update(read_seconds=t_read, cells_cached=cached)
        return dataset, labels, ks, stats

    # -------------------------------------------------------------- one slice of a dataset
    def load_shard(self, dataset: str, lo: int, hi: int, encoder: Encoder, space: str) -> dict:
        """Read cells ``lo:hi`` of ``dataset`` and featurise them (PCA waits for its fit)."""
        t0 = time.perf_counter()
        X, cached = self._read(dataset, lo, hi, space)
        t1 = time.perf_counter()
        shard = {"lo": lo, "hi": hi, "X": X, "x": None}
        if space != "pca":
            shard["x"] = featurize(X, space, self._encoder(encoder))
            shard["X"] = None
        self._shards[dataset] = shard
        return {"read_seconds": t1 - t0, "feature_seconds": time.perf_counter() - t1, "cells_cached": cached}

    def _shard(self, dataset: str) -> dict:
        if dataset not in self._shards:
            raise ShardLost(f"this K-means actor holds no slice of {dataset} (it was restarted)")
        return self._shards[dataset]

    def sample(self, dataset: str, positions: np.ndarray) -> sp.csr_matrix | np.ndarray:
        """Rows at dataset positions (within this shard): raw CSR before a PCA fit, else
        features."""
        shard = self._shard(dataset)
        local = np.asarray(positions) - shard["lo"]
        return shard["X"][local] if shard["x"] is None else shard["x"][local]

    def project(self, dataset: str, projection: Projection) -> float:
        t0 = time.perf_counter()
        shard = self._shard(dataset)
        shard["x"] = projection.apply(shard["X"])
        shard["X"] = None
        return time.perf_counter() - t0

    def starts(self, x_sample: np.ndarray, ks: list[int], seed: int) -> list[np.ndarray]:
        """Every partition's k-means++ start (:func:`plusplus_inits`)."""
        return plusplus_inits(x_sample, ks, seed)

    def _held(self, shard: dict):
        """The slice's cells as Lloyd holds them (on the GPU with torch: copied there once)."""
        if "xt" not in shard:
            eng = self._engine()
            shard["xt"] = eng.hold(shard["x"])
            shard["x64"] = eng.float64_cells(shard["xt"])  # for the sums, made once for every iteration
        return shard["xt"]

    def _engine(self):
        return engine(self.cfg.engine, self.cfg.use_gpu)

    def step(self, dataset: str, centroids: list[np.ndarray]) -> LloydPartial:
        shard = self._shard(dataset)
        return self._engine().partial_step(self._held(shard), centroids, shard["x64"])

    def final(self, dataset: str, centroids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Labels of this shard's cells and its summed squared distances per partition."""
        shard = self._shard(dataset)
        labels, dist = self._engine().assign(self._held(shard), centroids)
        del self._shards[dataset]
        return labels, dist.sum(0, dtype=np.float64)


def cluster_sharded(actors: list, store: Atlas, dataset: str, cfg: PseudoLabelConfig, space: str,
                    encoder: Encoder) -> tuple[np.ndarray, list[int], dict]:
    """One large dataset over every actor: each featurises its slice; the driver gathers the
    k-means++ sample (and fits the PCA on it), then runs Lloyd by reducing the actors' sums.
    An actor restarted on the way (it lost its slice) makes the dataset start over, at most
    ``cfg.actor_restarts`` times; every attempt computes the same labels."""
    import ray

    attempt = 1
    while True:
        try:
            labels, ks, stats = _cluster_sharded_once(actors, store, dataset, cfg, space, encoder)
            return labels, ks, stats | {"attempts": attempt}
        except ray.exceptions.RayTaskError as e:
            if not isinstance(getattr(e, "cause", None), ShardLost) or attempt > max(0, cfg.actor_restarts):
                raise
            attempt += 1


def _cluster_sharded_once(actors: list, store: Atlas, dataset: str, cfg: PseudoLabelConfig, space: str,
                          encoder: Encoder) -> tuple[np.ndarray, list[int], dict]:
    import ray

    t0 = time.perf_counter()
    n = store.dataset(dataset).n_cells
    bounds = np.linspace(0, n, len(actors) + 1).astype(np.int64)
    loads = ray.get([a.load_shard.remote(dataset, int(lo), int(hi), encoder, space)
                     for a, lo, hi in zip(actors, bounds[:-1], bounds[1:])])
    t_load = time.perf_counter()

    def gather(positions):  # rows at sorted dataset positions, from the actors holding them
        owner = np.searchsorted(bounds, positions, side="right") - 1
        return ray.get([a.sample.remote(dataset, positions[owner == i]) for i, a in enumerate(actors)])

    sample = init_sample(n, cfg.init_sample_cells, cfg.seed)
    if space == "pca":
        fit_rows = init_sample(n, min(cfg.pca_fit_cells, cfg.init_sample_cells), cfg.seed)
        projection = fit_pca(sp.vstack(gather(fit_rows)).tocsr(), cfg.pca_dims, cfg.seed, cfg.pca_genes)
        ref = ray.put(projection)
        ray.get([a.project.remote(dataset, ref) for a in actors])
    x_sample = np.concatenate(gather(sample))
    t_feat = time.perf_counter()
    ks = n_clusters(n, cfg.cluster_sizes, cfg.min_k)
    # the starts on one actor: the partitions share their k-means|| candidates
    inits = ray.get(actors[0].starts.remote(x_sample, ks, cfg.seed))
    t_init = time.perf_counter()

    def step(centroids):
        ref = ray.put(centroids)
        return ray.get([a.step.remote(dataset, ref) for a in actors])

    centroids, iterations = run_lloyd(step, inits, cfg.niter, cfg.seed)
    ref = ray.put(centroids)
    finals = ray.get([a.final.remote(dataset, ref) for a in actors])
    t_end = time.perf_counter()
    labels = np.concatenate([f[0] for f in finals])
    dims = int(x_sample.shape[1])
    stats = {
        "n_cells": n, "dims": dims, "ks": ks, "shards": len(actors),
        "read_seconds": max(ld["read_seconds"] for ld in loads),
        "cells_cached": all(ld["cells_cached"] for ld in loads),
        "feature_seconds": t_feat - t_load + max(ld["feature_seconds"] for ld in loads),
        "init_seconds": t_init - t_feat, "lloyd_seconds": t_end - t_init,
        "kmeans_seconds": t_end - t_feat, "wall_seconds": t_end - t0,
        "lloyd_iterations": iterations, "lloyd_flops": lloyd_flops(n, ks, dims, iterations),
        "objectives": [float(v) for v in np.sum([f[1] for f in finals], axis=0)],
    }
    return labels, ks, stats


class KMeansPool:
    """A pool of K-means actors reused across refreshes (their start-up and imports are paid
    once). Use as a context manager, or call :meth:`close`; Ray must be up."""

    def __init__(self, locator: Locator, cfg: PseudoLabelConfig, n_actors: int | None = None):
        from scpretrain_dist.runtime import restartable

        self.locator, self.cfg = locator, cfg
        Actor = restartable(KMeansWorker, cfg.actor_restarts, num_cpus=cfg.cpus_per_actor,
                            num_gpus=1 if cfg.use_gpu else 0)
        self.actors = [Actor.remote(locator, cfg) for _ in range(max(1, n_actors or cfg.num_actors))]
        self.home: dict[str, int] = {}  # dataset -> the actor that last clustered it whole

    def warm_up(self) -> None:
        """Wait until every actor has started and imported what clustering needs."""
        import ray

        ray.get([a.warm_up.remote() for a in self.actors])

    def refresh(self, datasets: list[str], version: int, encoder: Encoder = None) -> PseudoLabels:
        """Cluster every dataset at every partition.

        ``encoder``: None for the first phase (``cfg.phase1_space``), else the embedding space
        of this encoder, given as the path of its checkpoint (each actor loads it) or as arrays.
        """
        import ray

        cfg = self.cfg
        store = self.locator.atlas()
        sizes = {r.name: r.n_cells for r in store.datasets()}
        missing = sorted(set(datasets) - set(sizes))
        if missing:
            raise ConfigError(f"datasets {missing} are not in the atlas {self.locator.uri}")
        order = sorted(datasets, key=lambda d: -sizes[d])  # largest first: shortest makespan
        space = "embedding" if encoder is not None else cfg.phase1_space
        sharded = [d for d in order if sizes[d] > cfg.shard_threshold_cells]
        whole = [d for d in order if sizes[d] <= cfg.shard_threshold_cells]
        encoder_ref = ray.put(encoder) if isinstance(encoder, dict) else encoder
        labels, ks, stats = {}, {}, {}
        try:
            for name in sharded:
                labels[name], ks[name], stats[name] = cluster_sharded(self.actors, store, name, cfg, space, encoder_ref)
            for name, lab, k, st in self._cluster_whole(whole, encoder_ref, space):
                labels[name], ks[name], stats[name] = lab, k, st
        except ray.exceptions.ActorDiedError as e:
            raise PoolError(
                f"a K-means actor died after {max(0, cfg.actor_restarts)} restart(s) (pseudolabel.actor_restarts); "
                f"rerun the same command: pretraining resumes after its last finished step. "
                f"Ray said: {str(e).splitlines()[0]}") from None
        return PseudoLabels(version, {d: labels[d] for d in datasets}, {d: ks[d] for d in datasets}, space, stats)

    def _cluster_whole(self, datasets: list[str], encoder, space: str):
        """Whole datasets, one task per dataset, largest first. A dataset goes back to the actor
        that clustered it last (its cells may be cached there); one without an actor goes to
        whichever actor is free first, so the first refresh places datasets as a greedy
        largest-first schedule does and later refreshes keep that balance."""
        import ray

        from scpretrain_dist.runtime import on_actors

        tasks = on_actors(self.actors, datasets, lambda actor, d: actor.cluster.remote(d, encoder, space),
                          home=self.home.get)
        for i, d, done in tasks:
            self.home[d] = i
            yield ray.get(done)

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []

    def __enter__(self) -> KMeansPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def refresh_pseudo_labels(
    locator: Locator,
    datasets: list[str],
    cfg: PseudoLabelConfig,
    version: int,
    encoder: Encoder = None,
) -> PseudoLabels:
    """One refresh on a pool started for it (see :meth:`KMeansPool.refresh`)."""
    sizes = {r.name: r.n_cells for r in locator.atlas().datasets()}
    any_sharded = any(sizes.get(d, 0) > cfg.shard_threshold_cells for d in datasets)
    n_actors = cfg.num_actors if any_sharded else min(cfg.num_actors, max(1, len(datasets)))
    with KMeansPool(locator, cfg, n_actors) as pool:
        return pool.refresh(datasets, version, encoder)


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
