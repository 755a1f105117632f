"""Value-type detection and the one normalisation every stage uses: log1p(CP10k)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

TARGET_SUM = 1e4


def detect_value_type(X: sp.spmatrix | np.ndarray, sample: int = 200_000) -> str:
    """"counts" when the stored values are whole numbers, else "lognorm"."""
    data = X.data if sp.issparse(X) else np.asarray(X).ravel()
    data = data[data != 0]
    if data.size == 0:
        return "counts"
    if data.size > sample:
        data = data[:: data.size // sample]
    frac_non_integer = np.mean(np.abs(data - np.round(data)) > 1e-3)
    return "counts" if frac_non_integer < 1e-3 else "lognorm"


def normalize_rows(X: sp.csr_matrix, value_types: np.ndarray | str) -> sp.csr_matrix:
    """Per cell: library size to 1e4, then log1p.

    Log-normalised rows are first taken back to linear scale with expm1 and rescaled, which
    makes any natural-log CP-whatever input consistent with counts.
    """
    X = sp.csr_matrix(X, dtype=np.float32, copy=True)
    if isinstance(value_types, str):
        lognorm_rows = np.full(X.shape[0], value_types == "lognorm")
    else:
        lognorm_rows = np.asarray(value_types) == "lognorm"
    if lognorm_rows.any():
        row_of = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
        sel = lognorm_rows[row_of]
        X.data[sel] = np.expm1(X.data[sel])
    lib = np.asarray(X.sum(1)).ravel()
    scale = np.divide(TARGET_SUM, lib, out=np.zeros_like(lib), where=lib > 0)
    X.data *= np.repeat(scale, np.diff(X.indptr)).astype(np.float32)
    np.log1p(X.data, out=X.data)
    return X


def normalize_dense(X: np.ndarray, value_type: str) -> np.ndarray:
    """Dense twin of :func:`normalize_rows` for request-sized inputs."""
    X = np.asarray(X, dtype=np.float32)
    if value_type == "lognorm":
        X = np.expm1(X)
    lib = X.sum(1, keepdims=True)
    X = X * np.divide(TARGET_SUM, lib, out=np.zeros_like(lib), where=lib > 0)
    return np.log1p(X)
