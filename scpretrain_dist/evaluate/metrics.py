"""Classification metrics from predicted probabilities (one-vs-rest for AUPRC/AUROC)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    cohen_kappa_score,
    f1_score,
    roc_auc_score,
)

METRICS = ("accuracy", "kappa", "macro_f1", "macro_auprc", "macro_auroc")


def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray, bins: int = 15) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by cells (Guo et
    al. 2017): 0 when a call made with confidence c is right a fraction c of the time."""
    y_true = np.asarray(y_true)
    conf, right = proba.max(1), proba.argmax(1) == y_true
    which = np.minimum((conf * bins).astype(int), bins - 1)
    total = 0.0
    for b in np.unique(which):
        m = which == b
        total += m.sum() * abs(right[m].mean() - conf[m].mean())
    return float(total / max(len(y_true), 1))


def class_auprc(y_true: np.ndarray, proba: np.ndarray) -> dict[int, float]:
    """One-vs-rest AUPRC of each class present in ``y_true`` (the terms of the macro AUPRC); a
    class with one test cell scores 1 / that cell's rank among all cells by its probability."""
    y_true = np.asarray(y_true)
    return {c: float(average_precision_score((y_true == c).astype(int), proba[:, c]))
            for c in range(proba.shape[1]) if (y_true == c).any()}


def classification_metrics(y_true: np.ndarray, proba: np.ndarray,
                           auprc: dict[int, float] | None = None) -> dict[str, float]:
    """``proba`` is (cells, n_types) over all training classes; a class absent from the test
    cells has no positive and is skipped in the macro AUPRC/AUROC rather than failing.
    ``auprc``: the per-class terms (:func:`class_auprc`) where the caller has them already."""
    y_true = np.asarray(y_true)
    y_pred = proba.argmax(1)
    auprc = class_auprc(y_true, proba) if auprc is None else auprc
    present = list(auprc)
    auroc = []
    for c in present:
        pos = (y_true == c).astype(int)
        if 0 < pos.sum() < len(pos):
            auroc.append(roc_auc_score(pos, proba[:, c]))
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "kappa": float(cohen_kappa_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "macro_auprc": float(np.mean(list(auprc.values()))) if auprc else float("nan"),
        "macro_auroc": float(np.mean(auroc)) if auroc else float("nan"),
    }


UNKNOWN_METRICS = ("unknown_auroc", "unknown_rejected", "known_rejected", "known_accuracy", "accepted_accuracy")


def unknown_cell_metrics(is_unknown: np.ndarray, score: np.ndarray, correct: np.ndarray,
                         threshold: float | None = None) -> dict[str, float]:
    """How well ``score`` (higher: more like a type the reference knows) tells the cells of a type
    the reference lacks (``is_unknown``) from the known ones: the AUROC of -score at finding
    unknown cells; and, rejecting cells whose score is below ``threshold``, the fractions of
    unknown and known cells rejected and the accuracy on all known cells and on the accepted
    ones (``correct``: the call was right; known cells only). No threshold: NaN for those."""
    is_unknown, score, correct = np.asarray(is_unknown, bool), np.asarray(score, float), np.asarray(correct, bool)
    known = ~is_unknown
    out = {"unknown_auroc": float(roc_auc_score(is_unknown, -score)) if 0 < is_unknown.sum() < len(score) else float("nan"),
           "known_accuracy": float(correct[known].mean()) if known.any() else float("nan")}
    if threshold is None:
        return out | {"unknown_rejected": float("nan"), "known_rejected": float("nan"), "accepted_accuracy": float("nan")}
    rejected = score < threshold
    accepted = known & ~rejected
    return out | {"unknown_rejected": float(rejected[is_unknown].mean()) if is_unknown.any() else float("nan"),
                  "known_rejected": float(rejected[known].mean()) if known.any() else float("nan"),
                  "accepted_accuracy": float(correct[accepted].mean()) if accepted.any() else float("nan")}


def clustering_metrics(y_true: np.ndarray, clusters: np.ndarray) -> dict[str, float]:
    """Rand index and adjusted Rand index of a clustering against the true labels."""
    from sklearn.metrics import adjusted_rand_score, rand_score

    return {"rand": float(rand_score(y_true, clusters)), "ari": float(adjusted_rand_score(y_true, clusters))}


def paired_wilcoxon(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Two-sided paired Wilcoxon signed-rank test of a vs b (e.g. pretrained vs not across
    targets x seeds); mean difference and how many pairs a wins."""
    from scipy.stats import wilcoxon

    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = ~(np.isnan(a) | np.isnan(b))
    a, b = a[ok], b[ok]
    d = a - b
    if len(d) == 0:
        return {"n": 0, "mean_diff": float("nan"), "wins": 0, "p_value": float("nan")}
    p = float(wilcoxon(a, b).pvalue) if np.any(d != 0) else 1.0
    return {"n": int(len(d)), "mean_diff": float(d.mean()), "wins": int((d > 0).sum()),
            "losses": int((d < 0).sum()), "p_value": p}
