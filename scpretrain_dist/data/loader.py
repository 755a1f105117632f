"""The streaming training dataset: one rank's shard of an atlas of any size, read buffer by buffer.

Guarantees, whatever the atlas size and world size:

* every rank runs the same number of steps (shards of ``ceil(n / world)`` cells, padded by
  wrap-around; with ``drop_last`` every batch is full);
* shards are seeded and disjoint up to that padding, and every cell is seen once per epoch;
* batches mix datasets: a shard is a seeded permutation of contiguous chunks of cells (cheap to
  read), a buffer gathers hundreds of chunks from across the atlas and batches are drawn from it
  cell by cell;
* memory is bounded by the buffer size, not the atlas: at most ``prefetch_buffers + 1`` buffers
  are held (one consumed, the next read by a background thread);
* values arrive in the atlas gene space, normalised to log1p(CP10k) exactly as
  :func:`~scpretrain_dist.data.normalize.normalize_rows` does, as CSR batches
  (:class:`~scpretrain_dist.model.networks.SparseBatch`) for the encoder's ``embedding_bag``.

With ``cache_bytes`` > 0 the first epoch also keeps the rank's cells as compact CSR; if the
whole shard fits the budget, later epochs run from memory with a full shuffle of the shard.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp
import torch

from scpretrain_dist.config import ConfigError
from scpretrain_dist.data.distributed import rank_and_world
from scpretrain_dist.data.normalize import normalize_rows
from scpretrain_dist.data.sharding import _cut, ranges_to_positions, shard_ranges
from scpretrain_dist.model.networks import SparseBatch
from scpretrain_dist.store.atlas import StoreError
from scpretrain_dist.store.sources import csr_nbytes

DEFAULT_CHUNK_CELLS = 512
DEFAULT_BUFFER_CELLS = 32768


@dataclass
class CellBatch:
    """One batch: cells as CSR, their dataset (index into the loader's dataset list), their
    pseudo-labels when the loader was given some, and their soma_joinids."""

    x: SparseBatch
    dataset_idx: torch.Tensor  # (n,) int64
    labels: torch.Tensor | None  # (n, n_partitions)
    joinids: np.ndarray  # (n,) int64

    def __len__(self) -> int:
        return len(self.joinids)


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class _ShardCache:
    """The rank's normalised cells as one compact CSR, filled during the first epoch while it
    stays within ``budget`` bytes (given up, and freed, as soon as it would not)."""

    def __init__(self, budget: int):
        self.budget = budget
        self.parts: list[tuple[np.ndarray, sp.csr_matrix]] = []
        self.nbytes = 0
        self.gave_up = budget <= 0
        self.joinids: np.ndarray | None = None  # sorted distinct joinids, once complete
        self.row_of: np.ndarray | None = None  # row in X of each of them
        self.X: sp.csr_matrix | None = None

    @property
    def ready(self) -> bool:
        return self.X is not None

    def add(self, joinids: np.ndarray, X: sp.csr_matrix) -> None:
        if self.gave_up:
            return
        self.nbytes += csr_nbytes(X) + joinids.nbytes
        if self.nbytes > self.budget:
            self.gave_up, self.parts = True, []
            return
        self.parts.append((joinids, X))

    def finish(self) -> None:
        if self.gave_up or not self.parts:
            self.parts = []
            return
        joinids = np.concatenate([p[0] for p in self.parts])
        X = sp.vstack([p[1] for p in self.parts], format="csr")
        self.parts = []
        uniq, first = np.unique(joinids, return_index=True)  # padding may repeat a cell
        self.joinids, self.row_of, self.X = uniq, first, X


def _gather_rows(X: sp.csr_matrix, rows: np.ndarray) -> sp.csr_matrix:
    return X[rows]


class StreamingCells(torch.utils.data.IterableDataset):
    """One rank's shard of ``datasets`` from the atlas at ``locator``, as shuffled batches.

    Picklable (it holds the locator; the store is opened in the process that iterates). Rank
    and world size come from :func:`~scpretrain_dist.data.distributed.rank_and_world` unless
    given. ``labels`` (optional) holds one row per cell of ``datasets`` in order (e.g. the
    concatenated pseudo-labels) and is batched along.
    """

    def __init__(
        self,
        locator,
        datasets: list[str],
        batch_size: int,
        seed: int,
        *,
        rank: int | None = None,
        world: int | None = None,
        labels: np.ndarray | None = None,
        chunk_cells: int = DEFAULT_CHUNK_CELLS,
        buffer_cells: int = DEFAULT_BUFFER_CELLS,
        prefetch_buffers: int = 1,
        drop_last: bool = True,
        cache_bytes: int = 0,
    ):
        from scpretrain_dist.store.sources import open_source

        super().__init__()
        self.batch_size = _positive_int("batch size", batch_size)
        self.chunk_cells = _positive_int("chunk_cells", chunk_cells)
        buffer_cells = _positive_int("buffer_cells", buffer_cells)
        self.prefetch_buffers = _positive_int("prefetch_buffers", prefetch_buffers, minimum=0)
        self.cache_bytes = _positive_int("cache_bytes", cache_bytes, minimum=0)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ConfigError(f"seed must be an integer shared by every rank, got {seed!r}")
        self.seed = int(seed)
        if buffer_cells < self.batch_size:
            raise ConfigError(f"buffer_cells ({buffer_cells}) must hold at least one batch ({self.batch_size} cells)")
        if buffer_cells < self.chunk_cells:
            raise ConfigError(
                f"buffer_cells ({buffer_cells}) must hold at least one chunk of {self.chunk_cells} cells; "
                "for batches that mix datasets it should hold hundreds of chunks"
            )
        # whole batches per buffer: only the last batch of an epoch can be short
        self.buffer_cells = buffer_cells // self.batch_size * self.batch_size
        if rank is None or world is None:
            rank, world = rank_and_world()
        if not 0 <= rank < world:
            raise ConfigError(f"rank {rank} is outside world size {world}")
        if world > 1 and not drop_last:
            raise ConfigError(
                f"drop_last=False under DDP (world size {world}): a short last batch would weigh "
                "as much as a full one in the averaged gradient; keep drop_last=True"
            )
        self.rank, self.world, self.drop_last = int(rank), int(world), bool(drop_last)
        if locator.timestamp_ms is None:
            locator = locator.pinned()  # every epoch and every reader sees one version
        self.locator = locator
        if not datasets:
            raise ConfigError("the loader needs at least one dataset")
        if len(set(datasets)) != len(datasets):
            raise ConfigError(f"datasets named more than once: {sorted({d for d in datasets if datasets.count(d) > 1})}")
        source = open_source(locator)
        try:
            records = {r.name: r for r in source.datasets()}
            self.n_genes = source.n_genes
        finally:
            source.close()
        missing = [d for d in datasets if d not in records]
        if missing:
            raise StoreError(f"datasets {missing} are not in the atlas {locator.uri}; it holds: {', '.join(records) or 'nothing'}")
        self.datasets = list(datasets)
        recs = [records[d] for d in datasets]
        sizes = np.array([r.n_cells for r in recs], dtype=np.int64)
        self._pos_start = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self._joinid_start = np.array([r.joinid_start for r in recs], dtype=np.int64)
        self._value_types = np.array([r.value_type for r in recs], dtype=object)
        self.n_cells = int(sizes.sum())
        if self.n_cells == 0:
            raise ConfigError(f"datasets {datasets} hold no cells")
        self.cells_per_rank = -(-self.n_cells // self.world)
        steps = self.cells_per_rank // self.batch_size if self.drop_last else -(-self.cells_per_rank // self.batch_size)
        if steps == 0:
            raise ConfigError(
                f"batch size {self.batch_size} is larger than the {self.cells_per_rank} cells each of "
                f"{self.world} rank(s) gets from {self.n_cells} cells; lower the batch size or the workers"
            )
        self.steps_per_epoch = int(steps)
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape[0] != self.n_cells:
                raise ConfigError(f"labels have {labels.shape[0]} rows for {self.n_cells} cells of {datasets}")
        self.labels = labels
        self._shard = shard_ranges(self.n_cells, self.rank, self.world, self.seed, self.chunk_cells)
        self.epoch = 0
        self._source = None
        self._readers: set = set()  # how to stop each background reader now running
        self._cache = _ShardCache(self.cache_bytes)

    # ------------------------------------------------------------------ positions
    def dataset_of(self, positions: np.ndarray) -> np.ndarray:
        """Index into ``datasets`` of each position (0..n_cells-1)."""
        return np.searchsorted(self._pos_start, positions, side="right") - 1

    def joinids_of(self, positions: np.ndarray) -> np.ndarray:
        d = self.dataset_of(positions)
        return positions - self._pos_start[d] + self._joinid_start[d]

    def shard_positions(self) -> np.ndarray:
        """This rank's positions, in shard order (ceil(n / world) of them)."""
        return ranges_to_positions(*self._shard)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def cached(self) -> bool:
        """Whether epochs now run from the in-memory copy of the shard."""
        return self._cache.ready

    # ------------------------------------------------------------------ reading
    def _open(self):
        if self._source is None:
            from scpretrain_dist.store.sources import open_source

            self._source = open_source(self.locator)
        return self._source

    def close(self) -> None:
        """Stop the background readers (a batch iterator left unfinished keeps its reader until it
        is garbage-collected, and a reader must not read from a closed source), then close."""
        for halt in list(self._readers):
            halt()
        if self._source is not None:
            self._source.close()
            self._source = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_source"] = None
        state["_readers"] = set()
        state["_cache"] = _ShardCache(self.cache_bytes)
        return state

    def _read(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix]:
        """Cells at ``positions`` -> (sorted unique joinids, inverse, normalised CSR of the unique)."""
        joinids = self.joinids_of(positions)
        uniq, inverse = np.unique(joinids, return_inverse=True)
        raw = self._open().read_rows(uniq)
        d = self.dataset_of(positions)
        types = np.empty(len(uniq), dtype=object)
        types[inverse] = self._value_types[d]
        X = normalize_rows(raw, types[0] if (types == types[0]).all() else types, copy=False)
        return uniq, inverse, X

    def _buffers(self, epoch: int, fill_cache: bool, stop: threading.Event) -> Iterator:
        """(normalised CSR of the buffer's distinct cells, row of each shuffled cell, positions
        of the shuffled cells) per buffer of this epoch."""
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        starts, stops = self._shard
        order = rng.permutation(len(starts))
        starts, stops = starts[order], stops[order]
        n_used = self.cells_per_rank if not self.drop_last else self.steps_per_epoch * self.batch_size
        for lo in range(0, n_used, self.buffer_cells):
            if stop.is_set():
                return
            positions = ranges_to_positions(*_cut(starts, stops, lo, min(lo + self.buffer_cells, n_used)))
            uniq, inverse, X = self._read(positions)
            if fill_cache:
                self._cache.add(uniq, X)
            perm = rng.permutation(len(positions))  # the cell-level shuffle within the buffer
            yield X, inverse[perm], positions[perm]
        if fill_cache and n_used < self.cells_per_rank and not stop.is_set():
            # the cells drop_last leaves out this epoch, read for the cache only: batches of
            # the filling epoch are exactly those of a streamed one
            uniq, _, X = self._read(ranges_to_positions(*_cut(starts, stops, n_used, self.cells_per_rank)))
            self._cache.add(uniq, X)

    def _prefetched(self, items_fn, depth: int) -> Iterator:
        """Run ``items_fn(stop)`` on a background thread, ``depth`` items ahead at most."""
        if depth == 0:
            yield from items_fn(threading.Event())
            return
        q: queue.Queue = queue.Queue()
        # taken before an item is built, given back once it is consumed: the consumer's item
        # plus ``depth`` read ahead are all that is ever held
        slots = threading.Semaphore(depth + 1)
        stop = threading.Event()
        done = object()

        def work():
            try:
                it = items_fn(stop)
                while True:
                    slots.acquire()
                    if stop.is_set():
                        break
                    try:
                        item = next(it)
                    except StopIteration:
                        break
                    q.put(item)
            except BaseException as e:  # re-raised in the consumer
                q.put(e)
                return
            q.put(done)

        t = threading.Thread(target=work, name="scpretrain-loader-io", daemon=True)

        def halt():
            stop.set()
            slots.release()  # a reader waiting for a free slot wakes, sees the stop and ends
            t.join()

        self._readers.add(halt)
        t.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                del item
                slots.release()
        finally:
            self._readers.discard(halt)
            halt()

    # ------------------------------------------------------------------ batches
    def _batch(self, X: sp.csr_matrix, rows: np.ndarray, positions: np.ndarray, device) -> CellBatch:
        part = _gather_rows(X, rows)
        didx = self.dataset_of(positions)
        labels = None
        if self.labels is not None:
            labels = torch.from_numpy(np.ascontiguousarray(self.labels[positions])).to(device)
        return CellBatch(
            SparseBatch.from_csr(part, device),
            torch.from_numpy(didx.astype(np.int64)).to(device),
            labels,
            self.joinids_of(positions),
        )

    def epoch_batches(self, epoch: int, device: str | torch.device = "cpu") -> Iterator[CellBatch]:
        """The batches of ``epoch`` on this rank: ``len(self)`` of them, deterministic given the
        seed, rank and epoch."""
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers > 1:
            raise ConfigError(
                "StreamingCells reads on its own background thread and shards by rank only; use it "
                "with DataLoader(num_workers=0 or 1), or iterate it directly"
            )
        bs, steps = self.batch_size, self.steps_per_epoch
        if self._cache.ready:
            yield from self._cached_batches(epoch, device)
            return
        fill = not self._cache.gave_up and self._cache.X is None and self.cache_bytes > 0
        if fill:
            self._cache = _ShardCache(self.cache_bytes)
        emitted = 0
        # buffers hold whole batches (buffer_cells is a multiple of the batch size), so a batch
        # never straddles two buffers; only the last batch of an epoch can be short
        for X, rows, positions in self._prefetched(lambda stop: self._buffers(epoch, fill, stop), self.prefetch_buffers):
            for i in range(0, len(rows), bs):
                if emitted == steps:
                    break
                yield self._batch(X, rows[i : i + bs], positions[i : i + bs], device)
                emitted += 1
            del X, rows, positions  # let the buffer go before the next one is read
        if fill:
            self._cache.finish()
        if emitted != steps:  # a broken guarantee must never pass silently: DDP would hang
            raise RuntimeError(f"rank {self.rank} produced {emitted} batches, not {steps}")

    def _cached_batches(self, epoch: int, device) -> Iterator[CellBatch]:
        positions = self.shard_positions()
        rows = self._cache.row_of[np.searchsorted(self._cache.joinids, self.joinids_of(positions))]
        order = np.random.default_rng([self.seed, epoch, self.rank]).permutation(len(positions))
        bs = self.batch_size
        for k in range(self.steps_per_epoch):
            idx = order[k * bs : (k + 1) * bs]
            yield self._batch(self._cache.X, rows[idx], positions[idx], device)

    def __iter__(self) -> Iterator[CellBatch]:
        epoch = self.epoch
        yield from self.epoch_batches(epoch)
        self.epoch = epoch + 1

    def batches(
        self, batch_size: int, seed: int, epoch: int, device: str | torch.device = "cpu"
    ) -> Iterator[tuple[SparseBatch, torch.Tensor, torch.Tensor | None]]:
        """(cells, dataset index, labels) per batch: the interface of ``CellShard.batches``."""
        if batch_size != self.batch_size or seed != self.seed:
            raise ConfigError(
                f"this loader was built for batch size {self.batch_size} and seed {self.seed}, "
                f"not {batch_size} and {seed}"
            )
        for b in self.epoch_batches(epoch, device):
            yield b.x, b.dataset_idx, b.labels


def open_shard(worker, labels, rank: int, world: int, gene_sharded: bool = False):
    """A training worker's data, as ``worker.pretrain.loader`` asks (``worker``: the
    iteration's ``train.pretrain.WorkerConfig``): ``"memory"`` (the whole shard read up front,
    :class:`~scpretrain_dist.data.dataset.CellShard`; with ``gene_sharded``, every cell over this
    rank's genes, :class:`~scpretrain_dist.data.dataset.GeneShardedCells`) or ``"stream"``
    (:class:`StreamingCells`, options from ``worker.stream``)."""
    p, datasets = worker.pretrain, list(worker.datasets)
    if p.loader == "memory":
        from scpretrain_dist.data.dataset import CellShard, GeneShardedCells

        shard_type = GeneShardedCells if gene_sharded else CellShard
        return shard_type.load(worker.locator, datasets, labels, rank, world, seed=p.seed)
    return StreamingCells(
        worker.locator, datasets, p.batch_size, p.seed, rank=rank, world=world,
        labels=np.concatenate([labels.labels[d] for d in datasets]), **asdict(worker.stream),
    )
