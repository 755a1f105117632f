"""Batch annotation cells/s vs CellTypist on the same query cells, and serving latency over HTTP.

Both annotators are trained on the same reference cells and genes: our classifier (fine-tuned
here without pretraining, or ``--model``) and a CellTypist logistic regression
(``celltypist.train``, SGD). CellTypist is timed on ``celltypist.annotate`` alone, given the
query already log-normalised in memory; ours as the whole ``scpretrain annotate`` path on the
query file (model from the registry, Ray actor pool start-up, reading, writing the output), and
separately in this process without Ray, and as the bare forward pass. Serving: p50/p95 latency
of ``scpretrain serve`` (MLflow's scoring server) on 127.0.0.1 for 1, 100 and 1000 cells per
request, in the sparse request format (JSON with base64, and Parquet) and as a dense JSON table of
every query gene.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "scrna"
DEFAULT_REFERENCE = SHARED / "pbmc3k_10xv1.h5ad"
DEFAULT_QUERY = SHARED / "pbmc_sorted_zheng_10xv1.h5ad"
MODEL_NAME = "scpretrain-bench-annotator"


def add_arguments(p) -> None:
    p.add_argument("--reference", default=str(DEFAULT_REFERENCE) if DEFAULT_REFERENCE.exists() else None,
                   help="labelled .h5ad both annotators are trained on (default ../shared/data/scrna/pbmc3k_10xv1.h5ad, "
                        "else the demo data)")
    p.add_argument("--query", default=None,
                   help=".h5ad or folder of them to annotate (default pbmc_sorted_zheng_10xv1 beside the reference)")
    p.add_argument("--model", help="a registered models:/NAME@ALIAS in --work-dir (default: fine-tune one on the reference)")
    p.add_argument("--min-cells", type=int, default=20000,
                   help="tile the query cells until there are at least this many (an atlas-sized job; 0: as given)")
    p.add_argument("--block-size", type=int, default=4096)
    p.add_argument("--workers", type=int, default=2, help="Ray actors of our batch path")
    p.add_argument("--requests", type=int, default=30, help="timed requests per request size")
    p.add_argument("--sizes", default="1,100,1000", help="cells per request")
    p.add_argument("--parts", default="batch,serving", help="which parts to run: batch, serving or both")
    p.add_argument("--celltypist-max-iter", type=int, default=100)


def _config(args):
    from scpretrain_dist import recipes

    annotate = {"workers": args.workers, "block_size": args.block_size}
    if not any(s.startswith("annotate.cpus_per_worker") for s in args.set):
        annotate["cpus_per_worker"] = 1
    return recipes.configure(args.recipe, args.config, args.set, args.work_dir or "scpretrain_bench_annotate",
                             annotate=annotate)


def _import_celltypist():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import celltypist
    except ImportError:
        raise SystemExit(
            "bench annotate needs CellTypist, which lives in the benchmark environment: run "
            "`make bench-venv`, then `.venv-bench/bin/scpretrain bench annotate ...`"
        ) from None
    import logging

    logging.getLogger("celltypist").setLevel(logging.WARNING)
    return celltypist


def _read(path: Path):
    """Cells x upper-case gene symbols, columns that collide once upper-cased summed (as
    ingest does), so both annotators see one column per gene."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    a = ad.read_h5ad(path)
    X = sp.csr_matrix(a.X, dtype=np.float32)
    codes, symbols = pd.factorize(pd.Index(a.var_names.astype(str)).str.upper())
    if len(symbols) < len(codes):
        X = (X @ sp.csr_matrix((np.ones(len(codes), np.float32), (np.arange(len(codes)), codes)),
                               shape=(len(codes), len(symbols)))).tocsr()
    return ad.AnnData(X=X, obs=a.obs, var=pd.DataFrame(index=pd.Index(symbols, dtype=str)))


def _lognorm(adata):
    """log1p(CP10k), the input CellTypist expects (and what our annotator computes inside)."""
    from scpretrain_dist.catalog.values import detect_value_type
    from scpretrain_dist.data.normalize import normalize_rows

    out = adata.copy()
    out.X = normalize_rows(adata.X, detect_value_type(adata.X))
    return out


def _inputs(args, cfg, log):
    """Reference and query AnnData (query tiled to --min-cells, written once for our path)."""
    import anndata as ad

    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if args.reference is None:
        from scpretrain_dist.demo import write_demo_atlas

        demo = work / "demo_data"
        paths = write_demo_atlas(demo, cfg.demo)
        ref_path, query_paths = paths[0], paths[1:]
        log(f"bench annotate: no real data given; demo reference {ref_path.name}, query {[p.name for p in query_paths]}")
    else:
        ref_path = Path(args.reference)
        if args.query:
            q = Path(args.query)
            query_paths = sorted(q.glob("*.h5ad")) if q.is_dir() else [q]
        else:
            query_paths = [ref_path.parent / DEFAULT_QUERY.name]
    for p in [ref_path, *query_paths]:
        if not p.exists():
            raise SystemExit(f"bench annotate: {p} does not exist")
    ref = _read(ref_path)
    parts = [_read(p) for p in query_paths]
    query = parts[0] if len(parts) == 1 else ad.concat(parts, join="outer", label="source",
                                                         keys=[p.stem for p in query_paths], index_unique="-")
    n0 = query.n_obs
    repeat = max(1, -(-args.min_cells // n0)) if args.min_cells else 1
    if repeat > 1:
        query = ad.concat([query] * repeat, index_unique="-", keys=[str(i) for i in range(repeat)])
    query.obs = query.obs[[]]  # cells only: both tools see the same matrix and genes
    qpath = work / "query.h5ad"
    query.write_h5ad(qpath)
    log(f"bench annotate: reference {ref_path.name} {ref.n_obs} cells x {ref.n_vars} genes; query "
        f"{', '.join(p.stem for p in query_paths)}: {n0} cells x {query.n_vars} genes, tiled x{repeat} -> {query.n_obs} cells")
    return ref, ref_path, query, qpath, [str(p) for p in query_paths], repeat


def _train_ours(cfg, ref, ref_name, split, log) -> tuple[str, dict]:
    """Fine-tune the classifier on the reference (no pretraining) and register it."""
    import dataclasses

    import pandas as pd

    from scpretrain_dist.serve.pyfunc import register_annotator
    from scpretrain_dist.tracking.mlflow_runs import stage_run
    from scpretrain_dist.train.finetune import finetune, predict_proba

    X = _lognorm(ref).X
    classes, y = np.unique(ref.obs["cell_type"].astype(str).to_numpy(), return_inverse=True)
    f = dataclasses.replace(cfg.finetune, max_epochs=min(cfg.finetune.max_epochs, 30),
                            patience=min(cfg.finetune.patience, 5))
    t0 = time.perf_counter()
    res = finetune(X[split.train].toarray(), y[split.train], X[split.val].toarray(), y[split.val],
                   len(classes), f, cfg.model, seed=0)
    seconds = time.perf_counter() - t0
    acc = float((predict_proba(res.model, X[split.test].toarray()).argmax(1) == y[split.test]).mean())
    log(f"bench annotate: fine-tuned our classifier on {ref_name} in {seconds:.0f} s "
        f"({res.epochs_run} epochs), held-out accuracy {acc:.3f}")
    example = pd.DataFrame(ref.X[:2].toarray(), columns=ref.var_names)
    lineage = {"store_uri": "", "store_version": "", "pretrain_datasets": [], "pseudo_label_version": "none",
               "encoder_run": "", "finetune_dataset": ref_name, "purpose": "bench annotate",
               "metrics": {"accuracy": round(acc, 4)}}
    with stage_run("bench-annotate-finetune", cfg):
        name, version = register_annotator(res.model, np.asarray(ref.var_names), classes, example, lineage, MODEL_NAME, "bench")
    return f"models:/{name}/{version}", {"heldout_accuracy": acc, "finetune_seconds": seconds}


def _train_celltypist(ct, ref_ln, split, max_iter, log, feature_selection: bool = False):
    """CellTypist on the reference's train + validation cells; ``feature_selection``: its
    two-pass training on the top 300 genes per type (its tutorial's custom models)."""
    t0 = time.perf_counter()
    train = ref_ln[np.sort(np.concatenate([split.train, split.val]))].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ct.train(train, labels="cell_type", use_SGD=True, max_iter=max_iter, n_jobs=1,
                         check_expression=False, feature_selection=feature_selection)
        pred = ct.annotate(ref_ln[split.test].copy(), model=model, majority_voting=False)
    acc = float((pred.predicted_labels["predicted_labels"].astype(str).to_numpy()
                 == ref_ln.obs["cell_type"].astype(str).to_numpy()[split.test]).mean())
    seconds = time.perf_counter() - t0
    log(f"bench annotate: trained CellTypist (SGD, max_iter {max_iter}) on {train.n_obs} cells x "
        f"{len(model.features)} genes in {seconds:.0f} s, held-out accuracy {acc:.3f}")
    return model, {"heldout_accuracy": acc, "train_seconds": seconds, "n_features": int(len(model.features))}


def _time_celltypist(ct, model, query_ln, runs=2) -> tuple[float, list[float], np.ndarray]:
    times, labels = [], None
    for _ in range(runs):
        data = query_ln.copy()  # annotate scales its input in place
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = ct.annotate(data, model=model, majority_voting=False)
        times.append(time.perf_counter() - t0)
        labels = res.predicted_labels["predicted_labels"].astype(str).to_numpy()
    return min(times), times, labels


def _time_ours(cfg, model_uri, qpath: Path, workers: int, tag: str, runs: int, log) -> tuple[float, list[float], dict]:
    import anndata as ad

    from scpretrain_dist.runtime import shutdown_ray
    from scpretrain_dist.serve.annotate import annotate_h5ad

    times, info = [], {}
    for i in range(runs):
        out = qpath.with_name(f"annotated-{tag}.h5ad")
        if out.exists():
            out.unlink()
        shutdown_ray()  # every run starts its own Ray, as the CLI does
        t0 = time.perf_counter()
        rep = annotate_h5ad(cfg, model_uri, qpath, out=out, workers=workers, progress=False, log=lambda m: None)
        times.append(time.perf_counter() - t0)
        log(f"bench annotate: ours ({tag}) run {i + 1}: {rep.n_cells} cells in {times[-1]:.2f} s")
        if i == 0:
            info["labels"] = ad.read_h5ad(out, backed="r").obs["scpretrain_label"].astype(str).to_numpy()
    return min(times), times, info


def _time_ours_ray_running(cfg, model_uri, qpath: Path, workers: int, log) -> float:
    """The actor-pool path on a Ray that is already up (a cluster): start-up of actors included."""
    from scpretrain_dist.runtime import init_ray, shutdown_ray
    from scpretrain_dist.serve.annotate import annotate_h5ad

    out = qpath.with_name("annotated-ray-running.h5ad")
    if out.exists():
        out.unlink()
    shutdown_ray()
    init_ray(cfg)
    try:
        t0 = time.perf_counter()
        rep = annotate_h5ad(cfg, model_uri, qpath, out=out, workers=workers, progress=False, log=lambda m: None)
        seconds = time.perf_counter() - t0
    finally:
        shutdown_ray()
    log(f"bench annotate: ours (ray already running) {rep.n_cells} cells in {seconds:.2f} s")
    return seconds


def _time_ray_start(cfg) -> float:
    from scpretrain_dist.runtime import init_ray, shutdown_ray

    shutdown_ray()
    t0 = time.perf_counter()
    init_ray(cfg)
    seconds = time.perf_counter() - t0
    shutdown_ray()
    return seconds


def _time_forward(cfg, model_uri, query, block_size) -> tuple[float, float]:
    """The forward pass alone on the in-memory query (what ``celltypist.annotate`` is timed on),
    and the model load through the registry."""
    from scpretrain_dist.serve.annotate import load_annotator
    from scpretrain_dist.tracking.registry import ModelFetch

    t0 = time.perf_counter()
    annotator = load_annotator(ModelFetch(model_uri, cfg.tracking_uri))
    load = time.perf_counter() - t0
    genes = np.asarray(query.var_names)
    annotator.predict_matrix(query.X[:block_size], genes, "counts")  # warm caches
    best = np.inf
    for _ in range(2):
        t0 = time.perf_counter()
        for lo in range(0, query.n_obs, block_size):
            annotator.predict_matrix(query.X[lo : lo + block_size], genes, "counts")
        best = min(best, time.perf_counter() - t0)
    return best, load


# ---------------------------------------------------------------------------- serving
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PARQUET = "application/vnd.apache.parquet"


def _post(port: int, body: bytes, content_type: str = "application/json") -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                 headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _serving(cfg, model_uri, query, sizes, n_requests, log) -> dict:
    import pandas as pd

    from scpretrain_dist.serve.annotate import load_annotator
    from scpretrain_dist.serve.pyfunc import sparse_request, sparse_request_parquet
    from scpretrain_dist.tracking.registry import ModelFetch

    port = _free_port()
    cmd = [sys.executable, "-m", "scpretrain_dist.cli", "serve", "--model", model_uri, "--port", str(port),
           "--work-dir", str(cfg.work_dir)]
    log_file = open(Path(cfg.work_dir) / "serve.log", "w")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"bench annotate: the scoring server did not start; see {log_file.name}") from None
                time.sleep(0.5)
        annotator = load_annotator(ModelFetch(model_uri, cfg.tracking_uri))
        genes = [str(g) for g in query.var_names]
        out = {}
        for n in sizes:
            X = query.X[:n]
            sparse_payload = sparse_request(X, genes)
            payloads = {"sparse": (json.dumps(sparse_payload).encode(), "application/json"),
                        "sparse_parquet": (sparse_request_parquet(X, genes), PARQUET)}
            dense_rows = X.toarray()
            payloads["dense_json"] = (json.dumps({"dataframe_split": {"columns": genes, "data": dense_rows.tolist()}})
                                      .encode(), "application/json")
            for fmt, (body, content_type) in payloads.items():
                reps = n_requests if fmt.startswith("sparse") or n <= 100 else max(3, n_requests // 6)
                for _ in range(2):  # warm-up: first requests import and cache
                    status, resp = _post(port, body, content_type)
                    if status != 200:
                        raise SystemExit(f"bench annotate: the server answered {status}: {resp[:300]!r}")
                lat = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    status, resp = _post(port, body, content_type)
                    lat.append((time.perf_counter() - t0) * 1000)
                preds = json.loads(resp)["predictions"]
                assert len(preds) == n
                # the model's own share of a request: the pyfunc on the DataFrame the server builds
                if fmt == "sparse_parquet":
                    frame = pd.read_parquet(io.BytesIO(body))
                else:
                    split = json.loads(body)["dataframe_split"]
                    frame = pd.DataFrame(split["data"], columns=split["columns"])
                t0 = time.perf_counter()
                if fmt.startswith("sparse"):
                    annotator.predict(frame, genes=sparse_payload["params"]["genes"],
                                      sparse_dtypes=sparse_payload["params"]["sparse_dtypes"])
                else:
                    annotator.predict(frame)
                model_ms = (time.perf_counter() - t0) * 1000
                out[f"{fmt}_{n}"] = {"cells": n, "format": fmt, "requests": reps, "bytes": len(body),
                                     "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
                                     "model_ms": model_ms}
                log(f"bench annotate: serving {n:>5} cells ({fmt:14s}, {len(body) / 1e6:7.2f} MB): "
                    f"p50 {np.percentile(lat, 50):8.1f} ms, p95 {np.percentile(lat, 95):8.1f} ms (model {model_ms:.1f} ms)")
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log_file.close()


def run(args) -> dict:
    from scpretrain_dist.bench.report import result
    from scpretrain_dist.evaluate.splits import split_cells
    from scpretrain_dist.runtime import peak_rss_mib

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    if not parts or parts - {"batch", "serving"}:
        raise SystemExit(f"bench annotate: --parts {args.parts!r} must name batch, serving or both")
    ct = _import_celltypist() if "batch" in parts else None
    log = print
    cfg = _config(args)
    ref, ref_path, query, qpath, query_files, repeat = _inputs(args, cfg, log)
    ref = ref[ref.obs["cell_type"].astype(str).to_numpy() != "unknown"].copy()
    split = split_cells(ref.obs["cell_type"].astype(str).to_numpy(), 0, cfg.finetune.train_frac,
                        cfg.finetune.val_frac, cfg.finetune.train_cap)
    if args.model:
        model_uri, ours_train = args.model, {}
    else:
        model_uri, ours_train = _train_ours(cfg, ref, ref_path.stem, split, log)
    n = query.n_obs
    extra: dict = {"model": model_uri,
                   "query": {"files": query_files, "tiled": repeat, "cells": n, "genes": int(query.n_vars)},
                   "reference": {"file": str(ref_path), "cells": int(ref.n_obs), "genes": int(ref.n_vars)},
                   "threads": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
                   "targets": {"batch_ratio_min": 2.0, "serving_p50_ms_1000_cells_max": 100.0}}
    ours_cps, peers, met = None, {}, {}
    if "batch" in parts:
        ct_model, ct_train = _train_celltypist(ct, _lognorm(ref), split, args.celltypist_max_iter, log)
        query_ln = _lognorm(query)
        ct_s, ct_times, ct_labels = _time_celltypist(ct, ct_model, query_ln)
        log(f"bench annotate: CellTypist annotate: {n} cells in {ct_s:.2f} s (runs {[round(t, 2) for t in ct_times]})")
        fwd_s, load_s = _time_forward(cfg, model_uri, query, args.block_size)
        log(f"bench annotate: ours, forward pass only: {n} cells in {fwd_s:.2f} s")
        inproc_s, inproc_times, inproc = _time_ours(cfg, model_uri, qpath, 0, "in-process", 2, log)
        ray_s, ray_times, ray_info = _time_ours(cfg, model_uri, qpath, args.workers, "ray", 1, log)
        ray_start = _time_ray_start(cfg)
        warm_s = _time_ours_ray_running(cfg, model_uri, qpath, args.workers, log)
        ct_cps = n / ct_s
        # the headline is what `scpretrain annotate` does by default with this job on this
        # machine (see _choose_workers); both paths are measured and reported whatever it is
        from scpretrain_dist.serve.annotate import _choose_workers

        default = "in-process" if _choose_workers(cfg, None, n, lambda m: None) == 0 else "ray"
        ours_cps, peers = (n / inproc_s if default == "in-process" else n / ray_s), {"celltypist": ct_cps}
        extra.update(
            ours_is=f"whole `scpretrain annotate --h5ad` path as run by default on {n} cells ({default}): registry "
                    "load, reading, forward pass, writing the output file"
                    + (f", Ray start-up and actor pool ({args.workers} actors)" if default == "ray" else ""),
            peer_is="celltypist.annotate only, on the query already log-normalised in memory",
            ours_default_path=default, ours_ray_cells_per_s=n / ray_s, ratio_ray=(n / ray_s) / ct_cps,
            ours_in_process_cells_per_s=n / inproc_s, ratio_in_process=(n / inproc_s) / ct_cps,
            ours_forward_only_cells_per_s=n / fwd_s, ratio_forward_only=(n / fwd_s) / ct_cps,
            ours_ray_already_running_cells_per_s=n / warm_s, ratio_ray_already_running=(n / warm_s) / ct_cps,
            seconds={"celltypist_annotate": ct_times, "ours_ray_whole": ray_times,
                     "ours_in_process_whole": inproc_times, "ours_forward_only": fwd_s,
                     "ours_ray_already_running": warm_s, "ray_start": ray_start,
                     "model_load_from_registry": load_s},
            training={"ours": ours_train, "celltypist": ct_train},
            agreement={"ours_ray_vs_in_process": float((ray_info["labels"] == inproc["labels"]).mean()),
                       "ours_vs_celltypist": float((ray_info["labels"] == ct_labels).mean())},
        )
        met.update(batch_ratio=ours_cps / ct_cps >= 2.0, batch_ratio_in_process=(n / inproc_s) / ct_cps >= 2.0,
                   batch_ratio_ray=(n / ray_s) / ct_cps >= 2.0)
    if "serving" in parts:
        sizes = [int(x) for x in args.sizes.split(",") if x]
        serving = _serving(cfg, model_uri, query, sizes, args.requests, log)
        extra["serving_latency_ms"] = serving
        for fmt in ("sparse", "sparse_parquet"):
            p50 = serving.get(f"{fmt}_1000", {}).get("p50_ms")
            met[f"serving_p50_1000_{fmt}"] = p50 is not None and p50 < 100.0
        dense = serving.get("dense_json_1000", {}).get("p50_ms")
        met["serving_p50_1000_dense_json"] = dense is not None and dense < 100.0
    res = result("annotate", "cells/s", ours_cps, peers, higher_is_better=True, met=met,
                 peak_rss_mib=peak_rss_mib(), load_average_1_5_15min=list(os.getloadavg()), **extra)
    shutil.rmtree(Path(cfg.work_dir) / "ray", ignore_errors=True)
    return res
