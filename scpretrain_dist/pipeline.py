"""The stages chained: demo data -> ingest -> pretrain -> fine-tune/evaluate -> register.

Each function is one stage a CLI subcommand calls; ``quickstart`` runs them all under one
MLflow parent run.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np

from scpretrain_dist.config import RunConfig
from scpretrain_dist.store.soma import AtlasStore, StoreError


@contextmanager
def stage_run(name: str, cfg: RunConfig, timings: dict | None = None):
    """An MLflow run for a stage, nested under the active run if there is one."""
    import mlflow

    from scpretrain_dist.tracking.mlflow_runs import log_config, setup

    setup(cfg)
    t0 = time.perf_counter()
    nested = mlflow.active_run() is not None
    with mlflow.start_run(run_name=name, nested=nested) as run:
        mlflow.set_tag("stage", name)
        if not nested:
            log_config(cfg)
        yield run
        seconds = time.perf_counter() - t0
        mlflow.log_metric("stage_seconds", seconds)
    if timings is not None:
        timings[name] = seconds


def demo_data(cfg: RunConfig, out_dir: str | Path) -> list[Path]:
    from scpretrain_dist.catalog.synthetic import write_demo_atlas

    return write_demo_atlas(out_dir, cfg.demo)


def ingest(cfg: RunConfig, inputs: list[str], catalog: str | None = None, root: str | None = None, log=print):
    from scpretrain_dist.catalog.entries import entries_from_paths, load_catalog

    entries = load_catalog(catalog, root) if catalog else entries_from_paths(inputs)
    store = AtlasStore.open_or_create(cfg.store_uri)
    return store.ingest(entries, log=log)


def pretraining_datasets(store: AtlasStore, exclude: tuple[str, ...] | list[str]) -> list[str]:
    names = [r.name for r in store.datasets()]
    missing = sorted(set(exclude) - set(names))
    if missing:
        raise StoreError(f"cannot exclude {missing}: not in the atlas (it holds {', '.join(names)})")
    return [n for n in names if n not in set(exclude)]


def pretrain_key(cfg: RunConfig, datasets: list[str]) -> str:
    """Cache key of an encoder: what was trained on what, with which settings. The store
    version is left out: ingest only appends, so the named datasets' cells never change."""
    blob = json.dumps({"datasets": sorted(datasets), "pretrain": asdict(cfg.pretrain) | {"exclude_datasets": []},
                       "pseudolabel": asdict(cfg.pseudolabel), "model": asdict(cfg.model),
                       "store": cfg.store_uri}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def pretrain(cfg: RunConfig, exclude: tuple[str, ...] = (), log=print, reuse: bool = True):
    """Pretrain on every dataset but ``exclude`` (a cached encoder of the same key is reused)."""
    import mlflow

    from scpretrain_dist.train.launch import init_ray
    from scpretrain_dist.train.pretrain import PretrainResult
    from scpretrain_dist.train.pretrain import pretrain as run_pretrain

    store = AtlasStore(cfg.store_uri)
    datasets = pretraining_datasets(store, exclude)
    if not datasets:
        raise StoreError("every dataset is excluded; pretraining needs at least one")
    version = store.locator.pinned().timestamp_ms
    key = pretrain_key(cfg, datasets)
    cached = Path(cfg.work_dir) / "pretrain" / key / "result.json"
    if reuse and cached.exists():
        result = PretrainResult(**json.loads(cached.read_text()))
        if Path(result.encoder_path).exists():
            log(f"pretrain: reusing cached encoder {result.encoder_path} (key {key})")
            return result, None
    log(f"pretrain: {len(datasets)} datasets ({', '.join(datasets)}), excluded: {', '.join(exclude) or 'none'}")
    init_ray(cfg)
    run_id = mlflow.active_run().info.run_id if mlflow.active_run() else None
    result = run_pretrain(cfg, datasets, tag=key, mlflow_run_id=run_id, log=log)
    if run_id:
        mlflow.log_params({"pretrain_key": key, "pretrain_datasets": ",".join(datasets), "store_version": version})
        mlflow.log_metric("pretrain_iterations_run", result.iterations_run)
    return result, run_id


def finetune_and_evaluate(
    cfg: RunConfig,
    targets: list[str],
    pretrain_result,
    encoder_run_id: str | None,
    report_dir: str | Path,
    register: bool = True,
    log=print,
) -> list[dict]:
    """Fine-tune every method on every target and seed; write the report; register the first
    target's scPretrain model with the configured alias."""
    import mlflow

    from scpretrain_dist.evaluate.protocols import evaluate_target, load_target
    from scpretrain_dist.evaluate.report import format_table, write_report
    from scpretrain_dist.train.pretrain import load_encoder

    store = AtlasStore(cfg.store_uri)
    records = {r.name: r for r in store.datasets()}
    for t in targets:
        if t not in records:
            raise StoreError(f"target {t!r} is not in the atlas; it holds {', '.join(records)}")
        if not records[t].labelled:
            raise StoreError(f"target {t!r} has no cell-type labels; choose a labelled dataset")
        if pretrain_result is not None and t in pretrain_result.datasets:
            raise StoreError(f"target {t!r} was seen in pretraining; exclude it to evaluate honestly")
    encoder, genes, mask = None, None, None
    if pretrain_result is not None:
        encoder = load_encoder(pretrain_result.encoder_path)
        genes = store.genes()
        mask = np.zeros(len(genes), dtype=bool)
        for d in pretrain_result.datasets:
            mask |= store.dataset_gene_mask(d)
    rows, first_model = [], None
    for t in targets:
        data = load_target(store, t)
        t_rows, models = evaluate_target(cfg, data, encoder, genes, mask, log=log)
        rows += t_rows
        if first_model is None and models:
            seed = min(models)
            first_model = (data, models[seed], seed)
    context = {
        "protocol": "leave-datasets-out (one pretraining serves every target outside it)",
        "targets": ", ".join(targets),
        "pretraining datasets": ", ".join(pretrain_result.datasets) if pretrain_result else "none",
        "pretraining iterations": pretrain_result.iterations_run if pretrain_result else 0,
        "store": cfg.store_uri,
    }
    js, md = write_report(rows, report_dir, context)
    table = format_table(rows)
    if mlflow.active_run():
        from scpretrain_dist.evaluate.report import summary

        mlflow.log_artifact(str(js), "report")
        mlflow.log_artifact(str(md), "report")
        for _, r in summary(rows).iterrows():
            if r["dataset"] == "MEAN":
                for m in ("accuracy", "kappa", "macro_f1", "macro_auprc", "macro_auroc"):
                    mlflow.log_metric(f"{r['method']}_{m}", float(r[m]))
        if register and first_model is not None:
            import pandas as pd

            from scpretrain_dist.tracking.mlflow_runs import log_annotator

            data, model, seed = first_model
            example = pd.DataFrame(np.expm1(data.X[:3]).round(0), columns=[str(g) for g in data.genes])
            mine = [r for r in rows if r["dataset"] == data.name and r["method"] == "scpretrain" and r["seed"] == seed][0]
            lineage = {
                "store_uri": str(Path(cfg.store_uri).resolve()),
                "store_version": str(store.locator.pinned().timestamp_ms),
                "pretrain_datasets": pretrain_result.datasets,
                "pseudo_label_version": str(pretrain_result.iterations_run - 1),
                "encoder_run": encoder_run_id or "",
                "encoder_path": pretrain_result.encoder_path,
                "finetune_dataset": data.name,
                "finetune_seed": str(seed),
                "metrics": {k: round(mine[k], 4) for k in ("accuracy", "kappa", "macro_f1", "macro_auprc", "macro_auroc")},
            }
            name, version = log_annotator(model, data.genes, data.classes, example, lineage,
                                          cfg.tracking.registered_model, cfg.tracking.alias)
            log(f"registered models:/{name}/{version} with alias @{cfg.tracking.alias}")
    log("\n" + table)
    log(f"\nreport: {js} and {md}")
    return rows


def choose_targets(cfg: RunConfig, store: AtlasStore) -> list[str]:
    records = store.datasets()
    names = {r.name for r in records}
    wanted = [t for t in cfg.evaluate.targets if t in names]
    if wanted:
        return wanted
    labelled = sorted((r for r in records if r.labelled), key=lambda r: -r.n_cells)
    if not labelled:
        raise StoreError("no dataset in the atlas has cell-type labels to fine-tune on")
    if cfg.evaluate.targets:
        print(f"targets {list(cfg.evaluate.targets)} are not in the atlas; using the largest labelled dataset {labelled[0].name}")
    return [labelled[0].name]


def quickstart(cfg: RunConfig, data: str | None = None, log=print) -> dict:
    """Everything, end to end, under one MLflow parent run; returns stage timings and rows."""
    import mlflow

    from scpretrain_dist.train.launch import shutdown_ray

    timings: dict[str, float] = {}
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        with stage_run("quickstart", cfg) as parent:
            if data is None:
                t0 = time.perf_counter()
                demo_dir = work / "demo_data"
                paths = demo_data(cfg, demo_dir)
                timings["demo-data"] = time.perf_counter() - t0
                log(f"demo-data: {len(paths)} synthetic datasets in {demo_dir}")
                inputs = [str(demo_dir / "catalog.toml")]
            else:
                inputs = [data]
            with stage_run("ingest", cfg, timings):
                report = ingest(cfg, [], catalog=inputs[0]) if inputs[0].endswith(".toml") else ingest(cfg, inputs)
                mlflow.log_metric("datasets_added", len(report.added))
                mlflow.log_metric("atlas_genes", report.n_genes_after)
            store = AtlasStore(cfg.store_uri)
            targets = choose_targets(cfg, store)
            with stage_run("pretrain", cfg, timings):
                result, run_id = pretrain(cfg, exclude=tuple(targets), log=log)
                run_id = run_id or mlflow.active_run().info.run_id
            with stage_run("finetune-evaluate", cfg, timings):
                rows = finetune_and_evaluate(cfg, targets, result, run_id, work / "report", log=log)
            mlflow.log_dict(timings, "stage_seconds.json")
            parent_id = parent.info.run_id
    finally:
        shutdown_ray()
    log("\nstage wall times: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    log(f"MLflow: parent run {parent_id} in {cfg.tracking_uri}")
    log(f"  open the UI with: mlflow ui --backend-store-uri {cfg.tracking_uri}")
    return {"timings": timings, "rows": rows, "parent_run_id": parent_id}
