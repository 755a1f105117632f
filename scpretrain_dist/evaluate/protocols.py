"""Evaluation protocols, every method on identical cells.

- ``evaluate_target`` (the paper's track): a labelled dataset never seen in pretraining is split
  60/10/30 per seed (training capped at min(1000, 0.6 n)); at each label budget a stratified
  subset of the training split is fine-tuned on, the validation split drives early stopping,
  and the test split is scored.
- ``cluster_target``: K-means with k = number of true types on the frozen pretrained embedding
  vs on UMAP of PCA (the paper's Fig. 3), scored by Rand index and ARI.
- ``evaluate_transfer`` (the annotation track): fine-tune on labelled reference datasets and
  predict another dataset, labels harmonised through a user-given mapping.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from scpretrain_dist.config import RunConfig
from scpretrain_dist.console import detail, progress
from scpretrain_dist.data.normalize import normalize_rows, to_linear
from scpretrain_dist.evaluate.methods import (
    NETWORKS,
    SHIFT_METHODS,
    Cells,
    Fitted,
    check_methods,
    embed,
    run_method,
    runnable_methods,
    unknown_scores,
)
from scpretrain_dist.evaluate.metrics import (
    class_auprc,
    classification_metrics,
    clustering_metrics,
    unknown_cell_metrics,
)
from scpretrain_dist.evaluate.splits import Split, budget_subset, split_cells
from scpretrain_dist.store.atlas import UNKNOWN_LABEL, Atlas, StoreError
from scpretrain_dist.train.finetune import adapt_to_label_shift, gene_index, training_prior

MIN_SHARED_GENES = 50  # genes a reference and its query must share for a transfer


@dataclass
class TargetData:
    name: str
    X: sp.csr_matrix  # labelled cells x ``genes``, log1p(CP10k)
    genes: np.ndarray
    labels: np.ndarray  # int codes
    classes: np.ndarray  # code -> label name
    obs_ids: np.ndarray


@dataclass
class Encoder:
    """A pretrained encoder and the atlas gene space it was trained on."""

    weights: dict  # {"weight": genes x dim, "bias": dim}
    genes: np.ndarray  # atlas gene symbols
    mask: np.ndarray  # genes measured by the pretraining datasets

    def index(self, genes: np.ndarray) -> np.ndarray:
        return gene_index(genes, self.genes, self.mask)


# ---------------------------------------------------------------- label mapping
def load_mapping(path: str | Path | None) -> dict[str, dict[str, str | None]] | None:
    """A JSON file {dataset: {label: shared label, or null to drop the cells}}."""
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        raise StoreError(f"label mapping {p} does not exist; give a JSON file {{dataset: {{label: shared label or null}}}}")
    try:
        mapping = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"label mapping {p} is not valid JSON ({e}); expected {{dataset: {{label: shared label or null}}}}") from e
    if not isinstance(mapping, dict) or not all(isinstance(v, dict) for v in mapping.values()):
        raise StoreError(f"label mapping {p} must be an object of objects: {{dataset: {{label: shared label or null}}}}")
    for ds, m in mapping.items():
        bad = [k for k, v in m.items() if v is not None and not isinstance(v, str)]
        if bad:
            raise StoreError(f"label mapping {p}: dataset {ds!r} maps {bad} to non-strings; use a label or null")
    return mapping


def harmonise(name: str, labels: np.ndarray, mapping: dict | None) -> np.ndarray:
    """Mapped labels (UNKNOWN_LABEL where the mapping drops a cell)."""
    if mapping is None:
        return labels
    if name not in mapping:
        raise StoreError(f"the label mapping has no entry for dataset {name!r}; add one "
                         f"(it has {', '.join(mapping) or 'none'})")
    m = mapping[name]
    present = sorted(set(labels) - {UNKNOWN_LABEL})
    missing = [lab for lab in present if lab not in m]
    if missing:
        raise StoreError(f"the label mapping for {name!r} does not cover labels {missing}; map each to a "
                         f"shared label or to null to drop those cells")
    return np.array([UNKNOWN_LABEL if lab == UNKNOWN_LABEL or m[lab] is None else m[lab] for lab in labels],
                    dtype=object)


# ---------------------------------------------------------------- loading
def load_target(
    store: Atlas,
    name: str,
    genes: np.ndarray | None = None,
    mapping: dict | None = None,
    classes: np.ndarray | None = None,
) -> TargetData:
    """Labelled cells of one dataset, log1p(CP10k)-normalised over ``genes`` (default: the
    dataset's own genes), labels mapped through ``mapping`` and coded against ``classes``
    (default: its own label set). A restricted gene space is normalised again over it, so a
    reference and a query measured on different panels are normalised alike."""
    rec = store.dataset(name)
    if not rec.labelled:
        raise StoreError(f"dataset {name!r} has no cell-type labels; it cannot be a fine-tuning target")
    raw, obs = store.read_dataset(name)
    if genes is None:
        cols = np.flatnonzero(store.dataset_gene_mask(name))
        genes = store.genes()[cols]
    else:
        cols = _columns(store, genes)
    labels = harmonise(name, obs["cell_type"].to_numpy().astype(object), mapping)
    keep = labels != UNKNOWN_LABEL
    if classes is not None:
        keep &= np.isin(labels, classes)
    if keep.sum() == 0:
        raise StoreError(f"dataset {name!r} has no labelled cells left (after the label mapping)")
    Xg = _in_genes(raw[np.flatnonzero(keep)], cols, rec.value_type)
    if classes is None:
        classes, codes = np.unique(labels[keep].astype(str), return_inverse=True)
    else:
        codes = np.searchsorted(classes, labels[keep].astype(str))
    return TargetData(name, Xg, np.asarray(genes), codes, np.asarray(classes),
                      obs["obs_id"].to_numpy()[keep])


def load_query(store: Atlas, name: str, genes: np.ndarray) -> sp.csr_matrix:
    """Every cell of dataset ``name`` (labelled or not: the labels are not read) over ``genes``,
    log1p(CP10k) as :func:`load_target` makes them: the unlabelled cells semi-supervised
    fine-tuning adapts to."""
    raw, _ = store.read_dataset(name)
    return _in_genes(raw, _columns(store, genes), store.dataset(name).value_type)


def _columns(store: Atlas, genes: np.ndarray) -> np.ndarray:
    """The atlas column of each gene symbol (-1: not in the atlas)."""
    where = {g: i for i, g in enumerate(store.genes())}
    return np.array([where.get(str(g).upper(), -1) for g in genes], dtype=np.int64)


def _in_genes(raw, cols: np.ndarray, value_type: str) -> sp.csr_matrix:
    """Stored rows (values of ``value_type``) as log1p(CP10k) over the atlas columns ``cols`` (-1: a
    gene it lacks, 0), normalised over that panel."""
    X = sp.csr_matrix(raw, dtype=np.float32)
    X.data = to_linear(X.data, value_type).astype(np.float32)
    present = cols >= 0
    Xg = sp.csr_matrix((X.shape[0], len(cols)), dtype=np.float32)
    if present.any():
        Xg = sp.hstack([X[:, cols[present]], sp.csr_matrix((X.shape[0], int((~present).sum())), dtype=np.float32)]).tocsr()
        order = np.concatenate([np.flatnonzero(present), np.flatnonzero(~present)])
        Xg = Xg[:, np.argsort(order)]
    return normalize_rows(Xg, "counts").tocsr()


def _cells(t: TargetData, pos: np.ndarray) -> Cells:
    return Cells(t.X[pos], t.labels[pos])


def _row(dataset, method, seed, budget, m, n_train, n_val, n_test, n_types, seconds, extra) -> dict:
    return {"dataset": dataset, "method": method, "seed": seed, "budget": budget, **m,
            "n_train": n_train, "n_val": n_val, "n_test": n_test, "n_types": n_types,
            "seconds": seconds, **extra}


# ---------------------------------------------------------------- the paper's track
def evaluate_target(
    cfg: RunConfig,
    target: TargetData,
    encoder: Encoder | None,
    log=detail,
    query: sp.csr_matrix | None = None,
) -> tuple[list[dict], list[dict], dict]:
    """Rows (dataset, method, seed, budget, metrics), the splits (cell ids per seed and budget),
    the fine-tuned scPretrain models at the full budget by seed (for registration), and each
    method's confusion table at the full budget, first seed.

    ``query``: unlabelled cells in the target's genes (:func:`load_query`) that the model is
    meant to annotate: ``scpretrain_ssl`` then also runs (at the full budget), fine-tuned
    semi-supervised on them, and the models returned for registration are its (guarded) ones."""
    ev, f = cfg.evaluate, cfg.finetune
    check_methods(ev.methods)
    methods = runnable_methods(ev.methods, encoder is not None, has_query=query is not None)
    registered = "scpretrain_ssl" if query is not None and "scpretrain_ssl" in methods else "scpretrain"
    n_types = len(target.classes)
    gidx = encoder.index(target.genes) if encoder is not None else None
    budgets = sorted(set(ev.budgets)) if ev.budgets else [f.train_cap]
    full = max(budgets)
    swept = {*NETWORKS, *ev.sweep_methods}  # run at every budget; the others at the full one only
    rows, splits, models, confusion = [], [], {}, {}
    bar = progress(len(f.seeds) * len(budgets), f"fine-tune {target.name}", unit="fit")
    for seed in f.seeds:
        split = split_cells(target.labels, seed, f.train_frac, f.val_frac, f.train_cap)
        val, test = _cells(target, split.val), _cells(target, split.test)
        done: dict[int, list[dict]] = {}  # n_train -> rows, when budgets above the split coincide
        for budget in budgets:
            train_pos = budget_subset(target.labels, split.train, budget, seed)
            splits.append({"dataset": target.name, "seed": seed, "budget": budget,
                           **_ids(target.obs_ids, Split(train_pos, split.val, split.test))})
            bar.update(1)
            if len(train_pos) in done:  # the same cells as a smaller budget: same results
                rows += [{**r, "budget": budget} for r in done[len(train_pos)]]
                continue
            train = _cells(target, train_pos)
            # the whole training split is the full protocol, even when a smaller budget reaches it
            whole = budget == full or len(train_pos) == len(split.train)
            on = [m for m in methods if whole or m in swept]
            features: dict = {}
            these = []
            for method in on:
                t0 = time.perf_counter()
                fit = run_method(method, train, val, test, n_types, seed, cfg,
                                 encoder.weights if encoder else None, gidx, features, unlabelled=query,
                                 classes=target.classes)
                auprc = class_auprc(test.y, fit.proba)
                m = classification_metrics(test.y, fit.proba, auprc)
                these.append(_row(target.name, method, seed, budget, m, len(train_pos), len(split.val),
                                  len(split.test), n_types, time.perf_counter() - t0,
                                  fit.extra | by_class(target.classes, train.y, auprc)))
                if method == registered and whole:
                    models[seed] = fit.model
                if whole and seed == min(f.seeds):
                    confusion[method] = confusion_table(target.classes, test.y, fit.proba.argmax(1))
                log(f"  {target.name:26s} budget {len(train_pos):5d} {method:12s} seed {seed}: "
                    f"accuracy {m['accuracy']:.3f} kappa {m['kappa']:.3f} AUPRC {m['macro_auprc']:.3f}")
            done[len(train_pos)] = these
            # the full-protocol-only methods report at the full budget alone (the curve of kappa
            # by budget must average every method over the same targets), their rows copied there
            rows += [r for r in these if budget == full or r["method"] in swept]
            mine = [r for r in these if r["method"] == "scpretrain"]
            if mine:
                bar.set_postfix(seed=seed, budget=budget, scpretrain_kappa=f"{mine[0]['kappa']:.3f}")
    bar.close()
    return rows, splits, models, confusion


def by_class(classes: np.ndarray, y_train: np.ndarray, ap: dict[int, float]) -> dict:
    """Each test class's AUPRC (``ap``: :func:`class_auprc`) and its number of training cells (a
    type seen in one training cell is ranked from that one example), by class name."""
    return {"auprc_by_class": {str(classes[c]): v for c, v in ap.items()},
            "n_train_by_class": {str(classes[c]): int((np.asarray(y_train) == c).sum()) for c in ap}}


def _ids(obs_ids: np.ndarray, s: Split) -> dict:
    return {"train": obs_ids[s.train].tolist(), "val": obs_ids[s.val].tolist(), "test": obs_ids[s.test].tolist()}


def cluster_target(target: TargetData, encoder: Encoder | None, seed: int = 0, n_pcs: int = 50) -> tuple[list[dict], dict]:
    """K-means (k = number of true types) on the pretrained embedding, on PCA, and on UMAP of
    PCA; Rand index and ARI against the true labels. Also returns 2-D UMAP coordinates of the
    embedding and of PCA for the figures."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    k = len(target.classes)
    dense = np.asarray(target.X.todense(), np.float32)
    pcs = PCA(n_components=min(n_pcs, dense.shape[0] - 1, dense.shape[1]), random_state=seed).fit_transform(dense)
    spaces = {"pca": pcs}
    coords = {"pca": umap_2d(pcs, seed)}
    spaces["umap_pca"] = coords["pca"]
    if encoder is not None:
        emb = embed(encoder.weights, encoder.index(target.genes), target.X)
        spaces["embedding"] = emb
        coords["embedding"] = umap_2d(emb, seed)
    rows = []
    for space, Z in spaces.items():
        km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(Z)
        rows.append({"dataset": target.name, "space": space, "k": k, "seed": seed,
                     **clustering_metrics(target.labels, km.labels_)})
    return rows, {"coords": coords, "labels": target.classes[target.labels]}


def umap_2d(x: np.ndarray, seed: int, n_neighbors: int = 15) -> np.ndarray:
    """2-D UMAP coordinates of ``x``, its nearest neighbours found exactly by scikit-learn:
    UMAP's own search compiles its numba functions for about 8 s in every process."""
    import umap
    from sklearn.neighbors import NearestNeighbors

    k = min(n_neighbors, len(x))
    dist, idx = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(x)
    with warnings.catch_warnings():  # that UMAP without its search index cannot embed new cells: never asked
        warnings.filterwarnings("ignore", message="precomputed_knn", category=UserWarning)
        return umap.UMAP(n_neighbors=k, random_state=seed, n_jobs=1,
                         precomputed_knn=(idx, dist.astype(np.float32), None)).fit_transform(x)


# ---------------------------------------------------------------- the annotation track
def shared_genes(store: Atlas, datasets: list[str]) -> np.ndarray:
    """Atlas genes measured in every one of ``datasets``."""
    mask = np.ones(store.n_genes, dtype=bool)
    for d in datasets:
        mask &= store.dataset_gene_mask(d)
    return store.genes()[mask]


def evaluate_transfer(
    cfg: RunConfig,
    store: Atlas,
    references: list[str],
    query: str,
    mapping: dict | None,
    encoder: Encoder | None,
    log=detail,
    hold_out: str | None = None,
    pair_names: bool = False,
) -> tuple[list[dict], list[dict], dict]:
    """Fine-tune on the labelled reference datasets (90% train, 10% validation per seed;
    training capped at the largest budget), predict every labelled query cell whose
    harmonised label the references know. Genes: those measured in the references and the
    query, normalised over that shared panel in both.

    ``hold_out``: a cell type removed from the references (an unknown type). The query keeps
    its cells of that type; the rows' dataset is "<query> without <type>", their metrics are
    those of the known cells plus :func:`unknown_cell_metrics` of the score the method rejects
    on, with its own rule, and the AUROC of each score of :func:`unknown_scores`.
    ``pair_names``: rows name their dataset "<references> -> <query>" (a transfer matrix)."""
    ev, f = cfg.evaluate, cfg.finetune
    genes = shared_genes(store, [*references, query])
    if len(genes) < MIN_SHARED_GENES:
        raise StoreError(f"references {references} and query {query!r} share only {len(genes)} genes; "
                         f"transfer needs at least {MIN_SHARED_GENES}")
    refs = [load_target(store, r, genes, mapping) for r in references]
    classes = np.unique(np.concatenate([r.classes[r.labels] for r in refs]))
    if hold_out is not None:
        classes = classes[classes != hold_out]
    refs = [load_target(store, r, genes, mapping, classes) for r in references]
    q = load_target(store, query, genes, mapping, classes if hold_out is None else np.union1d(classes, [hold_out]))
    dropped = int(store.dataset(query).n_cells - len(q.labels))
    names = q.classes[q.labels]
    is_unknown = names == hold_out if hold_out is not None else np.zeros(len(names), bool)
    y_query = np.where(is_unknown, 0, np.searchsorted(classes, names))  # unknown cells: no code of theirs
    known = ~is_unknown
    # the confusion tables name the held-out type as a true label (a row no method can predict)
    table_classes = classes if hold_out is None else np.append(classes, hold_out)
    y_table = np.where(is_unknown, len(classes), y_query)
    dataset = f"{'+'.join(references)} -> {query}" if pair_names else query
    dataset = dataset if hold_out is None else f"{dataset} without {hold_out}"
    Xr = sp.vstack([r.X for r in refs]).tocsr()
    yr = np.concatenate([r.labels for r in refs])
    ids = np.concatenate([r.obs_ids for r in refs])
    methods = runnable_methods(ev.methods, encoder is not None, has_query=True)
    check_methods(methods)
    gidx = encoder.index(genes) if encoder is not None else None
    cap = max(ev.budgets) if ev.budgets else f.train_cap
    rows, splits, models, confusion = [], [], {}, {}
    label = dataset if pair_names else f"{'+'.join(references)} -> {dataset}"
    bar = progress(len(f.seeds) * len(methods), label, unit="fit")
    for seed in f.seeds:
        s = split_cells(yr, seed, train_frac=1 - f.val_frac, val_frac=f.val_frac, train_cap=10**9)
        # split_cells puts its test share first; with train_frac = 1 - val_frac there is none
        train_pos = budget_subset(yr, s.train, cap, seed)
        train, val, test = Cells(Xr[train_pos], yr[train_pos]), Cells(Xr[s.val], yr[s.val]), Cells(q.X, y_query)
        splits.append({"dataset": dataset, "seed": seed, "budget": cap, "references": references,
                       "train": ids[train_pos].tolist(), "val": ids[s.val].tolist(), "test": q.obs_ids.tolist()})
        features: dict = {}
        for method in methods:
            t0 = time.perf_counter()
            fit = run_method(method, train, val, test, len(classes), seed, cfg,
                             encoder.weights if encoder else None, gidx, features, unlabelled=q.X, classes=classes)
            seconds = time.perf_counter() - t0
            if hold_out is not None and "ece" in fit.extra:  # calibration of the known cells only
                from scipy.special import softmax

                from scpretrain_dist.evaluate.metrics import expected_calibration_error as ece

                fit.extra |= {"ece": ece(y_query[known], fit.proba[known]),
                              "ece_calibrated": ece(y_query[known], softmax(fit.logits[known] / fit.temperature, axis=1))}
            variants = [(method, fit.proba)]
            if ev.label_shift and method in SHIFT_METHODS:
                prior = fit.prior if fit.prior is not None else training_prior(train.y, len(classes))
                variants.append((f"{method}+shift", adapt_to_label_shift(fit.proba, prior)))
            for name, proba in variants:
                auprc = class_auprc(test.y[known], proba[known])
                m = classification_metrics(test.y[known], proba[known], auprc)
                if hold_out is not None:
                    m |= _unknown_metrics(fit if name == method else Fitted(proba), is_unknown,
                                          proba.argmax(1) == y_query)
                if seed == min(f.seeds):
                    confusion[name] = confusion_table(table_classes, y_table, proba.argmax(1))
                rows.append(_row(dataset, name, seed, cap, m, len(train_pos), len(s.val), int(known.sum()),
                                 len(classes), seconds,
                                 {**fit.extra, "references": ",".join(references), "query": query,
                                  "n_genes": len(genes), **by_class(classes, train.y, auprc),
                                  "query_cells_dropped": dropped, **({"held_out": hold_out,
                                                                      "n_unknown": int(is_unknown.sum())}
                                                                     if hold_out is not None else {})}))
                log(f"  {label}: {name:18s} seed {seed}: accuracy {m['accuracy']:.3f} "
                    f"kappa {m['kappa']:.3f} AUPRC {m['macro_auprc']:.3f}"
                    + (f" unknown AUROC {m['unknown_auroc']:.3f}" if hold_out is not None else ""))
            if method == "scpretrain":
                models[seed] = fit.model
            bar.update(1)
    bar.close()
    return rows, splits, {"models": models, "genes": genes, "classes": classes, "confusion": confusion,
                          "dataset": dataset}


def _unknown_metrics(fit: Fitted, is_unknown: np.ndarray, correct: np.ndarray) -> dict:
    """unknown_cell_metrics of the score the method rejects on (with its own threshold) and, for
    the networks, the AUROC of every score (``unknown_auroc_<score>``)."""
    scores = unknown_scores(fit)
    m = unknown_cell_metrics(is_unknown, scores[fit.reject_score], correct, fit.reject_threshold)
    m["reject_score"] = fit.reject_score
    if fit.logits is not None:  # the networks: several scores
        for name, score in scores.items():
            m[f"unknown_auroc_{name}"] = unknown_cell_metrics(is_unknown, score, correct)["unknown_auroc"]
    return m


def confusion_table(classes: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """{true label: {predicted label: cells}} over the labels that occur."""
    out: dict[str, dict[str, int]] = {}
    for t, p in zip(classes[y_true], classes[y_pred]):
        out.setdefault(str(t), {}).setdefault(str(p), 0)
        out[str(t)][str(p)] += 1
    return out
