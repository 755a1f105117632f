"""The atlas as a zarr CSR store: the second backend of the streaming loader.

Layout (zarr v3 group):
    X/data, X/indices, X/indptr   float32 values, int32 gene ids, int64 row pointers (CSR)
    obs/obs_id, obs/cell_type     strings, one per cell
    attrs                         ``scpretrain.genes`` (the atlas gene symbols),
                                  ``scpretrain.genes.<dataset>`` (packed gene masks) and
                                  ``scpretrain.datasets`` (the registry, written last: the commit
                                  marker, as in the SOMA store)

Rows past the committed cells (a write that failed) are invisible and cut off by the next write.
Written by ``scpretrain demo-data --format zarr`` or exported from a SOMA atlas (``export_zarr``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from scpretrain_dist.store.soma import (
    GENES_KEY,
    REGISTRY_KEY,
    UNKNOWN_LABEL,
    AtlasLocator,
    AtlasStore,
    DatasetRecord,
    IngestReport,
    StoreError,
    StreamedDataset,
    _pack_mask,
    _pipelined,
    _unpack_mask,
)
from scpretrain_dist.store.sources import runs, stack_runs

FORMAT_KEY = "scpretrain.format"
FORMAT = "csr/1"
GENE_LIST_KEY = "scpretrain.genes"
NNZ_CHUNK = 1 << 20
CELL_CHUNK = 1 << 16


@dataclass(frozen=True)
class ZarrLocator:
    """Picklable pointer to a zarr CSR atlas (a directory)."""

    uri: str


def _open_group(uri: str, mode: str):
    import zarr

    try:
        return zarr.open_group(uri, mode=mode)
    except FileNotFoundError:
        raise StoreError(f"no zarr atlas at {uri}; write one with `scpretrain demo-data --format zarr` "
                         "or `scpretrain export zarr`") from None


def _check_format(group, uri: str) -> None:
    if group.attrs.get(FORMAT_KEY) != FORMAT:
        raise StoreError(f"{uri} is not a zarr CSR atlas of this package (no {FORMAT_KEY}={FORMAT!r} attribute)")


class ZarrSource:
    """A zarr CSR atlas read run by run: one slice of data and of indices per run of cells."""

    def __init__(self, locator: ZarrLocator):
        self.locator = locator
        if not Path(locator.uri).exists():
            raise StoreError(f"no zarr atlas at {locator.uri}")
        g = _open_group(locator.uri, "r")
        _check_format(g, locator.uri)
        self._records = [DatasetRecord(**r) for r in json.loads(g.attrs.get(REGISTRY_KEY, "[]"))]
        self._genes = list(g.attrs.get(GENE_LIST_KEY, []))
        self._data, self._indices, self._indptr = g["X/data"], g["X/indices"], g["X/indptr"]

    @property
    def n_genes(self) -> int:
        return len(self._genes)

    def genes(self) -> np.ndarray:
        return np.array(self._genes, dtype=object)

    def datasets(self) -> list[DatasetRecord]:
        return list(self._records)

    def read_rows(self, joinids: np.ndarray) -> sp.csr_matrix:
        starts, stops = runs(joinids)
        if starts.size == 0:
            return sp.csr_matrix((0, self.n_genes), dtype=np.float32)
        # every row pointer the runs need, in one read: run k owns ptr[at[k] : at[k] + len_k + 1]
        lengths = stops - starts
        at = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])
        pos = np.repeat(starts - at, lengths + 1) + np.arange(int((lengths + 1).sum()))
        ptr = self._indptr.get_coordinate_selection(pos)

        def parts():  # read run by run while the result fills
            for a, b, k in zip(starts.tolist(), stops.tolist(), at.tolist()):
                run_ptr = ptr[k : k + b - a + 1]
                lo, hi = int(run_ptr[0]), int(run_ptr[-1])
                yield run_ptr - lo, self._indices[lo:hi], self._data[lo:hi]

        nnz = int(sum(ptr[k + b - a] - ptr[k] for a, b, k in zip(starts.tolist(), stops.tolist(), at.tolist())))
        return stack_runs(parts(), self.n_genes, nnz_hint=nnz)

    def close(self) -> None:
        pass


class _ZarrWriter:
    """Appends datasets to a zarr CSR atlas; the registry attribute is the commit marker."""

    def __init__(self, uri: str, genes: list[str]):
        import zarr

        self.uri = uri
        if Path(uri).exists():
            g = zarr.open_group(uri, mode="r+")
            _check_format(g, uri)
        else:
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
            g = zarr.open_group(uri, mode="w")
            g.create_array("X/data", shape=(0,), chunks=(NNZ_CHUNK,), dtype="float32")
            g.create_array("X/indices", shape=(0,), chunks=(NNZ_CHUNK,), dtype="int32")
            g.create_array("X/indptr", shape=(1,), chunks=(CELL_CHUNK,), dtype="int64", fill_value=0)
            g.create_array("obs/obs_id", shape=(0,), chunks=(CELL_CHUNK,), dtype=str)
            g.create_array("obs/cell_type", shape=(0,), chunks=(CELL_CHUNK,), dtype=str)
            g.attrs.update({FORMAT_KEY: FORMAT, GENE_LIST_KEY: [], REGISTRY_KEY: "[]"})
        self.group = g
        self.records = [DatasetRecord(**r) for r in json.loads(g.attrs.get(REGISTRY_KEY, "[]"))]
        current = list(g.attrs.get(GENE_LIST_KEY, []))
        if genes[: len(current)] != current:
            raise StoreError(f"the zarr atlas {uri} has another gene space ({len(current)} genes) than "
                             "the one being written; write to a new store")
        self.genes = genes
        # cut what a failed write left past the committed cells
        self.n_cells = sum(r.n_cells for r in self.records)
        self.nnz = int(g["X/indptr"][self.n_cells])
        for name, size in (("X/data", self.nnz), ("X/indices", self.nnz), ("X/indptr", self.n_cells + 1),
                           ("obs/obs_id", self.n_cells), ("obs/cell_type", self.n_cells)):
            if g[name].shape[0] != size:
                g[name].resize((size,))

    def append_block(self, obs_ids: np.ndarray, labels: np.ndarray, X: sp.csr_matrix) -> None:
        g = self.group
        X = sp.csr_matrix(X, dtype=np.float32)
        X.sum_duplicates()
        g["X/data"].append(X.data)
        g["X/indices"].append(X.indices.astype(np.int32, copy=False))
        g["X/indptr"].append(X.indptr[1:].astype(np.int64) + self.nnz)
        g["obs/obs_id"].append(np.asarray(obs_ids, dtype=object).astype(str))
        g["obs/cell_type"].append(np.asarray(labels, dtype=object).astype(str))
        self.nnz += X.nnz
        self.n_cells += X.shape[0]

    def commit(self, records: list[DatasetRecord], masks: dict[str, np.ndarray]) -> None:
        attrs = {GENES_KEY + name: _pack_mask(m) for name, m in masks.items()}
        attrs[GENE_LIST_KEY] = list(self.genes)
        attrs[REGISTRY_KEY] = json.dumps([asdict(r) for r in records])  # the commit marker, last
        self.group.attrs.update(attrs)


def write_zarr_atlas(uri: str | Path, genes, datasets: list[StreamedDataset], log=print) -> IngestReport:
    """Append streamed datasets to a zarr CSR atlas (created if absent); same rules as
    ``AtlasStore.append_streamed``: same content is skipped, other content under a known name refused."""
    uri = str(uri)
    genes = [str(g) for g in genes]
    w = _ZarrWriter(uri, genes)
    existing = {r.name: r for r in w.records}
    n_genes_before = len(w.group.attrs.get(GENE_LIST_KEY, []))
    added, skipped, messages = [], [], []
    records, masks = list(w.records), {}
    for d in datasets:
        if d.name in existing:
            if d.sha256 and d.sha256 == existing[d.name].sha256:
                skipped.append(d.name)
                messages.append(f"dataset {d.name} is already in the atlas (same content); nothing to do")
                log(messages[-1])
                continue
            raise StoreError(f"dataset {d.name} is already in the zarr atlas {uri} with other content")
        t0 = time.perf_counter()
        start = w.n_cells
        types: set[str] = set()

        def blocks(d=d, types=types) -> Iterator:
            for obs_ids, labels, X in d.blocks():
                if X.shape[1] != len(genes) or X.shape[0] != len(obs_ids) or X.shape[0] != len(labels):
                    raise StoreError(f"dataset {d.name}: a block does not match its cells or the genes")
                types.update(np.unique(np.asarray(labels, dtype=str)).tolist())
                yield obs_ids, labels, X

        _pipelined(blocks(), lambda b: w.append_block(*b))
        if w.n_cells - start != d.n_cells:
            raise StoreError(f"dataset {d.name} yielded {w.n_cells - start} cells, not the {d.n_cells} announced")
        n_types = len(types - {UNKNOWN_LABEL, "nan", ""})
        records.append(DatasetRecord(
            name=d.name, joinid_start=start, n_cells=d.n_cells, n_genes=int(d.gene_mask.sum()),
            value_type=d.value_type, species=d.species, tissue=d.tissue, technology=d.technology,
            label_key=d.label_key, n_types=n_types, source=d.source, sha256=d.sha256,
            ingested_at=time.strftime("%Y-%m-%dT%H:%M:%S"), group=d.group,
        ))
        masks[d.name] = d.gene_mask
        added.append(d.name)
        messages.append(f"wrote {d.name}: {d.n_cells} cells, {int(d.gene_mask.sum())} genes "
                        f"({time.perf_counter() - t0:.1f}s)")
        log(messages[-1])
    if added:
        w.commit(records, masks)
    return IngestReport(added, skipped, n_genes_before, len(genes), messages)


def export_zarr(
    locator: AtlasLocator, out_uri: str | Path, datasets: list[str] | None = None,
    block_cells: int = 32768, log=print,
) -> IngestReport:
    """Copy datasets of a SOMA atlas (all by default) into a zarr CSR atlas, block by block.

    Values are copied as stored (raw counts stay counts); each dataset keeps its value type,
    gene mask and registry entry. Cells are renumbered contiguously in the zarr store.
    """
    from scpretrain_dist.store.sources import SomaSource

    store = AtlasStore(locator.uri, locator.timestamp_ms)
    records = {r.name: r for r in store.datasets()}
    names = list(records) if datasets is None else list(datasets)
    missing = [n for n in names if n not in records]
    if missing:
        raise StoreError(f"cannot export {missing}: not in the atlas {locator.uri} (it holds {', '.join(records)})")
    genes = store.genes()
    source = SomaSource(locator)

    def blocks(rec: DatasetRecord):
        def gen():
            with locator.open() as exp:
                for lo in range(rec.joinid_start, rec.joinid_start + rec.n_cells, block_cells):
                    hi = min(lo + block_cells, rec.joinid_start + rec.n_cells)
                    obs = exp.obs.read(coords=(slice(lo, hi - 1),), column_names=["soma_joinid", "obs_id", "cell_type"])
                    obs = obs.concat().to_pandas().sort_values("soma_joinid")
                    X = source.read_rows(np.arange(lo, hi, dtype=np.int64))
                    yield obs["obs_id"].to_numpy(dtype=object), obs["cell_type"].to_numpy(dtype=object), X
        return gen

    streamed = [
        StreamedDataset(
            name=r.name, n_cells=r.n_cells, gene_mask=store.dataset_gene_mask(r.name), blocks=blocks(r),
            value_type=r.value_type, species=r.species, tissue=r.tissue, technology=r.technology,
            label_key=r.label_key, source=r.source, sha256=r.sha256, group=r.group,
        )
        for r in (records[n] for n in names)
    ]
    try:
        return write_zarr_atlas(out_uri, genes, streamed, log=log)
    finally:
        source.close()


def zarr_gene_mask(locator: ZarrLocator, name: str) -> np.ndarray:
    g = _open_group(locator.uri, "r")
    n = len(g.attrs.get(GENE_LIST_KEY, []))
    text = g.attrs.get(GENES_KEY + name)
    if text is None:
        raise StoreError(f"dataset {name!r} is not in the zarr atlas {locator.uri}")
    return _unpack_mask(text, n)
