"""Refreshing every pseudo-label of an atlas (3 partitions per dataset, k = n/50, n/100, n/200):
ours (the Ray actor pool) vs sequential faiss and scikit-learn on full normalised expression.

What each method clusters, honestly stated in the result:
- ours: ``pseudolabel.phase1_space`` (default here "pca": a 50-dimensional sparse randomized PCA
  of each dataset's normalised expression) or, with ``--encoder``, the encoder's embedding;
  datasets in parallel on the actor pool, Lloyd from a k-means++ start, all partitions of a
  dataset in one pass; datasets above ``shard_threshold_cells`` split over every actor;
- faiss_sequential_expression (the original implementation's approach): one dataset after the
  other, faiss.Kmeans with its own (random) initialisation on the dense normalised expression
  over the dataset's genes;
- sklearn_expression: scikit-learn KMeans (k-means++, one init, Lloyd) on the sparse normalised
  expression, one dataset after the other.
Every method reads its cells from the same store and its time includes that reading. Peers get
as many threads as ours has actors. Ours is timed on a started pool (the pool lives through a
whole pretraining run, so every refresh after the first finds it started); the pool's start-up
is reported beside it, with the speed-up it leaves. With ``--encoder`` the same refresh runs a
second time, as every later refresh of a pretraining run does: the actors then embed the cells
they kept from the first (``pseudolabel.cache_bytes``) instead of reading the store; the headline
and the peers' ratios stay those of the first refresh, which reads, as the peers do. Quality: NMI of each partition's pseudo-labels to the
atlas's cell types (labelled cells only), averaged over datasets and partitions, with purity
and cluster balance beside it (see ``_nmi``). Every method's pseudo-labels are saved.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import numpy as np

PEERS = ("faiss", "sklearn")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.set_defaults(recipe="paper")  # the method's K-means settings (30 Lloyd iterations)
    p.add_argument("--store", help="atlas to cluster (default: the work dir's atlas.soma)")
    p.add_argument("--datasets", nargs="*", help="datasets to cluster (default: all)")
    p.add_argument("--space", default="pca", choices=["pca", "expression", "raw"],
                   help="our first-phase space (default pca); ignored with --encoder")
    p.add_argument("--encoder", help="an encoder.pt: cluster our side on its embedding instead; 'random' for a "
                   "seeded, untrained encoder over the atlas genes (times the embedding-space refresh without a "
                   "pretraining run; its NMI says nothing about pretraining)")
    p.add_argument("--peers", default="faiss,sklearn", help=f"peers to run, from {','.join(PEERS)} ('' for none)")
    p.add_argument("--threads", type=int, default=0, help="threads for the peers (default: our actor count)")
    p.add_argument("--gemm-size", type=int, default=2048,
                   help="n of the n x n float32 GEMM that measures the machine's matmul rate (default 2048)")
    p.add_argument("--engines", action="store_true",
                   help="instead: time the K-means engines (ours, faiss in our loop, faiss.Kmeans) against each "
                        "other on identical features, starts and iterations, one thread each, interleaved runs")
    p.add_argument("--engine-shapes", default="20000x50,60000x200,160000x200",
                   help="--engines: cells x dims of the synthetic features (k = n/50, n/100, n/200)")
    p.add_argument("--engine-iterations", type=int, default=10, help="--engines: Lloyd iterations of every run")
    p.add_argument("--engine-repeats", type=int, default=3, help="--engines: interleaved runs per engine")
    p.add_argument("--pca", nargs="+", metavar="H5AD",
                   help="instead: the pseudo-labels' PCA (fit_pca, 2000 most variable genes) vs scikit-learn's on "
                        "the same genes and on all genes, one thread, on these .h5ad files' normalised cells")


def run(args) -> dict:
    if args.pca:
        return run_pca(args)
    if args.engines:
        return run_engines(args)
    import ray

    from scpretrain_dist import recipes
    from scpretrain_dist.bench.report import result
    from scpretrain_dist.config import ConfigError, merge
    from scpretrain_dist.pseudolabel.kmeans import cpu_gemm
    from scpretrain_dist.pseudolabel.pool import KMeansPool
    from scpretrain_dist.runtime import init_ray, peak_rss_mib, ray_scope
    from scpretrain_dist.store.atlas import StoreError, atlas_for

    load_start = os.getloadavg()[0]  # a shared machine: other work changes every timing
    cfg = recipes.configure(args.recipe, args.config, args.set, args.work_dir)
    if args.store:
        cfg = merge(cfg, {"store": {"uri": str(Path(args.store).resolve())}})
    pcfg = dataclasses.replace(cfg.pseudolabel, phase1_space=args.space)
    peers = [p for p in str(args.peers).split(",") if p]
    bad = sorted(set(peers) - set(PEERS))
    if bad:
        raise ConfigError(f"--peers {bad} unknown; choose from {', '.join(PEERS)}")
    if args.encoder and args.encoder != "random" and not Path(args.encoder).exists():
        raise ConfigError(f"--encoder {args.encoder} does not exist (give an encoder.pt, or 'random')")
    store = atlas_for(cfg)
    records = {r.name: r for r in store.datasets()}
    datasets = args.datasets or list(records)
    unknown = sorted(set(datasets) - set(records))
    if unknown:
        raise StoreError(f"datasets {unknown} are not in the atlas {cfg.store_uri}")
    threads = args.threads or max(1, pcfg.num_actors)
    truth = _true_labels(store, datasets)
    matmul = measure_matmul(threads, args.gemm_size)
    print(f"matmul float32: {matmul['flops_per_second_1_thread'] / 1e9:.1f} GFLOP/s on 1 thread, "
          f"{matmul['flops_per_second_all_threads'] / 1e9:.1f} on {matmul['threads']} (best of "
          f"{', '.join(matmul['per_library'])}); the assignment's GEMM: {cpu_gemm()}")

    # ---------------------------------------------------------------- ours
    locator = store.locator.pinned()
    encoder = str(Path(args.encoder).resolve()) if args.encoder and args.encoder != "random" else None
    if args.encoder == "random":
        encoder = _random_encoder(Path(cfg.work_dir) / "bench_kmeans" / "random_encoder.pt", store.n_genes,
                                  cfg.model.embedding_dim, pcfg.seed)
    with ray_scope():  # a caller's Ray (a test session's) stays up
        init_ray(cfg)
        t0 = time.perf_counter()
        with KMeansPool(locator, pcfg) as pool:
            pool.warm_up()
            t_start = time.perf_counter() - t0
            t0 = time.perf_counter()
            ours = pool.refresh(datasets, 0, encoder)
            t_ours = time.perf_counter() - t0
            later = None
            if encoder:  # what every later refresh of a pretraining run pays: cells cached
                t0 = time.perf_counter()
                later = pool.refresh(datasets, 1, encoder)
                t_later = time.perf_counter() - t0
                print(f"ours, the same refresh again (cells kept by the actors): {t_later:.1f}s")
            actor_memory = {
                "peak_rss_mib": ray.get([a.peak_rss_mib.remote() for a in pool.actors]),
                "cached_mib": [b / 2**20 for b in ray.get([a.cached_bytes.remote() for a in pool.actors])],
                "cache_bytes_setting": pcfg.cache_bytes,
            }
    flops = sum(s["lloyd_flops"] for s in ours.stats.values())
    lloyd_core_seconds = sum(s["lloyd_seconds"] for s in ours.stats.values())
    stage_seconds = _stage_seconds(ours)
    methods = {"ours": {"seconds": t_ours, "labels": ours.labels,
                        "clusters": f"{ours.space} ({next(iter(ours.stats.values()))['dims']} dims)"}}
    print(f"ours: {t_ours:.1f}s ({ours.space}), pool start-up {t_start:.1f}s")

    # ---------------------------------------------------------------- peers
    for peer in peers:
        t0 = time.perf_counter()
        labels, read_s = (faiss_sequential if peer == "faiss" else sklearn_sequential)(store, datasets, pcfg, threads)
        methods[f"{peer}_{'sequential_' if peer == 'faiss' else ''}expression"] = {
            "seconds": time.perf_counter() - t0, "read_seconds": read_s, "labels": labels,
            "clusters": "dense normalised expression over each dataset's genes" if peer == "faiss"
            else "sparse normalised expression over each dataset's genes"}
        print(f"{peer}: {time.perf_counter() - t0:.1f}s")

    nmi = {m: _nmi(v["labels"], truth) for m, v in methods.items()}
    labels_file = Path(cfg.work_dir) / "bench_kmeans" / "pseudo_labels.npz"
    labels_file.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(labels_file, **{f"{m}/{d}": lab for m, v in methods.items() for d, lab in v["labels"].items()})
    # the machine's rate: the measured all-thread GEMM, or the 1-thread one times the threads
    # when that is higher (the other core busy with other work), whichever is larger
    machine_rate = max(matmul["flops_per_second_all_threads"], threads * matmul["flops_per_second_1_thread"])
    matmul["machine_flops_per_second"] = machine_rate
    matmul["assignment_gemm"] = cpu_gemm()
    peer_seconds = {m: v["seconds"] for m, v in methods.items() if m != "ours"}
    faiss_key = "faiss_sequential_expression"
    targets = {}
    if faiss_key in methods:
        targets = {
            "speedup_vs_faiss_expression": peer_seconds[faiss_key] / t_ours,
            "speedup_target": 10.0,
            "nmi_gap_to_faiss_expression": nmi["ours"]["mean"] - nmi[faiss_key]["mean"],
            "nmi_gap_allowed": -0.02,
        }
    targets.update({
        "fraction_of_machine_matmul_rate": flops / t_ours / machine_rate,
        "fraction_of_one_core_in_lloyd": flops / lloyd_core_seconds / matmul["flops_per_second_1_thread"]
        if lloyd_core_seconds else None,
        "fraction_target": 0.5,
    })
    if faiss_key in methods:
        targets["speedup_vs_faiss_expression_cold_pool"] = peer_seconds[faiss_key] / (t_ours + t_start)
    later_detail = None
    if later is not None:
        targets["fraction_of_machine_matmul_rate_later_refreshes"] = flops / t_later / machine_rate
        later_detail = {
            "seconds": t_later, "stage_seconds_summed_over_datasets": _stage_seconds(later),
            "datasets_from_actor_cache": sum(bool(s.get("cells_cached")) for s in later.stats.values()),
            "labels_equal_first_refresh": all(np.array_equal(later.labels[d], ours.labels[d]) for d in datasets),
            "flops_per_second_wall": flops / t_later,
        }
    extra_load = {"load_average_1min_start_end": [load_start, os.getloadavg()[0]]}
    return result(
        "kmeans", "seconds to refresh all pseudo-labels", t_ours, peer_seconds, higher_is_better=False,
        atlas={"store": cfg.store_uri, "datasets": len(datasets),
               "cells": int(sum(records[d].n_cells for d in datasets))},
        what_is_clustered={m: v["clusters"] for m, v in methods.items()},
        nmi_to_cell_types={m: v["mean"] for m, v in nmi.items()},
        purity_to_cell_types={m: v["purity"] for m, v in nmi.items()},
        effective_clusters_fraction_of_k={m: v["effective_clusters_fraction"] for m, v in nmi.items()},
        labels_file=str(labels_file),
        nmi_per_dataset={m: v["per_dataset"] for m, v in nmi.items()},
        ours_detail={
            "actors": pcfg.num_actors, "space": ours.space, "niter": pcfg.niter,
            "pool_startup_seconds": t_start, "seconds_cold_pool": t_ours + t_start,
            "stage_seconds_summed_over_datasets": stage_seconds,
            "sharded_datasets": [d for d, s in ours.stats.items() if s["shards"] > 1],
            "lloyd_flops": flops,
            # per dataset, the iterations each partition ran (fewer than niter: its fixed point)
            "lloyd_iterations": {d: s["lloyd_iterations"] for d, s in ours.stats.items()},
            "flops_per_second_wall": flops / t_ours,
            "flops_per_second_per_core_in_lloyd": flops / lloyd_core_seconds if lloyd_core_seconds else None,
            "later_refresh": later_detail,
        },
        matmul=matmul,
        targets=targets,
        peer_threads=threads,
        peak_rss_mib_driver=peak_rss_mib(),
        actor_memory=actor_memory,
        **extra_load,
    )


ENGINE_RUNS = ("blas", "faiss", "faiss.Kmeans")


def _features(n: int, d: int, seed: int) -> np.ndarray:
    """Synthetic cells x features: 40 Gaussian groups of uneven size and spread (as embeddings
    of cell types are), float32, the same for a seed."""
    rng = np.random.default_rng([seed, n, d])
    centers = rng.normal(0, 3, (40, d))
    group = rng.choice(40, n, p=rng.dirichlet(np.ones(40)))
    return (centers[group] + rng.normal(0, 1, (n, d)) * rng.uniform(0.5, 2.0, 40)[group, None]).astype(np.float32)


def _faiss_kmeans(x: np.ndarray, inits: list[np.ndarray], niter: int) -> tuple[np.ndarray, list[float]]:
    """faiss's own K-means loop (faiss.Kmeans) from the given starts, every cell used (no
    subsampling), then its index's assignment."""
    import faiss

    labels = np.empty((len(x), len(inits)), dtype=np.int64)
    objectives = []
    for p, c in enumerate(inits):
        km = faiss.Kmeans(x.shape[1], len(c), niter=niter, seed=0, verbose=False,
                          max_points_per_centroid=len(x), min_points_per_centroid=1)
        km.train(x, init_centroids=np.ascontiguousarray(c, dtype=np.float32))
        d, i = km.index.search(x, 1)
        labels[:, p] = i[:, 0]
        objectives.append(float(d.sum(dtype=np.float64)))
    return labels, objectives


def run_engines(args) -> dict:
    """The engines on identical features, identical k-means++ starts and identical iteration
    counts (no early stop), one thread each, ``--engine-repeats`` interleaved runs: the CPU
    engine of ``pseudolabel.engine = "auto"`` is the one measured fastest here."""
    import faiss
    import torch
    from sklearn.metrics import adjusted_rand_score
    from threadpoolctl import threadpool_limits

    from scpretrain_dist.bench.report import result
    from scpretrain_dist.config import ConfigError
    from scpretrain_dist.pseudolabel.kmeans import (
        CPU_DEFAULT_ENGINE,
        cpu_gemm,
        engine,
        lloyd,
        lloyd_flops,
        plusplus_inits,
    )

    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.engine_shapes.split(",") if s]
    except ValueError:
        raise ConfigError(f"--engine-shapes {args.engine_shapes!r}: give cells x dims, e.g. 20000x50,160000x200") from None
    if args.engine_iterations < 1 or args.engine_repeats < 1 or not shapes:
        raise ConfigError("--engine-iterations and --engine-repeats must be >= 1, and --engine-shapes non-empty")
    niter, seed = args.engine_iterations, 0
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    out = {}
    with threadpool_limits(1):
        for n, d in shapes:
            x = _features(n, d, seed)
            ks = [max(2, round(n / s)) for s in (50, 100, 200)]
            inits = plusplus_inits(x[np.random.default_rng(seed).choice(n, min(n, 100_000), replace=False)], ks, seed)
            times = {e: [] for e in ENGINE_RUNS}
            labels, objectives = {}, {}
            for _ in range(args.engine_repeats):  # interleaved: every engine once per round
                for e in ENGINE_RUNS:
                    t0 = time.perf_counter()
                    if e == "faiss.Kmeans":
                        lab, obj = _faiss_kmeans(x, inits, niter)
                    else:
                        lab, _, obj, _ = lloyd(x, inits, niter, seed, engine(e), stop_at_fixed_point=False)
                    times[e].append(time.perf_counter() - t0)
                    labels[e], objectives[e] = lab, obj
            flops = lloyd_flops(n, ks, d, niter)
            shape = f"{n}x{d}"
            out[shape] = {
                "cells": n, "dims": d, "ks": ks, "iterations": niter,
                "seconds": {e: sorted(t)[len(t) // 2] for e, t in times.items()},
                "runs_seconds": times,
                "gflops_per_second": {e: flops / sorted(t)[len(t) // 2] / 1e9 for e, t in times.items()},
                "objective_relative_to_blas": {e: float(np.sum(o) / np.sum(objectives["blas"])) for e, o in objectives.items()},
                "ari_to_blas_labels": {e: float(np.mean([adjusted_rand_score(labels["blas"][:, p], labels[e][:, p])
                                                         for p in range(len(ks))])) for e in ENGINE_RUNS},
            }
            s = out[shape]["seconds"]
            print(f"{shape} k={ks}, {niter} iterations, 1 thread: " + ", ".join(f"{e} {v:.2f}s" for e, v in s.items()))
    total = {e: sum(v["seconds"][e] for v in out.values()) for e in ENGINE_RUNS}
    fastest_cpu = min(("blas", "faiss"), key=lambda e: total[e])
    return result("kmeans_engines", "seconds (sum over shapes, median of interleaved runs)", total["blas"],
                  {e: total[e] for e in ENGINE_RUNS if e != "blas"}, higher_is_better=False,
                  shapes=out, threads=1, assignment_gemm=cpu_gemm(), fastest_cpu_engine=fastest_cpu,
                  cpu_default_engine=CPU_DEFAULT_ENGINE,
                  note="ours = the blas engine; faiss = faiss's exact search inside the same Lloyd loop; "
                       "faiss.Kmeans = faiss's own loop from the same starts, every cell used")


def run_pca(args) -> dict:
    """Time and variance captured of the two PCAs (see docs/architecture.md), per file and dims."""
    import scipy.sparse as sp
    from sklearn.decomposition import PCA
    from threadpoolctl import threadpool_limits

    from scpretrain_dist.bench.report import result
    from scpretrain_dist.catalog.entries import read_h5ad
    from scpretrain_dist.catalog.values import detect_value_type
    from scpretrain_dist.data.normalize import normalize_rows
    from scpretrain_dist.pseudolabel.features import fit_pca, most_variable_genes

    def timed(f, *a, **kw):
        t0 = time.perf_counter()
        out = f(*a, **kw)
        return out, time.perf_counter() - t0

    def sklearn_pca(dims, dense):
        return PCA(dims, random_state=0).fit_transform(dense)

    files = {}
    with threadpool_limits(1):
        for path in args.pca:
            a = read_h5ad(path, "--pca")
            X = normalize_rows(sp.csr_matrix(a.X), detect_value_type(a.X))
            genes = most_variable_genes(X, 2000)
            A = np.asarray(X[:, genes].todense(), np.float64)
            A -= A.mean(0)
            total = float((A**2).sum())
            row = {"cells": X.shape[0], "genes": X.shape[1]}
            for dims in (50, 200):
                (_, z), t_ours = timed(fit_pca, X, dims, 0, 2000, return_fitted=True)
                t0 = time.perf_counter()
                zh = sklearn_pca(dims, np.asarray(X[:, genes].todense(), np.float32))
                t_same = time.perf_counter() - t0
                t0 = time.perf_counter()
                sklearn_pca(dims, np.asarray(X.todense(), np.float32))
                t_all = time.perf_counter() - t0
                row[f"dims_{dims}"] = {
                    "fit_pca_seconds": t_ours, "sklearn_same_genes_seconds": t_same, "sklearn_all_genes_seconds": t_all,
                    "variance_captured_fit_pca": float((z.astype(np.float64) ** 2).sum() / total),
                    "variance_captured_sklearn_same_genes": float((zh.astype(np.float64) ** 2).sum() / total)}
                print(f"{Path(path).name} {dims} dims: fit_pca {t_ours:.2f}s, scikit-learn same genes {t_same:.2f}s, "
                      f"all genes {t_all:.2f}s")
            files[Path(path).name] = row
    first = next(iter(files.values()))["dims_50"]
    return result("pca", "seconds, 50 dims, first file", first["fit_pca_seconds"],
                  {"sklearn_same_genes": first["sklearn_same_genes_seconds"],
                   "sklearn_all_genes": first["sklearn_all_genes_seconds"]}, higher_is_better=False, files=files)


def _random_encoder(path: Path, n_genes: int, dim: int, seed: int) -> str:
    """A seeded, untrained encoder checkpoint (the model's own initialisation)."""
    import torch

    from scpretrain_dist.model.networks import Encoder
    from scpretrain_dist.pseudolabel.features import write_encoder

    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    return str(write_encoder(Encoder(n_genes, dim), path))


def _stage_seconds(labels) -> dict:
    return {k: sum(s[k] for s in labels.stats.values())
            for k in ("read_seconds", "feature_seconds", "init_seconds", "lloyd_seconds")}


def measure_matmul(threads: int, n: int = 2048, repeats: int = 5) -> dict:
    """float32 GEMM rate of this machine on 1 thread and on ``threads`` threads: the best of
    torch's GEMM (MKL on x86) and numpy's (OpenBLAS), each library's rates kept as well. The
    faster library differs between CPUs (see ``kmeans.cpu_gemm``), and the machine's rate is
    what the faster one reaches."""
    import torch
    from threadpoolctl import threadpool_limits

    def best_seconds(product) -> float:
        product()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            product()
            best = min(best, time.perf_counter() - t0)
        return best

    before = torch.get_num_threads()
    out = {"size": n, "threads": threads, "per_library": {}}
    a, b = torch.randn(n, n), torch.randn(n, n)
    an, bn = a.numpy(), b.numpy()
    try:
        for key, t in (("flops_per_second_1_thread", 1), ("flops_per_second_all_threads", threads)):
            torch.set_num_threads(t)
            rates = {"torch": 2.0 * n**3 / best_seconds(lambda: torch.mm(a, b))}
            with threadpool_limits(t):
                rates["numpy"] = 2.0 * n**3 / best_seconds(lambda: an @ bn)
            for lib, rate in rates.items():
                out["per_library"].setdefault(lib, {})[key] = rate
            out[key] = max(rates.values())
    finally:
        torch.set_num_threads(before)
    return out


def faiss_sequential(store, datasets, cfg, threads) -> tuple[dict, float]:
    """The original approach: each dataset's dense normalised expression, faiss.Kmeans (its own
    random initialisation), one dataset and one partition after the other."""

    from scpretrain_dist.pseudolabel.features import read_cells
    from scpretrain_dist.pseudolabel.kmeans import n_clusters

    out, read_s = {}, 0.0
    for d in datasets:
        t0 = time.perf_counter()
        n = store.dataset(d).n_cells
        x = np.ascontiguousarray(read_cells(store, d, 0, n, "expression").toarray(), dtype=np.float32)
        read_s += time.perf_counter() - t0
        out[d] = faiss_partitions(x, n_clusters(n, cfg.cluster_sizes, cfg.min_k), cfg.niter, cfg.seed, threads)
    return out, read_s


def faiss_partitions(x: np.ndarray, ks: list[int], niter: int, seed: int, threads: int) -> np.ndarray:
    """faiss.Kmeans (its own random initialisation) for each k, one after the other."""
    import faiss

    faiss.omp_set_num_threads(threads)
    lab = np.empty((len(x), len(ks)), dtype=np.int64)
    for p, k in enumerate(ks):
        km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed + p, verbose=False)
        km.train(x)
        lab[:, p] = km.index.search(x, 1)[1][:, 0]
    return lab


def sklearn_sequential(store, datasets, cfg, threads) -> tuple[dict, float]:
    """scikit-learn KMeans (k-means++, n_init=1, Lloyd, its default tolerance) on each
    dataset's sparse normalised expression, one dataset and one partition after the other."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    from scpretrain_dist.pseudolabel.features import read_cells
    from scpretrain_dist.pseudolabel.kmeans import n_clusters

    out, read_s = {}, 0.0
    with threadpool_limits(threads):
        for d in datasets:
            t0 = time.perf_counter()
            n = store.dataset(d).n_cells
            X = read_cells(store, d, 0, n, "expression")
            read_s += time.perf_counter() - t0
            ks = n_clusters(n, cfg.cluster_sizes, cfg.min_k)
            lab = np.empty((n, len(ks)), dtype=np.int64)
            for p, k in enumerate(ks):
                km = KMeans(k, init="k-means++", n_init=1, max_iter=cfg.niter, random_state=cfg.seed + p,
                            algorithm="lloyd")
                lab[:, p] = km.fit_predict(X)
            out[d] = lab
    return out, read_s


def _true_labels(store, datasets) -> dict[str, np.ndarray]:
    out = {}
    for d in datasets:
        if store.dataset(d).labelled:
            out[d] = store.read_obs(d)["cell_type"].astype(str).to_numpy()
    return out


def _nmi(labels: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> dict:
    """Per labelled dataset and partition: NMI to the cell types, purity (fraction of cells
    whose cluster's most common type is theirs) and the effective number of clusters
    exp(entropy of the cluster sizes) as a fraction of k. NMI rewards unbalanced clusterings
    when k is much larger than the number of types (a low cluster entropy raises it), so the
    other two say whether a lower NMI means less pure clusters or only more balanced ones."""
    from sklearn.metrics import normalized_mutual_info_score

    from scpretrain_dist.catalog.inputs import UNKNOWN_LABEL

    per, purity, balance = {}, {}, {}
    for d, y in truth.items():
        keep = y != UNKNOWN_LABEL
        if keep.sum() < 2:
            continue
        lab = labels[d][keep]
        types = np.unique(y[keep], return_inverse=True)[1]
        per[d], purity[d], balance[d] = [], [], []
        for p in range(lab.shape[1]):
            c = lab[:, p]
            per[d].append(round(float(normalized_mutual_info_score(types, c)), 4))
            table = np.zeros((c.max() + 1, types.max() + 1), dtype=np.int64)
            np.add.at(table, (c, types), 1)
            purity[d].append(round(float(table.max(1).sum() / len(c)), 4))
            sizes = table.sum(1)
            frac = sizes[sizes > 0] / len(c)
            balance[d].append(round(float(np.exp(-(frac * np.log(frac)).sum()) / len(sizes)), 4))

    def mean(x):
        flat = [v for vs in x.values() for v in vs]
        return float(np.mean(flat)) if flat else float("nan")

    return {"mean": mean(per), "purity": mean(purity), "effective_clusters_fraction": mean(balance),
            "per_dataset": per}
