"""The atlas store protocol, shared by the TileDB-SOMA and zarr backends.

An atlas is one gene space (upper-case symbols; human and mouse meet there), datasets appended to
it (each a contiguous range of cell ids, ``joinid``), a registry of those datasets and, per
dataset, which genes it measured. Every backend commits an append by writing the registry last,
so a failed append leaves nothing a reader can see. Ingest (reading and checking ``.h5ad``
inputs against the atlas), block checks and the registry records live here once; a backend
only stores arrays.

A backend is chosen by ``store.backend`` or, when that is ``auto``, by the URI: a ``.zarr``
path, or an existing zarr atlas, is zarr; anything else is SOMA.
"""

from __future__ import annotations

import base64
import json
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scpretrain_dist.catalog.entries import DatasetEntry
from scpretrain_dist.catalog.inputs import (
    UNKNOWN_LABEL,
    PreparedDataset,
    file_sha256,
    prepare_dataset,
)
from scpretrain_dist.config import RunConfig, UserError

REGISTRY_KEY = "scpretrain.datasets"
GENES_KEY = "scpretrain.genes."
ANNOTATIONS_KEY = "scpretrain.annotations"
OBS_COLUMNS = ["soma_joinid", "obs_id", "dataset_id", "cell_type"]
INGEST_BLOCK_CELLS = 4096
# a dataset sharing fewer of its genes than this with the rest of the atlas is refused (its
# names are not the atlas's gene symbols: another species, ids, a typo'd column); under
# LOW_OVERLAP it is accepted with a warning
MIN_OVERLAP = 0.05
LOW_OVERLAP = 0.5


class StoreError(UserError):
    """An input or store state that ingest or reading cannot accept."""


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


class Locator(Protocol):
    """Picklable pointer to an atlas, pinned to a version so every process reads the same cells.
    Pass a locator between processes, never an open handle."""

    uri: str
    timestamp_ms: int | None

    def pinned(self) -> Locator: ...

    def atlas(self) -> Atlas: ...


def pack_mask(mask: np.ndarray) -> str:
    return base64.b64encode(np.packbits(mask.astype(bool)).tobytes()).decode()


def unpack_mask(text: str, n: int) -> np.ndarray:
    """The mask over ``n`` genes (genes added after the dataset are False)."""
    bits = np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))[:n].astype(bool)
    mask = np.zeros(n, dtype=bool)
    mask[: bits.size] = bits
    return mask


def pipelined(items: Iterator, consume: Callable[[object], None], depth: int = 1) -> None:
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


def check_gene_overlap(prepared: list[PreparedDataset], atlas_genes: list[str], log) -> None:
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


def _streamed(p: PreparedDataset, index: dict[str, int], n_genes: int) -> StreamedDataset:
    """A prepared (in-memory) dataset as blocks in the atlas gene space."""
    cols = np.array([index[s] for s in p.symbols], dtype=np.int64)
    mask = np.zeros(n_genes, dtype=bool)
    mask[cols] = True

    def blocks():
        for lo in range(0, p.matrix.shape[0], INGEST_BLOCK_CELLS):
            part = p.matrix[lo : lo + INGEST_BLOCK_CELLS].tocoo()
            X = sp.csr_matrix((part.data.astype(np.float32), (part.row, cols[part.col])), shape=(part.shape[0], n_genes))
            hi = lo + part.shape[0]
            yield p.obs_ids[lo:hi], p.labels[lo:hi], X

    return StreamedDataset(
        name=p.entry.name, n_cells=p.matrix.shape[0], gene_mask=mask, blocks=blocks, value_type=p.value_type,
        species=p.species, tissue=p.tissue, technology=p.technology, label_key=p.label_key,
        source=str(p.entry.path), sha256=p.sha256, group=p.entry.group)


class Atlas(ABC):
    """Read and append to an atlas; open per use, pass ``locator`` between processes.

    A backend implements the storage (``_exists``, ``_create``, the registry and gene reads, the
    sorted row read, the block writer and the annotation columns); ingest and the checks are
    shared.
    """

    locator: Locator

    @property
    def uri(self) -> str:
        return self.locator.uri

    # ------------------------------------------------------------------ backend
    @abstractmethod
    def _exists(self) -> bool:
        """Whether an atlas of this backend is at the URI (an absent path or empty folder is not)."""

    @abstractmethod
    def _create(self) -> None:
        """Create an empty atlas where nothing is."""

    @abstractmethod
    def datasets(self) -> list[DatasetRecord]:
        """The committed datasets (at the locator's version), in joinid order."""

    @abstractmethod
    def genes(self) -> np.ndarray:
        """Gene symbols of the atlas gene space, by gene index."""

    @abstractmethod
    def _gene_mask_text(self, name: str) -> str | None: ...

    @abstractmethod
    def _read_sorted(self, joinids: np.ndarray) -> sp.csr_matrix:
        """Rows of sorted unique ``joinids`` x atlas genes, float32 CSR, values as stored."""

    @abstractmethod
    def _read_obs(self, lo: int, hi: int) -> pd.DataFrame:
        """obs_id and cell_type of cells [lo, hi)."""

    @abstractmethod
    def _write(self, genes: list[str], n_genes_before: int, n_cells_before: int,
               parts: list[tuple[StreamedDataset, Iterator]], records: Callable[[], list[DatasetRecord]]) -> None:
        """Grow the gene space to ``genes`` (from ``n_genes_before``) and the cells from the
        ``n_cells_before`` committed ones; per dataset write its blocks (``(joinid of the first
        cell, obs_ids, labels, CSR)``, checked; the iterator ends once all are) and its gene mask;
        then commit ``records()`` (every dataset, old and new) as the registry, last."""

    @abstractmethod
    def read_meta(self, key: str) -> str | None:
        """A text the atlas keeps beside its data (the annotation record)."""

    @abstractmethod
    def write_meta(self, key: str, value: str) -> None: ...

    # annotation columns: a label (text) and a confidence (float32) column per model version,
    # and optionally an embedding (cells x dim); a cell is annotated when its label is written
    @abstractmethod
    def obs_columns(self) -> list[str]: ...

    @abstractmethod
    def add_annotation_columns(self, label: str, confidence: str, embedding: str | None, n_cells: int,
                               dim: int) -> None:
        """Add the columns (and the embedding) missing; existing ones are kept as they are."""

    @abstractmethod
    def annotated(self, label: str, embedding: str | None, lo: int, n: int) -> np.ndarray:
        """Per cell of [lo, lo + n): label written (and the embedding, when named)."""

    @abstractmethod
    def write_annotations(self, lo: int, label: str, labels: np.ndarray, confidence: str, values: np.ndarray,
                          embedding: str | None, vectors: np.ndarray | None) -> None:
        """Cells [lo, lo + len(labels)): the embedding first, the labels last (the commit)."""

    @abstractmethod
    def embedding_path(self, name: str) -> str:
        """Where the embedding ``name`` lives inside the atlas (what users open)."""

    # ------------------------------------------------------------------ reading
    @property
    def n_genes(self) -> int:
        """Genes in the atlas gene space (a backend may know it without reading the symbols)."""
        return len(self.genes())

    def dataset(self, name: str) -> DatasetRecord:
        records = {r.name: r for r in self.datasets()}
        if name not in records:
            raise StoreError(
                f"dataset {name!r} is not in the atlas {self.uri}; it holds: {', '.join(records) or 'nothing'}"
            )
        return records[name]

    def dataset_gene_mask(self, name: str) -> np.ndarray:
        """Boolean mask over the atlas genes: which genes this dataset measured."""
        text = self._gene_mask_text(name)
        if text is None:
            raise StoreError(f"dataset {name!r} is not in the atlas {self.uri}")
        return unpack_mask(text, self.n_genes)

    def read_rows(self, joinids: np.ndarray) -> sp.csr_matrix:
        """Cells (by joinid, in the given order; one asked twice comes twice) x atlas genes, the
        values as stored (``data.normalize.normalized_rows`` gives them normalised)."""
        joinids = np.asarray(joinids, dtype=np.int64)
        uniq = np.unique(joinids)
        mat = self._read_sorted(uniq)
        out = mat if len(uniq) == len(joinids) and (uniq == joinids).all() else mat[np.searchsorted(uniq, joinids)]
        return out.tocsr()

    def read_obs(self, name: str) -> pd.DataFrame:
        """A dataset's cells: soma_joinid, obs_id, dataset_id, cell_type, in joinid order."""
        rec = self.dataset(name)
        obs = self._read_obs(rec.joinid_start, rec.joinid_start + rec.n_cells)
        obs.insert(0, "soma_joinid", rec.joinids)
        obs.insert(2, "dataset_id", rec.name)
        return obs[OBS_COLUMNS]

    def read_dataset(self, name: str) -> tuple[sp.csr_matrix, pd.DataFrame]:
        """A dataset's cells x atlas genes as stored, and its obs."""
        rec = self.dataset(name)
        return self.read_rows(rec.joinids), self.read_obs(name)

    def annotation_lock(self) -> Path | None:
        """The file one annotation writer holds (beside a local atlas); None for remote URIs."""
        return None if "://" in self.uri else Path(self.uri).with_name(Path(self.uri).name + ".annotate.lock")

    def annotations(self) -> dict:
        """Which model versions annotated which datasets (the record kept in the atlas)."""
        return json.loads(self.read_meta(ANNOTATIONS_KEY) or "{}")

    # ------------------------------------------------------------------ writing
    def _present(self, name: str, sha256: str, existing: dict[str, DatasetRecord], skipped: list, messages: list,
                 log) -> bool:
        """Whether dataset ``name`` is in the atlas already with this content (then it is skipped,
        and said); under the same name with other content it is refused."""
        if name not in existing:
            return False
        if sha256 and sha256 == existing[name].sha256:
            skipped.append(name)
            messages.append(f"dataset {name} is already in the atlas (same content); nothing to do")
            log(messages[-1])
            return True
        raise StoreError(f"dataset {name} is already in the atlas {self.uri} with other content (from "
                         f"{existing[name].source}); give the new data another name, or write to a new store")

    def ingest(self, entries: list[DatasetEntry], log=print) -> IngestReport:
        """Append ``.h5ad`` datasets, creating the atlas if nothing is at its path yet. All are
        read and validated before anything is written (or created); a dataset already present
        with the same content is skipped; with other content it is refused."""
        fresh = not self._exists()
        existing = {} if fresh else {r.name: r for r in self.datasets()}
        names = [e.name for e in entries]
        dups = {n for n in names if names.count(n) > 1}
        if dups:
            raise StoreError(f"the inputs name dataset(s) {sorted(dups)} more than once")
        prepared: list[PreparedDataset] = []
        skipped, messages = [], []
        by_content = {r.sha256: r.name for r in existing.values() if r.sha256}
        for entry in entries:
            digest = file_sha256(entry.path) if Path(entry.path).is_file() else ""
            if self._present(entry.name, digest, existing, skipped, messages, log):
                continue
            if digest and digest in by_content:
                raise StoreError(
                    f"dataset {entry.name} ({entry.path}) has the same content as dataset {by_content[digest]!r}, "
                    "already in the atlas or in these inputs (same sha256); ingesting it again would "
                    "duplicate its cells. Leave it out, or ingest it under its first name")
            prepared.append(prepare_dataset(entry, log=log))
            by_content[prepared[-1].sha256] = entry.name
        genes = [] if fresh else [str(g) for g in self.genes()]
        if not prepared:
            return IngestReport([], skipped, len(genes), len(genes), messages)
        check_gene_overlap(prepared, genes, log)
        index = {g: i for i, g in enumerate(genes)}
        for p in prepared:
            for s in p.symbols:
                if s not in index:
                    index[s] = len(genes)
                    genes.append(s)
        streamed = [_streamed(p, index, len(genes)) for p in prepared]
        report = self.append_streamed(genes, streamed, log=log)  # creates the atlas: every input is checked
        return IngestReport(report.added, skipped + report.skipped, report.n_genes_before, report.n_genes_after,
                            messages + report.messages)

    def append_streamed(self, genes: np.ndarray | list[str], datasets: list[StreamedDataset], log=print) -> IngestReport:
        """Append datasets that arrive block by block (an atlas larger than memory), creating the
        atlas if nothing is at its path yet.

        ``genes`` is the whole atlas gene space after the append; the atlas's current genes must
        be its prefix. The registry is written last, so a failure leaves the committed datasets
        exactly as they were. A dataset already present with the same ``sha256`` is skipped;
        with another, refused.
        """
        genes = [str(g) for g in genes]
        fresh = not self._exists()
        existing = {} if fresh else {r.name: r for r in self.datasets()}
        current = [] if fresh else [str(g) for g in self.genes()]
        if genes[: len(current)] != current:
            raise StoreError(
                f"the atlas {self.uri} has another gene space ({len(current)} genes) than the one "
                "being appended; write these datasets to a new store"
            )
        if len(set(genes)) != len(genes):
            raise StoreError("the gene symbols being appended are not unique")
        todo, skipped, messages = [], [], []
        for d in datasets:
            if self._present(d.name, d.sha256, existing, skipped, messages, log):
                continue
            if d.gene_mask.shape != (len(genes),):
                raise StoreError(f"dataset {d.name}: its gene mask does not cover the {len(genes)} atlas genes")
            todo.append(d)
        if not todo:
            return IngestReport([], skipped, len(current), len(current), messages)
        if fresh:
            self._create()
        n_genes = len(genes)
        records = list(existing.values())
        n_cells_before = sum(r.n_cells for r in records)
        starts = np.cumsum([n_cells_before] + [d.n_cells for d in todo])

        def checked(d: StreamedDataset, start: int) -> Iterator[tuple[int, np.ndarray, np.ndarray, sp.csr_matrix]]:
            """``d``'s blocks, each checked and canonical (sorted, unique genes per cell), with
            the joinid of its first cell; its record once the last block is written."""
            t0, done, types = time.perf_counter(), 0, set()
            for obs_ids, labels, values in d.blocks():
                n = values.shape[0]
                if n != len(obs_ids) or n != len(labels) or values.shape[1] != n_genes:
                    raise StoreError(f"dataset {d.name}: a block does not match its cells or the genes")
                values = sp.csr_matrix(values, dtype=np.float32)
                values.sum_duplicates()
                if values.nnz and (values.indices.min() < 0 or values.indices.max() >= n_genes):
                    raise StoreError(f"dataset {d.name}: a block has gene indices outside the atlas")
                types.update(np.unique(np.asarray(labels, dtype=str)).tolist())
                if done + n > d.n_cells:
                    raise StoreError(f"dataset {d.name} yields more than its {d.n_cells} cells")
                yield start + done, np.asarray(obs_ids, dtype=object), np.asarray(labels, dtype=object), values
                done += n
            if done != d.n_cells:
                raise StoreError(f"dataset {d.name} yielded {done} cells, not the {d.n_cells} announced")
            rec = DatasetRecord(
                name=d.name, joinid_start=start, n_cells=d.n_cells, n_genes=int(d.gene_mask.sum()),
                value_type=d.value_type, species=d.species, tissue=d.tissue, technology=d.technology,
                label_key=d.label_key, n_types=len(types - {UNKNOWN_LABEL, "nan", ""}), source=d.source,
                sha256=d.sha256, ingested_at=time.strftime("%Y-%m-%dT%H:%M:%S"), group=d.group)
            records.append(rec)
            messages.append(f"ingested {d.name}: {d.n_cells} cells, {rec.n_genes} genes, {d.value_type}, "
                            f"{rec.n_types} cell types ({time.perf_counter() - t0:.1f}s)")
            log(messages[-1])

        self._write(genes, len(current), n_cells_before, [(d, checked(d, int(s))) for d, s in zip(todo, starts)],
                    lambda: records)
        return IngestReport([d.name for d in todo], skipped, len(current), n_genes, messages)


def backend_of(uri: str, backend: str = "auto") -> str:
    """``soma`` or ``zarr``: the one asked for, else by the URI (``.zarr``, or a zarr atlas there)."""
    if backend != "auto":
        return backend
    path = Path(uri.rstrip("/"))
    if path.suffix == ".zarr" or (path.is_dir() and (path / "zarr.json").is_file()):
        return "zarr"
    return "soma"


def open_atlas(uri: str | Path, backend: str = "auto", timestamp_ms: int | None = None) -> Atlas:
    """The atlas at ``uri`` (nothing is read yet; it may not exist)."""
    uri = str(uri)
    if backend_of(uri, backend) == "zarr":
        from scpretrain_dist.store.zarr_csr import ZarrLocator

        return ZarrLocator(uri, timestamp_ms).atlas()
    from scpretrain_dist.store.soma import SomaLocator

    return SomaLocator(uri, timestamp_ms).atlas()


def atlas_for(cfg: RunConfig, uri: str | Path | None = None) -> Atlas:
    """The run's atlas: ``uri`` (default ``store.uri``, or the work dir's) of ``store.backend``;
    an experiment read in place with the ``store`` column mapping."""
    uri = str(uri or cfg.store_uri)
    if cfg.store.backend == "experiment":
        from scpretrain_dist.store.experiment import ExperimentLocator

        return ExperimentLocator(uri, None, cfg.store, str(Path(cfg.work_dir).resolve() / "atlas-index")).atlas()
    return open_atlas(uri, cfg.store.backend)


def copy_atlas(source: Atlas, out_uri: str | Path, datasets: list[str] | None = None, backend: str = "zarr",
               block_cells: int = 32768, log=print):
    """Copy datasets of an atlas (all by default) into another atlas (a zarr one by default),
    block by block: values as stored, each dataset's value type, gene mask and registry entry
    kept; cells renumbered contiguously in the copy."""
    records = {r.name: r for r in source.datasets()}
    names = list(records) if datasets is None else list(datasets)
    missing = [n for n in names if n not in records]
    if missing:
        raise StoreError(f"cannot export {missing}: not in the atlas {source.uri} (it holds {', '.join(records)})")

    def blocks(rec: DatasetRecord):
        def gen():
            obs = source.read_obs(rec.name)
            for lo in range(0, rec.n_cells, block_cells):
                hi = min(lo + block_cells, rec.n_cells)
                X = source.read_rows(np.arange(rec.joinid_start + lo, rec.joinid_start + hi, dtype=np.int64))
                yield obs["obs_id"].to_numpy(dtype=object)[lo:hi], obs["cell_type"].to_numpy(dtype=object)[lo:hi], X
        return gen

    streamed = [
        StreamedDataset(
            name=r.name, n_cells=r.n_cells, gene_mask=source.dataset_gene_mask(r.name), blocks=blocks(r),
            value_type=r.value_type, species=r.species, tissue=r.tissue, technology=r.technology,
            label_key=r.label_key, source=r.source, sha256=r.sha256, group=r.group,
        )
        for r in (records[n] for n in names)
    ]
    return open_atlas(out_uri, backend).append_streamed(source.genes(), streamed, log=log)
