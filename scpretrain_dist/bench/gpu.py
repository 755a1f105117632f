"""Pretraining and K-means refresh on one GPU, and the projected time of the paper's workload.

One process, no Ray and no store, so that it runs on a lone GPU machine with torch alone (the
synthetic atlas of ``scpretrain demo-data`` is generated in memory, in parallel, with the same
generator). Sections, each timed with the device synchronised:

- ``matmul``: the GPU's measured float32 (no TF32), TF32 and bf16 GEMM rates: the ceilings;
- ``refresh``: a pseudo-label refresh of every dataset (3 partitions, k = n/50, n/100, n/200,
  30 Lloyd iterations): the encoder's embedding computed on the GPU, k-means++ / k-means|| starts
  on the host (a sample of at most 100k cells), Lloyd on the GPU (the torch GEMM + argmin of
  ``pseudolabel/kmeans.py``, the embedding never leaving the device). Run twice: from a random
  encoder (the labels the pretraining below trains on) and from the trained one;
- ``pretrain``: ours (the training shard held on the GPU and batches gathered there, sparse
  ``embedding_bag`` input, fused heads with lazy Adam on their touched rows, a dense encoder
  gradient) vs the plain PyTorch loop
  of the original design (dense Linear encoder, a head per (dataset, partition), one dataset per
  batch, torch Adam) fed as it was (batches densified on the host, then copied), and the same
  plain loop with its batches densified on the GPU; same cells, labels, epochs and batch size;
  final pseudo-label loss of each over every cell;
- ``kmeans_peers``: faiss on the host CPUs (sequential, its own initialisation) clustering the
  same trained embeddings, on a subset of datasets, against our refresh of the same datasets;
  NMI of each to the true cell types;
- ``projection``: iterations x (epochs x cells / our cells per second + one refresh) for the
  paper's workload (0.9M cells, 10 iterations x 50 epochs).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import numpy as np

_GEN = {}  # per generator process: the plan and the dataset models it has built


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cells", type=int, default=900_000, help="cells in the atlas (paper: about 0.9M)")
    p.add_argument("--datasets", type=int, default=60)
    p.add_argument("--genes", type=int, default=20_000)
    p.add_argument("--types", type=int, default=20)
    p.add_argument("--epochs", type=int, default=2, help="epochs of each pretraining run")
    p.add_argument("--batch-size", type=int, default=0, help="default: pretrain.batch_size")
    p.add_argument("--device", default="cuda", help="torch device (cpu for a dry run)")
    p.add_argument("--processes", type=int, default=0, help="generator processes (default: all CPUs)")
    p.add_argument("--peer-cells", type=int, default=300_000,
                   help="cells of the dataset subset the K-means peers cluster (0: skip them)")
    p.add_argument("--skip-plain-host", action="store_true", help="skip the host-fed plain loop")
    p.add_argument("--large-batch", type=int, default=4096,
                   help="also time one epoch of ours at this batch size, on a copy of the model (0: skip)")
    p.add_argument("--paper-cells", type=int, default=900_000)
    p.add_argument("--paper-iterations", type=int, default=10)
    p.add_argument("--paper-epochs", type=int, default=50)
    p.add_argument("--partial", help="write the result so far to this JSON file after every section")


def run(args) -> dict:
    import torch

    from scpretrain_dist.bench.report import result
    from scpretrain_dist.config import (
        ConfigError,
        DemoDataConfig,
        PretrainConfig,
        PseudoLabelConfig,
    )

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("bench gpu: --device cuda but torch sees no CUDA device here; run it on a GPU "
                          "machine with a CUDA build of torch, or pass --device cpu for a dry run")
    pcfg = PseudoLabelConfig()
    tcfg = PretrainConfig()
    bs = args.batch_size or tcfg.batch_size
    out: dict = {"device": _device_info(device), "settings": {
        "cells": args.cells, "datasets": args.datasets, "genes": args.genes, "types": args.types,
        "epochs": args.epochs, "batch_size": bs, "lr": tcfg.lr, "niter": pcfg.niter,
        "cluster_sizes": list(pcfg.cluster_sizes)}}

    def save(section: str, value) -> None:
        out[section] = value
        print(f"[{section}] {json.dumps(value, default=str)[:2000]}", flush=True)
        if args.partial:
            Path(args.partial).write_text(json.dumps(out, indent=1, default=str))

    save("matmul", measure_gpu_matmul(device))
    t0 = time.perf_counter()
    demo = DemoDataConfig(n_datasets=args.datasets, n_genes=args.genes, n_types=args.types, n_cells=args.cells)
    atlas = simulate_atlas(demo, args.processes or os.cpu_count() or 1)
    save("atlas", {"seconds": time.perf_counter() - t0, "cells": atlas["n_cells"],
                   "non_zeros_per_cell": atlas["X"].nnz / atlas["n_cells"]})

    from scpretrain_dist.data.dataset import CellShard
    from scpretrain_dist.model.networks import PretrainModel
    from scpretrain_dist.pseudolabel.kmeans import n_clusters

    torch.manual_seed(0)
    starts, sizes = atlas["starts"], atlas["sizes"]
    ks = [n_clusters(int(n), pcfg.cluster_sizes, pcfg.min_k) for n in sizes]
    t0 = time.perf_counter()
    host = CellShard(atlas["X"], atlas["dataset_idx"], np.zeros((atlas["n_cells"], 3), np.int64),
                     np.arange(atlas["n_cells"]))
    shard = host.to_device(device)
    _sync(device)
    upload_s = time.perf_counter() - t0
    # the encoder's gradient is dense on a GPU (see PretrainModel), row-sparse on a CPU
    model = PretrainModel(args.genes, ks, 200, sparse_grad=True, encoder_sparse_grad=device.type == "cpu").to(device)
    refresh0 = refresh(shard, model, starts, sizes, ks, pcfg, device, atlas["truth"])
    refresh0["upload_seconds"] = upload_s
    labels = refresh0.pop("labels")
    save("refresh_random_encoder", refresh0)
    shard.labels = torch.from_numpy(labels).to(device)
    host.labels = labels

    runs = {}
    runs["ours"] = pretrain_ours(model, shard, args.epochs, bs, tcfg.lr, device)
    save("pretrain_ours", runs["ours"])
    runs["plain_device_batches"] = plain_loop_gpu(shard, host, starts, sizes, ks, args, bs, tcfg.lr, device, on_device=True)
    save("pretrain_plain_device_batches", runs["plain_device_batches"])

    refresh1 = refresh(shard, model, starts, sizes, ks, pcfg, device, atlas["truth"])
    refresh1.pop("labels")
    save("refresh_trained_encoder", refresh1)
    save("projection", projection(args, atlas["n_cells"], refresh1["seconds"], runs))
    if args.peer_cells > 0:
        save("kmeans_peers", kmeans_peers(atlas, shard, model, ks, pcfg, device, args.peer_cells))

    if args.large_batch:
        save("pretrain_ours_large_batch", pretrain_ours(copy.deepcopy(model), shard, 1, args.large_batch, tcfg.lr, device)
             | {"batch_size": args.large_batch, "note": "throughput only: one more epoch from the trained model"})
    if device.type == "cuda":
        other = copy.deepcopy(model)
        other.encoder.sparse_grad = True
        save("pretrain_ours_row_sparse_encoder", pretrain_ours(other, shard, 1, bs, tcfg.lr, device)
             | {"note": "the CPU setting (row-sparse encoder gradient, lazy Adam) on the GPU: one more epoch"})
    if not args.skip_plain_host:
        runs["plain_pytorch"] = plain_loop_gpu(shard, host, starts, sizes, ks, args, bs, tcfg.lr, device, on_device=False)
        save("pretrain_plain_pytorch", runs["plain_pytorch"])
        save("projection", projection(args, atlas["n_cells"], refresh1["seconds"], runs))

    peers = {k: v["cells_per_second"] for k, v in runs.items() if k != "ours"}
    extra = {k: out[k] for k in out if k not in {"device"}}
    extra["device_info"] = out["device"]
    extra["loss_not_worse_than_plain"] = {
        k: runs["ours"]["final_eval_loss"] <= v["final_eval_loss"] for k, v in runs.items() if k != "ours"}
    return result("gpu", "training cells/s on one GPU", runs["ours"]["cells_per_second"], peers,
                  higher_is_better=True, **extra)


def projection(args, n_cells: int, refresh_seconds: float, runs: dict) -> dict:
    """Hours of the paper's workload: iterations x (epochs x cells / cells per second + one
    refresh), the refresh scaled linearly from the measured atlas (k grows with each dataset's
    size, so the cost is linear in the number of datasets of the same sizes)."""
    refresh_s = refresh_seconds * args.paper_cells / n_cells
    out = {"workload": f"{args.paper_cells} cells, {args.paper_iterations} iterations x {args.paper_epochs} epochs",
           "refresh_seconds_per_iteration": refresh_s, "refresh_scaled_from_cells": n_cells,
           "paper_reported": "about 3 days on one GPU"}
    for name, r in runs.items():
        train_s = args.paper_epochs * args.paper_cells / r["cells_per_second"]
        out[f"{name}_train_seconds_per_iteration"] = train_s
        out[f"{name}_total_hours"] = args.paper_iterations * (train_s + refresh_s) / 3600
    return out


# ------------------------------------------------------------------ measurements
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_info(device) -> dict:
    import torch

    info = {"torch": torch.__version__, "device": str(device), "host_cpus": os.cpu_count()}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    try:
        import faiss

        info["faiss"] = faiss.__version__
        info["faiss_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    except ImportError:
        info["faiss"] = None
    return info


def measure_gpu_matmul(device, repeats: int = 10) -> dict:
    """GEMM rates on ``device``: float32 without TF32 (the exact K-means assignment's ceiling),
    TF32, and bf16; the mean of ``repeats`` products after 3 warm-ups."""
    import torch

    n = 8192 if device.type == "cuda" else 1024
    out = {"size": n}
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        for key, dtype, tf32 in (("float32", torch.float32, False), ("tf32", torch.float32, True),
                                 ("bf16", torch.bfloat16, False)):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            for _ in range(3):
                a @ b
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(repeats):
                a @ b
            _sync(device)
            out[f"{key}_flops_per_second"] = 2.0 * n**3 * repeats / (time.perf_counter() - t0)
            del a, b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    return out


# ------------------------------------------------------------------ the atlas, in memory
def _chunk(task):
    from scpretrain_dist.data.normalize import normalize_rows
    from scpretrain_dist.demo import dataset_model, plan_atlas, simulate_chunk

    cfg, d, c = task
    if _GEN.get("cfg") != cfg:
        _GEN.clear()
        _GEN.update(cfg=cfg, plan=plan_atlas(cfg), models={})
    models = _GEN["models"]
    if d not in models:
        models[d] = dataset_model(_GEN["plan"], d)
    labels, X = simulate_chunk(_GEN["plan"], models[d], c)
    return d, c, labels, normalize_rows(X, "counts", copy=False)


def simulate_atlas(cfg, processes: int) -> dict:
    """The synthetic atlas of ``cfg`` (the ``demo-data`` generator), log1p(CP10k)-normalised,
    as one CSR in dataset order; chunks generated by ``processes`` processes."""
    import multiprocessing as mp

    import scipy.sparse as sp

    from scpretrain_dist.demo import CHUNK_CELLS, plan_atlas

    plan = plan_atlas(cfg)
    tasks = [(cfg, d, c) for d in range(cfg.n_datasets) for c in range(-(-int(plan.sizes[d]) // CHUNK_CELLS))]
    with mp.get_context("fork").Pool(processes) as pool:
        parts = sorted(pool.imap_unordered(_chunk, tasks, chunksize=1), key=lambda t: (t[0], t[1]))
    X = sp.vstack([p[3] for p in parts], format="csr")
    types = plan.type_names()
    truth_all = np.concatenate([types[p[2]] for p in parts])
    sizes = plan.sizes.astype(np.int64)
    starts = plan.starts
    return {
        "X": X, "n_cells": X.shape[0], "sizes": sizes, "starts": starts, "names": list(plan.names),
        "dataset_idx": np.repeat(np.arange(len(sizes)), sizes),
        "truth": [truth_all[s : s + n] for s, n in zip(starts, sizes)],
    }


# ------------------------------------------------------------------ refresh
def embed_rows(shard, model, lo: int, hi: int, block: int = 65536):
    """sigmoid(encoder) of shard rows lo..hi, computed on the shard's device."""
    import torch

    with torch.no_grad():
        parts = [model.encoder.embed(shard.gather(torch.arange(a, min(a + block, hi), device=shard.device)))
                 for a in range(lo, hi, block)]
    return torch.cat(parts).float().contiguous()


def refresh(shard, model, starts, sizes, ks, pcfg, device, truth) -> dict:
    """Every dataset's 3 partitions on the embedding: embed (GPU), start (host), Lloyd (GPU)."""
    import torch

    from scpretrain_dist.pseudolabel import kmeans as km

    labels = np.empty((int(sizes.sum()), len(pcfg.cluster_sizes)), dtype=np.int64)
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # of each dataset in ``labels``
    embed_s = lloyd_s = init_s = 0.0
    flops = 0.0
    t_all = time.perf_counter()
    for d, (s, n) in enumerate(zip(starts, sizes)):
        t0 = time.perf_counter()
        xt = embed_rows(shard, model, int(s), int(s + n))
        _sync(device)
        t1 = time.perf_counter()
        sample = km.init_sample(int(n), pcfg.init_sample_cells, pcfg.seed)
        inits = km.plusplus_inits(xt[torch.from_numpy(sample).to(xt.device)].cpu().numpy(), ks[d], pcfg.seed)
        t2 = time.perf_counter()
        lab, _, _, its = km.lloyd(xt, inits, pcfg.niter, pcfg.seed, eng=km.engine("torch", gpu=xt.is_cuda))
        t3 = time.perf_counter()
        labels[first[d] : first[d] + n] = lab
        embed_s, init_s, lloyd_s = embed_s + t1 - t0, init_s + t2 - t1, lloyd_s + t3 - t2
        flops += km.lloyd_flops(int(n), ks[d], xt.shape[1], its)
    seconds = time.perf_counter() - t_all
    from scpretrain_dist.bench.kmeans import _nmi

    names = [str(d) for d in range(len(sizes))]
    quality = _nmi({names[d]: labels[f : f + n] for d, (f, n) in enumerate(zip(first, sizes))},
                   dict(zip(names, truth)))
    return {"seconds": seconds, "embed_seconds": embed_s, "init_seconds_host": init_s, "lloyd_seconds": lloyd_s,
            "lloyd_flops_per_second": flops / lloyd_s, "backend": f"torch-{device.type}",
            "nmi": quality.get("mean"), "labels": labels}


# ------------------------------------------------------------------ pretraining
def pretrain_ours(model, shard, epochs: int, bs: int, lr: float, device) -> dict:
    from scpretrain_dist.train.optim import LazyAdam
    from scpretrain_dist.train.steps import pretrain_eval, pretrain_step

    opt = LazyAdam(model.parameters(), lr=lr)
    history = []
    for epoch in range(epochs):
        model.train()
        _sync(device)
        t0 = time.perf_counter()
        loss_sum, cells = 0.0, 0
        for x, didx, lab in shard.batches(bs, 0, epoch):
            out = pretrain_step(model, x, didx, lab, opt)
            loss_sum += float(out.total.detach()) * len(didx)
            cells += len(didx)
        _sync(device)
        history.append([time.perf_counter() - t0, loss_sum / cells, cells])
    model.eval()
    loss, acc, n = pretrain_eval(model, shard.batches(bs, 0, 10**6))
    return _summary(history, loss / n) | {"final_eval_accuracy": acc / n, "peak_gpu_memory_gib": _peak_gib(device)}


def plain_loop_gpu(shard, host, starts, sizes, ks, args, bs: int, lr: float, device, on_device: bool) -> dict:
    """The plain loop of ``bench pretrain`` on ``device``: dense batches of one dataset each,
    densified on the host and copied (``on_device=False``, as the original code fed its GPU) or
    gathered and densified on the GPU."""
    import torch
    import torch.nn.functional as F

    from scpretrain_dist.bench.pretrain import plain_network, plain_train
    from scpretrain_dist.model.networks import _densify

    torch.manual_seed(0)
    model = plain_network(args.genes, ks, 200).to(device)

    def dense(rows: np.ndarray):
        if not on_device:
            return torch.from_numpy(host.X[rows].toarray()).to(device)
        b = shard.gather(torch.from_numpy(rows).to(device))
        return _densify(b.indices, b.offsets, b.values, len(rows), args.genes)

    def loss_of(d: int, local: np.ndarray):
        rows = starts[d] + local
        y = shard.labels[torch.from_numpy(rows).to(device)]
        return sum(F.cross_entropy(lg, y[:, p]) for p, lg in enumerate(model(dense(rows), d)))

    history, final_loss = plain_train(model, [int(n) for n in sizes], loss_of, args.epochs, bs, lr, 0,
                                      sync=lambda: _sync(device))
    return _summary(history, final_loss) | {"peak_gpu_memory_gib": _peak_gib(device),
                                            "batches": "device" if on_device else "host"}


def _summary(history: list, final_loss: float) -> dict:
    h = np.asarray(history, dtype=np.float64)  # seconds, loss, cells
    return {"cells_per_second": float(h[:, 2].sum() / h[:, 0].sum()),
            "epoch_cells_per_second": (h[:, 2] / h[:, 0]).round(1).tolist(),
            "epoch_loss": h[:, 1].round(4).tolist(), "train_seconds": float(h[:, 0].sum()),
            "final_eval_loss": final_loss}


def _peak_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# ------------------------------------------------------------------ K-means peers
def kmeans_peers(atlas, shard, model, ks, pcfg, device, peer_cells: int) -> dict:
    """faiss on the host CPUs (sequential, its own initialisation, all threads) clustering the
    same trained embeddings as our GPU refresh, on a seeded subset of datasets of about
    ``peer_cells`` cells; NMI of each to the true cell types. (On full expression, the original
    implementation's approach, faiss on these CPUs takes minutes per 100k cells: ``bench
    kmeans`` measures that on a CPU machine.)"""
    from scpretrain_dist.bench.kmeans import _nmi, faiss_partitions

    sizes, starts = atlas["sizes"], atlas["starts"]
    order = np.random.default_rng(0).permutation(len(sizes))
    chosen = np.sort(order[: int(np.searchsorted(np.cumsum(sizes[order]), peer_cells)) + 1])
    truth = {str(d): atlas["truth"][d] for d in chosen}
    sub = refresh(shard, model, starts[chosen], sizes[chosen], [ks[d] for d in chosen], pcfg, device,
                  [atlas["truth"][d] for d in chosen])
    sub.pop("labels")
    out = {"datasets": len(chosen), "cells": int(sizes[chosen].sum()), "ours_gpu_refresh": sub}
    try:
        import faiss  # noqa: F401
    except ImportError:
        out["faiss_cpu_embedding"] = "faiss is not installed"
        return out
    threads = os.cpu_count() or 1
    emb = {d: embed_rows(shard, model, int(starts[d]), int(starts[d] + sizes[d])).cpu().numpy() for d in chosen}
    t0 = time.perf_counter()
    labels = {str(d): faiss_partitions(emb[d], ks[d], pcfg.niter, pcfg.seed, threads) for d in chosen}
    seconds = time.perf_counter() - t0
    out["faiss_cpu_embedding"] = {"seconds": seconds, "threads": threads, "nmi": _nmi(labels, truth)["mean"],
                                  "note": "embeddings given (not timed)"}
    out["speedup_vs_faiss_cpu_same_embedding"] = seconds / sub["seconds"]
    return out
