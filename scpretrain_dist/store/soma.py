"""The atlas as one TileDB-SOMA experiment.

Layout:
    obs                  one row per cell: obs_id, dataset_id, cell_type
    ms/RNA/var           the atlas gene space: gene_symbol (upper case; human and mouse meet here)
    ms/RNA/X/counts      sparse values as ingested (raw counts or log-normalised), float32
    metadata             ``scpretrain.datasets``: the dataset registry (JSON), and one packed
                         gene-membership mask per dataset

The registry is written last and is the commit marker of an ingest: rows of a dataset that is
not in the registry are invisible to readers and are overwritten by the next ingest, so a failed
ingest never leaves a half dataset behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from scpretrain_dist.store.atlas import (
    GENES_KEY,
    REGISTRY_KEY,
    Atlas,
    DatasetRecord,
    StoreError,
    StreamedDataset,
    pack_mask,
    pipelined,
)

N_GENES_KEY = "scpretrain.n_genes"
MEASUREMENT = "RNA"
LAYER = "counts"
# X is read by runs of cells. One gene tile as wide as any gene space keeps each cell's values
# together in the array's global order, so reading a run of cells decompresses only those cells'
# data tiles (with the default 2048-gene tiles, one cell costs its whole 2048-cell band).
X_GENE_TILE = 1 << 18
X_CREATE_OPTIONS = {"tiledb": {"create": {"dims": {"soma_dim_1": {"tile": X_GENE_TILE}}}}}
# Reading many runs of cells one query each: result buffers sized for a run (tiledbsoma's default
# reserves far more, so every query mapped fresh pages), and TileDB keeps the memory it freed
# instead of trimming the heap after every query. Together they took the kernel's page-fault
# time from half of a streamed cell's CPU cost to a tenth. A run larger than the buffers is
# read in several parts, still correct.
STREAM_READ_CONFIG = {"soma.init_buffer_bytes": str(8 << 20), "sm.mem.malloc_trim": "false"}
# Whole datasets or blocks of one (K-means actors, fine-tuning, the in-memory loader): larger
# buffers, fewer rounds of an incomplete query; runs of cells read as slices, at most this many
# (scattered cells are one point query instead).
WHOLE_READ_CONFIG = {"soma.init_buffer_bytes": str(64 << 20), "sm.mem.malloc_trim": "false"}
MAX_SLICE_READS = 256


_CONTEXTS: dict = {}


def _context(tiledb_config: dict):
    """One TileDB context per configuration and process (a context owns thread pools, costly
    to make for every read)."""
    import tiledbsoma as soma

    key = (os.getpid(), tuple(sorted(tiledb_config.items())))
    if key not in _CONTEXTS:
        _CONTEXTS[key] = soma.SOMATileDBContext(tiledb_config=dict(tiledb_config))
    return _CONTEXTS[key]


@dataclass(frozen=True)
class SomaLocator:
    """Picklable pointer to a SOMA atlas, pinned to a point in time so every process reads the
    same version. Pass this between processes, never an open handle."""

    uri: str
    timestamp_ms: int | None = None

    def open(self, tiledb_config: dict | None = None):
        """The experiment, read-only; ``tiledb_config`` (e.g. :data:`STREAM_READ_CONFIG`) gives
        it its own TileDB context."""
        import tiledbsoma as soma

        context = _context(tiledb_config) if tiledb_config else None
        try:
            return soma.Experiment.open(self.uri, tiledb_timestamp=self.timestamp_ms, context=context)
        except soma.SOMAError as e:
            if "://" not in self.uri and not Path(self.uri).exists():
                raise StoreError(f"no atlas at {self.uri}; run `scpretrain ingest` first (or give the right "
                                 "--work-dir / store.uri)") from None
            raise StoreError(f"{self.uri} is not a SOMA experiment ({str(e).splitlines()[0][:200]}); give the "
                             "atlas folder `scpretrain ingest` made, or a path that does not exist yet") from None

    def pinned(self) -> SomaLocator:
        """The same atlas, pinned to its current version."""
        with self.open() as exp:
            return SomaLocator(self.uri, exp.tiledb_timestamp_ms)

    def atlas(self) -> SomaAtlas:
        return SomaAtlas(self)


def _with_null_columns(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with null values for the obs columns added after creation (annotations):
    TileDB writes need every attribute of a row."""
    for f in schema:
        if f.name not in table.column_names:
            table = table.append_column(f.name, pa.nulls(table.num_rows, f.type))
    return table


class SomaAtlas(Atlas):
    """The atlas in one TileDB-SOMA experiment."""

    def __init__(self, locator: SomaLocator):
        self.locator = locator

    # ------------------------------------------------------------------ creation
    def _exists(self) -> bool:
        if "://" in self.uri:
            return True
        path = Path(self.uri)
        return path.exists() and not (path.is_dir() and not any(path.iterdir()))

    def _create(self) -> None:
        """A new, empty atlas, built under a temporary name beside the URI and renamed into place
        (members are stored relative to the experiment), so an interrupted create leaves nothing
        at the URI to block the next one."""
        import shutil

        path = Path(self.uri)
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self._create_layout(str(tmp))
            os.rename(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def _create_layout(uri: str) -> None:
        import tiledbsoma as soma

        with soma.Experiment.create(uri) as exp:
            exp.add_new_dataframe(
                "obs",
                schema=pa.schema(
                    [
                        ("soma_joinid", pa.int64()),
                        ("obs_id", pa.large_string()),
                        ("dataset_id", pa.large_string()),
                        ("cell_type", pa.large_string()),
                    ]
                ),
                domain=[[0, 0]],
            )
            rna = exp.add_new_collection("ms").add_new_collection(MEASUREMENT, soma.Measurement)
            rna.add_new_dataframe(
                "var",
                schema=pa.schema([("soma_joinid", pa.int64()), ("gene_symbol", pa.large_string())]),
                domain=[[0, 0]],
            )
            rna.add_new_collection("X").add_new_sparse_ndarray(
                LAYER, type=pa.float32(), shape=(1, 1), platform_config=X_CREATE_OPTIONS
            )
            exp.metadata[REGISTRY_KEY] = "[]"

    # ------------------------------------------------------------------ registry
    def datasets(self) -> list[DatasetRecord]:
        path = Path(self.uri)
        if "://" not in self.uri and not path.exists():
            raise StoreError(f"no atlas at {self.uri}; run `scpretrain ingest` first")
        if "://" not in self.uri and not path.is_dir():
            raise StoreError(f"{self.uri} is a file, not an atlas; give a folder path for the atlas (store.uri)")
        with self.locator.open() as exp:
            if REGISTRY_KEY not in exp.metadata:
                raise StoreError(f"{self.uri} is a SOMA experiment but not an scpretrain atlas (it has no dataset "
                                 "registry); ingest into a new path, e.g. --work-dir of its own")
            return [DatasetRecord(**r) for r in json.loads(exp.metadata[REGISTRY_KEY])]

    def genes(self) -> np.ndarray:
        with self.locator.open() as exp:
            n = _n_genes(exp)
            if n == 0:
                return np.array([], dtype=object)
            tbl = exp.ms[MEASUREMENT].var.read(coords=(slice(0, n - 1),)).concat()
        df = tbl.to_pandas().sort_values("soma_joinid")
        return df["gene_symbol"].to_numpy(dtype=object)

    @property
    def n_genes(self) -> int:
        with self.locator.open() as exp:
            return _n_genes(exp)

    def _gene_mask_text(self, name: str) -> str | None:
        with self.locator.open() as exp:
            return exp.metadata.get(GENES_KEY + name)

    def read_meta(self, key: str) -> str | None:
        with self.locator.open() as exp:
            return exp.metadata.get(key)

    def write_meta(self, key: str, value: str) -> None:
        import tiledbsoma as soma

        with soma.Experiment.open(self.uri, "w") as exp:
            exp.metadata[key] = value

    # ------------------------------------------------------------------ appending
    def _write(self, genes: list[str], n_genes_before: int, n_cells_before: int,
               parts: list[tuple[StreamedDataset, Iterator]], records: Callable[[], list[DatasetRecord]]) -> None:
        import tiledbsoma as soma

        n_genes = len(genes)
        n_cells = n_cells_before + sum(d.n_cells for d, _ in parts)
        # grow the domains first (a resize becomes visible only to a newly opened handle)
        with soma.Experiment.open(self.uri, "w") as exp:
            if n_cells > exp.obs.domain[0][1] + 1:
                exp.obs.tiledbsoma_resize_soma_joinid_shape(n_cells)
            var = exp.ms[MEASUREMENT].var
            if n_genes > var.domain[0][1] + 1:
                var.tiledbsoma_resize_soma_joinid_shape(n_genes)
            X = exp.ms[MEASUREMENT].X[LAYER]
            if n_cells > X.shape[0] or n_genes > X.shape[1]:
                X.resize((max(n_cells, X.shape[0]), max(n_genes, X.shape[1])))
            gene_tile = int(json.loads(X.schema_config_options().dims)["soma_dim_1"]["tile"])
        # CSR order is the array's global order when one gene tile spans every gene: TileDB then
        # skips sorting each block, and its order/bounds/duplicate checks (most of a write's
        # time) are replaced by the cheap CSR checks of the shared block check
        global_order = n_genes <= gene_tile
        write_options = {"tiledb": {"write": {"sort_coords": not global_order}}}
        context = None
        if global_order:
            context = soma.SOMATileDBContext(tiledb_config={
                "sm.check_coord_oob": "false", "sm.check_global_order": "false", "sm.check_coord_dups": "false"})
        self._drop_uncommitted_cells(n_cells_before)
        with soma.Experiment.open(self.uri, "w", context=context) as exp:
            if n_genes > n_genes_before:
                exp.ms[MEASUREMENT].var.write(pa.table({
                    "soma_joinid": np.arange(n_genes_before, n_genes, dtype=np.int64),
                    "gene_symbol": pa.array(genes[n_genes_before:], pa.large_string()),
                }))
            X = exp.ms[MEASUREMENT].X[LAYER]

            def write(block, d):
                lo, obs_ids, labels, values = block
                n = values.shape[0]
                exp.obs.write(_with_null_columns(pa.table({
                    "soma_joinid": np.arange(lo, lo + n, dtype=np.int64),
                    "obs_id": pa.array(obs_ids, pa.large_string()),
                    "dataset_id": pa.array([d.name] * n, pa.large_string()),
                    "cell_type": pa.array(labels, pa.large_string()),
                }), exp.obs.schema))
                rows = np.repeat(np.arange(lo, lo + n, dtype=np.int64), np.diff(values.indptr))
                table = pa.Table.from_pydict({
                    "soma_dim_0": rows,
                    "soma_dim_1": values.indices.astype(np.int64),
                    "soma_data": values.data,
                })
                # one fragment, submitted in slices: the write's working copies stay the size of
                # a slice instead of the block (peak memory ~1/3)
                X.write(pa.Table.from_batches(table.to_batches(max_chunksize=1 << 20)), platform_config=write_options)

            for d, blocks in parts:
                pipelined(blocks, lambda b, d=d: write(b, d))
                exp.metadata[GENES_KEY + d.name] = pack_mask(d.gene_mask)
            exp.metadata[N_GENES_KEY] = n_genes
            exp.metadata[REGISTRY_KEY] = json.dumps([asdict(r) for r in records()])  # the commit marker, last

    def _drop_uncommitted_cells(self, n_committed: int) -> None:
        """Delete X values a failed ingest left past the last committed cell."""
        import tiledbsoma as soma

        with soma.Experiment.open(self.uri) as exp:
            ned = exp.ms[MEASUREMENT].X[LAYER].non_empty_domain()
        if ned and ned[0][1] >= n_committed:
            uri = f"{self.uri}/ms/{MEASUREMENT}/X/{LAYER}"
            with soma.SparseNDArray.open(uri, mode="d") as X:
                X.delete_cells((slice(n_committed, int(ned[0][1])),))

    # ------------------------------------------------------------------ reading
    def _read_obs(self, lo: int, hi: int) -> pd.DataFrame:
        with self.locator.open() as exp:
            tbl = exp.obs.read(coords=(slice(lo, hi - 1),), column_names=["soma_joinid", "obs_id", "cell_type"]).concat()
        return tbl.to_pandas().sort_values("soma_joinid").drop(columns="soma_joinid").reset_index(drop=True)

    def _read_sorted(self, joinids: np.ndarray) -> sp.csr_matrix:
        with self.locator.open(WHOLE_READ_CONFIG) as exp:
            return read_rows_by_joinid(exp.ms[MEASUREMENT].X[LAYER], joinids, _n_genes(exp))

    # ------------------------------------------------------------------ annotation columns
    def obs_columns(self) -> list[str]:
        with self.locator.open() as exp:
            return list(exp.obs.schema.names)

    def embedding_path(self, name: str) -> str:
        return f"ms/{MEASUREMENT}/obsm/{name}"

    def add_annotation_columns(self, label: str, confidence: str, embedding: str | None, n_cells: int,
                               dim: int) -> None:
        add_obs_annotation_columns(self.uri, MEASUREMENT, label, confidence, embedding, n_cells, dim)

    def annotated(self, label: str, embedding: str | None, lo: int, n: int) -> np.ndarray:
        return obs_rows_annotated(f"{self.uri}/obs", label, embedding and f"{self.uri}/{self.embedding_path(embedding)}",
                                  np.arange(lo, lo + n, dtype=np.int64))

    def write_annotations(self, lo: int, label: str, labels: np.ndarray, confidence: str, values: np.ndarray,
                          embedding: str | None, vectors: np.ndarray | None) -> None:
        write_obs_annotations(self.uri, MEASUREMENT, np.arange(lo, lo + len(labels), dtype=np.int64), label, labels,
                              confidence, values, embedding, vectors)


# ---------------------------------------------------------------------- annotation columns in obs
# Shared by this backend and an experiment read in place whose annotations are written back.


def add_obs_annotation_columns(uri: str, measurement: str, label: str, confidence: str, embedding: str | None,
                               n_rows: int, dim: int) -> None:
    """A label and a confidence column in the experiment's obs (schema evolution, as
    ``tiledbsoma.io.update_obs`` does; existing rows read null) and an embedding array of
    ``n_rows`` x ``dim`` in ``ms/<measurement>/obsm``."""
    import tiledbsoma as soma
    from tiledbsoma.io._util import get_arrow_str_format

    with soma.Experiment.open(uri) as exp:
        have = set(exp.obs.schema.names)
    new = {k: t for k, t in ((label, pa.large_string()), (confidence, pa.float32())) if k not in have}
    if new:
        with soma.Experiment.open(uri, "w") as exp:
            exp.obs._handle._update_dataframe_schema([], {k: get_arrow_str_format(t) for k, t in new.items()}, {})
    if embedding:
        with soma.Experiment.open(uri, "w") as exp:
            ms = exp.ms[measurement]
            obsm = ms["obsm"] if "obsm" in ms else ms.add_new_collection("obsm")
            if embedding not in obsm:
                obsm.add_new_sparse_ndarray(embedding, type=pa.float32(), shape=(max(n_rows, 1), dim))
            elif obsm[embedding].shape[0] < n_rows:
                obsm[embedding].resize((n_rows, dim))


def _coords(joinids: np.ndarray):
    """TileDB coordinates of sorted joinids: a range where they are contiguous."""
    if len(joinids) and joinids[-1] - joinids[0] == len(joinids) - 1:
        return slice(int(joinids[0]), int(joinids[-1]))
    return joinids


def obs_rows_annotated(obs_uri: str, label: str, embedding_uri: str | None, joinids: np.ndarray) -> np.ndarray:
    """Whether each cell (by soma_joinid) has its ``label`` in the DataFrame at ``obs_uri``, and
    its row in the embedding array at ``embedding_uri`` where one is asked."""
    import tiledbsoma as soma

    done = np.zeros(len(joinids), dtype=bool)
    order = np.argsort(joinids, kind="stable")
    ids = np.asarray(joinids, dtype=np.int64)[order]

    def position(found: np.ndarray) -> np.ndarray:
        return order[np.searchsorted(ids, found)]

    if not soma.DataFrame.exists(obs_uri):
        return done
    with soma.DataFrame.open(obs_uri) as obs:
        if label not in obs.schema.names:
            return done
        tbl = obs.read(coords=(_coords(ids),), column_names=["soma_joinid", label]).concat()
    done[position(tbl["soma_joinid"].to_numpy())] = tbl[label].is_valid().to_numpy(zero_copy_only=False)
    if embedding_uri:
        have = np.zeros(len(joinids), dtype=bool)
        if soma.SparseNDArray.exists(embedding_uri):
            with soma.SparseNDArray.open(embedding_uri) as A:
                t = A.read(coords=(_coords(ids), slice(0, 0))).tables().concat()
            have[position(t["soma_dim_0"].to_numpy())] = True
        done &= have
    return done


def write_obs_annotations(uri: str, measurement: str, joinids: np.ndarray, label: str, labels: np.ndarray,
                          confidence: str, values: np.ndarray, embedding: str | None,
                          vectors: np.ndarray | None) -> None:
    """The embedding first, then the cells' whole obs rows (TileDB writes need every attribute;
    the other columns are written back with the values just read) in one write: the filled label
    column is the block's commit marker."""
    import tiledbsoma as soma

    order = np.argsort(joinids, kind="stable")
    ids = np.asarray(joinids, dtype=np.int64)[order]
    if embedding and vectors is not None:
        dim = vectors.shape[1]
        with soma.SparseNDArray.open(f"{uri}/ms/{measurement}/obsm/{embedding}", "w") as A:
            A.write(pa.Table.from_pydict({
                "soma_dim_0": np.repeat(ids, dim),
                "soma_dim_1": np.tile(np.arange(dim, dtype=np.int64), len(ids)),
                "soma_data": vectors[order].astype(np.float32).ravel(),
            }))
    with soma.DataFrame.open(f"{uri}/obs") as obs:
        tbl = obs.read(coords=(_coords(ids),)).concat()
    if tbl.num_rows != len(ids):
        raise StoreError(f"obs of {uri} holds {tbl.num_rows} of the {len(ids)} rows to annotate "
                         f"(soma_joinids {ids[0]}..{ids[-1]})")
    tbl = tbl.take(pa.array(np.argsort(tbl["soma_joinid"].to_numpy())))
    labels, values = np.asarray(labels, dtype=object)[order], np.asarray(values, dtype=np.float32)[order]
    tbl = tbl.set_column(tbl.schema.get_field_index(label), label, pa.array(labels.tolist(), pa.large_string()))
    tbl = tbl.set_column(tbl.schema.get_field_index(confidence), confidence, pa.array(values, pa.float32()))
    with soma.DataFrame.open(f"{uri}/obs", "w") as obs:
        obs.write(tbl)


def read_rows_by_joinid(X, joinids: np.ndarray, n_genes: int) -> sp.csr_matrix:
    """Rows of sorted unique ``joinids`` of a SOMA sparse array as float32 CSR: a slice query per
    run of consecutive cells (whole datasets, blocks), one point query for scattered cells."""
    from scpretrain_dist.store.sources import read_run, runs, stack_runs

    starts, stops = runs(joinids)
    if len(starts) <= MAX_SLICE_READS:
        return stack_runs((read_run(X, a, b) for a, b in zip(starts.tolist(), stops.tolist())), n_genes)
    tbl = X.read(coords=(joinids,)).tables().concat()
    rows = np.searchsorted(joinids, tbl["soma_dim_0"].to_numpy())
    data = tbl["soma_data"].to_numpy().astype(np.float32)
    mat = sp.csr_matrix((data, (rows, tbl["soma_dim_1"].to_numpy())), shape=(len(joinids), n_genes))
    mat.sum_duplicates()
    return mat


def _n_genes(exp) -> int:
    return int(exp.metadata.get(N_GENES_KEY, 0))
