"""Batch annotation of whole datasets with a registered model: the atlas (obs columns named after
the model version, in either backend) or an ``.h5ad`` file (scanpy-style ``obs``/``obsm`` entries).

Blocks of cells stream through a pool of Ray actors. The driver loads the model from the
registry and sends it to each actor once; an actor reads its blocks itself from a locator (the
store URI pinned to a version, or a file path), so only predictions travel back; the driver is
the only writer.

Resuming: in the atlas a block is finished when its label column is filled (written after its
embedding and confidence), so the data is its own progress record; for an ``.h5ad`` finished
blocks are files in a folder beside the output, and the file itself is replaced (atomically) only once every block is done. A rerun skips finished blocks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from scpretrain_dist.catalog.entries import read_h5ad
from scpretrain_dist.config import RunConfig, UserError
from scpretrain_dist.data.normalize import compile_keep_columns, keep_columns
from scpretrain_dist.store.atlas import ANNOTATIONS_KEY, Atlas, Locator, StoreError, atlas_for
from scpretrain_dist.store.files import exclusive, save_npz_whole, write_json_whole
from scpretrain_dist.tracking.registry import ModelFetch, ModelRef

# mlflow warns, on defining the pyfunc class, that its predict has no type hints
with warnings.catch_warnings(record=True):
    from scpretrain_dist.serve.pyfunc import Annotator, InputError, _check_values

H5AD_LABEL = "scpretrain_label"
H5AD_CONFIDENCE = "scpretrain_confidence"
H5AD_EMBEDDING = "X_scpretrain"
H5AD_UNS = "scpretrain_annotation"
# an --out with one of these suffixes gets a table of the calls (one row per cell, keyed by the
# input's obs names) instead of an annotated copy of the whole file
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")
# predicting threads of an in-process run at most (each holds a block or two in memory)
MAX_THREADS = 8


class AnnotateError(UserError):
    """A model, input or output that batch annotation cannot use; the message says what to do."""


# ---------------------------------------------------------------------------- the model
def load_annotator(fetch: ModelFetch) -> Annotator:
    """The fetched version's annotator, built from its artifacts (weights and gene list) by the
    current code, so models logged by older releases annotate with the same forward pass as new
    ones. The fetch's folder is removed once they are read."""
    ref, arts = fetch.result()
    try:
        if "weights" not in arts or "meta" not in arts:
            raise AnnotateError(f"{ref.uri} is not an scpretrain annotator (no weights/meta artifacts)")
        return Annotator(arts["weights"], arts["meta"])
    finally:
        fetch.close()


def _as_fetch(model: str | ModelFetch, cfg: RunConfig) -> ModelFetch:
    """``model``: a model URI, or its fetch already under way (the CLI starts it first). The
    compiled gene selection loads meanwhile, in a thread (this one mostly waits for the fetch)."""
    import threading

    threading.Thread(target=compile_keep_columns, name="compile", daemon=True).start()
    return model if isinstance(model, ModelFetch) else ModelFetch(model, cfg.tracking_uri)


# ---------------------------------------------------------------------------- blocks
@dataclass(frozen=True)
class StoreSource:
    """One atlas dataset, by locator: actors open the store themselves."""

    locator: Locator
    dataset: str
    joinid_start: int
    value_type: str
    gene_model: bool | None = None  # whether a pooled gene model joins the calls (see check_source)


@dataclass(frozen=True)
class H5adSource:
    path: str
    value_type: str
    gene_model: bool | None = None


@dataclass(frozen=True)
class Block:
    source: StoreSource | H5adSource
    index: int  # within its dataset or file
    start: int  # first row, counted from the dataset's (file's) first cell
    stop: int

    @property
    def n_cells(self) -> int:
        return self.stop - self.start


@dataclass
class BlockResult:
    block: Block
    codes: np.ndarray  # int32 index into the model's classes
    confidence: np.ndarray  # float32
    embedding: np.ndarray | None
    seconds: float


def make_blocks(source: StoreSource | H5adSource, n_cells: int, block_size: int) -> list[Block]:
    return [Block(source, i, lo, min(lo + block_size, n_cells)) for i, lo in enumerate(range(0, n_cells, block_size))]


class _CsrRows:
    """Row ranges of an ``.h5ad`` whose X is a CSR group, read straight into ``slots`` buffers
    that are used in turn: a block's arrays stay valid until ``slots`` more blocks are read. Fresh
    arrays for every block cost as much again as the read (page faults on new memory; measured in
    docs/benchmarks.md)."""

    def __init__(self, group, slots: int):
        import h5py

        self.shape = tuple(int(n) for n in group.attrs["shape"])
        # no chunk cache: HDF5 then reads whole chunks straight into the buffer, not through it
        dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
        dapl.set_chunk_cache(0, 0, 1.0)
        self._data, self._indices = (h5py.Dataset(h5py.h5d.open(group.id, name, dapl=dapl)) for name in (b"data", b"indices"))
        self._indptr = group["indptr"][:].astype(np.int64)
        self._slots: list = [None] * slots
        self._next = 0

    @staticmethod
    def of(group, slots: int) -> _CsrRows | None:
        """For a CSR X; None for anything else (dense, CSC), which anndata reads."""
        kind = group.attrs.get("encoding-type", group.attrs.get("h5sparse_format"))
        if isinstance(kind, bytes):
            kind = kind.decode()
        return _CsrRows(group, slots) if kind in ("csr_matrix", "csr") and "shape" in group.attrs else None

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        lo, hi = int(self._indptr[start]), int(self._indptr[stop])
        k = self._next
        self._next = (k + 1) % len(self._slots)
        buf = self._slots[k]
        if buf is None or buf[0].size < hi - lo:
            size = int(1.25 * (hi - lo))
            buf = self._slots[k] = (np.empty(size, self._data.dtype), np.empty(size, self._indices.dtype))
        data, indices = buf[0][: hi - lo], buf[1][: hi - lo]
        if hi > lo:
            self._data.read_direct(data, np.s_[lo:hi])
            self._indices.read_direct(indices, np.s_[lo:hi])
        return sp.csr_matrix((data, indices, self._indptr[start : stop + 1] - lo), shape=(stop - start, self.shape[1]))


class BlockReader:
    """Reads blocks' raw values and gene names; keeps one open handle per file and one gene
    list per dataset for the life of the worker. ``slots``: how many blocks read from an
    ``.h5ad`` may be in use at once (their buffers are reused after that)."""

    def __init__(self, slots: int = 1):
        self._datasets: dict = {}
        self._files: dict = {}
        self._slots = slots

    def read(self, block: Block) -> tuple[sp.csr_matrix | np.ndarray, np.ndarray]:
        src = block.source
        if isinstance(src, StoreSource):
            key = (src.locator, src.dataset)
            if key not in self._datasets:
                store = src.locator.atlas()
                mask = store.dataset_gene_mask(src.dataset)
                # the dataset's genes, renumbered in atlas order; None: every atlas gene, no copy
                cols = None if mask.all() else np.where(mask, np.cumsum(mask) - 1, -1)
                self._datasets[key] = (store, cols, store.genes() if cols is None else store.genes()[mask])
            store, cols, genes = self._datasets[key]
            ids = np.arange(src.joinid_start + block.start, src.joinid_start + block.stop, dtype=np.int64)
            X = store.read_rows(ids)
            return (X if cols is None else keep_columns(X, cols, len(genes))), genes
        if src.path not in self._files:
            self._files[src.path] = self._open_h5ad(src.path)
        read, genes = self._files[src.path]
        return read(block.start, block.stop), genes

    def _open_h5ad(self, path: str) -> tuple[Callable[[int, int], sp.csr_matrix | np.ndarray], np.ndarray]:
        """A reader of ``path``'s row ranges, and its gene names. A CSR X is read with h5py and
        only var with anndata: anndata's backed open would read all of obs again (0.3 s for
        500k cells), which ``annotate_h5ad`` has read once already."""
        import anndata as ad
        import h5py

        f = h5py.File(path, "r")
        # (a file older than anndata's element encodings, anndata 0.7, is read by anndata whole)
        rows = _CsrRows.of(f["X"], self._slots) if "encoding-type" in f["var"].attrs else None
        if rows is not None:
            from anndata.io import read_elem

            return rows.read, np.asarray(read_elem(f["var"]).index.astype(str))
        f.close()  # dense or CSC: anndata reads it
        adata = ad.read_h5ad(path, backed="r")
        return (lambda start, stop: adata.X[start:stop]), np.asarray(adata.var_names.astype(str))


def annotate_block(annotator: Annotator, reader: BlockReader, block: Block, embedding: bool) -> BlockResult:
    """The unit of work: read one block, align its genes, predict."""
    t0 = time.perf_counter()
    X, genes = reader.read(block)
    return _predict_block(annotator, block, X, genes, embedding, t0)


def _predict_block(annotator: Annotator, block: Block, X, genes, embedding: bool, t0: float) -> BlockResult:
    p = annotator.predict_matrix(X, genes, block.source.value_type, embedding, merge_repeats=True,
                                 gene_model=block.source.gene_model)
    return BlockResult(block, p.codes.astype(np.int32), p.confidence, p.embedding, time.perf_counter() - t0)


# cells of a dataset that a pooled gene model is checked on, in runs spread over the dataset
GENE_MODEL_SAMPLE, GENE_MODEL_SAMPLE_RUNS = 2_000, 20


def check_source(annotator: Annotator, source: StoreSource | H5adSource, n_cells: int, log,
                 reader: BlockReader | None = None):
    """``source`` with its gene model decided once for all its cells: a model with a pooled gene
    model (``finetune.gene_model``) checks it on up to ``GENE_MODEL_SAMPLE`` of them, spread
    over the dataset (:meth:`~scpretrain_dist.model.networks.CellTypeClassifier.check_gene_model`),
    and the verdict ("gene model ...") or None. ``reader``: one to share between sources (its
    open store)."""
    if not annotator.model.pooled:
        return source, None
    if n_cells <= GENE_MODEL_SAMPLE:
        runs = [(0, n_cells)]
    else:
        size = GENE_MODEL_SAMPLE // GENE_MODEL_SAMPLE_RUNS
        runs = [(int(a), int(a) + size) for a in np.linspace(0, n_cells - size, GENE_MODEL_SAMPLE_RUNS)]
    reader, parts = reader or BlockReader(), []
    for lo, hi in runs:
        block = Block(source, -1, lo, hi)
        with _named(block):
            X, genes = reader.read(block)
        parts.append(sp.csr_matrix(X, copy=True))  # (the reader reuses its buffers)
    block = Block(source, -1, 0, n_cells)
    with _named(block):
        check = annotator.check_gene_model(sp.vstack(parts, format="csr"), genes, source.value_type)
    name = source.dataset if isinstance(source, StoreSource) else source.path
    if not check.used:
        log(f"annotate: {name}: {check.describe()}; calls by the network alone")
    return dataclasses.replace(source, gene_model=check.used), check.describe()


class _BlockWorker:
    """Ray actor body: the driver's model (sent once through Ray's object store, so workers
    need no access to the registry and never import MLflow), then blocks on request."""

    def __init__(self, annotator: Annotator):
        self.annotator = annotator
        self.reader = BlockReader()

    def run(self, block: Block, embedding: bool) -> BlockResult:
        return annotate_block(self.annotator, self.reader, block, embedding)


def _where(b: Block) -> str:
    src = b.source
    name = src.dataset if isinstance(src, StoreSource) else src.path
    return f"{name}, cells {b.start}..{b.stop - 1}"


def stream_results(blocks: list[Block], annotator: Annotator, embedding: bool,
                   cfg: RunConfig, workers: int) -> Iterator[BlockResult]:
    """Results as blocks finish (any order), with ``annotator``: ``workers = 0``: in this
    process; else a pool of Ray actors, two blocks in flight per actor. A pool worker that
    dies is restarted and its blocks retried (``annotate.worker_restarts``); an error a block
    raises (bad input) is not retried."""
    if not blocks:
        return
    if workers <= 0:
        from scpretrain_dist.runtime import intra_op_threads

        cpus = len(os.sched_getaffinity(0))
        threads = cfg.annotate.threads or min(cpus, MAX_THREADS)
        # the cores shared out: each thread's torch products on cpus / threads of them
        with intra_op_threads(max(1, cpus // threads)):
            yield from _in_process(blocks, annotator, embedding, threads)
        return
    import ray

    from scpretrain_dist.runtime import init_ray, on_actors, restartable, shutdown_ray

    started = not ray.is_initialized()
    init_ray(cfg)
    actors = []
    try:
        worker = restartable(_BlockWorker, cfg.annotate.worker_restarts, num_cpus=cfg.annotate.cpus_per_worker)
        n_actors = min(workers, len(blocks))
        model = ray.put(annotator)
        actors = [worker.remote(model) for _ in range(n_actors)]
        for _, block, done in on_actors(actors, blocks, lambda actor, b: actor.run.remote(b, embedding), per_actor=2):
            try:
                res = ray.get(done)
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, (InputError, StoreError, AnnotateError)):
                    raise AnnotateError(f"{_where(block)}: {cause}") from None
                raise
            except ray.exceptions.ActorDiedError as e:
                raise AnnotateError(
                    f"{_where(block)}: an annotation worker died after {max(0, cfg.annotate.worker_restarts)} restart(s) "
                    f"(annotate.worker_restarts); finished blocks are kept, rerun the same command to resume. "
                    f"Ray said: {str(e).splitlines()[0]}") from None
            yield res
    finally:
        for a in actors:
            ray.kill(a)
        if started:
            shutdown_ray()


@contextmanager
def _named(block: Block):
    """A block's bad input (or unreadable store) as an AnnotateError that says which cells."""
    try:
        yield
    except (InputError, StoreError) as e:
        raise AnnotateError(f"{_where(block)}: {e}") from None


def _in_process(blocks: list[Block], annotator: Annotator, embedding: bool, threads: int) -> Iterator[BlockResult]:
    """Results in block order: this thread reads the blocks, in order (one open file), while
    ``threads`` threads predict them (numpy and torch release the GIL in their loops)."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    reader = BlockReader(slots=threads + 1)  # the blocks being predicted, and the one read next
    pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="annotate")
    running: deque = deque()

    def result():
        block, fut = running.popleft()
        with _named(block):
            return fut.result()

    try:
        for b in blocks:
            t0 = time.perf_counter()
            with _named(b):
                X, genes = reader.read(b)
            running.append((b, pool.submit(_predict_block, annotator, b, X, genes, embedding, t0)))
            while len(running) > threads:  # one block read ahead per thread, no more
                yield result()
        while running:
            yield result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _choose_workers(cfg: RunConfig, workers: int | None, cells: int, log) -> int:
    """``workers`` as given; else the actor pool (``annotate.workers``) only where there is a Ray
    cluster to spread over (``ray.address``, ``RAY_ADDRESS`` as under ``ray job submit``, or a
    Ray already running) and the job has at least ``annotate.ray_min_cells`` cells. On one
    machine the in-process forward pass already uses every core, and starting Ray and actors
    costs seconds that a pool on the same cores never wins back (docs/annotation.md)."""
    if workers is not None:
        return workers
    if cfg.annotate.workers <= 0:
        return 0
    # a Ray this process runs has imported ray already: asking needs no import (a quarter second)
    ray = sys.modules.get("ray")
    if not (cfg.ray.address or os.environ.get("RAY_ADDRESS") or (ray is not None and ray.is_initialized())):
        log("annotate: no Ray cluster to spread over (no ray.address, RAY_ADDRESS or running Ray): in this process, "
            "without starting Ray; --workers N uses the actor pool regardless")
        return 0
    if cells < cfg.annotate.ray_min_cells:
        log(f"annotate: {cells} cells to do (< annotate.ray_min_cells = {cfg.annotate.ray_min_cells}): "
            "in this process, without starting actors; --workers N uses the actor pool regardless")
        return 0
    return cfg.annotate.workers


def _progress(total: int, initial: int, desc: str, show: bool | None):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="cells", desc=desc, disable=None if show is None else not show,
                smoothing=0.1, dynamic_ncols=True)


@dataclass
class AnnotateReport:
    model_uri: str
    target: str  # store URI or output file
    columns: dict[str, str]  # what was written where
    n_cells: int
    blocks_total: int
    blocks_computed: int
    blocks_skipped: int
    cells_computed: int
    seconds: float
    datasets: list[str] = field(default_factory=list)
    gene_overlap: dict[str, float] = field(default_factory=dict)
    gene_model: dict[str, str] = field(default_factory=dict)  # a pooled gene model's verdict per dataset

    @property
    def cells_per_second(self) -> float:
        """Cells annotated by this run per second of its wall time (start-up included)."""
        return self.cells_computed / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------- the atlas
@contextmanager
def _store_lock(store: Atlas):
    """One annotation writer per store: two runs writing at once could lose each other's
    blocks or record. Local stores only (a file beside it, or beside its annotations)."""
    lock = store.annotation_lock()
    if lock is None:
        yield
        return
    with exclusive(lock, refuse=lambda e: AnnotateError(
            f"another `scpretrain annotate` ({e.holder}) is writing to {store.uri} (lock {e.lock_path}); wait for it "
            "to finish")):
        yield


def _prepare_store_columns(store: Atlas, ref: ModelRef, embedding: bool, dim: int, n_cells: int) -> None:
    """Add this version's obs columns (and embedding) unless it already owns them; refuse when
    another model's record holds these names."""
    record = store.annotations().get(ref.prefix)
    names = set(store.obs_columns())
    mine = {ref.label_column, ref.confidence_column}
    if record is not None and (record.get("model") != ref.name or int(record.get("version", -1)) != ref.version):
        raise AnnotateError(
            f"obs columns {sorted(mine)} of {store.uri} belong to {record.get('model')} v{record.get('version')}; "
            "refusing to overwrite them (rename the registered model)"
        )
    if record is None and names & mine:
        raise AnnotateError(f"obs of {store.uri} already has column(s) {sorted(names & mine)} that no annotation "
                            "record accounts for; refusing to overwrite them")
    store.add_annotation_columns(ref.label_column, ref.confidence_column, ref.prefix if embedding else None,
                                 n_cells, dim)


def _write_record(store: Atlas, ref: ModelRef, embedding: bool, updates: dict[str, dict]) -> None:
    allrec = store.annotations()
    rec = allrec.setdefault(ref.prefix, {
        "model": ref.name, "version": ref.version, "model_uri": ref.uri, "run_id": ref.run_id,
        "tracking_uri": ref.tracking_uri,
        "columns": {"label": ref.label_column, "confidence": ref.confidence_column}, "datasets": {},
    })
    if embedding:
        rec["embedding"] = store.embedding_path(ref.prefix)
    for name, info in updates.items():
        rec["datasets"][name] = {**rec["datasets"].get(name, {}), **info}
    store.write_meta(ANNOTATIONS_KEY, json.dumps(allrec))


def _write_store_block(store: Atlas, ref: ModelRef, res: BlockResult, names: Callable) -> None:
    src = res.block.source
    store.write_annotations(src.joinid_start + res.block.start, ref.label_column, names(res.codes),
                            ref.confidence_column, res.confidence, ref.prefix if res.embedding is not None else None,
                            res.embedding)


def annotate_store(
    cfg: RunConfig,
    model_uri: str | ModelFetch,
    store_uri: str,
    datasets: list[str] | None = None,
    embedding: bool = False,
    block_size: int | None = None,
    workers: int | None = None,
    on_block: Callable[[BlockResult], None] | None = None,
    progress: bool | None = None,
    log=print,
) -> AnnotateReport:
    """Annotate datasets of the atlas (all by default) into obs columns named after the model
    version; ``on_block`` is called after each block is durably written."""
    t0 = time.perf_counter()
    block_size = block_size or cfg.annotate.block_size
    if block_size < 1:
        raise AnnotateError(f"block size must be positive, got {block_size}")
    fetch = _as_fetch(model_uri, cfg)
    ref = fetch.ref
    store = atlas_for(cfg, str(Path(store_uri).resolve()) if "://" not in store_uri else store_uri)
    records = {r.name: r for r in store.datasets()}
    names = list(datasets) if datasets else list(records)
    unknown = [d for d in names if d not in records]
    if unknown:
        raise StoreError(f"dataset(s) {unknown} are not in the atlas {store.uri}; it holds: {', '.join(records) or 'nothing'}")
    annotator = load_annotator(fetch)
    genes = store.genes()
    overlaps = {}
    for d in names:  # every check before the first write
        try:
            overlaps[d] = annotator.check_genes(genes[store.dataset_gene_mask(d)], merge_repeats=True)
        except InputError as e:
            raise AnnotateError(f"dataset {d}: {e}") from None
    n_atlas = sum(r.n_cells for r in records.values())
    dim = annotator.embedding_dim
    locator = store.locator.pinned()
    with _store_lock(store):
        _prepare_store_columns(store, ref, embedding, dim, n_atlas)
        prior = store.annotations().get(ref.prefix, {}).get("datasets", {})
        blocks, pending, done_cells = [], [], 0
        sizes = {}
        for d in names:
            rec = records[d]
            bs = block_size
            if prior.get(d, {}).get("status") == "running" and prior[d].get("block_size") not in (None, bs):
                bs = int(prior[d]["block_size"])
                log(f"annotate: resuming {d} with its block size {bs}")
            sizes[d] = bs
            finished = store.annotated(ref.label_column, ref.prefix if embedding else None, rec.joinid_start,
                                       rec.n_cells)
            done_cells += int(finished.sum())
            for b in make_blocks(StoreSource(locator, d, rec.joinid_start, rec.value_type), rec.n_cells, bs):
                blocks.append(b)
                if not finished[b.start : b.stop].all():
                    pending.append(b)
        left = {d: sum(1 for b in pending if b.source.dataset == d) for d in names}
        verdicts, sources, reader = {}, {}, BlockReader()
        for d in names:  # a pooled gene model, checked on each dataset that has cells to annotate
            if left[d]:
                src = next(b.source for b in pending if b.source.dataset == d)
                sources[d], verdict = check_source(annotator, src, records[d].n_cells, log, reader)
                if verdict:
                    verdicts[d] = verdict
        pending = [dataclasses.replace(b, source=sources[b.source.dataset]) for b in pending]
        now = time.strftime("%Y-%m-%dT%H:%M:%S")
        _write_record(store, ref, embedding, {
            d: {"status": "running" if left[d] else "complete", "block_size": sizes[d], "cells": records[d].n_cells,
                "gene_overlap": round(overlaps[d], 4), **({"gene_model": verdicts[d]} if d in verdicts else {}),
                **({} if left[d] or d in prior else {"finished_at": now})}
            for d in names})
        total = sum(records[d].n_cells for d in names)
        log(f"annotate: {ref.uri} ({fetch.requested}) -> {store.uri}: {len(names)} dataset(s), {total} cells, "
            f"{len(pending)} of {len(blocks)} blocks to do; columns {ref.label_column}, {ref.confidence_column}"
            + (f", embedding {store.embedding_path(ref.prefix)}" if embedding else ""))
        computed = 0
        bar = _progress(total, done_cells, "annotate", progress)
        try:
            workers = _choose_workers(cfg, workers, sum(b.n_cells for b in pending), log)
            with closing(stream_results(pending, annotator, embedding, cfg, workers)) as results:
                for res in results:
                    _write_store_block(store, ref, res, annotator.label_names)
                    computed += 1
                    bar.update(res.block.n_cells)
                    d = res.block.source.dataset
                    left[d] -= 1
                    if left[d] == 0:
                        _write_record(store, ref, embedding, {d: {"status": "complete",
                                                                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}})
                    if on_block is not None:
                        on_block(res)
        finally:
            bar.close()
    cols = {"label": f"obs.{ref.label_column}", "confidence": f"obs.{ref.confidence_column}"}
    if embedding:
        cols["embedding"] = store.embedding_path(ref.prefix)
    return AnnotateReport(ref.uri, store.uri, cols, total, len(blocks), computed, len(blocks) - len(pending),
                          sum(b.n_cells for b in pending), time.perf_counter() - t0, names, overlaps, verdicts)


# ---------------------------------------------------------------------------- .h5ad files
def output_path(path: Path, out: str | Path | None, in_place: bool) -> Path:
    """Where the annotated file goes, checked before any work: the input itself only with
    ``in_place`` (and when it may be written), else a new file that does not exist yet."""
    if not path.is_file():
        raise AnnotateError(f"--h5ad {path} does not exist" if not path.exists() else f"--h5ad {path} is not a file")
    if in_place:
        # the permission bits too: a superuser may write anything, but a file made read-only says "keep"
        if (not path.stat().st_mode & 0o222 or not os.access(path, os.R_OK | os.W_OK)
                or not os.access(path.resolve().parent, os.W_OK | os.X_OK)):
            raise AnnotateError(f"--in-place: {path} (or its folder) is read-only; make it writable, or leave out "
                                "--in-place to write an annotated copy")
        return path
    out = Path(out) if out else path.with_name(f"{path.stem}.annotated.h5ad")
    if out.exists() and out.resolve() == path.resolve():
        raise AnnotateError(f"--out {out} is the input; pass --in-place to add the annotation to the input itself")
    if out.exists():
        raise AnnotateError(f"{out} already exists; choose another --out, remove it, or pass --in-place to "
                            "annotate the input itself")
    folder = out.resolve().parent
    while not folder.exists():
        folder = folder.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise AnnotateError(f"cannot write {out}: {folder} is read-only; choose another --out")
    return out


def _read_manifest(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except (ValueError, OSError):  # a damaged record of our own: start over
        return None


def _file_identity(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def annotate_h5ad(
    cfg: RunConfig,
    model_uri: str | ModelFetch,
    path: str | Path,
    out: str | Path | None = None,
    embedding: bool = False,
    block_size: int | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    in_place: bool = False,
    on_block: Callable[[BlockResult], None] | None = None,
    progress: bool | None = None,
    log=print,
) -> AnnotateReport:
    """Annotate every cell of an ``.h5ad``: ``obs['scpretrain_label']``,
    ``obs['scpretrain_confidence']`` (and ``obsm['X_scpretrain']``), written to a copy, ``out``
    (default ``<input>.annotated.h5ad``), or with ``in_place`` into the input itself (replaced in
    one rename at the end, its permissions kept). An ``out`` ending in ``.csv``, ``.tsv`` or
    ``.parquet`` gets a table of the calls instead (``cell``: the obs name, then the same
    entries), without copying the file. The input is otherwise never changed.

    Finished blocks wait in ``<out>.annotate-progress/``; a rerun picks them up."""
    import h5py

    t0 = time.perf_counter()
    block_size = block_size or cfg.annotate.block_size
    if block_size < 1:
        raise AnnotateError(f"--block-size {block_size}: give a positive number of cells per block")
    path = Path(path)
    out = output_path(path, out, in_place)
    fetch = _as_fetch(model_uri, cfg)
    adata = read_h5ad(path, "--h5ad", backed="r")
    n_cells, genes = adata.n_obs, np.asarray(adata.var_names.astype(str))
    clash = [c for c in (H5AD_LABEL, H5AD_CONFIDENCE) if c in adata.obs] + \
            ([H5AD_EMBEDDING] if H5AD_EMBEDDING in adata.obsm else [])
    if n_cells == 0:
        adata.file.close()
        raise AnnotateError(f"{path} holds no cells")
    table = out.suffix.lower() in TABLE_SUFFIXES
    if clash and not overwrite and not table:
        adata.file.close()
        raise AnnotateError(f"{path} already has {clash}; pass --overwrite to replace them or --out to write a new file")
    cell_names = np.asarray(adata.obs_names.astype(str)) if table else None
    try:
        annotator = load_annotator(fetch)  # (fetched meanwhile)
        overlap = annotator.check_genes(genes, merge_repeats=True)
        probe = annotator.gene_map(genes, merge_repeats=True)
        # the value type, once for the file, from the model's genes in its first cells
        first = sp.csr_matrix(adata.X[: min(n_cells, 2_000)])
        values = first.data[probe.row[first.indices] >= 0]
        _check_values(values)
        from scpretrain_dist.catalog.values import detect_value_type

        value_type = detect_value_type(values)
    except InputError as e:
        raise AnnotateError(f"{path}: {e}") from None
    finally:
        adata.file.close()
    ref = fetch.ref
    src, verdict = check_source(annotator, H5adSource(str(path.resolve()), value_type), n_cells, log)
    blocks = make_blocks(src, n_cells, block_size)
    progress_dir = out.with_name(out.name + ".annotate-progress")
    manifest = {"model_uri": ref.uri, "input": _file_identity(path), "n_cells": n_cells,
                "block_size": block_size, "embedding": embedding, "value_type": value_type,
                **({"gene_model": src.gene_model} if verdict else {})}
    mf = progress_dir / "manifest.json"
    old = _read_manifest(mf)
    if old is not None and old != manifest:
        diff = sorted(k for k in manifest if old.get(k) != manifest[k])
        if diff == ["block_size"] and isinstance(old.get("block_size"), int) and old["block_size"] >= 1:
            manifest["block_size"] = block_size = old["block_size"]  # the same work, cut as it was
            blocks = make_blocks(src, n_cells, block_size)
            log(f"annotate: resuming {progress_dir} with its block size {block_size}")
        else:  # finished blocks of another input, model or setting: of no use to this run
            log(f"annotate: {progress_dir} holds an unfinished run that differs in {diff}; starting over")
            shutil.rmtree(progress_dir)
            old = None
    if old is None:
        progress_dir.mkdir(parents=True, exist_ok=True)
        write_json_whole(mf, manifest, indent=None)

    def block_file(b: Block) -> Path:
        return progress_dir / f"block_{b.index:06d}.npz"

    pending = [b for b in blocks if not block_file(b).exists()]
    log(f"annotate: {ref.uri} ({fetch.requested}) -> {out}: {n_cells} cells, {len(genes)} genes "
        f"({overlap:.1%} of the model's), {value_type}; {len(pending)} of {len(blocks)} blocks to do")
    bar = _progress(n_cells, sum(b.n_cells for b in blocks if b not in pending), "annotate", progress)
    computed = 0
    try:
        workers = _choose_workers(cfg, workers, sum(b.n_cells for b in pending), log)
        with closing(stream_results(pending, annotator, embedding, cfg, workers)) as results:
            for res in results:
                arrays = {"codes": res.codes, "confidence": res.confidence}
                if res.embedding is not None:
                    arrays["embedding"] = res.embedding
                save_npz_whole(block_file(res.block), **arrays)
                computed += 1
                bar.update(res.block.n_cells)
                if on_block is not None:
                    on_block(res)
    except AnnotateError:
        if not any(progress_dir.glob("block_*.npz")):  # bad input before any block finished: nothing to keep
            shutil.rmtree(progress_dir, ignore_errors=True)
        raise
    finally:
        bar.close()

    codes = np.empty(n_cells, np.int32)
    conf = np.empty(n_cells, np.float32)
    emb = None
    for b in blocks:
        with np.load(block_file(b)) as z:
            codes[b.start : b.stop] = z["codes"]
            conf[b.start : b.stop] = z["confidence"]
            if embedding:
                if emb is None:
                    emb = np.empty((n_cells, z["embedding"].shape[1]), np.float32)
                emb[b.start : b.stop] = z["embedding"]
    info = {"model": ref.name, "version": ref.version, "model_uri": ref.uri, "requested": fetch.requested,
            "run_id": ref.run_id, "gene_overlap": overlap, "value_type": value_type,
            **({"gene_model": verdict} if verdict else {}), "annotated_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if table:
        _write_table(out, cell_names, annotator.classes, annotator.unassigned, codes, conf, emb)
        cols = {"label": H5AD_LABEL, "confidence": H5AD_CONFIDENCE}
        if embedding:
            cols["embedding"] = f"{H5AD_EMBEDDING}_0 .. {H5AD_EMBEDDING}_{emb.shape[1] - 1}"
    else:
        _write_h5ad_annotation(path, out, annotator.classes, annotator.unassigned, codes, conf, emb, info, h5py)
        cols = {"label": f"obs.{H5AD_LABEL}", "confidence": f"obs.{H5AD_CONFIDENCE}"}
        if embedding:
            cols["embedding"] = f"obsm.{H5AD_EMBEDDING}"
    shutil.rmtree(progress_dir, ignore_errors=True)
    return AnnotateReport(ref.uri, str(out), cols, n_cells, len(blocks), computed, len(blocks) - len(pending),
                          sum(b.n_cells for b in pending), time.perf_counter() - t0, [path.stem], {path.stem: overlap},
                          {path.stem: verdict} if verdict else {})


def _labels(classes, unassigned: str, codes: np.ndarray):
    """The calls as a categorical: ``unassigned`` where a cell has no model gene or was rejected."""
    import pandas as pd

    categories = [str(c) for c in classes]
    if (codes < 0).any():
        categories.append(unassigned)
        codes = np.where(codes < 0, len(classes), codes)
    return pd.Categorical.from_codes(codes, categories=categories)


def _write_table(out: Path, cells: np.ndarray, classes, unassigned: str, codes, conf, emb) -> None:
    """The calls as a table (``.csv``, ``.tsv`` or ``.parquet``): one row per cell, in the input's
    order, keyed by its obs name; written whole, then renamed into place."""
    import pandas as pd

    from scpretrain_dist.store.files import replaced_whole

    df = pd.DataFrame({"cell": cells, H5AD_LABEL: _labels(classes, unassigned, codes), H5AD_CONFIDENCE: conf})
    if emb is not None:
        df = pd.concat([df, pd.DataFrame(emb, columns=[f"{H5AD_EMBEDDING}_{i}" for i in range(emb.shape[1])])], axis=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    with replaced_whole(out) as fh:
        if out.suffix.lower() == ".parquet":
            df.to_parquet(fh, index=False)
        else:
            df.to_csv(fh, sep="\t" if out.suffix.lower() == ".tsv" else ",", index=False)


def _write_h5ad_annotation(path: Path, out: Path, classes, unassigned: str, codes, conf, emb, info: dict,
                           h5py) -> None:
    """Copy the file, add the entries to the copy's existing HDF5 groups (nothing else is
    rewritten), then move it over ``out`` in one rename."""
    from anndata.io import write_elem

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.annotate-{os.getpid()}.tmp")
    shutil.copyfile(path, tmp)
    try:
        with h5py.File(tmp, "r+") as f:
            obs = f["obs"]
            order = [str(c) for c in np.atleast_1d(obs.attrs.get("column-order", []))]
            for key in (H5AD_LABEL, H5AD_CONFIDENCE):
                if key in obs:
                    del obs[key]
                if key in order:
                    order.remove(key)
            write_elem(obs, H5AD_LABEL, _labels(classes, unassigned, codes))
            write_elem(obs, H5AD_CONFIDENCE, conf)
            obs.attrs["column-order"] = np.array(order + [H5AD_LABEL, H5AD_CONFIDENCE], dtype=object)
            if emb is not None:
                if "obsm" not in f:
                    write_elem(f, "obsm", {})
                if H5AD_EMBEDDING in f["obsm"]:
                    del f["obsm"][H5AD_EMBEDDING]
                write_elem(f["obsm"], H5AD_EMBEDDING, emb)
            if "uns" not in f:
                write_elem(f, "uns", {})
            if H5AD_UNS in f["uns"]:
                del f["uns"][H5AD_UNS]
            write_elem(f["uns"], H5AD_UNS, info)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if out.exists():  # --in-place: the file keeps its permissions
            shutil.copymode(out, tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
