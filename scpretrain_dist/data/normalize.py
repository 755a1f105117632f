"""The one normalisation every stage uses: log1p(CP10k) (value types: ``catalog/values.py``);
and the one way cells are cut down to a set of genes before it (:func:`keep_columns`)."""

from __future__ import annotations

import functools

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
    # a float32 CSR is normalised as it is: scipy's constructor would copy arrays that fill under
    # half their buffer (keep_columns' output)
    if copy or X.format != "csr" or X.dtype != np.float32:
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


def keep_columns(X: sp.csr_matrix, new_column: np.ndarray, n_columns: int) -> sp.csr_matrix:
    """The values of ``X``'s columns ``j`` with ``new_column[j] >= 0``, moved to that column of a
    float32 CSR of ``n_columns`` columns (a column subset, renumbered; two columns may land on one,
    as repeated values of a row); the other values dropped, the rest in ``X``'s order. One
    compiled pass over the values with no branch per value; scipy's ``X[:, cols]`` makes two
    (docs/benchmarks.md, "Batch annotation")."""
    X = sp.csr_matrix(X)
    new_column = np.asarray(new_column)
    if new_column.shape != (X.shape[1],):
        raise ValueError(f"new_column has {new_column.shape} entries for {X.shape[1]} columns")
    index = np.int32 if max(X.nnz, n_columns) < 2**31 else np.int64  # scipy's rule: one type for both
    indptr, indices = np.empty(X.shape[0] + 1, index), np.empty(X.nnz, index)
    data = np.empty(X.nnz, np.float32)
    if X.nnz:
        n = _keep_kernel()(X.indptr, X.indices, X.data, new_column.astype(indices.dtype, copy=False),
                           indptr, indices, data)
    else:
        indptr[:] = n = 0
    Y = sp.csr_matrix((X.shape[0], n_columns), dtype=np.float32)
    # set, not passed to the constructor, which would copy arrays that fill under half their
    # buffer to free the rest; the rest was never written, so it holds no memory
    Y.data, Y.indices, Y.indptr = data[:n], indices[:n], indptr
    return Y


def compile_keep_columns() -> None:
    """Load :func:`keep_columns`' compiled pass for the usual CSR types (int32 indices, float32
    values) now: half a second that can overlap other waiting."""
    keep_columns(sp.csr_matrix(np.ones((1, 1), np.float32)), np.zeros(1, np.int64), 1)


@functools.cache
def _keep_kernel():
    import numba

    def keep(indptr, indices, data, new_column, out_indptr, out_indices, out_data):
        # every value is written at slot n, and n moves on only for a kept one: no branch to
        # mispredict on a column that is kept or not at random
        n = 0
        out_indptr[0] = 0
        for r in range(indptr.size - 1):
            for k in range(indptr[r], indptr[r + 1]):
                j = new_column[indices[k]]
                out_indices[n] = j
                out_data[n] = data[k]
                n += j >= 0
            out_indptr[r + 1] = n
        return n

    try:  # compiled once per machine: kept in __pycache__ (or NUMBA_CACHE_DIR)
        return numba.njit(nogil=True, cache=True)(keep)
    except RuntimeError:  # nowhere writable to keep it: compiled in every process (half a second)
        return numba.njit(nogil=True)(keep)


def normalized_rows(store, joinids: np.ndarray, value_types: np.ndarray | str) -> sp.csr_matrix:
    """Cells of an atlas store (by soma_joinid, in the given order) x atlas genes, log1p(CP10k);
    ``value_types`` is one value type for every cell or one per cell."""
    return normalize_rows(store.read_rows(joinids), value_types, copy=False)  # a matrix the read made
