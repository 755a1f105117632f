"""The one normalisation every stage uses: log1p(CP10k) (value types: ``catalog/values.py``)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

TARGET_SUM = 1e4


def to_linear(values: np.ndarray, value_type: str, in_place: bool = False) -> np.ndarray:
    """Undo the log of log-normalised values (clipped so no value overflows float32), into
    ``values`` itself with ``in_place``."""
    out = values if in_place else None
    if value_type == "lognorm":
        return np.expm1(np.minimum(values, 80.0, out=out), out=out)
    if value_type == "log2norm":
        y = np.exp2(np.minimum(values, 120.0, out=out), out=out)
        y -= 1.0
        return y
    return values


def normalize_rows(X, value_types: np.ndarray | str, copy: bool = True):
    """Per cell: library size to 1e4, then log1p; a CSR matrix or a dense array (float32 out,
    the same kind as in).

    Log-normalised rows are first taken back to linear scale with expm1 and rescaled, which
    makes any natural-log CP-whatever input consistent with counts. ``copy=False`` normalises
    a float32 input in place (a loader's freshly read buffer).
    """
    n = X.shape[0]
    types = np.full(n, value_types, dtype=object) if isinstance(value_types, str) else np.asarray(value_types)
    if not sp.issparse(X):
        X = np.array(X, dtype=np.float32, copy=copy) if copy else np.asarray(X, dtype=np.float32)
        for vt in ("lognorm", "log2norm"):
            rows = types == vt
            if rows.any():
                X[rows] = to_linear(X[rows], vt)
        lib = X.sum(1, keepdims=True, dtype=np.float64)
        X *= np.divide(TARGET_SUM, lib, out=np.zeros_like(lib), where=lib > 0).astype(np.float32)
        return np.log1p(X, out=X)
    X = sp.csr_matrix(X, dtype=np.float32, copy=copy)
    if n and (types == types[0]).all():  # one value type (a dataset, a file): in place, no cell index
        to_linear(X.data, types[0], in_place=True)
    else:
        row_of = None
        for vt in ("lognorm", "log2norm"):
            rows = types == vt
            if rows.any():
                row_of = np.repeat(np.arange(n), np.diff(X.indptr)) if row_of is None else row_of
                sel = rows[row_of]
                X.data[sel] = to_linear(X.data[sel], vt)
    lib = np.asarray(X.sum(1)).ravel()
    scale = np.divide(TARGET_SUM, lib, out=np.zeros_like(lib), where=lib > 0)
    _scale_rows(X, scale.astype(np.float32, copy=False))
    np.log1p(X.data, out=X.data)
    return X


def _scale_rows(X: sp.csr_matrix, scale: np.ndarray, rows: int = 16384) -> None:
    """``X.data *= scale[row of each value]`` in place, a block of rows at a time: the repeated
    scales are a small temporary the allocator reuses, not one as large as the matrix whose
    fresh pages cost more than the product (a third of reading a dataset)."""
    for lo in range(0, X.shape[0], rows):
        hi = min(lo + rows, X.shape[0])
        X.data[X.indptr[lo] : X.indptr[hi]] *= np.repeat(scale[lo:hi], np.diff(X.indptr[lo : hi + 1]))


def normalized_rows(store, joinids: np.ndarray, value_types: np.ndarray | str) -> sp.csr_matrix:
    """Cells of an atlas store (by soma_joinid, in the given order) x atlas genes, log1p(CP10k);
    ``value_types`` is one value type for every cell or one per cell."""
    return normalize_rows(store.read_rows(joinids), value_types, copy=False)  # a matrix the read made
