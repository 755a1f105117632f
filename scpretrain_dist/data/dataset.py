"""A training worker's shard of the atlas: its cells, their dataset and pseudo-labels, in host
memory (:class:`CellShard`) or, on a GPU, in device memory (:class:`DeviceCellShard`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import scipy.sparse as sp
import torch

from scpretrain_dist.data.normalize import keep_columns, normalized_rows
from scpretrain_dist.data.sharding import epoch_batches, shard_positions
from scpretrain_dist.model.networks import SparseBatch
from scpretrain_dist.store.atlas import Locator


class PseudoLabelled(Protocol):
    """What a shard needs of a pseudo-labelling (``pseudolabel.pool.PseudoLabels``): each
    dataset's labels, cells x partitions."""

    labels: Mapping[str, np.ndarray]


def _run_cells(locator: Locator, datasets: list[str], pseudo_labels: PseudoLabelled):
    """The run's store and, per cell of ``datasets`` in order: joinid, dataset index,
    pseudo-labels and value type."""
    store = locator.atlas()
    records = {r.name: r for r in store.datasets()}
    joinids = np.concatenate([records[d].joinids for d in datasets])
    didx = np.concatenate([np.full(records[d].n_cells, i) for i, d in enumerate(datasets)])
    labels = np.concatenate([pseudo_labels.labels[d] for d in datasets])
    vtypes = np.concatenate(
        [np.full(records[d].n_cells, records[d].value_type, dtype=object) for d in datasets]
    )
    return store, joinids, didx, labels, vtypes


@dataclass
class CellShard:
    """Normalised cells of one rank held as compact CSR (cells x atlas genes)."""

    X: sp.csr_matrix
    dataset_idx: np.ndarray  # (n,) index into the run's dataset list
    labels: np.ndarray  # (n, n_partitions) local cluster ids
    joinids: np.ndarray

    @classmethod
    def load(
        cls,
        locator: Locator,
        datasets: list[str],
        pseudo_labels: PseudoLabelled,
        rank: int,
        world: int,
        seed: int,
        block_cells: int = 16384,
    ) -> CellShard:
        store, joinids, didx, labels, vtypes = _run_cells(locator, datasets, pseudo_labels)
        pos = shard_positions(len(joinids), rank, world, seed)
        # read in joinid order (sequential I/O), blocks bound the transient memory
        order = np.argsort(joinids[pos], kind="stable")
        pos = pos[order]
        blocks = [
            normalized_rows(store, joinids[pos[i : i + block_cells]], vtypes[pos[i : i + block_cells]])
            for i in range(0, len(pos), block_cells)
        ]
        return cls(sp.vstack(blocks).tocsr(), didx[pos], labels[pos], joinids[pos])

    def __len__(self) -> int:
        return self.X.shape[0]

    def to_device(self, device: str | torch.device) -> DeviceCellShard:
        return DeviceCellShard.from_shard(self, device)

    def batches(
        self, batch_size: int, seed: int, epoch: int, device: str | torch.device = "cpu"
    ) -> Iterator[tuple[SparseBatch, torch.Tensor, torch.Tensor]]:
        for idx in epoch_batches(len(self), batch_size, seed, epoch):
            yield (
                SparseBatch.from_csr(self.X[idx], device),
                torch.from_numpy(self.dataset_idx[idx].astype(np.int64)).to(device),
                torch.from_numpy(self.labels[idx]).to(device),
            )


@dataclass
class GeneShardedCells:
    """Every cell of the run over one rank's genes (gene g is rank g % world's), for an encoder
    sharded by gene (:class:`~scpretrain_dist.train.parallel.GeneRowExchange`). Step t yields
    every rank's batch t, cut as :class:`CellShard` cuts it, over this rank's genes, so the
    ranks exchange no batches; the dataset indices and pseudo-labels are this rank's cells'.
    Memory is about a row shard's (all cells, a 1/world share of their values); loading reads
    the whole run once on every rank."""

    X: sp.csr_matrix  # every cell of the run (joinid order) x atlas genes, other ranks' genes dropped
    rows: list[np.ndarray]  # each rank's shard as rows of X, in its CellShard order
    dataset_idx: np.ndarray  # per row of X
    labels: np.ndarray  # per row of X
    joinids: np.ndarray  # per row of X
    rank: int

    @classmethod
    def load(cls, locator: Locator, datasets: list[str], pseudo_labels: PseudoLabelled, rank: int,
             world: int, seed: int, block_cells: int = 16384) -> GeneShardedCells:
        store, joinids, didx, labels, vtypes = _run_cells(locator, datasets, pseudo_labels)
        order = np.argsort(joinids, kind="stable")  # every cell, read in joinid order
        genes = np.arange(store.n_genes)
        owned = np.where(genes % world == rank, genes, -1)  # this rank's genes keep their columns
        blocks = [
            keep_columns(normalized_rows(store, joinids[order[i : i + block_cells]], vtypes[order[i : i + block_cells]]),
                         owned, store.n_genes)
            for i in range(0, len(order), block_cells)
        ]
        row_of = np.empty(len(order), dtype=np.int64)
        row_of[order] = np.arange(len(order))
        rows = []
        for r in range(world):  # each rank's shard in the order CellShard.load keeps it
            pos = shard_positions(len(joinids), r, world, seed)
            rows.append(row_of[pos[np.argsort(joinids[pos], kind="stable")]])
        return cls(sp.vstack(blocks).tocsr(), rows, didx[order], labels[order], joinids[order], rank)

    def __len__(self) -> int:
        return len(self.rows[self.rank])

    def batches(
        self, batch_size: int, seed: int, epoch: int, device: str | torch.device = "cpu"
    ) -> Iterator[tuple[SparseBatch, torch.Tensor, torch.Tensor]]:
        for idx in epoch_batches(len(self), batch_size, seed, epoch):  # the same on every rank
            per_rank = [r[idx] for r in self.rows]
            x = SparseBatch.from_csr(self.X[np.concatenate(per_rank)], device)
            x.cells_per_rank = tuple(len(p) for p in per_rank)
            own = per_rank[self.rank]
            yield (
                x,
                torch.from_numpy(self.dataset_idx[own].astype(np.int64)).to(device),
                torch.from_numpy(self.labels[own]).to(device),
            )


class DeviceCellShard:
    """A :class:`CellShard` held in device memory: its CSR arrays, dataset indices and labels
    are copied once, and every batch is gathered on the device (no host work and no transfer
    per step, which on a GPU would take longer than the step). Same batches, in the same order,
    as the host shard."""

    def __init__(self, indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                 dataset_idx: torch.Tensor, labels: torch.Tensor, n_genes: int):
        self.indptr, self.indices, self.values = indptr, indices, values
        self.dataset_idx, self.labels, self.n_genes = dataset_idx, labels, n_genes
        self.device = indptr.device

    @classmethod
    def from_shard(cls, shard: CellShard, device: str | torch.device) -> DeviceCellShard:
        X = shard.X

        def put(a: np.ndarray, dtype) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a, dtype=dtype)).to(device)

        return cls(put(X.indptr, np.int64), put(X.indices, np.int64), put(X.data, np.float32),
                   put(shard.dataset_idx, np.int64), put(shard.labels, np.int64), X.shape[1])

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def gather(self, rows: torch.Tensor) -> SparseBatch:
        """Rows ``rows`` (a device tensor) as the batch :meth:`SparseBatch.from_csr` makes."""
        starts = self.indptr[rows]
        counts = self.indptr[rows + 1] - starts
        offsets = torch.cumsum(counts, 0) - counts
        total = int(counts.sum())
        pos = torch.repeat_interleave(starts - offsets, counts, output_size=total)
        pos += torch.arange(total, device=self.device)
        indices = self.indices[pos]
        present = torch.zeros(self.n_genes, dtype=torch.bool, device=self.device)
        present[indices] = True
        genes = torch.nonzero(present).squeeze(1)
        local = (torch.cumsum(present, 0) - 1)[indices]
        return SparseBatch(indices, offsets, self.values[pos], genes, local)

    def batches(
        self, batch_size: int, seed: int, epoch: int, device: str | torch.device | None = None
    ) -> Iterator[tuple[SparseBatch, torch.Tensor, torch.Tensor]]:
        """``device`` is accepted for the interface of :meth:`CellShard.batches`; batches are
        on the shard's own device."""
        parts = epoch_batches(len(self), batch_size, seed, epoch)
        order = torch.from_numpy(np.concatenate(parts)).to(self.device)
        lo = 0
        for part in parts:
            rows = order[lo : lo + len(part)]
            lo += len(part)
            yield self.gather(rows), self.dataset_idx[rows], self.labels[rows]
