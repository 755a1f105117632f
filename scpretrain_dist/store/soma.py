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

import base64
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from scpretrain_dist.catalog.entries import DatasetEntry
from scpretrain_dist.catalog.inputs import (
    UNKNOWN_LABEL,
    PreparedDataset,
    file_sha256,
    prepare_dataset,
)
from scpretrain_dist.config import UserError

REGISTRY_KEY = "scpretrain.datasets"
GENES_KEY = "scpretrain.genes."
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


class StoreError(UserError):
    """An input or store state that ingest or reading cannot accept."""


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
class AtlasLocator:
    """Picklable pointer to an atlas, pinned to a point in time so every process reads the
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

    def pinned(self) -> AtlasLocator:
        """The same atlas, pinned to its current version."""
        with self.open() as exp:
            return AtlasLocator(self.uri, exp.tiledb_timestamp_ms)


@dataclass(frozen=True)
class DatasetRecord:
    name: str
    joinid_start: int
    n_cells: int
    n_genes: int
    value_type: str
    species: str
    tissue: str
    technology: str
    label_key: str
    n_types: int
    source: str
    sha256: str
    ingested_at: str
    group: str = ""  # the catalog's group (e.g. "pbmc"); empty when ingested without a catalog

    @property
    def labelled(self) -> bool:
        return self.n_types > 0

    @property
    def joinids(self) -> np.ndarray:
        return np.arange(self.joinid_start, self.joinid_start + self.n_cells, dtype=np.int64)


@dataclass
class IngestReport:
    added: list[str]
    skipped: list[str]
    n_genes_before: int
    n_genes_after: int
    messages: list[str]


def _pack_mask(mask: np.ndarray) -> str:
    return base64.b64encode(np.packbits(mask.astype(bool)).tobytes()).decode()


def _unpack_mask(text: str, n: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))[:n]
    return bits.astype(bool)


def _with_null_columns(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with null values for the obs columns added after creation (annotations):
    TileDB writes need every attribute of a row."""
    for f in schema:
        if f.name not in table.column_names:
            table = table.append_column(f.name, pa.nulls(table.num_rows, f.type))
    return table


@dataclass
class StreamedDataset:
    """A dataset appended block by block, never whole in memory, already in the atlas gene
    space. ``blocks()`` yields (obs_ids, labels, values CSR cells x atlas genes) in cell order."""

    name: str
    n_cells: int
    gene_mask: np.ndarray  # bool over the atlas genes: what this dataset measured
    blocks: Callable[[], Iterator[tuple[np.ndarray, np.ndarray, sp.csr_matrix]]]
    value_type: str = "counts"
    species: str = "unknown"
    tissue: str = "unknown"
    technology: str = "unknown"
    label_key: str = "cell_type"
    source: str = ""
    sha256: str = ""
    group: str = ""


def _pipelined(items: Iterator, consume: Callable[[object], None], depth: int = 1) -> None:
    """``consume`` every item on a writer thread while the next items are produced here, at most
    ``depth`` ahead (bounded memory); the first error on either side is raised here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    failed: list[BaseException] = []
    stop = object()

    def writer() -> None:
        while True:
            item = q.get()
            if item is stop:
                return
            if not failed:
                try:
                    consume(item)
                except BaseException as e:  # re-raised in the producing thread
                    failed.append(e)

    t = threading.Thread(target=writer, name="scpretrain-store-writer", daemon=True)
    t.start()
    try:
        for item in items:
            if failed:
                break
            q.put(item)
    finally:
        q.put(stop)
        t.join()
    if failed:
        raise failed[0]


# a dataset sharing fewer of its genes than this with the rest of the atlas is refused (its
# names are not the atlas's gene symbols: another species, ids, a typo'd column); under
# LOW_OVERLAP it is accepted with a warning
MIN_OVERLAP = 0.05
LOW_OVERLAP = 0.5


def _check_gene_overlap(prepared: list[PreparedDataset], atlas_genes: list[str], log) -> None:
    """Each new dataset's genes against the atlas and the other new datasets (what it will be
    pretrained and compared with); nothing to compare with for a lone first dataset."""
    for p in prepared:
        others = set(atlas_genes).union(*(set(q.symbols) for q in prepared if q is not p))
        if not others:
            continue
        shared = sum(1 for s in p.symbols if s in others)
        frac = shared / len(p.symbols)
        where = f"dataset {p.entry.name} ({p.entry.path})"
        if p.entry.own_genes:
            if frac < LOW_OVERLAP:
                log(f"note: {where} shares {shared} of its {len(p.symbols)} genes with the atlas (own_genes = true): "
                    "it pretrains the encoder on genes of its own")
            continue
        if frac < MIN_OVERLAP:
            raise StoreError(
                f"{where} shares {shared} of its {len(p.symbols)} genes ({frac:.1%}) with the atlas and the other "
                f"inputs (e.g. its {', '.join(map(str, p.symbols[:3]))} vs {', '.join(sorted(others)[:3])}); the atlas "
                "matches genes by symbol (human and mouse by upper case). Give gene symbols (catalog gene_key names a "
                "var column of them); if its genes are deliberately of their own naming, set own_genes = true in its "
                "catalog entry")
        if frac < LOW_OVERLAP:
            log(f"warning: {where} shares only {shared} of its {len(p.symbols)} genes ({frac:.0%}) with the atlas "
                "and the other inputs; the rest add genes no other dataset measures")


class AtlasStore:
    """Read and append to a SOMA atlas. Open it per use; pass ``locator`` between processes."""

    def __init__(self, uri: str | Path, timestamp_ms: int | None = None):
        self.locator = AtlasLocator(str(uri), timestamp_ms)

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, uri: str | Path) -> AtlasStore:
        """A new, empty atlas, built under a temporary name beside ``uri`` and renamed into place
        (members are stored relative to the experiment), so an interrupted create leaves nothing
        at ``uri`` to block the next one."""
        import shutil

        uri = str(uri)
        if Path(uri).exists():
            raise StoreError(f"{uri} already exists; open it with AtlasStore({uri!r}) instead")
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(uri).with_name(f".{Path(uri).name}.creating-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            cls._create_layout(str(tmp))
            os.rename(tmp, uri)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls(uri)

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

    @classmethod
    def open_or_create(cls, uri: str | Path) -> AtlasStore:
        """The atlas at ``uri`` (checked to be one), or a new one where nothing is (an empty folder
        counts as nothing)."""
        path = Path(str(uri))
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        if not path.exists():
            return cls.create(uri)
        if not path.is_dir():
            raise StoreError(f"{uri} is a file, not an atlas; give a folder path for the atlas (store.uri)")
        store = cls(uri)
        store.datasets()  # refuses anything but an atlas
        return store

    @property
    def uri(self) -> str:
        return self.locator.uri

    # ------------------------------------------------------------------ registry
    def datasets(self) -> list[DatasetRecord]:
        if not Path(self.uri).exists():
            raise StoreError(f"no atlas at {self.uri}; run `scpretrain ingest` first")
        with self.locator.open() as exp:
            if REGISTRY_KEY not in exp.metadata:
                raise StoreError(f"{self.uri} is a SOMA experiment but not an scpretrain atlas (it has no dataset "
                                 "registry); ingest into a new path, e.g. --work-dir of its own")
            return [DatasetRecord(**r) for r in json.loads(exp.metadata[REGISTRY_KEY])]

    def dataset(self, name: str) -> DatasetRecord:
        records = {r.name: r for r in self.datasets()}
        if name not in records:
            raise StoreError(
                f"dataset {name!r} is not in the atlas {self.uri}; it holds: {', '.join(records) or 'nothing'}"
            )
        return records[name]

    def genes(self) -> np.ndarray:
        """Gene symbols of the atlas gene space, indexed by var soma_joinid."""
        with self.locator.open() as exp:
            n = self._n_genes(exp)
            if n == 0:
                return np.array([], dtype=object)
            tbl = exp.ms[MEASUREMENT].var.read(coords=(slice(0, n - 1),)).concat()
        df = tbl.to_pandas().sort_values("soma_joinid")
        return df["gene_symbol"].to_numpy(dtype=object)

    def dataset_gene_mask(self, name: str) -> np.ndarray:
        """Boolean mask over the atlas genes: which genes this dataset measured."""
        with self.locator.open() as exp:
            n = self._n_genes(exp)
            text = exp.metadata.get(GENES_KEY + name)
        if text is None:
            raise StoreError(f"dataset {name!r} is not in the atlas {self.uri}")
        mask = np.zeros(n, dtype=bool)
        packed = _unpack_mask(text, n)
        mask[: packed.size] = packed
        return mask

    @staticmethod
    def _n_genes(exp) -> int:
        return int(exp.metadata.get("scpretrain.n_genes", 0))

    # ------------------------------------------------------------------ ingest
    def ingest(self, entries: list[DatasetEntry], log=print) -> IngestReport:
        """Append datasets, creating the atlas if nothing is at its path yet. All are read and
        validated before anything is written (or created); a dataset already present with the
        same content is skipped; with other content it is refused."""
        import tiledbsoma as soma

        path = Path(self.uri)
        fresh = "://" not in self.uri and (not path.exists() or (path.is_dir() and not any(path.iterdir())))
        if fresh:
            existing, n_genes_before = {}, 0
        else:
            existing = {r.name: r for r in self.datasets()}
            with self.locator.open() as exp:
                n_genes_before = self._n_genes(exp)
        names = [e.name for e in entries]
        dups = {n for n in names if names.count(n) > 1}
        if dups:
            raise StoreError(f"the inputs name dataset(s) {sorted(dups)} more than once")
        prepared: list[PreparedDataset] = []
        skipped, messages = [], []
        by_content = {r.sha256: r.name for r in existing.values() if r.sha256}
        for entry in entries:
            digest = file_sha256(entry.path) if Path(entry.path).is_file() else ""
            if entry.name in existing:
                if digest == existing[entry.name].sha256:
                    msg = f"dataset {entry.name} is already in the atlas (same file); nothing to do"
                    skipped.append(entry.name)
                    messages.append(msg)
                    log(msg)
                    continue
                raise StoreError(
                    f"dataset {entry.name} is already in the atlas with different content "
                    f"(from {existing[entry.name].source}); give the new file another name"
                )
            if digest and digest in by_content:
                raise StoreError(
                    f"dataset {entry.name} ({entry.path}) has the same content as dataset {by_content[digest]!r}, "
                    "already in the atlas or in these inputs (same sha256); ingesting it again would "
                    "duplicate its cells. Leave it out, or ingest it under its first name")
            prepared.append(prepare_dataset(entry, log=log))
            by_content[prepared[-1].sha256] = entry.name
        if not prepared:
            return IngestReport([], skipped, n_genes_before, n_genes_before, messages)
        genes_before = list(self.genes()) if n_genes_before else []
        _check_gene_overlap(prepared, genes_before, log)
        if fresh:  # every input checked: now the atlas may come into being
            if path.is_dir():
                path.rmdir()
            AtlasStore.create(self.uri)

        genes = genes_before
        index = {g: i for i, g in enumerate(genes)}
        for p in prepared:
            for s in p.symbols:
                if s not in index:
                    index[s] = len(genes)
                    genes.append(s)
        n_genes = len(genes)
        n_cells_before = sum(r.n_cells for r in existing.values())
        n_cells = n_cells_before + sum(p.matrix.shape[0] for p in prepared)

        # Grow the domains first (a resize becomes visible only to a newly opened handle).
        with soma.Experiment.open(self.uri, "w") as exp:
            if n_cells > exp.obs.domain[0][1] + 1:
                exp.obs.tiledbsoma_resize_soma_joinid_shape(n_cells)
            var = exp.ms[MEASUREMENT].var
            if n_genes > var.domain[0][1] + 1:
                var.tiledbsoma_resize_soma_joinid_shape(n_genes)
            X = exp.ms[MEASUREMENT].X[LAYER]
            if n_cells > X.shape[0] or n_genes > X.shape[1]:
                X.resize((max(n_cells, X.shape[0]), max(n_genes, X.shape[1])))

        records = [asdict(r) for r in existing.values()]
        self._drop_uncommitted_cells(n_cells_before)
        with soma.Experiment.open(self.uri, "w") as exp:
            if n_genes > n_genes_before:
                exp.ms[MEASUREMENT].var.write(
                    pa.table(
                        {
                            "soma_joinid": np.arange(n_genes_before, n_genes, dtype=np.int64),
                            "gene_symbol": pa.array(genes[n_genes_before:], pa.large_string()),
                        }
                    )
                )
            start = n_cells_before
            X = exp.ms[MEASUREMENT].X[LAYER]
            for p in prepared:
                n = p.matrix.shape[0]
                cols = np.array([index[s] for s in p.symbols], dtype=np.int64)
                exp.obs.write(
                    _with_null_columns(
                        pa.table(
                            {
                                "soma_joinid": np.arange(start, start + n, dtype=np.int64),
                                "obs_id": pa.array(p.obs_ids.tolist(), pa.large_string()),
                                "dataset_id": pa.array([p.entry.name] * n, pa.large_string()),
                                "cell_type": pa.array(p.labels.tolist(), pa.large_string()),
                            }
                        ),
                        exp.obs.schema,
                    )
                )
                for lo in range(0, n, 4096):  # bounded memory per write
                    coo = p.matrix[lo : lo + 4096].tocoo()
                    X.write(
                        pa.Table.from_pydict(
                            {
                                "soma_dim_0": (coo.row + start + lo).astype(np.int64),
                                "soma_dim_1": cols[coo.col],
                                "soma_data": coo.data.astype(np.float32),
                            }
                        )
                    )
                mask = np.zeros(n_genes, dtype=bool)
                mask[cols] = True
                exp.metadata[GENES_KEY + p.entry.name] = _pack_mask(mask)
                records.append(
                    asdict(
                        DatasetRecord(
                            name=p.entry.name,
                            joinid_start=start,
                            n_cells=n,
                            n_genes=len(cols),
                            value_type=p.value_type,
                            species=p.species,
                            tissue=p.tissue,
                            technology=p.technology,
                            label_key=p.label_key,
                            n_types=p.n_types,
                            source=str(p.entry.path),
                            sha256=p.sha256,
                            ingested_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
                            group=p.entry.group,
                        )
                    )
                )
                msg = (
                    f"ingested {p.entry.name}: {n} cells, {len(cols)} genes, {p.value_type}, "
                    f"{p.n_types} cell types"
                )
                messages.append(msg)
                log(msg)
                start += n
            exp.metadata["scpretrain.n_genes"] = n_genes
            exp.metadata[REGISTRY_KEY] = json.dumps(records)  # the commit marker, last
        return IngestReport([p.entry.name for p in prepared], skipped, n_genes_before, n_genes, messages)

    def append_streamed(
        self, genes: np.ndarray | list[str], datasets: list[StreamedDataset], log=print
    ) -> IngestReport:
        """Append datasets that arrive block by block (an atlas larger than memory).

        ``genes`` is the whole atlas gene space after the append; the store's current genes must
        be its prefix. Same commit protocol as :meth:`ingest`: the registry is written last, so a
        failure leaves the committed datasets exactly as they were. A dataset already present
        with the same ``sha256`` is skipped; with another, refused.
        """
        import tiledbsoma as soma

        existing = {r.name: r for r in self.datasets()}
        genes = [str(g) for g in genes]
        with self.locator.open() as exp:
            n_genes_before = self._n_genes(exp)
        current = list(self.genes()) if n_genes_before else []
        if genes[: len(current)] != current:
            raise StoreError(
                f"the atlas {self.uri} has another gene space ({len(current)} genes) than the one "
                "being appended; write these datasets to a new store"
            )
        if len(set(genes)) != len(genes):
            raise StoreError("the gene symbols being appended are not unique")
        todo, skipped, messages = [], [], []
        for d in datasets:
            if d.name in existing:
                if d.sha256 and d.sha256 == existing[d.name].sha256:
                    skipped.append(d.name)
                    messages.append(f"dataset {d.name} is already in the atlas (same content); nothing to do")
                    log(messages[-1])
                    continue
                raise StoreError(
                    f"dataset {d.name} is already in the atlas {self.uri} with other content "
                    f"(from {existing[d.name].source}); write to a new store or choose other names"
                )
            if d.gene_mask.shape != (len(genes),):
                raise StoreError(f"dataset {d.name}: its gene mask does not cover the {len(genes)} atlas genes")
            todo.append(d)
        if not todo:
            return IngestReport([], skipped, n_genes_before, n_genes_before, messages)
        n_genes = len(genes)
        n_cells_before = sum(r.n_cells for r in existing.values())
        n_cells = n_cells_before + sum(d.n_cells for d in todo)
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
        # time) are replaced by the cheap CSR checks below
        global_order = n_genes <= gene_tile
        write_options = {"tiledb": {"write": {"sort_coords": not global_order}}}
        context = None
        if global_order:
            context = soma.SOMATileDBContext(tiledb_config={
                "sm.check_coord_oob": "false", "sm.check_global_order": "false", "sm.check_coord_dups": "false"})
        records = [asdict(r) for r in existing.values()]
        self._drop_uncommitted_cells(n_cells_before)
        with soma.Experiment.open(self.uri, "w", context=context) as exp:
            if n_genes > n_genes_before:
                exp.ms[MEASUREMENT].var.write(
                    pa.table(
                        {
                            "soma_joinid": np.arange(n_genes_before, n_genes, dtype=np.int64),
                            "gene_symbol": pa.array(genes[n_genes_before:], pa.large_string()),
                        }
                    )
                )
            X = exp.ms[MEASUREMENT].X[LAYER]
            start = n_cells_before
            for d in todo:
                t0 = time.perf_counter()
                done = [0]
                types: set[str] = set()

                def blocks(d=d, start=start, done=done, types=types):
                    for obs_ids, labels, values in d.blocks():
                        lo = start + done[0]
                        n = values.shape[0]
                        if n != len(obs_ids) or n != len(labels) or values.shape[1] != n_genes:
                            raise StoreError(f"dataset {d.name}: a block does not match its cells or the genes")
                        values = sp.csr_matrix(values)
                        values.sum_duplicates()  # canonical: sorted, unique genes per cell
                        if values.nnz and (values.indices.min() < 0 or values.indices.max() >= n_genes):
                            raise StoreError(f"dataset {d.name}: a block has gene indices outside the atlas")
                        done[0] += n
                        types.update(np.unique(np.asarray(labels, dtype=str)).tolist())
                        if done[0] > d.n_cells:
                            raise StoreError(f"dataset {d.name} yields more than its {d.n_cells} cells")
                        yield lo, obs_ids, labels, values

                def write(block, d=d):
                    lo, obs_ids, labels, values = block
                    n = values.shape[0]
                    exp.obs.write(
                        pa.table(
                            {
                                "soma_joinid": np.arange(lo, lo + n, dtype=np.int64),
                                "obs_id": pa.array(np.asarray(obs_ids, dtype=object), pa.large_string()),
                                "dataset_id": pa.array([d.name] * n, pa.large_string()),
                                "cell_type": pa.array(np.asarray(labels, dtype=object), pa.large_string()),
                            }
                        )
                    )
                    rows = np.repeat(np.arange(lo, lo + n, dtype=np.int64), np.diff(values.indptr))
                    table = pa.Table.from_pydict(
                        {
                            "soma_dim_0": rows,
                            "soma_dim_1": values.indices.astype(np.int64),
                            "soma_data": values.data.astype(np.float32, copy=False),
                        }
                    )
                    # one fragment, submitted in slices: the write's working copies stay the
                    # size of a slice instead of the block (peak memory ~1/3)
                    X.write(pa.Table.from_batches(table.to_batches(max_chunksize=1 << 20)),
                            platform_config=write_options)

                _pipelined(blocks(), write)
                if done[0] != d.n_cells:
                    raise StoreError(f"dataset {d.name} yielded {done[0]} cells, not the {d.n_cells} announced")
                exp.metadata[GENES_KEY + d.name] = _pack_mask(d.gene_mask)
                n_types = len(types - {UNKNOWN_LABEL, "nan", ""})
                records.append(
                    asdict(
                        DatasetRecord(
                            name=d.name, joinid_start=start, n_cells=d.n_cells,
                            n_genes=int(d.gene_mask.sum()), value_type=d.value_type,
                            species=d.species, tissue=d.tissue, technology=d.technology,
                            label_key=d.label_key, n_types=n_types, source=d.source,
                            sha256=d.sha256, ingested_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
                            group=d.group,
                        )
                    )
                )
                messages.append(
                    f"wrote {d.name}: {d.n_cells} cells, {int(d.gene_mask.sum())} genes, "
                    f"{d.value_type}, {n_types} cell types ({time.perf_counter() - t0:.1f}s)"
                )
                log(messages[-1])
                start += d.n_cells
            exp.metadata["scpretrain.n_genes"] = n_genes
            exp.metadata[REGISTRY_KEY] = json.dumps(records)  # the commit marker, last
        return IngestReport([d.name for d in todo], skipped, n_genes_before, n_genes, messages)

    def _drop_uncommitted_cells(self, n_committed: int) -> None:
        """Delete X values a failed ingest left past the last committed cell."""
        import tiledbsoma as soma

        with soma.Experiment.open(self.uri) as exp:
            ned = exp.ms[MEASUREMENT].X[LAYER].non_empty_domain()
        if ned and ned[0][1] >= n_committed:
            uri = f"{self.uri}/ms/{MEASUREMENT}/X/{LAYER}"
            with soma.SparseNDArray.open(uri, mode="d") as X:
                X.delete_cells((slice(n_committed, int(ned[0][1])),))

    # ------------------------------------------------------------------ obs columns
    def obs_schema(self) -> pa.Schema:
        with self.locator.open() as exp:
            return exp.obs.schema

    def add_obs_columns(self, columns: dict[str, pa.DataType]) -> None:
        """Add nullable obs columns (schema evolution, as ``tiledbsoma.io.update_obs`` does);
        existing rows read them as null. Columns already present are refused."""
        import tiledbsoma as soma
        from tiledbsoma.io._util import get_arrow_str_format

        present = set(self.obs_schema().names)
        clash = sorted(set(columns) & present)
        if clash:
            raise StoreError(f"obs of {self.uri} already has column(s) {clash}")
        with soma.Experiment.open(self.uri, "w") as exp:
            exp.obs._handle._update_dataframe_schema(
                [], {k: get_arrow_str_format(t) for k, t in columns.items()}, {}
            )

    # ------------------------------------------------------------------ reading
    def read_obs(self, name: str) -> pd.DataFrame:
        rec = self.dataset(name)
        with self.locator.open() as exp:
            tbl = exp.obs.read(
                coords=(slice(rec.joinid_start, rec.joinid_start + rec.n_cells - 1),),
                column_names=["soma_joinid", "obs_id", "dataset_id", "cell_type"],
            ).concat()
        return tbl.to_pandas().sort_values("soma_joinid").reset_index(drop=True)

    def read_rows(self, joinids: np.ndarray) -> sp.csr_matrix:
        """Cells (by soma_joinid, in the given order) x atlas genes, the values as stored
        (``data.normalize.normalized_rows`` gives them normalised)."""
        from scpretrain_dist.store.sources import read_run, runs, stack_runs

        joinids = np.asarray(joinids, dtype=np.int64)
        uniq = np.unique(joinids)
        starts, stops = runs(uniq)
        with self.locator.open(WHOLE_READ_CONFIG) as exp:
            n_genes = self._n_genes(exp)
            X = exp.ms[MEASUREMENT].X[LAYER]
            if len(starts) <= MAX_SLICE_READS:  # whole datasets, blocks: a slice query per run
                mat = stack_runs((read_run(X, a, b) for a, b in zip(starts.tolist(), stops.tolist())), n_genes)
            else:  # scattered cells: one point query
                tbl = X.read(coords=(uniq,)).tables().concat()
                rows = np.searchsorted(uniq, tbl["soma_dim_0"].to_numpy())
                data = tbl["soma_data"].to_numpy().astype(np.float32)
                mat = sp.csr_matrix((data, (rows, tbl["soma_dim_1"].to_numpy())), shape=(len(uniq), n_genes))
                mat.sum_duplicates()
        # every requested position, in the given order (a joinid asked twice comes twice)
        out = mat if len(uniq) == len(joinids) and (uniq == joinids).all() else mat[np.searchsorted(uniq, joinids)]
        return out.tocsr()

    def read_dataset(self, name: str) -> tuple[sp.csr_matrix, pd.DataFrame]:
        """A dataset's cells x atlas genes as stored, and its obs."""
        rec = self.dataset(name)
        return self.read_rows(rec.joinids), self.read_obs(name)
