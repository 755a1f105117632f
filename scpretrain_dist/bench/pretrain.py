"""Pretraining throughput: cells/s per worker, ours (Ray Train, sparse row updates) with 1 and 2
workers vs a plain PyTorch loop of the original design, on the same cells and pseudo-labels.

The plain loop is one process: a dense ``nn.Linear`` encoder over the atlas genes fed dense
batches, one ``nn.Linear`` head per (dataset, partition), and one dataset at a time (every
batch holds the cells of one dataset, datasets in a shuffled order each epoch), with
``torch.optim.Adam``. Ours: sparse ``embedding_bag`` input, fused heads gathered per batch,
lazy Adam on the touched rows, batches mixing datasets, and an all-reduce of the touched rows
across workers. Both run the same epochs, batch size and learning rate, one thread per worker;
the final pseudo-label loss of both is measured the same way, over every cell after training.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.set_defaults(recipe="real_cpu")
    p.add_argument("--store", help="atlas to train on (default: the work dir's atlas.soma)")
    p.add_argument("--datasets", nargs="*", help="datasets to use (default: all)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", default="1,2", help="worker counts for ours, comma-separated")
    p.add_argument("--skip-plain", action="store_true", help="do not run the plain PyTorch loop")
    p.add_argument("--dense-ablation", action="store_true",
                   help="also run ours with sparse_updates=false (dense Adam, DDP) on 1 worker")


def run(args) -> dict:
    from scpretrain_dist import recipes
    from scpretrain_dist.bench.report import result
    from scpretrain_dist.config import merge
    from scpretrain_dist.pseudolabel.pool import KMeansPool
    from scpretrain_dist.runtime import init_ray, shutdown_ray
    from scpretrain_dist.store.atlas import StoreError, atlas_for
    from scpretrain_dist.train.pretrain import loop_config, train_iterations

    load_start = os.getloadavg()[0]  # a shared machine: other work changes every timing
    cfg = recipes.configure(args.recipe, args.config, args.set, args.work_dir)
    if args.store:
        cfg = merge(cfg, {"store": {"uri": str(Path(args.store).resolve())}})
    cfg = merge(cfg, {"pretrain": {"epochs": args.epochs}, "pseudolabel": {"phase1_space": "pca"}})
    store = atlas_for(cfg)
    names = [r.name for r in store.datasets()]
    datasets = args.datasets or names
    unknown = sorted(set(datasets) - set(names))
    if unknown:
        raise StoreError(f"datasets {unknown} are not in the atlas {cfg.store_uri}")
    workers = [int(w) for w in str(args.workers).split(",") if w]
    locator = store.locator.pinned()
    n_genes = store.n_genes
    out_dir = Path(cfg.work_dir) / "bench_pretrain"
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict] = {}
    init_ray(cfg)
    try:
        t0 = time.perf_counter()
        with KMeansPool(locator, cfg.pseudolabel) as pool:
            labels = pool.refresh(datasets, 0)
        labels_path = labels.save(out_dir / "pseudo_labels.npz")
        print(f"pseudo-labels for {len(datasets)} datasets in {time.perf_counter() - t0:.1f}s")
        plans = [(f"ours_{w}w", w, True) for w in workers]
        if args.dense_ablation:
            plans.append(("ours_dense_ddp_1w", 1, False))
        for name, w, sparse in plans:
            c = merge(cfg, {"pretrain": {"num_workers": w, "sparse_updates": sparse}})
            wc = loop_config(c, locator, datasets, labels_path, n_genes, final_eval=True, check_replicas=True)
            t0 = time.perf_counter()
            _, epochs = train_iterations(c, wc, f"bench-{name}-{int(time.time())}")
            runs[name] = _summarise(epochs[-1], w, time.perf_counter() - t0)
            print(f"{name}: {runs[name]}")
    finally:
        shutdown_ray()
    if not args.skip_plain:
        runs["plain_pytorch"] = _run_plain(cfg, datasets, str(labels_path))
        print(f"plain_pytorch: {runs['plain_pytorch']}")
    ours = runs[f"ours_{workers[0]}w"]
    peers = {"plain_pytorch_per_dataset_dense": runs["plain_pytorch"]["cells_per_second_per_worker"]} \
        if "plain_pytorch" in runs else {}
    extra = {
        "atlas": {"store": cfg.store_uri, "datasets": len(datasets), "genes": n_genes,
                  "cells": int(sum(len(v) for v in labels.labels.values()))},
        "settings": {"epochs": args.epochs, "batch_size": cfg.pretrain.batch_size, "lr": cfg.pretrain.lr,
                     "embedding_dim": cfg.model.embedding_dim, "cpus_per_worker": cfg.pretrain.cpus_per_worker},
        "runs": runs,
        "final_loss": {k: v.get("final_eval_loss") for k, v in runs.items()},
    }
    if len(workers) > 1:
        one, two = runs[f"ours_{workers[0]}w"], runs[f"ours_{workers[1]}w"]
        extra["scaling"] = {
            "workers": workers[:2],
            "total_cells_per_second": [one["total_cells_per_second"], two["total_cells_per_second"]],
            "speedup": two["total_cells_per_second"] / one["total_cells_per_second"],
        }
    if "plain_pytorch" in runs:
        extra["loss_not_worse_than_plain"] = ours["final_eval_loss"] <= runs["plain_pytorch"]["final_eval_loss"]
    extra_load = {"load_average_1min_start_end": [load_start, os.getloadavg()[0]]}
    return result("pretrain", "training cells/s per worker", ours["cells_per_second_per_worker"], peers,
                  higher_is_better=True, **extra, **extra_load)


def _summarise(metrics: dict, workers: int, wall: float) -> dict:
    """Cells/s per worker over all epochs (time inside the training loop; start-up excluded)."""
    hist = np.asarray(metrics["epoch_history"], dtype=np.float64)  # seconds, loss, cells/s/worker
    cells_per_worker = float((hist[:, 0] * hist[:, 2]).sum())
    seconds = float(hist[:, 0].sum())
    return {
        "workers": workers,
        "cells_per_second_per_worker": cells_per_worker / seconds,
        "total_cells_per_second": workers * cells_per_worker / seconds,
        "epoch_cells_per_second_per_worker": hist[:, 2].round(1).tolist(),
        "epoch_loss": hist[:, 1].round(4).tolist(),
        "train_seconds": seconds,
        "wall_seconds_with_startup": wall,
        "final_eval_loss": metrics.get("final_eval_loss"),
        "final_eval_accuracy": metrics.get("final_eval_accuracy"),
        "peak_rss_mib_per_worker": metrics.get("peak_rss_mib_per_worker"),
        "replica_max_diff": metrics.get("replica_max_diff"),
        "torch_threads": metrics.get("torch_threads"),
        "gradient_sync_seconds": metrics.get("gradient_sync_seconds"),
        "encoder_exchange_seconds": metrics.get("encoder_exchange_seconds"),
        "gradient_rows_sent_per_step": metrics.get("gradient_rows_sent_per_step"),
    }


# ------------------------------------------------------------------ the plain PyTorch loop
def _run_plain(cfg, datasets: list[str], labels_path: str) -> dict:
    """In a fresh process, so that its peak RSS is its own."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(plain_loop, (cfg.store_uri, datasets, labels_path, dataclasses.asdict(cfg.pretrain),
                                       cfg.model.embedding_dim))


def plain_network(n_genes: int, ks: list[list[int]], dim: int):
    """The original design's network: a dense Linear encoder, a Linear head per (dataset,
    partition); ``model(x, d)`` gives dataset ``d``'s partition logits."""
    import torch
    from torch import nn

    class PlainNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(n_genes, dim)
            self.heads = nn.ModuleList([nn.ModuleList([nn.Linear(dim, k) for k in kd]) for kd in ks])

        def forward(self, x, d):
            z = torch.sigmoid(self.encoder(x))
            return [h(z) for h in self.heads[d]]

    return PlainNet()


def plain_train(model, sizes: list[int], loss_of, epochs: int, batch_size: int, lr: float, seed: int,
                sync=lambda: None) -> tuple[list[list[float]], float]:
    """The original design's loop: torch Adam, every batch from one dataset, datasets in a
    shuffled order each epoch. ``loss_of(d, rows)``: the summed partition losses of rows
    ``rows`` (local to dataset ``d``). Returns ([seconds, mean loss, cells] per epoch, the
    final loss over every cell); ``sync`` runs before each clock read (a device's queue)."""
    import torch

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    history = []
    for _epoch in range(epochs):
        sync()
        t0 = time.perf_counter()
        cells, loss_sum = 0, 0.0
        for d in rng.permutation(len(sizes)):
            order = rng.permutation(int(sizes[d]))
            for lo in range(0, len(order), batch_size):
                idx = order[lo : lo + batch_size]
                opt.zero_grad(set_to_none=True)
                loss = loss_of(int(d), idx)
                loss.backward()
                opt.step()
                cells += len(idx)
                loss_sum += float(loss.detach()) * len(idx)
        sync()
        history.append([time.perf_counter() - t0, loss_sum / cells, cells])
    total = 0.0
    with torch.no_grad():
        for d, m in enumerate(sizes):
            for lo in range(0, int(m), batch_size):
                idx = np.arange(lo, min(lo + batch_size, int(m)))
                total += float(loss_of(d, idx)) * len(idx)
    return history, total / int(sum(sizes))


def plain_loop(store_uri: str, datasets: list[str], labels_path: str, pretrain: dict, dim: int) -> dict:
    """The original design: dense Linear encoder, a head per (dataset, partition), one dataset
    per batch, torch Adam; one thread."""
    import torch
    import torch.nn.functional as F

    from scpretrain_dist.data.normalize import normalized_rows
    from scpretrain_dist.pseudolabel.pool import PseudoLabels
    from scpretrain_dist.runtime import peak_rss_mib
    from scpretrain_dist.store.atlas import open_atlas

    torch.set_num_threads(1)
    torch.manual_seed(pretrain["seed"])
    store = open_atlas(store_uri)
    labels = PseudoLabels.load(labels_path)
    data = {d: normalized_rows(store, store.dataset(d).joinids, store.dataset(d).value_type)
            for d in datasets}  # normalised CSR, cells x atlas genes
    n_genes = next(iter(data.values())).shape[1]
    model = plain_network(n_genes, [labels.ks[d] for d in datasets], dim)

    def loss_of(d, idx):
        x = torch.from_numpy(data[datasets[d]][idx].toarray())
        y = torch.from_numpy(labels.labels[datasets[d]][idx])
        return sum(F.cross_entropy(lg, y[:, p]) for p, lg in enumerate(model(x, d)))

    sizes = [data[d].shape[0] for d in datasets]
    history, final_loss = plain_train(model, sizes, loss_of, pretrain["epochs"], pretrain["batch_size"],
                                      pretrain["lr"], pretrain["seed"])
    hist = np.asarray(history)  # seconds, loss, cells
    return {
        "workers": 1,
        "cells_per_second_per_worker": float(hist[:, 2].sum() / hist[:, 0].sum()),
        "epoch_cells_per_second_per_worker": (hist[:, 2] / hist[:, 0]).round(1).tolist(),
        "epoch_loss": hist[:, 1].round(4).tolist(),
        "train_seconds": float(hist[:, 0].sum()),
        "final_eval_loss": final_loss,
        "peak_rss_mib_per_worker": [round(peak_rss_mib(), 1)],
        "torch_threads": torch.get_num_threads(),
    }
