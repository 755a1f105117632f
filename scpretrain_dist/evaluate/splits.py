"""Train/validation/test splits of a labelled dataset, stratified, with the paper's cap."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Split:
    train: np.ndarray  # positions in the dataset
    val: np.ndarray
    test: np.ndarray


def split_cells(
    labels: np.ndarray,
    seed: int,
    train_frac: float = 0.6,
    val_frac: float = 0.1,
    train_cap: int = 1000,
) -> Split:
    """60/10/30 stratified; training cells capped at min(cap, 0.6 n) (the rest of the 60% is
    left out, so the test set stays 30% of the dataset)."""
    labels = np.asarray(labels)
    n = len(labels)
    rng = np.random.default_rng(seed)
    n_test = int(round((1 - train_frac - val_frac) * n))
    n_val = int(round(val_frac * n))
    n_train = min(train_cap, n - n_test - n_val)
    # stratify by dealing each class's shuffled cells across the pool in turn
    order = np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)])
    ranks = np.concatenate([np.arange((labels == c).sum()) / max((labels == c).sum(), 1) for c in np.unique(labels)])
    order = order[np.argsort(ranks + rng.random(n) * 1e-9, kind="stable")]
    # order now interleaves classes proportionally; take test, val, train from it
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    train = train[:n_train]
    return Split(np.sort(train), np.sort(val), np.sort(test))


def budget_subset(labels: np.ndarray, train: np.ndarray, budget: int, seed: int) -> np.ndarray:
    """``budget`` cells of the training split, stratified: every class of the split gets at least
    one cell when the budget allows, the rest in proportion to class size (largest remainders).
    Smaller budgets of the same seed are nested in larger ones only through the shared split;
    a budget at or above the split's size returns the whole split."""
    train = np.asarray(train)
    if budget <= 0:
        raise ValueError(f"label budget must be positive, got {budget}")
    if budget >= len(train):
        return np.sort(train)
    rng = np.random.default_rng([seed, budget])
    y = np.asarray(labels)[train]
    classes, counts = np.unique(y, return_counts=True)
    if budget >= len(classes):
        quota = np.ones(len(classes), dtype=np.int64)
        rest = budget - len(classes)
        share = (counts - 1) / max((counts - 1).sum(), 1) * rest
        quota += np.floor(share).astype(np.int64)
        left = budget - quota.sum()
        order = np.argsort(-(share - np.floor(share)), kind="stable")
        quota[order[:left]] += 1
    else:  # fewer cells than classes: the largest classes, one cell each
        quota = np.zeros(len(classes), dtype=np.int64)
        quota[np.argsort(-counts, kind="stable")[:budget]] = 1
    quota = np.minimum(quota, counts)
    picked = [rng.choice(train[y == c], size=q, replace=False) for c, q in zip(classes, quota) if q > 0]
    return np.sort(np.concatenate(picked))
