"""Evaluation protocols. ``evaluate_target``: fine-tune on one held-out labelled dataset (never
seen in pretraining) and test on its held-out cells, for every method and seed, on identical
splits."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from scpretrain_dist.config import RunConfig
from scpretrain_dist.evaluate.metrics import classification_metrics
from scpretrain_dist.evaluate.splits import split_cells
from scpretrain_dist.store.soma import UNKNOWN_LABEL, AtlasStore
from scpretrain_dist.train.finetune import finetune, gene_index, predict_proba


@dataclass
class TargetData:
    name: str
    X: np.ndarray  # labelled cells x the dataset's own genes, log1p(CP10k)
    genes: np.ndarray
    labels: np.ndarray  # int codes
    classes: np.ndarray  # code -> label name
    obs_ids: np.ndarray


def load_target(store: AtlasStore, name: str) -> TargetData:
    X, obs = store.read_dataset(name)
    mask = store.dataset_gene_mask(name)
    genes = store.genes()[mask]
    keep = (obs["cell_type"] != UNKNOWN_LABEL).to_numpy()
    if keep.sum() == 0:
        raise ValueError(f"dataset {name} has no labelled cells; it cannot be a fine-tuning target")
    classes, codes = np.unique(obs["cell_type"].to_numpy()[keep], return_inverse=True)
    return TargetData(name, X[keep][:, np.flatnonzero(mask)].toarray(), genes, codes, classes,
                      obs["obs_id"].to_numpy()[keep])


def evaluate_target(
    cfg: RunConfig,
    target: TargetData,
    encoder: dict[str, np.ndarray] | None,
    pretrained_genes: np.ndarray | None,
    pretrained_mask: np.ndarray | None,
    log=print,
) -> tuple[list[dict], dict]:
    """Rows of (dataset, method, seed, metrics, split ids); and the fine-tuned scPretrain
    models by seed (for registration)."""
    rows, models = [], {}
    f = cfg.finetune
    n_types = len(target.classes)
    for seed in f.seeds:
        split = split_cells(target.labels, seed, f.train_frac, f.val_frac, f.train_cap)
        Xtr, ytr = target.X[split.train], target.labels[split.train]
        Xva, yva = target.X[split.val], target.labels[split.val]
        Xte, yte = target.X[split.test], target.labels[split.test]
        for method in cfg.evaluate.methods:
            t0 = time.perf_counter()
            extra: dict = {}
            if method in ("scpretrain", "no_pretrain"):
                init = None
                if method == "scpretrain":
                    if encoder is None:
                        continue
                    init = {**encoder, "gene_index": gene_index(target.genes, pretrained_genes, pretrained_mask)}
                res = finetune(Xtr, ytr, Xva, yva, n_types, f, cfg.model, seed, init)
                proba = predict_proba(res.model, Xte)
                extra = {"best_epoch": res.best_epoch, "n_pretrained_genes": res.n_pretrained_genes}
                if method == "scpretrain":
                    models[seed] = res.model
            elif method == "logreg":
                from sklearn.linear_model import LogisticRegression

                clf = LogisticRegression(max_iter=1000, C=1.0).fit(Xtr, ytr)
                proba = np.zeros((len(yte), n_types))
                proba[:, clf.classes_] = clf.predict_proba(Xte)
            else:
                raise ValueError(f"unknown method {method!r}; use scpretrain, no_pretrain or logreg")
            m = classification_metrics(yte, proba)
            rows.append({
                "dataset": target.name, "method": method, "seed": seed, **m,
                "n_train": len(ytr), "n_val": len(yva), "n_test": len(yte), "n_types": n_types,
                "seconds": time.perf_counter() - t0, **extra,
                "split": {"train": target.obs_ids[split.train].tolist(),
                          "val": target.obs_ids[split.val].tolist(),
                          "test": target.obs_ids[split.test].tolist()},
            })
            log(f"  {target.name:28s} {method:12s} seed {seed}: accuracy {m['accuracy']:.3f} "
                f"kappa {m['kappa']:.3f} macro-F1 {m['macro_f1']:.3f}")
    return rows, models
