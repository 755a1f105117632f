"""Encoder (genes -> 200, sigmoid), one linear head per (dataset, partition), and the
fine-tune network encoder -> sigmoid -> Linear(200,100) -> sigmoid -> Linear(100, n_types).

Nothing here knows about DDP, Ray or MLflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class SparseBatch:
    """A CSR batch of cells in the form ``embedding_bag`` consumes: the encoder's first layer
    then costs O(non-zeros x 200) instead of O(genes x 200) per cell."""

    indices: torch.Tensor  # (nnz,) gene index of each value
    offsets: torch.Tensor  # (n_cells,) start of each cell in indices
    values: torch.Tensor  # (nnz,) float32

    @classmethod
    def from_csr(cls, X: sp.csr_matrix, device: torch.device | str = "cpu") -> SparseBatch:
        return cls(
            torch.from_numpy(X.indices.astype(np.int64)).to(device),
            torch.from_numpy(X.indptr[:-1].astype(np.int64)).to(device),
            torch.from_numpy(X.data.astype(np.float32)).to(device),
        )

    def __len__(self) -> int:
        return int(self.offsets.shape[0])


class Encoder(nn.Module):
    """Linear(n_genes, dim). The weight is stored genes x dim so a gene's row can be copied
    between gene spaces and gathered by ``embedding_bag`` for sparse input."""

    def __init__(self, n_genes: int, dim: int = 200):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_genes, dim))
        self.bias = nn.Parameter(torch.empty(dim))
        bound = 1.0 / math.sqrt(n_genes)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor | SparseBatch) -> torch.Tensor:
        if isinstance(x, SparseBatch):
            h = F.embedding_bag(
                x.indices, self.weight, x.offsets, mode="sum", per_sample_weights=x.values
            )
        else:
            h = x @ self.weight
        return h + self.bias

    def embed(self, x: torch.Tensor | SparseBatch) -> torch.Tensor:
        return torch.sigmoid(self(x))


class MultiTaskHeads(nn.Module):
    """One linear head per (dataset, partition), fused: partition p holds the rows of every
    dataset's head back to back. A cell's logits are masked to its own dataset's rows, so the
    cross-entropy of each cell runs over its dataset's clusters only."""

    def __init__(self, ks: list[list[int]], dim: int = 200, activation: str = "none"):
        super().__init__()
        if activation not in {"none", "sigmoid"}:
            raise ValueError(f"head activation {activation!r} must be 'none' or 'sigmoid'")
        self.activation = activation
        ks_arr = np.asarray(ks, dtype=np.int64)  # (n_datasets, n_partitions)
        self.n_partitions = ks_arr.shape[1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for p in range(self.n_partitions):
            total = int(ks_arr[:, p].sum())
            w = torch.empty(total, dim)
            nn.init.uniform_(w, -1 / math.sqrt(dim), 1 / math.sqrt(dim))
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(total)))
            offsets = np.concatenate([[0], np.cumsum(ks_arr[:, p])[:-1]])
            owner = np.repeat(np.arange(len(ks_arr)), ks_arr[:, p])
            self.register_buffer(f"offset_{p}", torch.from_numpy(offsets))
            self.register_buffer(f"owner_{p}", torch.from_numpy(owner))

    def forward(self, z: torch.Tensor, dataset_idx: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for p in range(self.n_partitions):
            logits = z @ self.weights[p].T + self.biases[p]
            if self.activation == "sigmoid":  # the original code squashed logits before CE
                logits = torch.sigmoid(logits)
            mask = getattr(self, f"owner_{p}")[None, :] != dataset_idx[:, None]
            out.append(logits.masked_fill(mask, float("-inf")))
        return out

    def global_targets(self, labels: torch.Tensor, dataset_idx: torch.Tensor) -> list[torch.Tensor]:
        """Local cluster ids (cells x partitions) -> row indices in each fused head."""
        return [
            getattr(self, f"offset_{p}")[dataset_idx] + labels[:, p] for p in range(self.n_partitions)
        ]


@dataclass
class PretrainLoss:
    total: torch.Tensor  # sum over partitions of the mean cross-entropy
    per_partition: list[float]
    accuracy: float  # fraction of pseudo-labels predicted, averaged over partitions


class PretrainModel(nn.Module):
    def __init__(self, n_genes: int, ks: list[list[int]], dim: int = 200, head_activation: str = "none"):
        super().__init__()
        self.encoder = Encoder(n_genes, dim)
        self.heads = MultiTaskHeads(ks, dim, head_activation)

    def forward(self, x: torch.Tensor | SparseBatch, dataset_idx: torch.Tensor) -> list[torch.Tensor]:
        return self.heads(self.encoder.embed(x), dataset_idx)

    def loss(self, logits: list[torch.Tensor], labels: torch.Tensor, dataset_idx: torch.Tensor) -> PretrainLoss:
        targets = self.heads.global_targets(labels, dataset_idx)
        losses = [F.cross_entropy(lg, t) for lg, t in zip(logits, targets)]
        acc = float(np.mean([(lg.argmax(1) == t).float().mean().item() for lg, t in zip(logits, targets)]))
        return PretrainLoss(torch.stack(losses).sum(), [x.item() for x in losses], acc)


class CellTypeClassifier(nn.Module):
    """Fine-tune network: encoder -> sigmoid -> Linear(200,100) -> sigmoid -> Linear(100, n_types)."""

    def __init__(self, n_genes: int, n_types: int, dim: int = 200, hidden: int = 100):
        super().__init__()
        self.encoder = Encoder(n_genes, dim)
        self.hidden = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, n_types)

    def embed(self, x: torch.Tensor | SparseBatch) -> torch.Tensor:
        return self.encoder.embed(x)

    def forward(self, x: torch.Tensor | SparseBatch) -> torch.Tensor:
        return self.out(torch.sigmoid(self.hidden(self.encoder.embed(x))))

    @torch.no_grad()
    def load_pretrained_encoder(self, weight: np.ndarray, bias: np.ndarray, gene_index: np.ndarray) -> int:
        """Copy pretrained rows for the input genes found in the pretraining gene space.

        ``gene_index[i]`` is the row of input gene i in ``weight``, or -1 (kept random).
        Returns how many genes took pretrained weights.
        """
        found = gene_index >= 0
        rows = torch.from_numpy(np.asarray(weight)[gene_index[found]])
        self.encoder.weight[torch.from_numpy(np.flatnonzero(found))] = rows.to(self.encoder.weight)
        self.encoder.bias.copy_(torch.from_numpy(np.asarray(bias)))
        return int(found.sum())
