"""What the streaming loader reads, behind one small protocol with a SOMA and a zarr backend.

A source is opened from a picklable locator inside the process that reads (a Ray Train worker),
never passed open. It knows the committed datasets (the registry), the atlas gene count, and
returns raw rows of cells as CSR in the atlas gene space. Reads are cheapest for runs of
consecutive cells: both backends turn sorted joinids into contiguous ranges.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from itertools import chain, islice
from typing import Protocol, runtime_checkable

import numpy as np
import scipy.sparse as sp

from scpretrain_dist.store.atlas import DatasetRecord, StoreError
from scpretrain_dist.store.soma import LAYER, MEASUREMENT, STREAM_READ_CONFIG, SomaLocator, _n_genes


@runtime_checkable
class CellSource(Protocol):
    """Raw rows of an atlas by soma_joinid, in the atlas gene space."""

    @property
    def n_genes(self) -> int: ...

    def datasets(self) -> list[DatasetRecord]: ...

    def read_rows(self, joinids: np.ndarray) -> sp.csr_matrix:
        """Rows of ``joinids`` (sorted ascending, unique) as float32 CSR, values as stored."""
        ...

    def close(self) -> None: ...


def runs(joinids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique joinids -> (starts, stops) of their maximal runs of consecutive ids
    (stops exclusive)."""
    joinids = np.asarray(joinids, dtype=np.int64)
    if joinids.size == 0:
        return joinids[:0], joinids[:0]
    if np.any(np.diff(joinids) <= 0):
        raise ValueError("read_rows needs sorted, unique joinids")
    cut = np.flatnonzero(np.diff(joinids) != 1) + 1
    starts = joinids[np.concatenate([[0], cut])]
    stops = joinids[np.concatenate([cut - 1, [joinids.size - 1]])] + 1
    return starts, stops


def stack_runs(parts: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], n_genes: int,
               nnz_hint: int = 0) -> sp.csr_matrix:
    """One (indptr from 0, gene ids, values) CSR piece per run -> one CSR, runs in order.

    Pieces are copied, as they arrive, into arrays that grow geometrically from ``nnz_hint``
    values: the peak is the result plus the pieces in flight, not every piece and then their
    concatenation (which held a buffer's cells twice). A single piece (a whole dataset read as
    one run) is the result itself, not copied."""
    parts = iter(parts)
    first = next(parts, None)
    if first is None:
        return sp.csr_matrix((0, n_genes), dtype=np.float32)
    second = next(parts, None)
    if second is None:
        ptr, cols, vals = first  # owned and writable, as the copies below are
        return sp.csr_matrix((np.require(vals, np.float32, "W"), np.require(cols, np.int32, "W"),
                              np.asarray(ptr, np.int64)), shape=(len(ptr) - 1, n_genes))
    indices = np.empty(max(int(nnz_hint), 1024), dtype=np.int32)
    data = np.empty(len(indices), dtype=np.float32)
    indptrs, nnz = [np.zeros(1, dtype=np.int64)], 0
    for ptr, cols, vals in chain([first, second], parts):
        m = len(cols)
        if nnz + m > len(indices):
            indices, data = _grown(indices, data, nnz, max(nnz + m, int(len(indices) * 1.5)))
        indices[nnz : nnz + m] = cols
        data[nnz : nnz + m] = vals
        indptrs.append(np.asarray(ptr[1:], dtype=np.int64) + nnz)
        nnz += m
    indptr = np.concatenate(indptrs)
    indices, data = _trimmed(indices, data, nnz)
    return sp.csr_matrix((data, indices, indptr), shape=(len(indptr) - 1, n_genes))


def read_run(X, start: int, stop: int):
    """Cells ``start..stop-1`` of a SOMA sparse array, one slice query -> a CSR piece.

    A result in one Arrow table (a loader's run of cells) is viewed as numpy and converted at
    once. A result in several (a whole dataset) is copied table by table into the piece's arrays
    as it arrives (sized from the first tables' values per cell, grown geometrically), its cell
    ids only counted: concatenating the tables first and converting the chunked columns held
    every value twice and took about as long as the query itself. A store whose values do not
    come in cell order is read again and sorted."""
    tables = iter(X.read(coords=(slice(start, stop - 1),)).tables())
    first, second = next(tables, None), next(tables, None)
    if second is None:
        if first is None:
            return np.zeros(stop - start + 1, dtype=np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32)
        return _coo_table(first, start, stop)
    n = stop - start
    counts = np.zeros(n, dtype=np.int64)
    indices, data, nnz, previous = np.empty(0, np.int32), np.empty(0, np.float32), 0, start
    for tbl in chain([first, second], tables):
        m = tbl.num_rows
        if not m:
            continue
        r = tbl["soma_dim_0"].to_numpy()
        if r[0] < previous or not (r[1:] >= r[:-1]).all():
            return _coo_table(X.read(coords=(slice(start, stop - 1),)).tables().concat(), start, stop)
        lo, hi = int(r[0]), int(r[-1]) + 1
        counts[lo - start : hi - start] += np.diff(np.searchsorted(r, np.arange(lo, hi + 1)))
        previous = hi - 1
        if nnz + m > len(indices):  # the run's size guessed from its values per cell so far
            indices, data = _grown(indices, data, nnz, max(nnz + m, int(len(indices) * 1.5),
                                                            int((nnz + m) / (hi - start) * n * 1.02)))
        indices[nnz : nnz + m] = tbl["soma_dim_1"].to_numpy()
        data[nnz : nnz + m] = tbl["soma_data"].to_numpy()
        nnz += m
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return (indptr, *_trimmed(indices, data, nnz))


def csr_nbytes(X: sp.csr_matrix) -> int:
    """Bytes held by a CSR matrix's three arrays."""
    return X.data.nbytes + X.indices.nbytes + X.indptr.nbytes


def _grown(indices: np.ndarray, data: np.ndarray, used: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR value arrays of ``size`` entries holding the first ``used`` of the given ones (only
    those are copied: the rest is first touched when written, not filled here)."""
    grown = np.empty(size, dtype=np.int32), np.empty(size, dtype=np.float32)
    grown[0][:used] = indices[:used]
    grown[1][:used] = data[:used]
    return grown


def _trimmed(indices: np.ndarray, data: np.ndarray, used: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``used`` entries: views, or copies when the slack behind them is large."""
    if len(indices) > used + used // 8 + 1024:  # do not keep much slack alive behind the views
        return indices[:used].copy(), data[:used].copy()
    return indices[:used], data[:used]


def _coo_table(tbl, start: int, stop: int):
    """A SOMA query's table (soma_dim_0, soma_dim_1, soma_data) of cells ``start..stop-1`` -> a CSR piece."""
    return coo_run(tbl["soma_dim_0"].to_numpy(), tbl["soma_dim_1"].to_numpy(), tbl["soma_data"].to_numpy(), start, stop)


def coo_run(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, start: int, stop: int):
    """COO values of cells ``start..stop-1`` (as a store returns them) -> a CSR piece.

    A store that keeps each cell's values together in gene order (the SOMA layout this package
    writes, and any single-fragment run) returns them sorted by cell already: that is checked in
    one cheap pass and the sort skipped. Otherwise they are sorted by (cell, gene), the order
    every reader of the store sums a cell's values in: a stable sort of one (cell, gene) key,
    which merges the sorted stretches a store returns (a SOMA array tiled over genes, such as
    ``tiledbsoma.io``'s, returns one per gene tile) instead of sorting from scratch (an eighth
    of the time of ``np.lexsort`` on a Census-schema experiment's runs).
    """
    cols = cols.astype(np.int32)
    vals = vals.astype(np.float32, copy=False)
    if rows.size > 1 and not (rows[1:] >= rows[:-1]).all():
        key = (rows - start).astype(np.int64) * (int(cols.max()) + 1) + cols
        order = np.argsort(key, kind="stable")
        rows, cols, vals = rows[order], cols[order], vals[order]
    indptr = np.searchsorted(rows, np.arange(start, stop + 1, dtype=np.int64))
    return indptr.astype(np.int64), cols, vals


class SomaSource:
    """A SOMA atlas read run by run: one slice query per run of consecutive cells, ``threads``
    queries in flight (TileDB releases the GIL, and a query's fixed cost then overlaps another's)."""

    def __init__(self, locator: SomaLocator, threads: int = 2):
        self.locator = locator
        self.threads = max(1, int(threads))
        self._pool = None
        self._nnz_per_cell = 0.0  # of the last read: sizes the next one's arrays
        self._records = locator.atlas().datasets()
        self._exp = None
        self._X = None
        with locator.open() as exp:
            self._n_genes = _n_genes(exp)

    @property
    def n_genes(self) -> int:
        return self._n_genes

    def datasets(self) -> list[DatasetRecord]:
        return list(self._records)

    def _array(self):
        if self._X is None:
            self._exp = self.locator.open(STREAM_READ_CONFIG)
            self._X = self._exp.ms[MEASUREMENT].X[LAYER]
        return self._X

    def read_rows(self, joinids: np.ndarray) -> sp.csr_matrix:
        starts, stops = runs(joinids)
        X = self._array()

        def read(run: tuple[int, int]):
            return read_run(X, *run)

        todo = list(zip(starts.tolist(), stops.tolist()))
        if self.threads > 1 and len(todo) > 1:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="scpretrain-soma-read")
            parts = _in_order(self._pool, read, todo, window=2 * self.threads)
        else:
            parts = (read(r) for r in todo)
        out = stack_runs(parts, self._n_genes, nnz_hint=int(self._nnz_per_cell * len(joinids) * 1.05))
        if len(joinids):
            self._nnz_per_cell = out.nnz / len(joinids)
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self._exp is not None:
            self._exp.close()
        self._exp = self._X = None

    def __getstate__(self):
        raise TypeError("a SomaSource holds an open array; pass its locator between processes")



def _in_order(pool, fn, items: list, window: int) -> Iterator:
    """``fn`` over ``items`` on ``pool``, results in order, at most ``window`` in flight (a
    plain ``pool.map`` submits everything at once and holds every result not yet consumed)."""
    it = iter(items)
    pending = deque(pool.submit(fn, item) for item in islice(it, window))
    while pending:
        result = pending.popleft().result()
        pending.extend(pool.submit(fn, item) for item in islice(it, 1))
        yield result


def open_source(locator) -> CellSource:
    """The source a locator points to: an atlas of our SOMA layout read by threaded slice
    queries; a zarr atlas or an experiment read in place by the atlas itself."""
    if isinstance(locator, SomaLocator):
        return SomaSource(locator)
    atlas = locator.atlas() if hasattr(locator, "atlas") else None
    if atlas is None or not isinstance(atlas, CellSource):
        raise StoreError(f"no cell source for {locator!r}; pass the locator of an atlas")
    atlas.datasets()  # refuses anything but an atlas, here rather than at the first read
    return atlas
