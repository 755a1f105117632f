"""A training worker's shard of the atlas: its cells, their dataset and pseudo-labels."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from scpretrain_dist.data.sharding import epoch_batches, shard_positions
from scpretrain_dist.model.networks import SparseBatch
from scpretrain_dist.pseudolabel.pool import PseudoLabels
from scpretrain_dist.store.soma import AtlasLocator, AtlasStore


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
        locator: AtlasLocator,
        datasets: list[str],
        pseudo_labels: PseudoLabels,
        rank: int,
        world: int,
        seed: int,
        block_cells: int = 16384,
    ) -> CellShard:
        store = AtlasStore(locator.uri, locator.timestamp_ms)
        records = {r.name: r for r in store.datasets()}
        joinids = np.concatenate([records[d].joinids for d in datasets])
        didx = np.concatenate([np.full(records[d].n_cells, i) for i, d in enumerate(datasets)])
        labels = np.concatenate([pseudo_labels.labels[d] for d in datasets])
        vtypes = np.concatenate(
            [np.full(records[d].n_cells, records[d].value_type, dtype=object) for d in datasets]
        )
        pos = shard_positions(len(joinids), rank, world, seed)
        # read in joinid order (sequential I/O), blocks bound the transient memory
        order = np.argsort(joinids[pos], kind="stable")
        pos = pos[order]
        blocks = [
            store.read_rows(joinids[pos[i : i + block_cells]], vtypes[pos[i : i + block_cells]])
            for i in range(0, len(pos), block_cells)
        ]
        return cls(sp.vstack(blocks).tocsr(), didx[pos], labels[pos], joinids[pos])

    def __len__(self) -> int:
        return self.X.shape[0]

    def batches(
        self, batch_size: int, seed: int, epoch: int, device: str | torch.device = "cpu"
    ) -> Iterator[tuple[SparseBatch, torch.Tensor, torch.Tensor]]:
        for idx in epoch_batches(len(self), batch_size, seed, epoch):
            yield (
                SparseBatch.from_csr(self.X[idx], device),
                torch.from_numpy(self.dataset_idx[idx].astype(np.int64)).to(device),
                torch.from_numpy(self.labels[idx]).to(device),
            )
