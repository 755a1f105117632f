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


def classification_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """``proba`` is (cells, n_types) over all training classes; a class absent from the test
    cells has no positive and is skipped in the macro AUPRC/AUROC rather than failing."""
    y_true = np.asarray(y_true)
    y_pred = proba.argmax(1)
    present = [c for c in range(proba.shape[1]) if (y_true == c).any()]
    auprc, auroc = [], []
    for c in present:
        pos = (y_true == c).astype(int)
        auprc.append(average_precision_score(pos, proba[:, c]))
        if 0 < pos.sum() < len(pos):
            auroc.append(roc_auc_score(pos, proba[:, c]))
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "kappa": float(cohen_kappa_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "macro_auprc": float(np.mean(auprc)) if auprc else float("nan"),
        "macro_auroc": float(np.mean(auroc)) if auroc else float("nan"),
    }
