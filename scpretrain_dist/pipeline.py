"""The stages chained: demo data -> ingest -> pretrain -> fine-tune/evaluate -> register.

Each function is one stage a CLI subcommand calls; ``quickstart`` runs them all under one
MLflow parent run.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from scpretrain_dist.catalog.inputs import UNKNOWN_LABEL
from scpretrain_dist.config import ConfigError, EvaluateConfig, RunConfig
from scpretrain_dist.console import detail, say
from scpretrain_dist.pseudolabel.kmeans import CPU_DEFAULT_ENGINE
from scpretrain_dist.store.atlas import Atlas, StoreError, atlas_for
from scpretrain_dist.tracking.mlflow_runs import (
    active_run_id,
    log_artifacts,
    log_dict,
    log_metrics,
    log_params,
    stage_run,
)


def demo_data(cfg: RunConfig, out_dir: str | Path) -> list[Path]:
    from scpretrain_dist.demo import write_demo_atlas

    return write_demo_atlas(out_dir, cfg.demo)


def ingest(cfg: RunConfig, inputs: list[str], catalog: str | None = None, root: str | None = None, log=say):
    from scpretrain_dist.catalog.entries import entries_from_paths, load_catalog

    entries = load_catalog(catalog, root) if catalog else entries_from_paths(inputs)
    return atlas_for(cfg).ingest(entries, log=log)


def pretraining_datasets(store: Atlas, exclude: tuple[str, ...] | list[str], min_cells: int = 1) -> list[str]:
    """The atlas datasets pretraining uses: all but ``exclude``; each must hold at least
    ``min_cells`` cells (K-means needs as many cells as its smallest k)."""
    records = store.datasets()
    names = [r.name for r in records]
    missing = sorted(set(exclude) - set(names))
    if missing:
        raise StoreError(f"cannot exclude {missing}: not in the atlas (it holds {', '.join(names)})")
    used = [r for r in records if r.name not in set(exclude)]
    if not used:
        raise StoreError(f"every dataset of the atlas is excluded ({', '.join(names)}); pretraining needs at least one")
    small = [f"{r.name} ({r.n_cells} cells)" for r in used if r.n_cells < min_cells]
    if small:
        raise StoreError(f"dataset(s) {', '.join(small)} hold fewer cells than the smallest K-means partition "
                         f"(pseudolabel.min_k = {min_cells}); leave them out of pretraining with --exclude "
                         "(or --set pretrain.exclude_datasets=[...])")
    return [r.name for r in used]


# settings of how a run copes, not of what it computes: left out of the encoder's cache key
RUN_ONLY_SETTINGS = {"pretrain": ("max_failures", "cpus_per_worker", "placement", "resources_per_worker"),
                     "pseudolabel": ("actor_restarts",)}
# settings added after encoders were cached: left out of the key at these values (what every
# earlier encoder was trained with), so those caches stay valid; any other value is in the key
KEY_NEUTRAL_DEFAULTS = {"pretrain": {"gradient_sync_dtype": "float32", "encoder_sharding": "genes"}}
# the first phase's PCA settings change nothing unless it clusters in the "pca" space; otherwise
# the key holds them at these fixed values (the defaults every earlier encoder was keyed with), so
# changing them, or their defaults, keeps those caches
UNUSED_PCA_SETTINGS = {"pca_dims": 50, "pca_genes": 4000, "pca_fit_cells": 10_000}


def pretrain_key(cfg: RunConfig, datasets: list[str]) -> str:
    """Cache key of an encoder: what was trained on what, with which settings. The store
    version is left out: ingest only appends, so the named datasets' cells never change."""
    def settings(section: str) -> dict:
        neutral = KEY_NEUTRAL_DEFAULTS.get(section, {})
        return {k: v for k, v in asdict(getattr(cfg, section)).items()
                if k not in RUN_ONLY_SETTINGS[section] and not (k in neutral and v == neutral[k])}

    pseudolabel = settings("pseudolabel")
    engine = pseudolabel.pop("engine")
    if engine == "auto":
        engine = "gpu-auto" if cfg.pseudolabel.use_gpu else CPU_DEFAULT_ENGINE
    if engine not in ("blas", "gpu-auto"):  # what every encoder before the setting was clustered with
        pseudolabel["engine"] = engine
    if cfg.pseudolabel.phase1_space != "pca":
        pseudolabel |= UNUSED_PCA_SETTINGS
    what = {"datasets": sorted(datasets), "pretrain": settings("pretrain") | {"exclude_datasets": []},
            "pseudolabel": pseudolabel, "model": asdict(cfg.model), "store": cfg.store_uri}
    if cfg.store.backend == "experiment":  # the mapping and filter choose the cells
        what["store_mapping"] = {k: v for k, v in asdict(cfg.store).items() if k not in ("uri", "backend")}
    if cfg.pretrain.loader == "stream":  # chunks, buffers and the cache set the order cells come in
        what["stream"] = asdict(cfg.stream) | {"prefetch_buffers": 0}  # read-ahead changes nothing
    blob = json.dumps(what, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def pretrain(cfg: RunConfig, exclude: tuple[str, ...] = (), log=say, reuse: bool = True):
    """Pretrain on every dataset but ``exclude`` (a cached encoder of the same key is reused, and
    an interrupted run of the same key resumes after its last finished step; ``reuse=False``:
    neither)."""
    from scpretrain_dist.runtime import init_ray
    from scpretrain_dist.train.pretrain import load_result
    from scpretrain_dist.train.pretrain import pretrain as run_pretrain

    store = atlas_for(cfg)
    datasets = pretraining_datasets(store, exclude, cfg.pseudolabel.min_k)
    version = store.locator.pinned().timestamp_ms
    key = pretrain_key(cfg, datasets)
    cached = Path(cfg.work_dir) / "pretrain" / key / "result.json"
    if reuse and cached.exists():
        try:
            result = load_result(cached)
        except ConfigError as e:
            log(f"pretrain: not reusing {cached} ({e}); training again")
        else:
            log(f"pretrain: reusing cached encoder {result.encoder_path} (key {key})")
            return result, None
    log(f"pretrain: {len(datasets)} datasets ({', '.join(datasets)}), excluded: {', '.join(exclude) or 'none'}")
    init_ray(cfg)
    run_id = active_run_id()
    result = run_pretrain(cfg, datasets, tag=key, mlflow_run_id=run_id, log=detail, resume=reuse)
    log(f"pretrain: {result.iterations_run} iterations in {result.seconds:.0f}s, final pseudo-label loss "
        f"{result.history[-1]['loss']:.3f}, encoder {result.encoder_path}")
    log_params({"pretrain_key": key, "pretrain_datasets": ",".join(datasets), "store_version": version})
    log_metrics({"pretrain_iterations_run": result.iterations_run})
    return result, run_id


def load_encoder_for(store: Atlas, pretrain_result):
    """The pretrained encoder with the atlas gene space and the genes its datasets measured."""
    from scpretrain_dist.evaluate.protocols import Encoder
    from scpretrain_dist.train.pretrain import load_encoder

    if pretrain_result is None:
        return None
    genes = store.genes()
    mask = np.zeros(len(genes), dtype=bool)
    for d in pretrain_result.datasets:
        mask |= store.dataset_gene_mask(d)
    return Encoder(load_encoder(pretrain_result.encoder_path), genes, mask)


# a fine-tuning target's least labelled cells: the 60/10/30 split leaves each part at least one
MIN_TARGET_CELLS = 10


def check_targets(store: Atlas, targets: list[str], pretrain_result=None) -> None:
    """Every target is a labelled atlas dataset pretraining never saw, with enough labelled cells
    (and types) to be split, fine-tuned on and tested. Reads obs only: cheap, before any work."""
    records = {r.name: r for r in store.datasets()}
    if not targets:
        raise StoreError("no target datasets given; name labelled datasets of the atlas (--target / --targets)")
    for t in targets:
        if t not in records:
            raise StoreError(f"target {t!r} is not in the atlas; it holds {', '.join(records)}")
        if not records[t].labelled:
            raise StoreError(f"target {t!r} has no cell-type labels; choose a labelled dataset")
        if pretrain_result is not None and t in pretrain_result.datasets:
            raise StoreError(f"target {t!r} was seen in pretraining; exclude it to evaluate honestly")
        labels = store.read_obs(t)["cell_type"].to_numpy()
        _check_labelled(f"target {t!r}", labels[labels != UNKNOWN_LABEL])


def _check_labelled(what: str, labels: np.ndarray) -> None:
    types = np.unique(labels)
    if len(labels) < MIN_TARGET_CELLS:
        raise StoreError(f"{what} has {len(labels)} labelled cells; fine-tuning and testing need at least "
                         f"{MIN_TARGET_CELLS} (split 60/10/30); choose a larger dataset")
    if len(types) < 2:
        raise StoreError(f"{what} has a single cell type ({', '.join(map(str, types))}); a classifier needs "
                         "at least 2")


def transfer_pairs(references: list[str], queries: list[str], pairwise: bool = False) -> list[tuple[list[str], str]]:
    """(references, query) of each transfer: every query from all the references together, or
    with ``pairwise`` from each reference alone (every ordered pair of different datasets)."""
    if pairwise:
        return [([r], q) for q in queries for r in references if r != q]
    return [(list(references), q) for q in queries]


def check_transfer(cfg: RunConfig, store: Atlas, references: list[str], queries: list[str],
                   mapping_path: str | None, hold_out: list[str] | None = None, pairwise: bool = False) -> dict | None:
    """Everything the transfer protocol needs, checked before any pretraining: references and
    queries in the atlas and distinct (``pairwise``: each pair), the label mapping readable and
    covering every label of theirs, enough labelled reference cells of 2+ types, query cells of
    types the references know, and enough shared genes; each ``hold_out`` type (``all``: every
    reference type) a reference type whose removal leaves 2+ types. Returns the mapping."""
    from scpretrain_dist.evaluate.protocols import (
        MIN_SHARED_GENES,
        harmonise,
        load_mapping,
        shared_genes,
    )

    if not references or not queries:
        raise StoreError("the transfer protocol needs --references and --queries (datasets in the atlas)")
    overlap = sorted(set(references) & set(queries))
    if overlap and not pairwise:
        raise StoreError(f"{overlap} are both reference and query; a query must be a different dataset "
                         "(--pairwise: each reference alone, every ordered pair of different datasets)")
    pairs = transfer_pairs(references, queries, pairwise)
    if not pairs:
        raise StoreError("--pairwise with one dataset makes no pair; give at least two")
    records = {r.name: r for r in store.datasets()}
    for d in [*references, *queries]:
        if d not in records:
            raise StoreError(f"{d!r} is not in the atlas; it holds {', '.join(records)}")
        if not records[d].labelled:
            raise StoreError(f"{d!r} has no cell-type labels; the transfer protocol scores labelled queries "
                             "(`scpretrain annotate` labels unlabelled ones)")
    mapping = load_mapping(mapping_path)
    labels = {d: harmonise(d, store.read_obs(d)["cell_type"].to_numpy().astype(object), mapping)
              for d in [*references, *queries]}
    for refs in dict.fromkeys(tuple(r) for r, _ in pairs):
        ref = np.concatenate([labels[r] for r in refs])
        known = ref[ref != UNKNOWN_LABEL]
        _check_labelled(f"references {', '.join(refs)}", known)
        for q in (q for r, q in pairs if tuple(r) == refs):
            if not np.isin(labels[q], known).any():
                raise StoreError(f"query {q!r} has no cell of a type the references {', '.join(refs)} know "
                                 f"({', '.join(np.unique(known))}); check the label mapping")
            n = len(shared_genes(store, [*refs, q]))
            if n < MIN_SHARED_GENES:
                raise StoreError(f"references {list(refs)} and query {q!r} share only {n} genes; transfer needs at "
                                 f"least {MIN_SHARED_GENES}")
        types = np.unique(known.astype(str))
        for t in hold_out_types(hold_out, types):
            if t not in types:
                raise StoreError(f"--hold-out-types {t!r} is not a type of the references {', '.join(refs)} "
                                 f"({', '.join(types)}); name one of them (after the label mapping) or 'all'")
            _check_labelled(f"references {', '.join(refs)} without {t}", known[known != t])
    return mapping


def hold_out_types(requested: list[str] | None, reference_types) -> list[str]:
    """The types ``--hold-out-types`` names; ``all``: every reference type."""
    if not requested:
        return []
    return [str(t) for t in reference_types] if list(requested) == ["all"] else list(dict.fromkeys(requested))


class Evaluation:
    """Rows, splits, clustering scores, UMAP views and fine-tuned models gathered over folds."""

    def __init__(self):
        self.rows, self.splits, self.clustering = [], [], []
        self.views, self.first_model, self.folds, self.confusion = {}, None, [], {}
        self.query = None  # the dataset the registered model was fine-tuned semi-supervised on

    def add_targets(self, cfg: RunConfig, store: Atlas, targets: list[str], pretrain_result, encoder_run_id, log=say,
                    query: str | None = None):
        from scpretrain_dist.evaluate.protocols import (
            cluster_target,
            evaluate_target,
            load_query,
            load_target,
            shared_genes,
        )

        check_targets(store, targets, pretrain_result)
        encoder = load_encoder_for(store, pretrain_result)
        self.query = query
        self.folds.append({"targets": list(targets), "encoder_run": encoder_run_id,
                           "pretraining datasets": list(pretrain_result.datasets) if pretrain_result else [],
                           "encoder": pretrain_result.encoder_path if pretrain_result else None})
        for t in targets:
            # with a query, the genes it shares with the target, normalised over that panel in
            # both (as the transfer protocol does): the registered model reads what the query measures
            data = load_target(store, t, shared_genes(store, [t, query]) if query else None)
            cells = load_query(store, query, data.genes) if query else None
            rows, splits, models, confusion = evaluate_target(cfg, data, encoder, log=detail, query=cells)
            for r in rows:
                if r["method"] == "scpretrain_ssl":
                    r["query"] = query
            self.confusion[t] = confusion
            self.rows += rows
            self.splits += splits
            if cfg.evaluate.cluster:
                crows, view = cluster_target(data, encoder, seed=min(cfg.finetune.seeds))
                self.clustering += crows
                self.views[t] = view
                detail("  " + t + " K-means ARI: " + ", ".join(f"{r['space']} {r['ari']:.3f}" for r in crows))
            if self.first_model is None and models:
                seed = min(models)
                self.first_model = (data, models[seed], seed, pretrain_result, encoder_run_id, t)

    def finish(self, cfg: RunConfig, store: Atlas, report_dir, context: dict, register: bool, log=say) -> list[dict]:
        from scpretrain_dist.evaluate.figures import write_figures
        from scpretrain_dist.evaluate.report import format_table, summary, write_report

        out = Path(report_dir)
        out.mkdir(parents=True, exist_ok=True)
        figures = write_figures(self.rows, self.views, out, self.confusion) if cfg.evaluate.figures else []
        js, md = write_report(self.rows, out, context, self.splits, self.clustering, figures, self.confusion)
        if active_run_id():
            log_artifacts((js, md, *figures), "report")
            log_metrics({f"{r['method']}_{m}": float(r[m]) for _, r in summary(self.rows).iterrows()
                         if r["dataset"] == "MEAN"
                         for m in ("accuracy", "kappa", "macro_f1", "macro_auprc", "macro_auroc")})
            if register and self.first_model is not None and self.first_model[3] is not None:
                self._register(cfg, store, log)
        log("\n" + format_table(self.rows))
        log(f"\nreport: {md} (every row and split: {js.name})")
        if figures:
            log("figures: " + ", ".join(Path(f).name for f in figures))
        return self.rows

    def _register(self, cfg: RunConfig, store: Atlas, log=say) -> None:
        import pandas as pd

        from scpretrain_dist.serve.pyfunc import register_annotator

        data, model, seed, pretrain_result, encoder_run_id, row_dataset = self.first_model
        full = max(r["budget"] for r in self.rows if r["dataset"] == row_dataset)
        method = "scpretrain_ssl" if self.query else "scpretrain"
        mine = [r for r in self.rows if r["dataset"] == row_dataset and r["method"] == method
                and r["seed"] == seed and r["budget"] == full][0]
        example = pd.DataFrame(np.expm1(data.X[:3].toarray()).round(0), columns=[str(g) for g in data.genes])
        lineage = {
            "store_uri": str(Path(cfg.store_uri).resolve()),
            "store_version": str(store.locator.pinned().timestamp_ms),
            "pretrain_datasets": pretrain_result.datasets,
            "pseudo_label_version": str(pretrain_result.iterations_run - 1),
            "encoder_run": encoder_run_id or "",
            "encoder_path": pretrain_result.encoder_path,
            "finetune_dataset": mine.get("references") or data.name,
            "finetune_seed": str(seed),
            "metrics": {k: round(mine[k], 4) for k in ("accuracy", "kappa", "macro_f1", "macro_auprc", "macro_auroc")},
        }
        if self.query:  # semi-supervised on its intended query, unless the guard fell back
            lineage |= {"semi_supervised_query": self.query, "ssl_fallback": str(bool(mine.get("ssl_fallback"))).lower()}
        name, version = register_annotator(model, data.genes, data.classes, example, lineage,
                                      cfg.tracking.registered_model, cfg.tracking.alias)
        log(f"registered models:/{name}/{version} with alias @{cfg.tracking.alias}")


def finetune_and_evaluate(
    cfg: RunConfig,
    targets: list[str],
    pretrain_result,
    encoder_run_id: str | None,
    report_dir: str | Path,
    register: bool = True,
    log=say,
    query: str | None = None,
) -> list[dict]:
    """Fine-tune every method on every target, seed and label budget with one pretrained
    encoder (or none); write the report and figures; register the first target's scPretrain
    model with the configured alias. ``query``: an atlas dataset the model is meant to annotate
    (:func:`check_query`): ``scpretrain_ssl`` also runs, semi-supervised on its cells, and the
    registered model is that one (or the supervised one where its guard fell back)."""
    cfg = installed_methods(cfg, log)
    store = atlas_for(cfg)
    ev = Evaluation()
    ev.add_targets(cfg, store, targets, pretrain_result, encoder_run_id, log=log, query=query)
    context = _context(cfg, ev, "fine-tune on each target's own cells")
    if query:
        context["semi-supervised query"] = f"{query} (scpretrain_ssl, guarded; the registered model)"
    return ev.finish(cfg, store, report_dir, context, register, log)


def check_query(cfg: RunConfig, store: Atlas, query: str, targets: list[str], pretrain_result) -> None:
    """The dataset ``finetune --query`` adapts to: in the atlas, not a target, with cells, sharing
    enough genes with every target, and a pretrained encoder and the ``scpretrain_ssl`` method to
    use it. Reads obs and gene masks only: before any work."""
    from scpretrain_dist.evaluate.protocols import MIN_SHARED_GENES, shared_genes

    records = {r.name: r for r in store.datasets()}
    if query not in records:
        raise StoreError(f"--query {query!r} is not in the atlas; ingest it first (`scpretrain ingest FILE.h5ad "
                         f"--work-dir {cfg.work_dir}`, labels not needed); the atlas holds {', '.join(records)}")
    if query in targets:
        raise StoreError(f"--query {query!r} is also a --target; the query is the unlabelled data the model is "
                         "meant for, a different dataset")
    if records[query].n_cells == 0:
        raise StoreError(f"--query {query!r} has no cells")
    for t in targets:
        n = len(shared_genes(store, [t, query]))
        if n < MIN_SHARED_GENES:
            raise StoreError(f"--query {query!r} shares {n} genes with target {t!r}; semi-supervised fine-tuning "
                             f"needs at least {MIN_SHARED_GENES} (is it the same species, with gene symbols?)")
    if pretrain_result is None:
        raise ConfigError("--query fine-tunes the pretrained network semi-supervised (scpretrain_ssl); give "
                          "--pretrain-result too")
    if "scpretrain_ssl" not in cfg.evaluate.methods:
        raise ConfigError("--query needs the scpretrain_ssl method, which evaluate.methods leaves out; add it")


def _context(cfg: RunConfig, ev: Evaluation, protocol: str) -> dict:
    return {
        "protocol": protocol,
        "folds": "; ".join(f"targets {', '.join(f['targets'])} <- encoder pretrained on "
                           f"{len(f['pretraining datasets'])} datasets ({', '.join(f['pretraining datasets']) or 'none'})"
                           for f in ev.folds),
        "fold scheme": cfg.evaluate.folds,
        "seeds": ", ".join(map(str, cfg.finetune.seeds)),
        "label budgets": ", ".join(map(str, cfg.evaluate.budgets)) + " (validation: 10% of each target, fixed per seed)",
        "fine-tuning": f"lr {cfg.finetune.lr}, encoder lr {cfg.finetune.encoder_lr or cfg.finetune.lr}, "
                       f"batch {cfg.finetune.batch_size}, early stopping on validation accuracy, ties by validation loss (patience {cfg.finetune.patience})"
                       + (f", input dropout {cfg.finetune.input_dropout}" if cfg.finetune.input_dropout else "")
                       + (f", mean weights of the {cfg.finetune.snapshots} best epochs" if cfg.finetune.snapshots > 1 else ""),
        "pretraining": f"{cfg.pretrain.iterations} iterations max x {cfg.pretrain.epochs} epochs, lr {cfg.pretrain.lr}, "
                       f"stop at NMI >= {cfg.pretrain.nmi_stop}",
        "methods": ", ".join(cfg.evaluate.methods),
        "store": cfg.store_uri,
    }


def resolve_targets(cfg: RunConfig, store: Atlas, targets: list[str] | None = None, log=say) -> list[str]:
    """Explicit targets, else the configured ones, else the labelled datasets of the configured
    group; unlabelled datasets are skipped (they still take part in pretraining)."""
    records = {r.name: r for r in store.datasets()}
    wanted = list(targets or cfg.evaluate.targets)
    if not wanted and cfg.evaluate.group:
        wanted = [n for n, r in records.items() if r.group == cfg.evaluate.group]
        if not wanted:
            groups = sorted({r.group for r in records.values() if r.group})
            raise StoreError(f"no dataset of group {cfg.evaluate.group!r} in the atlas (groups: {', '.join(groups) or 'none'}; "
                             f"ingest with a catalog that sets group, e.g. --catalog data_catalog/scrna_shared.toml)")
    if not wanted:
        return choose_targets(cfg, store)
    unknown = [t for t in wanted if t not in records]
    if unknown:
        raise StoreError(f"targets {unknown} are not in the atlas; it holds {', '.join(records)}")
    skipped = [t for t in wanted if not records[t].labelled]
    if skipped:
        log(f"skipping unlabelled datasets as targets (they stay in pretraining): {', '.join(skipped)}")
    out = [t for t in wanted if records[t].labelled]
    if not out:
        raise StoreError("none of the chosen targets has cell-type labels")
    return out


def fold_exclusions(targets: list[str], scheme: str, sizes: dict[str, int] | None = None) -> list[list[str]]:
    """Targets per fold. "grouped": one fold of all; "per_target": one each; "N" (a number):
    N folds, targets dealt largest first so fold sizes balance. Each fold's pretraining leaves
    out that fold's targets only, so the other targets' cells help pretrain it."""
    if scheme == "grouped":
        return [list(targets)]
    if scheme == "per_target":
        return [[t] for t in targets]
    if scheme.isdigit() and int(scheme) >= 1:
        n = min(int(scheme), len(targets))
        order = sorted(targets, key=lambda t: -(sizes or {}).get(t, 0))
        folds: list[list[str]] = [[] for _ in range(n)]
        for i, t in enumerate(order):
            folds[i % n if (i // n) % 2 == 0 else n - 1 - i % n].append(t)
        return [f for f in folds if f]
    raise StoreError(f"evaluate.folds {scheme!r} must be 'grouped', 'per_target' or a number of folds")


def installed_methods(cfg: RunConfig, log=say) -> RunConfig:
    """``cfg`` with the peer tools this environment lacks dropped from the default method list
    (said in the log); a peer asked for by name but not installed is an error, raised before any
    pretraining starts."""
    from scpretrain_dist.evaluate.methods import check_methods, missing_peers

    methods = cfg.evaluate.methods
    check_methods(methods)
    check_methods(cfg.evaluate.sweep_methods, "evaluate.sweep_methods")
    missing = missing_peers(methods)
    if not missing:
        return cfg
    if methods != EvaluateConfig().methods:
        raise ConfigError(f"evaluate.methods asks for {missing}, which this environment does not have installed; "
                          f"install the bench extra (pip install 'scpretrain-dist[bench]', or make bench-venv and run "
                          f".venv-bench/bin/scpretrain), or leave {missing} out of --methods")
    log(f"{', '.join(missing)} not installed here: those rows are skipped (make bench-venv, then run "
        f".venv-bench/bin/scpretrain, to compare with them)")
    return replace(cfg, evaluate=replace(cfg.evaluate, methods=tuple(m for m in methods if m not in missing)))


def check_lodo(cfg: RunConfig, store: Atlas, targets: list[str]) -> list[list[str]]:
    """The folds of a leave-datasets-out evaluation, each checked before any pretraining: its
    targets usable, and what pretraining keeps without them usable."""
    check_targets(store, targets)
    sizes = {r.name: r.n_cells for r in store.datasets()}
    folds = fold_exclusions(targets, cfg.evaluate.folds, sizes)
    for fold in folds:
        pretraining_datasets(store, tuple(dict.fromkeys([*fold, *cfg.pretrain.exclude_datasets])), cfg.pseudolabel.min_k)
    return folds


def evaluate_lodo(cfg: RunConfig, targets: list[str], report_dir, log=say) -> list[dict]:
    """Leave-datasets-out: per fold, pretrain on every dataset outside it (cached encoders are
    reused), fine-tune and test on each of its targets; one report over every fold."""
    cfg = installed_methods(cfg, log)
    store = atlas_for(cfg)
    folds = check_lodo(cfg, store, targets)
    ev = Evaluation()
    for fold in folds:
        with stage_run("pretrain", cfg):
            result, run_id = pretrain(cfg, exclude=tuple(dict.fromkeys([*fold, *cfg.pretrain.exclude_datasets])), log=log)
            run_id = run_id or active_run_id()
        with stage_run("finetune-evaluate", cfg):
            ev.add_targets(cfg, store, fold, result, run_id, log=log)
    proto = {"per_target": "leave-one-dataset-out, one pretraining per target",
             "grouped": "leave-datasets-out, grouped folds: one pretraining without every target serves them all"}.get(
        cfg.evaluate.folds, f"leave-datasets-out, {cfg.evaluate.folds} folds: each fold's pretraining leaves out its own targets only")
    return ev.finish(cfg, store, report_dir, _context(cfg, ev, proto), register=True, log=log)


def evaluate_transfer(cfg: RunConfig, references: list[str], queries: list[str], mapping_path: str | None,
                      report_dir, log=say, hold_out: list[str] | None = None, pairwise: bool = False) -> list[dict]:
    """Reference -> query: pretrain without the queries (cached encoders reused), fine-tune on
    the labelled references with harmonised labels, predict each query; one report.
    ``pairwise``: each reference alone to each other query (rows named "<reference> -> <query>";
    the report adds the transfer matrix). ``hold_out``: cell types (or ``all``) removed from the
    references one at a time, each query predicted once per type (unknown-cell rejection); no
    model is registered then."""
    from scpretrain_dist.evaluate.protocols import evaluate_transfer as transfer
    from scpretrain_dist.evaluate.protocols import harmonise

    cfg = installed_methods(cfg, log)
    store = atlas_for(cfg)
    mapping = check_transfer(cfg, store, references, queries, mapping_path, hold_out, pairwise)
    pairs = transfer_pairs(references, queries, pairwise)
    # the types each group of references holds out in turn ([None]: none), each reference read once
    held_out: dict[tuple[str, ...], list] = {}
    if hold_out:
        known = {}
        for r in dict.fromkeys(r for refs, _ in pairs for r in refs):
            labels = harmonise(r, store.read_obs(r)["cell_type"].to_numpy().astype(object), mapping)
            known[r] = labels[labels != UNKNOWN_LABEL].astype(str)
    for refs, _ in pairs:
        held_out[tuple(refs)] = (hold_out_types(hold_out, np.unique(np.concatenate([known[r] for r in refs])))
                                 if hold_out else [None])
    exclude = tuple(queries) if cfg.evaluate.folds == "grouped" else None
    ev = Evaluation()
    for q in queries:
        with stage_run("pretrain", cfg):
            result, run_id = pretrain(cfg, exclude=tuple(dict.fromkeys([*(exclude or (q,)), *cfg.pretrain.exclude_datasets])), log=log)
            run_id = run_id or active_run_id()
        with stage_run("finetune-evaluate", cfg):
            encoder = load_encoder_for(store, result)
            for refs in (r for r, query in pairs if query == q):
                for t in held_out[tuple(refs)]:
                    rows, splits, out = transfer(cfg, store, refs, q, mapping, encoder, log=detail, hold_out=t,
                                                 pair_names=pairwise)
                    ev.rows += rows
                    ev.splits += splits
                    ev.confusion[out["dataset"]] = out["confusion"]
            ev.folds.append({"targets": [q], "encoder_run": run_id, "pretraining datasets": list(result.datasets),
                             "encoder": result.encoder_path})
            if ev.first_model is None and out["models"] and not hold_out and not pairwise:
                from scpretrain_dist.evaluate.protocols import TargetData

                seed = min(out["models"])
                ref = TargetData("+".join(references), _example_rows(store, references[0], out["genes"]),
                                 out["genes"], np.zeros(0, int), out["classes"], np.zeros(0))
                ev.first_model = (ref, out["models"][seed], seed, result, run_id, q)
    context = _context(cfg, ev, "reference -> query transfer")
    context |= {"references": ", ".join(references), "queries": ", ".join(queries),
                "label mapping": mapping_path or "none (labels must match verbatim)"}
    if pairwise:
        context["pairs"] = f"{len(pairs)} ordered (reference, query) pairs, each reference alone"
    if hold_out:
        context["held-out types"] = ", ".join(dict.fromkeys(t for ts in held_out.values() for t in ts))
    return ev.finish(cfg, store, report_dir, context, register=not hold_out and not pairwise, log=log)


def _example_rows(store: Atlas, name: str, genes: np.ndarray):
    from scpretrain_dist.evaluate.protocols import load_target

    t = load_target(store, name, genes)
    return t.X[:3]


def choose_targets(cfg: RunConfig, store: Atlas) -> list[str]:
    records = store.datasets()
    names = {r.name for r in records}
    wanted = [t for t in cfg.evaluate.targets if t in names]
    if wanted:
        return wanted
    labelled = sorted((r for r in records if r.labelled), key=lambda r: -r.n_cells)
    if not labelled:
        raise StoreError("no dataset in the atlas has cell-type labels to fine-tune on")
    if cfg.evaluate.targets:
        say(f"targets {list(cfg.evaluate.targets)} are not in the atlas; using the largest labelled dataset {labelled[0].name}")
    return [labelled[0].name]


def quickstart(cfg: RunConfig, data: str | None = None, log=say) -> dict:
    """Everything, end to end, under one MLflow parent run; returns stage timings and rows."""
    from scpretrain_dist.runtime import ray_scope

    timings: dict[str, float] = {}
    cfg = installed_methods(cfg, log)  # the method list checked before any work
    if data is not None and not Path(data).exists():
        raise ConfigError(f"--data {data} does not exist; give a folder of .h5ad files or a catalog .toml")
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    with ray_scope():
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
                log_metrics({"datasets_added": len(report.added), "atlas_genes": report.n_genes_after})
            store = atlas_for(cfg)
            targets = choose_targets(cfg, store)
            with stage_run("pretrain", cfg, timings):
                result, run_id = pretrain(cfg, exclude=tuple(targets), log=log)
                run_id = run_id or active_run_id()
            with stage_run("finetune-evaluate", cfg, timings):
                rows = finetune_and_evaluate(cfg, targets, result, run_id, work / "report", log=log)
            log_dict(timings, "stage_seconds.json")
            parent_id = parent.info.run_id
    log("\nstage wall times: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    log(f"MLflow: parent run {parent_id} in {cfg.tracking_uri}")
    log(f"  open the UI with: mlflow ui --backend-store-uri {cfg.tracking_uri}")
    return {"timings": timings, "rows": rows, "parent_run_id": parent_id}
