"""Atlas scale: ingest, loader, K-means refresh and batch annotation at growing atlas sizes, and
CellTypist's annotate up to the largest size it completes within a memory cap.

For each size in ``--sizes`` a synthetic atlas (``demo-data``, streamed into a SOMA store; one
dataset per ``--cells-per-dataset`` cells, as atlases grow by adding datasets) is built and then
read by each step, every step its own command in a child process:

* ``ingest``: ``scpretrain demo-data --cells N``; cells/s, peak RSS, the store's size on disk and
  the non-zero genes per cell (a sample of cells read back);
* ``loader``: ours (``StreamingCells``, as ``bench loader`` times it); cells/s, peak RSS;
* ``kmeans``: ``bench kmeans --encoder random`` (a refresh on a 200-d embedding, then the same
  refresh from the cells the actors kept) at ``pseudolabel.niter = --kmeans-niter`` and the
  ``--set pseudolabel.*`` settings given;
* ``annotate``: ``scpretrain annotate --store-uri`` of every cell with a classifier trained on
  ``--reference-cells`` labelled cells of the largest atlas (each size draws its own cell-type
  programs, so only the largest's accuracy means anything); cells/s, peak RSS.

``celltypist``: for each of ``--celltypist-sizes`` (ascending), the first N cells of the largest
atlas are written as one log-normalised ``.h5ad``; ``celltypist.annotate`` of that file (its
model trained on the same reference cells) runs under an address-space cap of
``--memory-cap-gib`` and ``scpretrain annotate --h5ad`` runs on the same file; the sizes stop
at CellTypist's first failure. Both read the file and annotate every cell, each after the file
was read through once (both start with it in the page cache as far as memory allows); ours
writes a table of its calls (``--out calls.parquet``), CellTypist keeps its result in memory.
CellTypist's model is trained with its feature selection (the top 300 genes per type, as its
tutorial trains custom models): fewer genes make its dense scaled copy of the query, and so its
memory, smaller. Ours is timed three times on each file: over every atlas gene, trained again
on a panel of ``--gene-panel`` genes chosen from its reference (``ours_gene_panel``: the
``finetune.gene_panel`` setting), and on the genes CellTypist selected
(``ours_celltypist_genes``: both then read the same genes).

Peak RSS of a step is the largest sum of resident memory over its process tree (Ray's processes
included), sampled every 0.2 s, and where the step reports it, its own peak (VmHWM).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from scpretrain_dist import recipes
from scpretrain_dist.bench.report import result
from scpretrain_dist.config import ConfigError

PARTS = ("ingest", "loader", "kmeans", "annotate", "celltypist")


def add_arguments(p) -> None:
    p.add_argument("--sizes", default="1000000,5000000", help="atlas sizes in cells (default 1,000,000 and 5,000,000)")
    p.add_argument("--cells-per-dataset", type=int, default=50_000,
                   help="mean cells per dataset: an atlas of N cells has N / this many datasets (default 50,000)")
    p.add_argument("--genes", type=int, default=20_000)
    p.add_argument("--min-reads", type=int, default=2000, help="demo.min_reads of the atlases (default 2000)")
    p.add_argument("--max-reads", type=int, default=4000, help="demo.max_reads of the atlases (default 4000)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, default=1000, help="loader batches timed (default 1000)")
    p.add_argument("--kmeans-niter", type=int, default=3, help="Lloyd iterations of the timed refresh (default 3)")
    p.add_argument("--reference-cells", type=int, default=20_000, help="labelled cells both classifiers train on")
    p.add_argument("--gene-panel", type=int, default=1000,
                   help="ours is also trained on a panel of this many genes (finetune.gene_panel; 0: not)")
    p.add_argument("--workers", type=int, default=None,
                   help="annotation actors (default: as `scpretrain annotate` chooses; on one machine, in-process)")
    p.add_argument("--celltypist-sizes", default="100000,250000,500000,1000000",
                   help="cells CellTypist annotates, ascending; stops at its first failure ('' to skip)")
    p.add_argument("--memory-cap-gib", type=float, default=20.0,
                   help="address-space cap of the CellTypist child (default 20 GiB of the machine's 24)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"steps to run, from {','.join(PARTS)}")


# ---------------------------------------------------------------------------- measuring


def _tree_rss_mib(root: int) -> float:
    """Resident memory summed over ``root`` and its descendants, MiB (from /proc)."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in tree]
        tree.update(kids)
        frontier.extend(kids)
    kib = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/status") as f:
                kib += next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
    return kib / 1024


def measured(cmd: list[str], log_path: Path, env: dict | None = None, cap_bytes: int | None = None) -> dict:
    """Run ``cmd``; its wall seconds, exit code, peak RSS of its process tree and of itself,
    and its stdout (stderr goes to ``log_path``)."""
    def limit():
        if cap_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))

    peak = [0.0]
    with open(log_path, "w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                env={**os.environ, **(env or {})}, preexec_fn=limit)
        out: list[str] = []
        reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
        reader.start()
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss_mib(proc.pid))
            time.sleep(0.2)
        seconds = time.perf_counter() - t0
        reader.join()
    return {"seconds": round(seconds, 2), "rc": proc.returncode, "tree_peak_rss_mib": round(peak[0], 1),
            "stdout": "".join(out), "log": str(log_path)}


def _checked(step: dict, what: str) -> dict:
    if step["rc"] != 0:
        tail = Path(step["log"]).read_text()[-3000:]
        raise RuntimeError(f"bench scale: {what} failed (exit {step['rc']}); its log {step['log']} ends:\n{tail}")
    return step


def _du_gib(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30, 2)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "scpretrain_dist.cli", *args]


def _workers(args) -> list[str]:
    return [] if args.workers is None else ["--workers", str(args.workers)]


# ---------------------------------------------------------------------------- steps


def _ingest(work: Path, size: int, args, log) -> tuple[Path, dict]:
    uri = work / f"atlas_{size}.soma"
    record = Path(f"{uri}.ingest.json")
    if uri.exists() and record.exists():  # built by an earlier run of this bench: its figures stand
        return uri, json.loads(record.read_text()) | {"from_earlier_run": True}
    datasets = max(1, size // args.cells_per_dataset)
    log(f"bench scale: ingest {size:,} cells in {datasets} datasets -> {uri}")
    step = _checked(measured(_cli("demo-data", "--cells", str(size), "--datasets", str(datasets), "--genes",
                                  str(args.genes), "--store-uri", str(uri), "--work-dir", str(work),
                                  "--set", f"demo.min_reads={args.min_reads}", "--set",
                                  f"demo.max_reads={args.max_reads}"),
                             work / f"ingest_{size}.log"), "ingest")
    from scpretrain_dist.store.atlas import open_atlas

    atlas = open_atlas(str(uri))
    n = sum(r.n_cells for r in atlas.datasets())
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(n, min(n, 20_000), replace=False))
    nnz = np.diff(atlas.read_rows(sample).indptr)
    own = re.search(r"peak RSS (\d+) MiB", step["stdout"])
    out = {"cells": n, "datasets": datasets, "seconds": step["seconds"], "cells_per_s": round(n / step["seconds"], 1),
           "tree_peak_rss_mib": step["tree_peak_rss_mib"], "peak_rss_mib": float(own.group(1)) if own else None,
           "disk_gib": _du_gib(uri),
           "nonzero_genes_per_cell": {"min": int(nnz.min()), "p1": float(np.percentile(nnz, 1)),
                                      "median": float(np.median(nnz)), "mean": round(float(nnz.mean()), 1),
                                      "sampled_cells": int(len(nnz))}}
    record.write_text(json.dumps(out, indent=1))
    return uri, out


def _loader(cfg, uri: Path, args) -> dict:
    from scpretrain_dist.bench.loader import _child

    s = cfg.stream
    spec = {"uri": str(uri), "batch_size": args.batch_size, "batches": args.batches, "warmup": 20,
            "seed": cfg.pretrain.seed, "chunk_cells": s.chunk_cells, "buffer_cells": s.buffer_cells,
            "prefetch_buffers": s.prefetch_buffers, "loader": "ours", "peer_workers": 0}
    r = _child(spec)
    return {k: r[k] for k in ("cells_per_s", "cpu_ms_per_1k_cells", "peak_rss_mib", "cells")}


def _kmeans(work: Path, uri: Path, size: int, args) -> dict:
    out_json = work / f"kmeans_{size}.json"
    step = _checked(measured(_cli("bench", "kmeans", "--store", str(uri), "--encoder", "random", "--peers", "",
                                  "--work-dir", str(work / f"kmeans_{size}"), "--json", str(out_json),
                                  "--set", f"pseudolabel.niter={args.kmeans_niter}",
                                  *[x for a in args.set if a.startswith("pseudolabel.") for x in ("--set", a)]),
                             work / f"kmeans_{size}.log"), "bench kmeans")
    res = json.loads(out_json.read_text())
    d = res["ours_detail"]
    later = d.get("later_refresh") or {}
    return {"refresh_seconds": round(res["ours"], 1), "later_refresh_seconds": round(later.get("seconds", 0), 1),
            "pool_startup_seconds": round(d["pool_startup_seconds"], 1), "niter": d["niter"],
            "stage_seconds_summed_over_datasets": d["stage_seconds_summed_over_datasets"],
            "fraction_of_machine_matmul_rate": res["targets"].get("fraction_of_machine_matmul_rate"),
            "actor_memory": res.get("actor_memory"), "tree_peak_rss_mib": step["tree_peak_rss_mib"],
            "command_seconds": step["seconds"]}


def _reference(uri: Path, n_cells: int, seed: int = 0):
    """``n_cells`` labelled cells drawn evenly over the atlas (raw counts, the atlas genes)."""
    import anndata as ad
    import pandas as pd

    from scpretrain_dist.store.atlas import open_atlas

    atlas = open_atlas(str(uri))
    records = atlas.datasets()
    per = max(1, n_cells // len(records))
    rng = np.random.default_rng(seed)
    Xs, labels = [], []
    for r in records:
        take = np.sort(rng.choice(r.n_cells, min(per, r.n_cells), replace=False))
        Xs.append(atlas.read_rows(r.joinids[take]))
        labels.append(atlas.read_obs(r.name)["cell_type"].astype(str).to_numpy()[take])
    import scipy.sparse as sp

    y = np.concatenate(labels)
    obs = pd.DataFrame({"cell_type": y}, index=[f"ref{i}" for i in range(len(y))])
    return ad.AnnData(sp.vstack(Xs).tocsr(), obs=obs, var=pd.DataFrame(index=[str(g) for g in atlas.genes()]))


def _classifiers(cfg, uri: Path, args, ct, log) -> dict:
    """Our classifier (registered) and CellTypist's (a .pkl) trained on the same reference cells."""
    from scpretrain_dist.bench.annotate import _lognorm, _train_celltypist, _train_ours
    from scpretrain_dist.evaluate.splits import split_cells

    ref = _reference(uri, args.reference_cells)
    split = split_cells(ref.obs["cell_type"].to_numpy(), 0, cfg.finetune.train_frac, cfg.finetune.val_frac,
                        cfg.finetune.train_cap)
    model_uri, ours = _train_ours(cfg, ref, f"{uri.name} reference", split, log)
    out = {"model_uri": model_uri, "reference_cells": int(ref.n_obs), "ours": ours}
    if args.gene_panel:
        panel = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, gene_panel=args.gene_panel))
        uri_panel, ours_panel = _train_ours(panel, ref, f"{uri.name} reference, a panel of {args.gene_panel} genes",
                                            split, log)
        out |= {"model_uri_gene_panel": uri_panel, "ours_gene_panel": ours_panel}
    if ct is not None:
        model, info = _train_celltypist(ct, _lognorm(ref), split, 100, log, feature_selection=True)
        path = Path(cfg.work_dir) / "celltypist_model.pkl"
        model.write(str(path))
        out |= {"celltypist_model": str(path), "celltypist": info}
        # ours again on the genes CellTypist's feature selection kept: both read the same genes
        genes = np.isin(np.asarray(ref.var_names.astype(str)), np.asarray(model.features).astype(str))
        uri_same, same = _train_ours(cfg, ref[:, genes].copy(), f"{uri.name} reference, CellTypist's {int(genes.sum())} genes",
                                     split, log)
        out |= {"model_uri_celltypist_genes": uri_same, "ours_celltypist_genes": same}
    return out


def _annotate_store(work: Path, uri: Path, size: int, model_uri: str, args) -> dict:
    step = _checked(measured(_cli("annotate", "--model", model_uri, "--store-uri", str(uri), "--work-dir", str(work),
                                  *_workers(args)), work / f"annotate_{size}.log"), "annotate")
    rate = re.search(r"\(([\d,]+) cells/s\)", step["stdout"])
    return {"seconds": step["seconds"], "cells_per_s": round(size / step["seconds"], 1),
            "cells_per_s_reported": float(rate.group(1).replace(",", "")) if rate else None,
            "tree_peak_rss_mib": step["tree_peak_rss_mib"]}


def _query_file(uri: Path, n: int, path: Path) -> Path:
    """The first ``n`` cells of the atlas as one log-normalised .h5ad (with their true types),
    written block by block."""
    if path.exists():
        return path
    import anndata as ad
    import h5py
    import pandas as pd
    from anndata.io import sparse_dataset, write_elem

    from scpretrain_dist.data.normalize import normalize_rows
    from scpretrain_dist.store.atlas import open_atlas

    atlas = open_atlas(str(uri))
    labels, remaining = [], n
    for r in atlas.datasets():
        if remaining <= 0:
            break
        labels.append(atlas.read_obs(r.name)["cell_type"].astype(str).to_numpy()[:remaining])
        remaining -= len(labels[-1])
    y = np.concatenate(labels)
    if len(y) < n:
        raise ConfigError(f"bench scale: --celltypist-sizes asks for {n:,} cells; the largest atlas has {len(y):,}")
    tmp = path.with_name(path.name + ".tmp")
    ad.AnnData(obs=pd.DataFrame({"cell_type": pd.Categorical(y)}, index=[f"c{i}" for i in range(n)]),
               var=pd.DataFrame(index=[str(g) for g in atlas.genes()])).write_h5ad(tmp)
    with h5py.File(tmp, "a") as f:
        for lo in range(0, n, 65_536):
            X = normalize_rows(atlas.read_rows(np.arange(lo, min(n, lo + 65_536))), "counts").astype(np.float32)
            if lo == 0:
                write_elem(f, "X", X)
                target = sparse_dataset(f["X"])
            else:
                target.append(X)
    tmp.rename(path)
    return path


def _celltypist_child(spec: dict) -> dict:
    import warnings

    import anndata as ad
    import celltypist

    from scpretrain_dist.runtime import peak_rss_mib

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = celltypist.annotate(spec["h5ad"], model=spec["model"], majority_voting=False)
    seconds = time.perf_counter() - t0
    pred = res.predicted_labels["predicted_labels"].astype(str).to_numpy()
    truth = ad.read_h5ad(spec["h5ad"], backed="r").obs["cell_type"].astype(str).to_numpy()
    return {"seconds": round(seconds, 2), "accuracy": round(float((pred == truth).mean()), 4),
            "peak_rss_mib": round(peak_rss_mib(), 1)}


def _read_through(path: Path, chunk: int = 64 * 2**20) -> None:
    """Read a file once, so the command timed next starts with it in the page cache as far as
    memory allows (the one before may have pushed it out: CellTypist holds 16 GiB at 500k cells)."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        while f.readinto(buf):
            pass


def _ours_on_file(work: Path, q: Path, truth: np.ndarray, model_uri: str, name: str, args, log) -> dict:
    """``scpretrain annotate --h5ad q --out calls.parquet`` with ``model_uri`` (``name`` in the
    log), after reading the file through: seconds, cells/s, the process tree's peak RSS and the
    calls' accuracy."""
    import pandas as pd

    n = len(truth)
    log(f"bench scale: {n:,} cells: {name} ...")
    out = work / f"calls_{n}.parquet"
    out.unlink(missing_ok=True)
    _read_through(q)
    step = _checked(measured(_cli("annotate", "--model", model_uri, "--h5ad", str(q), "--out", str(out),
                                  "--work-dir", str(work), *_workers(args)),
                             work / f"annotate_h5ad_{n}_{name}.log"), "annotate --h5ad")
    calls = pd.read_parquet(out)["scpretrain_label"].astype(str).to_numpy()
    out.unlink()
    return {"seconds": step["seconds"], "cells_per_s": round(n / step["seconds"], 1),
            "tree_peak_rss_mib": step["tree_peak_rss_mib"], "accuracy": round(float((calls == truth).mean()), 4)}


# ours trained again on fewer genes: the JSON's ``ours_<variant>`` and ``ratio_<variant>``
VARIANTS = {"gene_panel": "its gene panel", "celltypist_genes": "CellTypist's genes"}


def _versus_celltypist(work: Path, uri: Path, sizes: list[int], models: dict, args, log) -> dict:
    import anndata as ad

    cap = int(args.memory_cap_gib * 2**30)
    rows, stopped = {}, None
    for n in sizes:
        q = _query_file(uri, n, work / f"query_{n}.h5ad")
        log(f"bench scale: {n:,} cells: CellTypist (capped at {args.memory_cap_gib:g} GiB) ...")
        spec = {"h5ad": str(q), "model": models["celltypist_model"]}
        _read_through(q)
        ct = measured([sys.executable, "-m", "scpretrain_dist.bench.scale", "--celltypist-child", json.dumps(spec)],
                      work / f"celltypist_{n}.log", cap_bytes=cap)
        truth = ad.read_h5ad(q, backed="r").obs["cell_type"].astype(str).to_numpy()
        row = {"ours": _ours_on_file(work, q, truth, models["model_uri"], "ours", args, log),
               "file_gib": round(q.stat().st_size / 2**30, 2)}
        for variant in VARIANTS:
            if models.get(f"model_uri_{variant}"):
                row[f"ours_{variant}"] = _ours_on_file(work, q, truth, models[f"model_uri_{variant}"], f"ours_{variant}",
                                                       args, log)
        lines = [ln for ln in ct["stdout"].splitlines() if ln.startswith("{")]
        if ct["rc"] != 0 or not lines:
            tail = Path(ct["log"]).read_text().strip().splitlines()[-1:] or [""]
            stopped = {"cells": n, "exit": ct["rc"], "last_line": tail[0][-300:], "seconds": ct["seconds"],
                       "tree_peak_rss_mib": ct["tree_peak_rss_mib"]}
            row["celltypist"] = {"failed": stopped}
            rows[str(n)] = row
            log(f"bench scale: CellTypist stopped at {n:,} cells (exit {ct['rc']}): {stopped['last_line']}")
            break
        c = json.loads(lines[-1])
        c["cells_per_s"] = round(n / ct["seconds"], 1)
        c["tree_peak_rss_mib"] = ct["tree_peak_rss_mib"]
        c["command_seconds"] = ct["seconds"]
        row["celltypist"] = c
        row["ratio"] = round(row["ours"]["cells_per_s"] / c["cells_per_s"], 2)
        same = ""
        for variant, words in VARIANTS.items():
            if f"ours_{variant}" in row:
                row[f"ratio_{variant}"] = round(row[f"ours_{variant}"]["cells_per_s"] / c["cells_per_s"], 2)
                same += (f"; ours on {words} {row[f'ours_{variant}']['cells_per_s']:,.0f} cells/s "
                         f"({row[f'ratio_{variant}']}x)")
        rows[str(n)] = row
        log(f"bench scale: {n:,} cells: ours {row['ours']['cells_per_s']:,.0f} cells/s, CellTypist "
            f"{c['cells_per_s']:,.0f} cells/s ({row['ratio']}x), its peak RSS {c['peak_rss_mib']:,.0f} MiB{same}")
    done = [int(k) for k, v in rows.items() if "cells_per_s" in v["celltypist"]]
    return {"by_size": rows, "largest_completed": max(done) if done else None, "stopped": stopped,
            "memory_cap_gib": args.memory_cap_gib}


# ---------------------------------------------------------------------------- run


def run(args) -> dict:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if not parts or set(parts) - set(PARTS):
        raise ConfigError(f"--parts takes {', '.join(PARTS)}; got {args.parts!r}")
    try:
        sizes = sorted(int(s) for s in args.sizes.split(",") if s.strip())
        ct_sizes = sorted(int(s) for s in args.celltypist_sizes.split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"--sizes and --celltypist-sizes take comma-separated cell counts; got {args.sizes!r} "
                          f"and {args.celltypist_sizes!r}") from None
    if not sizes or min(sizes) < 1 or args.cells_per_dataset < 1 or min(ct_sizes, default=1) < 1:
        raise ConfigError("--sizes, --celltypist-sizes and --cells-per-dataset must be positive")
    if ct_sizes and max(ct_sizes) > max(sizes):
        raise ConfigError(f"--celltypist-sizes {max(ct_sizes):,} is above the largest atlas ({max(sizes):,} cells)")
    ct = None
    if "celltypist" in parts:
        from scpretrain_dist.bench.annotate import _import_celltypist

        ct = _import_celltypist()
    cfg = recipes.configure(args.recipe, args.config, args.set, args.work_dir or "scpretrain_bench_scale")
    work = Path(cfg.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = print
    per_size: dict[str, dict] = {}
    uris = {}
    for size in sizes:
        uri, ingest = _ingest(work, size, args, log)
        uris[size] = uri
        per_size[str(size)] = {"ingest": ingest}
        log(f"bench scale: {size:,} cells: ingest {json.dumps(ingest)}")
    models = None
    if {"annotate", "celltypist"} & set(parts):  # the atlases' cell types differ by size: the largest's
        models = _classifiers(cfg, uris[sizes[-1]], args, ct, log)
    for size in sizes:
        row = per_size[str(size)]
        if "loader" in parts:
            row["loader"] = _loader(cfg, uris[size], args)
            log(f"bench scale: {size:,} cells: loader {json.dumps(row['loader'])}")
        if "kmeans" in parts:
            row["kmeans"] = _kmeans(work, uris[size], size, args)
            log(f"bench scale: {size:,} cells: kmeans {json.dumps(row['kmeans'])}")
        if "annotate" in parts:
            row["annotate"] = _annotate_store(work, uris[size], size, models["model_uri"], args)
            log(f"bench scale: {size:,} cells: annotate {json.dumps(row['annotate'])}")
    versus = _versus_celltypist(work, uris[sizes[-1]], ct_sizes, models, args, log) if ct is not None and ct_sizes else None
    lo, hi = per_size[str(sizes[0])], per_size[str(sizes[-1])]

    def growth(step: str, key: str):
        a, b = lo.get(step, {}).get(key), hi.get(step, {}).get(key)
        return round(b / a, 3) if a and b else None

    growths = {f"{step}_{key}": growth(step, key) for step, key in
               [("ingest", "peak_rss_mib"), ("ingest", "tree_peak_rss_mib"), ("loader", "peak_rss_mib"),
                ("annotate", "tree_peak_rss_mib"), ("ingest", "cells_per_s"), ("loader", "cells_per_s"),
                ("annotate", "cells_per_s")]}
    ours = peers = row = None
    if versus and versus["largest_completed"]:
        row = versus["by_size"][str(versus["largest_completed"])]
        ours, peers = row["ours"]["cells_per_s"], {"celltypist": row["celltypist"]["cells_per_s"]}
    met = {}
    if len(sizes) > 1:
        # the tree's sampled peak: measured the same way for every step and every size
        met["ingest_rss_within_20pct"] = (growths["ingest_tree_peak_rss_mib"] or 99) <= 1.2
        if "annotate" in parts:
            met["annotation_rss_within_20pct"] = (growths["annotate_tree_peak_rss_mib"] or 99) <= 1.2
    if ours:  # ours over every gene, and each of ours on fewer genes (CellTypist's model reads ~1,300)
        for key in ("ours", *(f"ours_{v}" for v in VARIANTS if f"ours_{v}" in row)):
            met["annotation_3x_celltypist" + key[len("ours"):]] = row[key]["cells_per_s"] / peers["celltypist"] >= 3.0
    return result("scale", "cells/s", ours, peers or {}, higher_is_better=True, met=met,
                  ours_is="`scpretrain annotate --h5ad` on the largest file CellTypist annotated, whole command",
                  peer_is="celltypist.annotate of the same file, in its own process",
                  sizes=per_size, growth_largest_vs_smallest=growths, versus_celltypist=versus,
                  classifiers=models, settings={k: getattr(args, k) for k in
                                                ("cells_per_dataset", "genes", "min_reads", "max_reads",
                                                 "batch_size", "batches", "kmeans_niter", "reference_cells",
                                                 "workers", "memory_cap_gib")})


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--celltypist-child":
        print(json.dumps(_celltypist_child(json.loads(sys.argv[2]))), flush=True)
