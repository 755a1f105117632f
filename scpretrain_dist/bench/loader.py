"""Loader throughput: cells/s delivered to a training loop, ours vs tiledbsoma-ml, one SOMA store.

Every loader reads the same store with shuffling on and batches of ``--batch-size`` cells on the
atlas gene space; ``--batches`` batches are timed after ``--warmup`` batches. Rows:

* ``ours``: :class:`~scpretrain_dist.data.loader.StreamingCells`, streaming (no cache), batches
  as ``SparseBatch`` (CSR, what the encoder consumes), normalised to log1p(CP10k);
* ``ours_dense``: the same batches densified to float32 (cells x genes) in the loop;
* ``tiledbsoma-ml``: ``ExperimentDataset`` (dense float32 batches of raw values, its defaults:
  shuffle chunks of 64 cells, IO batches of 65,536 cells);
* ``ours_cached`` (``--cached-world W``): rank 0 of W with the shard cache on; the first
  epoch fills it, then epochs from memory are timed (per rank);
* ``annbatch``: its ``Loader`` over its recommended layout (a pre-shuffled sharded zarr
  ``DatasetCollection`` made from the same cells, zarrs codec pipeline), CSR batches of raw
  values, its default chunk size and preload; in annbatch's own venv (Python >= 3.12,
  ``make annbatch-venv``), by ``bench/annbatch_child.py``;
* ``scdataset``: ``scDataset`` over the same cells as one backed ``.h5ad`` (its AnnData path),
  ``BlockShuffling`` with its defaults (blocks of 8 cells, fetches of 16 batches), CSR batches of
  raw values (the bench extra).

Each loader runs in its own process, so its peak RSS is its own. Shuffle quality: the mean
entropy of dataset-of-origin within a batch divided by the same for batches of a uniform random
permutation of the atlas (1 = as mixed as a perfect shuffle).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from scpretrain_dist import recipes
from scpretrain_dist.bench.report import result
from scpretrain_dist.config import ConfigError
from scpretrain_dist.runtime import peak_rss_mib

PEER = "tiledbsoma-ml"
LOADERS = ("ours", "ours_dense", "ours_experiment", "peer", "peer_trim_off", "annbatch", "scdataset")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store-uri", help="SOMA atlas to read (default: a demo atlas of --cells cells in the "
                   "work dir, built if absent)")
    p.add_argument("--cells", type=int, default=1_000_000, help="size of the demo atlas to build (default 1,000,000)")
    p.add_argument("--datasets", type=int, default=20, help="datasets of the demo atlas (default 20)")
    p.add_argument("--genes", type=int, default=20_000, help="genes of the demo atlas (default 20,000)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, default=1000, help="batches timed per loader (default 1000)")
    p.add_argument("--warmup", type=int, default=20, help="batches before the timing starts (default 20)")
    p.add_argument("--loaders", default="ours,ours_dense,peer",
                   help="comma-separated: ours, ours_dense, ours_experiment (ours reading a CELLxGENE Census-schema "
                   "experiment of the same cells in place), peer (tiledbsoma-ml), peer_trim_off (it with TileDB's "
                   "malloc_trim off, as ours reads), annbatch, scdataset (default: ours, ours_dense, peer)")
    p.add_argument("--peer-workers", type=int, default=0, help="DataLoader workers of the peer (default 0)")
    p.add_argument("--annbatch-python", default=".venv-annbatch/bin/python",
                   help="the Python of annbatch's venv (make annbatch-venv; default .venv-annbatch/bin/python)")
    p.add_argument("--cached-world", type=int, default=0,
                   help="also time ours from the shard cache on rank 0 of this world size (0: skip)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs per loader, interleaved (ours, peer, ours, ...); the median is reported (default 3)")
    p.add_argument("--rss-cells", default="",
                   help="comma-separated atlas sizes (e.g. 100000,300000,1000000): peak RSS of ours on each")


# ---------------------------------------------------------------------------- parent


def _demo_atlas(work_dir: Path, cells: int, datasets: int, genes: int, seed: int) -> tuple[str, dict | None]:
    """The demo atlas of that size, built in a child process (timed, its RSS its own) if absent."""
    uri = work_dir / f"bench_atlas_{cells}c_{datasets}d_{genes}g.soma"
    if uri.exists():
        return str(uri.resolve()), None
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "scpretrain_dist.cli", "demo-data", "--cells", str(cells), "--datasets",
           str(datasets), "--genes", str(genes), "--seed", str(seed), "--store-uri", str(uri)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise ConfigError(f"building the demo atlas failed:\n{out.stderr[-2000:]}")
    last = out.stdout.strip().splitlines()[-1]
    rss = float(last.rsplit("peak RSS", 1)[1].split()[0]) if "peak RSS" in last else None
    return str(uri.resolve()), {"cells": cells, "seconds": round(time.perf_counter() - t0, 1), "peak_rss_mib": rss}


def _child(spec: dict) -> dict:
    if spec["loader"] == "annbatch":
        return _annbatch("load", spec)
    cmd = [sys.executable, "-m", "scpretrain_dist.bench.loader", "--child", json.dumps(spec)]
    from scpretrain_dist.runtime import READER_ENV

    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **READER_ENV})
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"loader {spec['loader']} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def _annbatch(step: str, spec: dict) -> dict:
    script = Path(__file__).with_name("annbatch_child.py")
    out = subprocess.run([spec["python"], str(script), step, json.dumps(spec)], capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"annbatch {step} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def _peer_layouts(uri: str, loaders: list[str], annbatch_python: str, seed: int) -> dict:
    """The same cells in each peer's own layout, made once beside the atlas: one ``.h5ad`` (raw
    values, the atlas gene space, ``obs.dataset_id``; scDataset reads it backed), annbatch's
    collection made from that file, and for ``ours_experiment`` a SOMA experiment of it with
    CELLxGENE Census's column names (``tiledbsoma.io.from_h5ad``: obs ``dataset_id`` and
    ``cell_type``, var ``feature_name``, X ``raw``). Build times, peak RSS and sizes go in the result."""
    if not {"annbatch", "scdataset", "ours_experiment"} & set(loaders):
        return {}
    from scpretrain_dist.store.atlas import open_atlas

    atlas = open_atlas(uri)
    names = [r.name for r in atlas.datasets()]
    h5ad = Path(f"{uri.rstrip('/')}.h5ad")
    built: dict = {}
    if not h5ad.exists():
        import anndata as ad
        import pandas as pd
        import scipy.sparse as sp

        t0 = time.perf_counter()
        records = atlas.datasets()
        X = sp.vstack([atlas.read_rows(r.joinids) for r in records]).tocsr()
        obs = pd.DataFrame({"dataset_id": np.repeat([r.name for r in records], [r.n_cells for r in records])},
                           index=[str(i) for i in range(X.shape[0])])
        tmp = h5ad.with_name(h5ad.name + ".tmp")
        ad.AnnData(X, obs=obs, var=pd.DataFrame(index=[str(g) for g in atlas.genes()])).write_h5ad(tmp)
        tmp.rename(h5ad)
        built["h5ad"] = {"seconds": round(time.perf_counter() - t0, 1)}
    built.setdefault("h5ad", {})["mib"] = round(h5ad.stat().st_size / 2**20, 1)
    out = {"h5ad": str(h5ad), "datasets": names}
    if "annbatch" in loaders:
        collection = Path(f"{uri.rstrip('/')}.annbatch.zarr")
        if not collection.exists():
            tmp = collection.with_name(collection.name + ".tmp")
            built["annbatch"] = _annbatch("layout", {"python": annbatch_python, "h5ad": str(h5ad), "out": str(tmp),
                                                     "seed": seed})
            tmp.rename(collection)
        built.setdefault("annbatch", {})["mib"] = round(sum(f.stat().st_size for f in collection.rglob("*")
                                                            if f.is_file()) / 2**20, 1)
        out["collection"] = str(collection)
    if "ours_experiment" in loaders:
        experiment = Path(f"{uri.rstrip('/')}.census")
        if not experiment.exists():
            t0 = time.perf_counter()
            labels = np.concatenate([atlas.read_obs(r.name)["cell_type"].astype(str).to_numpy()
                                     for r in atlas.datasets()])
            _census_schema_experiment(h5ad, labels, experiment)
            built["experiment"] = {"seconds": round(time.perf_counter() - t0, 1)}
        built.setdefault("experiment", {})["mib"] = round(sum(f.stat().st_size for f in experiment.rglob("*")
                                                              if f.is_file()) / 2**20, 1)
        out["experiment"] = str(experiment)
    out["built"] = built
    return out


def _census_schema_experiment(h5ad: Path, labels: np.ndarray, out: Path) -> None:
    """The cells of ``h5ad`` and their ``labels`` as a SOMA experiment with CELLxGENE Census's
    column names; X is written from the file in chunks (``from_h5ad``), obs labelled after."""
    import anndata as ad
    import tiledbsoma
    import tiledbsoma.io

    tmp = out.with_name(out.name + ".tmp")
    tiledbsoma.io.from_h5ad(str(tmp), str(h5ad), "RNA", var_id_name="feature_name", X_layer_name="raw")
    obs = ad.read_h5ad(h5ad, backed="r").obs.copy()
    obs["cell_type"] = labels
    with tiledbsoma.Experiment.open(str(tmp), "w") as exp:
        tiledbsoma.io.update_obs(exp, obs)
    tmp.rename(out)


def _median_run(trials: list[dict]) -> dict:
    """The run with the median cells/s; its peak RSS is the largest of all runs."""
    ranked = sorted(trials, key=lambda t: t["cells_per_s"])
    out = dict(ranked[len(ranked) // 2])
    out["peak_rss_mib"] = max(t["peak_rss_mib"] for t in trials)
    return out


def _uniform_entropy(uri: str, batch_size: int, n_batches: int = 2000, seed: int = 0) -> float:
    """Mean within-batch entropy of dataset-of-origin for a uniform random permutation."""
    from scpretrain_dist.store.atlas import open_atlas

    sizes = np.array([r.n_cells for r in open_atlas(uri).datasets()])
    origin = np.repeat(np.arange(len(sizes)), sizes)
    perm = np.random.default_rng(seed).permutation(origin)
    n = min(n_batches, len(perm) // batch_size)
    return float(np.mean([_entropy(perm[i * batch_size : (i + 1) * batch_size], len(sizes)) for i in range(n)]))


def _entropy(codes: np.ndarray, n: int) -> float:
    p = np.bincount(codes, minlength=n) / len(codes)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def run(args) -> dict:

    cfg = recipes.configure(args.recipe, args.config, args.set, args.work_dir)
    loaders = [x.strip() for x in args.loaders.split(",") if x.strip()]
    unknown = set(loaders) - set(LOADERS)
    if unknown or not loaders:
        raise ConfigError(f"--loaders takes {', '.join(LOADERS)}; got {args.loaders!r}")
    if "annbatch" in loaders and not Path(args.annbatch_python).is_file():
        raise ConfigError(f"--annbatch-python {args.annbatch_python} does not exist; annbatch needs Python >= 3.12 in "
                          "a venv of its own: `make annbatch-venv` (or leave annbatch out of --loaders)")
    if "scdataset" in loaders and importlib.util.find_spec("scdataset") is None:
        raise ConfigError("scdataset is not installed in this environment; it is in the bench extra (`make bench-venv`), "
                          "or leave it out of --loaders")
    for name in ("batch_size", "batches", "cells", "datasets", "genes"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.cached_world < 0 or args.peer_workers < 0 or args.repeats < 1:
        raise ConfigError("--warmup, --cached-world and --peer-workers must be >= 0, --repeats >= 1")
    if {"peer", "peer_trim_off"} & set(loaders) and importlib.util.find_spec("tiledbsoma_ml") is None:
        raise ConfigError(
            "tiledbsoma-ml is not installed in this environment; run the benchmark from the bench "
            "venv (`make bench-venv`, then `.venv-bench/bin/scpretrain bench loader ...`), or pass "
            "--loaders ours,ours_dense"
        )
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    build = None
    if args.store_uri:
        uri = args.store_uri
        if not Path(uri).exists():
            raise ConfigError(f"--store-uri {uri} does not exist; omit it to build a demo atlas")
    else:
        uri, build = _demo_atlas(work, args.cells, args.datasets, args.genes, cfg.demo.seed)
    stream = cfg.stream
    base = {"uri": uri, "batch_size": args.batch_size, "batches": args.batches, "warmup": args.warmup,
            "seed": cfg.pretrain.seed, "chunk_cells": stream.chunk_cells, "buffer_cells": stream.buffer_cells,
            "prefetch_buffers": stream.prefetch_buffers}
    specs = {name: dict(base, loader=name, peer_workers=args.peer_workers) for name in loaders}
    layouts = _peer_layouts(uri, loaders, args.annbatch_python, cfg.pretrain.seed)
    for name in ("annbatch", "scdataset"):
        if name in specs:
            specs[name] |= {k: v for k, v in layouts.items() if k in ("h5ad", "collection", "datasets")}
            specs[name]["python"] = args.annbatch_python
    if "ours_experiment" in specs:
        # read in place as `--set store.backend=experiment` reads it; its index (each dataset's
        # cells and measured genes) made here once, beside the run, as a pipeline's first command does
        specs["ours_experiment"] |= {"experiment": layouts["experiment"], "index_dir": str(work / "atlas-index")}
        _ours_store(specs["ours_experiment"])
    if args.cached_world:
        specs["ours_cached"] = dict(base, loader="ours_cached", world=args.cached_world,
                                    cache_bytes=stream.cache_bytes or (8 << 30))
    # interleaved repeats: a shared machine's load drifts, and each loader sees the same drift
    trials: dict[str, list[dict]] = {name: [] for name in specs}
    for r in range(args.repeats):
        for name, spec in specs.items():
            print(f"  run {r + 1}/{args.repeats}: {name} ...", flush=True)
            trials[name].append(_child(spec))
    runs = {name: _median_run(t) for name, t in trials.items()}
    uniform = _uniform_entropy(uri, args.batch_size)
    quality = {k: round(v["mean_entropy"] / uniform, 4) for k, v in runs.items()}
    rss_by_size = {}
    for size in [int(s) for s in args.rss_cells.split(",") if s.strip()]:
        u, b = _demo_atlas(work, size, args.datasets, args.genes, cfg.demo.seed)
        print(f"  peak RSS of ours on {size} cells ...", flush=True)
        r = _child(dict(base, uri=u, loader="ours"))
        rss_by_size[str(size)] = {"peak_rss_mib": r["peak_rss_mib"], "cells_per_s": r["cells_per_s"],
                                  "build": b}
    cps = {k: v["cells_per_s"] for k, v in runs.items()}
    cpu = {k: v["cpu_ms_per_1k_cells"] for k, v in runs.items()}
    ours = cps.get("ours", cps.get("ours_dense"))
    peers = {PEER: cps["peer"]} if "peer" in cps else {}
    if "peer_trim_off" in cps:
        peers[f"{PEER} (malloc_trim off)"] = cps["peer_trim_off"]
    peers |= {name: cps[name] for name in ("annbatch", "scdataset") if name in cps}
    extra = {
        "cells_per_s": cps,
        "ratio_dense_vs_peer": (cps["ours_dense"] / cps["peer"]) if {"ours_dense", "peer"} <= cps.keys() else None,
        "cells_per_s_all_runs": {k: [round(t["cells_per_s"], 1) for t in v] for k, v in trials.items()},
        # CPU time (all threads of the loader's process) per 1,000 cells: load-independent
        "cpu_ms_per_1k_cells": cpu,
        "shuffle_quality": quality,
        "uniform_batch_entropy": round(uniform, 4),
        "peak_rss_mib": {k: v["peak_rss_mib"] for k, v in runs.items()},
        "rss_after_imports_mib": {k: v["rss_after_imports_mib"] for k, v in runs.items()},
        "rss_by_atlas_size": rss_by_size,
        "store": {"uri": uri, **runs[next(iter(runs))]["store"]},
        "build": build,
        "peer_layouts": layouts.get("built", {}),
        "settings": {k: base[k] for k in ("batch_size", "batches", "warmup", "chunk_cells", "buffer_cells",
                                           "prefetch_buffers")} | {"peer_workers": args.peer_workers,
                                                                   "cached_world": args.cached_world,
                                                                   "repeats": args.repeats},
        "details": runs,
    }
    return result("loader", "cells/s", ours, peers, higher_is_better=True, **extra)


# ---------------------------------------------------------------------------- child


def _ours_store(spec: dict):
    """The atlas ours streams: the spec's experiment read in place (its index made on opening,
    if absent), else the atlas at its ``uri``."""
    if spec.get("experiment"):
        from scpretrain_dist.config import StoreConfig
        from scpretrain_dist.store.experiment import ExperimentLocator

        return ExperimentLocator(spec["experiment"], None, StoreConfig(backend="experiment"), spec["index_dir"]).atlas()
    from scpretrain_dist.store.atlas import open_atlas

    return open_atlas(spec["uri"])


def _ours_batches(spec: dict, world: int = 1, cache_bytes: int = 0):
    from scpretrain_dist.data.loader import StreamingCells

    store = _ours_store(spec)
    names = [r.name for r in store.datasets()]
    ds = StreamingCells(store.locator, names, spec["batch_size"], spec["seed"], rank=0, world=world,
                        chunk_cells=spec["chunk_cells"], buffer_cells=spec["buffer_cells"],
                        prefetch_buffers=spec["prefetch_buffers"], cache_bytes=cache_bytes)
    return ds


def _time(batches, consume, warmup: int, n: int) -> tuple[float, int, list[float], float]:
    """(seconds, cells) over ``n`` batches after ``warmup``; entropies of the timed batches."""
    entropies = []
    cells = 0
    t0 = None
    for i, (x, origin, n_datasets) in enumerate(batches):
        if i == warmup:
            t0 = time.perf_counter()
            cpu0 = _cpu_seconds()
        consume(x)
        if i >= warmup:
            cells += len(origin)
            entropies.append(_entropy(origin, n_datasets))
        if i + 1 == warmup + n:
            break
    if t0 is None or len(entropies) < n:
        raise RuntimeError(f"the loader gave {len(entropies)} timed batches, not {n}")
    return time.perf_counter() - t0, cells, entropies, _cpu_seconds() - cpu0


def _cpu_seconds() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def child_main(spec: dict) -> dict:
    import torch

    from scpretrain_dist.store.atlas import open_atlas

    torch.set_num_threads(1)
    store = open_atlas(spec["uri"])
    records = store.datasets()
    n_genes = store.n_genes
    starts = np.array([r.joinid_start for r in records])
    order = np.argsort(starts)
    info = {"n_cells": int(sum(r.n_cells for r in records)), "n_datasets": len(records), "n_genes": n_genes}
    rss0 = peak_rss_mib()
    kind = spec["loader"]
    bs, n, warm = spec["batch_size"], spec["batches"], spec["warmup"]

    def dataset_of_joinids(j):
        return order[np.searchsorted(starts[order], j, side="right") - 1]

    if kind in ("ours", "ours_dense", "ours_cached", "ours_experiment"):
        world = spec.get("world", 1) if kind == "ours_cached" else 1
        ds = _ours_batches(spec, world, spec.get("cache_bytes", 0) if kind == "ours_cached" else 0)
        if kind == "ours_cached":
            t0 = time.perf_counter()
            for _ in ds.epoch_batches(0):
                pass
            info["fill_seconds"] = round(time.perf_counter() - t0, 1)
            if not ds.cached:
                raise RuntimeError("the shard did not fit the cache budget; raise stream.cache_bytes or --cached-world")
        first = 1 if kind == "ours_cached" else 0

        def batches():
            epoch = first
            while True:
                for b in ds.epoch_batches(epoch):
                    yield b, b.dataset_idx.numpy(), len(ds.datasets)
                epoch += 1

        if kind == "ours_dense":
            def consume(b):  # cells x genes float32, as the peer delivers
                x = b.x
                indices = x.indices.numpy()
                counts = np.diff(x.offsets.numpy(), append=len(indices))
                dense = np.zeros((len(x), n_genes), dtype=np.float32)
                dense.ravel()[np.repeat(np.arange(len(x)) * n_genes, counts) + indices] = x.values.numpy()
                return torch.from_numpy(dense)
        else:
            def consume(b):
                return b.x.values.sum()
        seconds, cells, ent, cpu = _time(batches(), consume, warm, n)
        ds.close()
    elif kind in ("peer", "peer_trim_off"):
        import tiledbsoma as soma
        from tiledbsoma_ml import ExperimentDataset, experiment_dataloader

        # peer_trim_off: the peer with the one TileDB setting of ours that suits its reads too
        # (its IO batches are far larger than ours, so our 8 MiB result buffers would not)
        context = soma.SOMATileDBContext(tiledb_config={"sm.mem.malloc_trim": "false"}) \
            if kind == "peer_trim_off" else None
        with soma.Experiment.open(spec["uri"], context=context) as exp, \
                exp.axis_query(measurement_name="RNA") as query:
            peer = ExperimentDataset(query, layer_name="counts", batch_size=bs, shuffle=True, seed=spec["seed"])
        loader = experiment_dataloader(peer, num_workers=spec["peer_workers"])

        def batches():
            epoch = 0
            while True:
                peer.set_epoch(epoch)
                for X, obs in loader:
                    yield torch.from_numpy(X), dataset_of_joinids(obs["soma_joinid"].to_numpy()), len(records)
                epoch += 1

        seconds, cells, ent, cpu = _time(batches(), lambda x: x.sum(), warm, n)
    elif kind == "scdataset":
        import anndata as ad
        from scdataset import BlockShuffling, scDataset

        adata = ad.read_h5ad(spec["h5ad"], backed="r")
        codes = adata.obs["dataset_id"].astype(str).map({n: i for i, n in enumerate(spec["datasets"])}).to_numpy()
        peer = scDataset(adata, BlockShuffling(), batch_size=bs, seed=spec["seed"],
                         fetch_callback=lambda coll, idx: (coll.X[idx], codes[idx]),
                         batch_callback=lambda fetched, b: (fetched[0][b], fetched[1][b]))

        def batches():
            while True:
                for X, origin in peer:
                    yield X, origin, len(spec["datasets"])

        seconds, cells, ent, cpu = _time(batches(), lambda x: x.data.sum(), warm, n)
    else:
        raise ValueError(f"unknown loader {kind!r}")
    import resource

    return {
        "loader": kind, "cells_per_s": cells / seconds, "seconds": round(seconds, 2), "cells": cells,
        "cpu_ms_per_1k_cells": round(1e6 * cpu / cells, 1),
        "mean_entropy": float(np.mean(ent)), "peak_rss_mib": round(peak_rss_mib(), 1),
        "rss_after_imports_mib": round(rss0, 1),
        "children_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "store": info,
    }


if __name__ == "__main__":  # a child process: one loader, measured alone (DataLoader workers re-import this)
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", required=True)
    out = child_main(json.loads(parser.parse_args().child))
    print(json.dumps(out))
