"""Encoder (genes -> 200, sigmoid), one linear head per (dataset, partition), and the
fine-tune network encoder -> sigmoid -> Linear(200,100) -> sigmoid -> Linear(100, n_types).

Nothing here knows about DDP, Ray or MLflow.
"""

from __future__ import annotations

import dataclasses
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
    then costs O(non-zeros x 200) instead of O(genes x 200) per cell.

    ``genes`` (the sorted distinct genes of the batch) and ``local_indices`` (``indices``
    renumbered into ``genes``) let an encoder with sparse gradients gather only the rows it
    needs; they are computed here, on the loader's side, when absent the encoder computes them.
    """

    indices: torch.Tensor  # (nnz,) gene index of each value
    offsets: torch.Tensor  # (n_cells,) start of each cell in indices
    values: torch.Tensor  # (nnz,) float32
    genes: torch.Tensor | None = None  # (n_present,) sorted distinct gene indices
    local_indices: torch.Tensor | None = None  # (nnz,) position of each index in ``genes``
    # Set on a batch of every rank's cells (rank order) over one rank's genes, for an encoder
    # sharded by gene (``train/parallel.py``, ``shard_by_gene``): how many cells each rank's batch has.
    cells_per_rank: tuple[int, ...] | None = None

    @classmethod
    def from_csr(cls, X: sp.csr_matrix, device: torch.device | str = "cpu", gathered: bool = True) -> SparseBatch:
        """``gathered=False`` (a forward pass without a sparse gradient): the CSR's own arrays,
        without the distinct genes, in its index type (``embedding_bag`` takes int32 or int64)."""
        if not gathered:
            index = np.promote_types(X.indices.dtype, X.indptr.dtype)
            return cls(torch.from_numpy(X.indices.astype(index, copy=False)).to(device),
                       torch.from_numpy(X.indptr[:-1].astype(index, copy=False)).to(device),
                       torch.from_numpy(X.data.astype(np.float32, copy=False)).to(device))
        # distinct genes by a presence count: O(nnz + genes), cheaper than sorting the indices
        # (bincount and take: cheaper than a boolean scatter and a fancy-index gather)
        present = np.bincount(X.indices, minlength=X.shape[1]) > 0
        genes = np.flatnonzero(present)
        local = np.take(np.cumsum(present, dtype=np.int64) - 1, X.indices)
        return cls(
            torch.from_numpy(X.indices.astype(np.int64)).to(device),
            torch.from_numpy(X.indptr[:-1].astype(np.int64)).to(device),
            torch.from_numpy(X.data.astype(np.float32, copy=False)).to(device),
            torch.from_numpy(genes.astype(np.int64)).to(device),
            torch.from_numpy(local).to(device),
        )

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(distinct genes, indices renumbered into them)."""
        if self.genes is None or self.local_indices is None:
            genes, local = torch.unique(self.indices, sorted=True, return_inverse=True)
            return genes, local
        return self.genes, self.local_indices

    def __len__(self) -> int:
        return int(self.offsets.shape[0])


# Above this fraction of non-zeros (over the batch's cells x the weight rows it meets: the genes
# present in it, or all of a fine-tuned encoder's) the encoder multiplies a dense batch: a GEMM
# runs ~5x more multiply-adds per second than sparse products.
DENSE_BATCH_DENSITY = 0.15


def _densify(local: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor, n_cells: int, n_cols: int) -> torch.Tensor:
    counts = torch.diff(offsets, append=offsets.new_tensor([len(local)]))
    cell = torch.repeat_interleave(torch.arange(n_cells, device=local.device), counts)
    dense = values.new_zeros(n_cells, n_cols)
    dense.index_put_((cell, local), values, accumulate=True)
    return dense


class _BagSum(torch.autograd.Function):
    """``embedding_bag(sum, per_sample_weights)`` over weight rows, with their gradient
    computed as X^T @ grad by a CSR product: on a CPU about twice as fast as embedding_bag's own
    backward, which materialises and sorts one gradient row per non-zero."""

    @staticmethod
    def forward(ctx, rows, local, offsets, values):
        ctx.save_for_backward(local, offsets, values)
        ctx.n_rows = rows.shape[0]
        return F.embedding_bag(local, rows, offsets, mode="sum", per_sample_weights=values)

    @staticmethod
    def backward(ctx, grad_out):
        local, offsets, values = ctx.saved_tensors
        indptr = np.append(offsets.numpy(), len(local))
        X = sp.csr_matrix((values.numpy(), local.numpy(), indptr), shape=(len(offsets), ctx.n_rows))
        grad_rows = X.T.tocsr() @ grad_out.detach().numpy()
        return torch.from_numpy(np.ascontiguousarray(grad_rows, dtype=np.float32)), None, None, None


def _bag_product(rows: torch.Tensor, local: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """X @ rows for the sparse batch X (CSR: column ``local``, ``offsets``, ``values``) in a
    training step: a dense batch as one GEMM, else the per-value sums with the CSR-product
    gradient (embedding_bag's own on a GPU)."""
    n_cells = len(offsets)
    if len(local) > DENSE_BATCH_DENSITY * n_cells * rows.shape[0]:
        # a dense batch: one GEMM beats the per-value products
        return _densify(local, offsets, values, n_cells, rows.shape[0]) @ rows
    if rows.is_cuda:
        return F.embedding_bag(local, rows, offsets, mode="sum", per_sample_weights=values)
    return _BagSum.apply(rows, local, offsets, values)


class _GatherRows(torch.autograd.Function):
    """``weight[rows]`` for sorted distinct ``rows``, whose gradient is a sparse tensor over
    those rows already marked coalesced: ``F.embedding(sparse=True)`` gives the same values
    uncoalesced, and coalescing them (a sort and a copy of every row) cost as much as the
    encoder's backward."""

    @staticmethod
    def forward(ctx, weight, rows):
        ctx.save_for_backward(rows)
        ctx.shape = weight.shape
        return weight.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad_rows):
        (rows,) = ctx.saved_tensors
        grad = torch.sparse_coo_tensor(rows.unsqueeze(0), grad_rows.contiguous(), ctx.shape,
                                       is_coalesced=True, check_invariants=False)
        return grad, None


class Encoder(nn.Module):
    """Linear(n_genes, dim). The weight is stored genes x dim so a gene's row can be copied
    between gene spaces and gathered by ``embedding_bag`` for sparse input.

    With ``sparse_grad`` a sparse batch first gathers the rows of the genes it contains, so the
    weight's gradient is a sparse tensor over those rows only (an optimizer and a gradient
    all-reduce then touch only them); the output is the same as without.
    """

    def __init__(self, n_genes: int, dim: int = 200, sparse_grad: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_genes, dim))
        self.bias = nn.Parameter(torch.empty(dim))
        self.sparse_grad = sparse_grad
        bound = 1.0 / math.sqrt(n_genes)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor | SparseBatch) -> torch.Tensor:
        if isinstance(x, SparseBatch):
            if x.cells_per_rank is not None:
                raise ValueError("a batch of every rank's cells over one rank's genes needs an "
                                 "encoder sharded by gene (train/parallel.py shard_by_gene)")
            if self.sparse_grad:
                h = self.rows_product(x)
            elif torch.is_grad_enabled() and not x.values.requires_grad:
                # a training step (fine-tuning): the product with the faster weight gradient
                h = _bag_product(self.weight, x.indices, x.offsets, x.values)
            else:
                # inference, or a gradient with respect to the values (saliency)
                h = F.embedding_bag(
                    x.indices, self.weight, x.offsets, mode="sum", per_sample_weights=x.values
                )
        else:
            h = x @ self.weight
        return h + self.bias

    def rows_product(self, x: SparseBatch) -> torch.Tensor:
        """X W over the rows of the genes present in ``x`` only (a sparse gradient over them)."""
        genes, local = x.gathered()
        rows = _GatherRows.apply(self.weight, genes)  # (n_present, dim)
        return _bag_product(rows, local, x.offsets, x.values)

    def embed(self, x: torch.Tensor | SparseBatch) -> torch.Tensor:
        return torch.sigmoid(self(x))


@dataclass
class PartitionLogits:
    """One partition's logits for a batch: column ``first_column[i] + c`` of row i is cell i's
    logit for cluster c of its own dataset; every other column of the row is -inf."""

    logits: torch.Tensor  # (cells, columns)
    first_column: torch.Tensor  # (cells,) int64

    def targets(self, local_labels: torch.Tensor) -> torch.Tensor:
        return self.first_column + local_labels


class MultiTaskHeads(nn.Module):
    """One linear head per (dataset, partition), fused: partition p is one parameter holding
    every dataset's head rows back to back, with the bias as the last column.

    A batch gathers only the rows of the datasets it contains, in one of two layouts chosen per
    batch by cost: ``block`` (every cell against all gathered rows, masked to its own dataset:
    cells x rows) or ``padded`` (every cell against its own dataset's rows only, padded to the
    largest k: cells x k_max). With ``sparse_grad`` the gradient is a sparse tensor over the
    gathered rows, so heads of datasets absent from the batch see neither a gradient nor an
    optimizer update.
    """

    def __init__(
        self, ks: list[list[int]], dim: int = 200, activation: str = "none",
        sparse_grad: bool = False, layout: str = "auto",
    ):
        super().__init__()
        if activation not in {"none", "sigmoid"}:
            raise ValueError(f"head activation {activation!r} must be 'none' or 'sigmoid'")
        if layout not in {"auto", "block", "padded"}:
            raise ValueError(f"head layout {layout!r} must be 'auto', 'block' or 'padded'")
        self.activation = activation
        self.sparse_grad = sparse_grad
        self.layout = layout
        ks_arr = np.asarray(ks, dtype=np.int64)  # (n_datasets, n_partitions)
        if ks_arr.ndim != 2 or (ks_arr < 1).any():
            raise ValueError(f"ks must be a datasets x partitions table of positive k, got {ks}")
        self.n_partitions = ks_arr.shape[1]
        self.weights = nn.ParameterList()
        for p in range(self.n_partitions):
            total = int(ks_arr[:, p].sum())
            w = torch.empty(total, dim + 1)
            nn.init.uniform_(w[:, :dim], -1 / math.sqrt(dim), 1 / math.sqrt(dim))
            nn.init.zeros_(w[:, dim])
            self.weights.append(nn.Parameter(w))
            offsets = np.concatenate([[0], np.cumsum(ks_arr[:, p])[:-1]])
            self.register_buffer(f"offset_{p}", torch.from_numpy(offsets), persistent=False)
            self.register_buffer(f"k_{p}", torch.from_numpy(ks_arr[:, p].copy()), persistent=False)

    def _gather(self, p: int, rows: torch.Tensor) -> torch.Tensor:
        return F.embedding(rows, self.weights[p], sparse=self.sparse_grad)

    def _activate(self, logits: torch.Tensor) -> torch.Tensor:
        # the original code squashed logits with a sigmoid before the cross-entropy
        return torch.sigmoid(logits) if self.activation == "sigmoid" else logits

    def forward(self, z: torch.Tensor, dataset_idx: torch.Tensor) -> list[PartitionLogits]:
        present, inverse = torch.unique(dataset_idx, sorted=True, return_inverse=True)
        z1 = torch.cat([z, z.new_ones(z.shape[0], 1)], dim=1)  # bias column
        k_all = torch.stack([getattr(self, f"k_{p}")[present] for p in range(self.n_partitions)])
        # every partition's largest k and row count in one device-to-host copy (each is a sync)
        stats = torch.cat([k_all.max(1).values, k_all.sum(1)]).tolist()
        out = []
        for p in range(self.n_partitions):
            k_present = k_all[p]
            k_max, n_rows = int(stats[p]), int(stats[self.n_partitions + p])
            layout = self.layout
            if layout == "auto":
                # block costs a GEMM of cells x rows; padded a memory-bound gather of cells x
                # k_max rows (~60x slower per element on a CPU): worth it once rows >> k_max
                layout = "padded" if n_rows > 64 * k_max else "block"
            starts = getattr(self, f"offset_{p}")[present]
            if layout == "block":
                # rows of the present datasets back to back; owner = position in ``present``
                owner = torch.repeat_interleave(torch.arange(len(present), device=z.device), k_present)
                first = torch.cumsum(k_present, 0) - k_present
                rows = starts[owner] + torch.arange(n_rows, device=z.device) - first[owner]
                logits = self._activate(z1 @ self._gather(p, rows).T)
                mask = owner[None, :] != inverse[:, None]
                out.append(PartitionLogits(logits.masked_fill(mask, float("-inf")), first[inverse]))
            else:
                cols = torch.arange(k_max, device=z.device)
                k_cell = k_present[inverse]
                valid = cols[None, :] < k_cell[:, None]
                rows_cell = starts[inverse][:, None] + torch.where(valid, cols[None, :], 0)
                w = self._gather(p, rows_cell.reshape(-1)).view(len(z), k_max, -1)
                logits = self._activate(torch.bmm(w, z1.unsqueeze(2)).squeeze(2))
                out.append(PartitionLogits(logits.masked_fill(~valid, float("-inf")),
                                           torch.zeros_like(inverse)))
        return out


@dataclass
class PretrainLoss:
    total: torch.Tensor  # sum over partitions of the mean cross-entropy
    per_partition: list[float]
    accuracy: float  # fraction of pseudo-labels predicted, averaged over partitions


class PretrainModel(nn.Module):
    """Encoder plus fused heads. ``sparse_grad`` makes the encoder's weight and every head
    produce sparse gradients over the rows a batch touched (see :class:`Encoder`,
    :class:`MultiTaskHeads`); the outputs do not change. ``encoder_sparse_grad`` sets the
    encoder's apart: on a GPU a batch of a few hundred cells touches most genes, and a dense
    gradient with dense Adam costs less there than sorting the touched rows."""

    def __init__(
        self, n_genes: int, ks: list[list[int]], dim: int = 200, head_activation: str = "none",
        sparse_grad: bool = False, head_layout: str = "auto", encoder_sparse_grad: bool | None = None,
    ):
        super().__init__()
        sparse_encoder = sparse_grad if encoder_sparse_grad is None else encoder_sparse_grad
        self.encoder = Encoder(n_genes, dim, sparse_grad=sparse_encoder)
        self.heads = MultiTaskHeads(ks, dim, head_activation, sparse_grad=sparse_grad, layout=head_layout)

    def forward(self, x: torch.Tensor | SparseBatch, dataset_idx: torch.Tensor) -> list[PartitionLogits]:
        return self.heads(self.encoder.embed(x), dataset_idx)

    def loss(self, logits: list[PartitionLogits], labels: torch.Tensor, dataset_idx: torch.Tensor | None = None) -> PretrainLoss:
        targets = [lg.targets(labels[:, p]) for p, lg in enumerate(logits)]
        losses = [F.cross_entropy(lg.logits, t) for lg, t in zip(logits, targets)]
        with torch.no_grad():
            acc = torch.stack([(lg.logits.argmax(1) == t).float().mean() for lg, t in zip(logits, targets)])
            values = torch.cat([torch.stack(losses).detach(), acc.mean()[None]]).tolist()  # one sync
        return PretrainLoss(torch.stack(losses).sum(), values[:-1], values[-1])


class GeneModel(nn.Module):
    """A one-vs-rest linear model over the genes themselves, the kind CellTypist fits: each gene
    scaled to unit variance over the training cells and capped at 10 standard deviations above
    its mean, then one logistic regression per type. Its log-sigmoids are pooled with a
    network's logits (:meth:`CellTypeClassifier.pool`). A scaled gene enters uncentred (a
    shift of a feature only moves the fitted intercepts), so a zero stays zero and a sparse batch
    costs O(non-zeros x types).

    ``inv_scale``, ``cap``: per gene; ``coef``: genes x types; ``intercept``: per type."""

    CAP = 10.0  # standard deviations above a gene's mean where its scaled value is capped (CellTypist's)

    def __init__(self, inv_scale: np.ndarray, cap: np.ndarray, coef: np.ndarray, intercept: np.ndarray):
        super().__init__()
        for name, value in (("inv_scale", inv_scale), ("cap", cap), ("coef", coef), ("intercept", intercept)):
            self.register_buffer(name, torch.as_tensor(np.asarray(value, np.float32)))

    def scaled(self, x: SparseBatch) -> torch.Tensor:
        """The scaled, capped value of each of a sparse batch's values (uncentred)."""
        return torch.minimum(x.values * self.inv_scale[x.indices], self.cap[x.indices])

    def mean_scaled(self) -> torch.Tensor:
        """Each gene's training mean, scaled: where its centred value is 0."""
        return self.cap - self.CAP

    def forward(self, x: torch.Tensor | SparseBatch, scaled: torch.Tensor | None = None) -> torch.Tensor:
        """Each type's decision value (the log-odds of its one-vs-rest model); ``scaled``: a
        sparse batch's :meth:`scaled` values, when the caller has them."""
        if isinstance(x, SparseBatch):
            return F.embedding_bag(x.indices, self.coef, x.offsets, mode="sum",
                                   per_sample_weights=self.scaled(x) if scaled is None else scaled) + self.intercept
        return torch.minimum(x * self.inv_scale, self.cap) @ self.coef + self.intercept


# A gene model's scaled genes carry each technology's own levels, which the validation cells
# cannot show: a set of cells (a dataset, a request) is called with the gene model only when
# there are GENE_MODEL_CHECK_CELLS or more of them to tell by, and the share of them whose
# calls agree with the network's is not below the validation cells' share by more than
# GENE_MODEL_AGREEMENT_DROP plus GENE_MODEL_CHECK_Z standard errors of the difference of two
# shares (one-sided 5%; a small validation set's share is only known roughly).
GENE_MODEL_AGREEMENT_DROP = 0.05
GENE_MODEL_CHECK_Z = 1.645
GENE_MODEL_CHECK_CELLS = 50


@dataclass(frozen=True)
class GeneModelCheck:
    """Whether a set of cells was called with the pooled gene model, and why."""

    used: bool
    agreement: float  # share of these cells whose network and gene-model calls agree (nan: none)
    reference: float  # the same share of the validation cells
    cells: int
    allowed: float = GENE_MODEL_AGREEMENT_DROP  # the drop from the reference tolerated

    def describe(self) -> str:
        if self.cells < GENE_MODEL_CHECK_CELLS:
            return (f"gene model left out: {self.cells} cells, fewer than the {GENE_MODEL_CHECK_CELLS} its check "
                    "needs (the network alone)")
        return (f"gene model {'pooled' if self.used else 'left out'}: its calls agree with the network's on "
                f"{self.agreement:.1%} of {self.cells} cells, against {self.reference:.1%} of the validation cells "
                f"({self.allowed:.1%} lower allowed)")


class CellTypeClassifier(nn.Module):
    """Fine-tune network: encoder -> sigmoid -> Linear(200,100) -> sigmoid -> Linear(100, n_types).

    With a :class:`GeneModel` (``finetune.gene_model``) its logits are pooled with that model's:
    ``(1 - w) logits + w log sigmoid(decision)``, whose softmax is the normalised geometric
    pool of the two models' probabilities (``gene_model_weight`` w), for a set of cells that
    passes :meth:`check_gene_model`."""

    def __init__(self, n_genes: int, n_types: int, dim: int = 200, hidden: int = 100):
        super().__init__()
        self.encoder = Encoder(n_genes, dim)
        self.hidden = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, n_types)
        # the input genes the model reads (a boolean mask; None: all): the others' first-layer
        # rows are zero (fine-tuning's ``gene_panel``), and an exported model leaves them out
        self.gene_mask: np.ndarray | None = None
        self.gene_model: GeneModel | None = None
        self.gene_model_weight = 0.0
        self.gene_model_agreement = float("nan")  # its calls' agreement with the network's on the validation cells
        self.gene_model_val_cells = 0  # how many those were (0: unknown)
        # set by fine-tuning (train/finetune.py): see :meth:`calibration`
        self.temperature = self.network_temperature = 1.0
        self.reject_threshold = self.network_reject_threshold = float("-inf")

    def embed(self, x: torch.Tensor | SparseBatch) -> torch.Tensor:
        return self.encoder.embed(x)

    def forward(self, x: torch.Tensor | SparseBatch) -> torch.Tensor:
        """The pooled logits, unchecked (see :meth:`check_gene_model`)."""
        return self.pool(x, self.classify(self.encoder(x)))

    def pool(self, x: torch.Tensor | SparseBatch, logits: torch.Tensor, scaled: torch.Tensor | None = None) -> torch.Tensor:
        """The network's ``logits`` for cells ``x``, pooled with the gene model's when it has one
        (``scaled``: as :meth:`GeneModel.forward`)."""
        return self.combine(logits, self.gene_model(x, scaled)) if self.pooled else logits

    def combine(self, logits: torch.Tensor, decision: torch.Tensor) -> torch.Tensor:
        """The network's ``logits`` pooled with the gene model's ``decision`` values."""
        w = self.gene_model_weight
        return (1 - w) * logits + w * F.logsigmoid(decision)

    def check_gene_model(self, logits: torch.Tensor, decision: torch.Tensor) -> GeneModelCheck:
        """Whether the cells of the network's ``logits`` and the gene model's ``decision``
        values (one dataset, or one request) are called with the gene model (see
        ``GENE_MODEL_AGREEMENT_DROP``). A model fitted before the validation agreement was kept
        pools every set of cells of ``GENE_MODEL_CHECK_CELLS`` or more."""
        n = len(logits)
        agreement = float((logits.argmax(1) == decision.argmax(1)).float().mean()) if n else float("nan")
        ref, n_val = self.gene_model_agreement, self.gene_model_val_cells
        # the standard error of the difference if both sets agreed at the validation share
        se = math.sqrt(ref * (1 - ref) * (1 / n_val + 1 / n)) if n and n_val and math.isfinite(ref) else 0.0
        allowed = GENE_MODEL_AGREEMENT_DROP + GENE_MODEL_CHECK_Z * se
        used = self.pooled and n >= GENE_MODEL_CHECK_CELLS and not agreement < ref - allowed
        return GeneModelCheck(used, agreement, ref, n, allowed)

    def called(self, logits: torch.Tensor, decision: torch.Tensor | None,
               gene_model: bool | None = None) -> tuple[torch.Tensor, GeneModelCheck | None]:
        """The logits one set of cells is called by, and the gene model's check (None: the model
        has none): the network's ``logits`` pooled with the gene model's ``decision`` values
        where :meth:`check_gene_model` passes, or where ``gene_model`` is True; False: the
        network alone (``decision`` may then be None)."""
        if not self.pooled:
            return logits, None
        if gene_model is False:
            return logits, GeneModelCheck(False, float("nan"), self.gene_model_agreement, len(logits))
        check = self.check_gene_model(logits, decision)
        if gene_model:
            check = dataclasses.replace(check, used=True)
        return (self.combine(logits, decision) if check.used else logits), check

    @property
    def pooled(self) -> bool:
        return self.gene_model is not None and self.gene_model_weight > 0

    def calibration(self, check: GeneModelCheck | None) -> tuple[float, float]:
        """(softmax temperature, rejection threshold) fitted at fine-tuning for calls made as
        ``check`` says: the pooled model's, or the network's alone where the gene model was
        left out (``network_*``)."""
        if check is not None and not check.used:
            return self.network_temperature, self.network_reject_threshold
        return self.temperature, self.reject_threshold

    def classify(self, pre: torch.Tensor) -> torch.Tensor:
        """Logits from the encoder's pre-activation (x W + b): what mixing cells acts on."""
        return self.out(torch.sigmoid(self.hidden(torch.sigmoid(pre))))

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


def known_type_score(logits: np.ndarray, temperature: float = 1.0, score: str = "energy") -> np.ndarray:
    """Per cell, a score that is high for a type the network knows, what rejection thresholds:
    ``energy`` (T log sum exp(logits / T), the negative free energy) or ``confidence`` (the
    log-odds of the calibrated confidence, :func:`confidence_log_odds`)."""
    from scipy.special import logsumexp

    if score == "confidence":
        return confidence_log_odds(logits, temperature)
    if score != "energy":
        raise ValueError(f"unknown rejection score {score!r}; energy or confidence")
    z = np.asarray(logits, np.float64)
    return temperature * logsumexp(z / temperature, axis=1) if z.size else np.zeros(len(z))


def confidence_log_odds(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """log(p / (1 - p)) of each cell's calibrated confidence p (the largest probability of
    softmax(logits / T)): the order of p, without p's rounding to 1 for confident cells (a
    float32 softmax reaches 1.0 at a logit margin of about 17), so a threshold on it stays
    meaningful when the validation cells are all confident."""
    from scipy.special import logsumexp

    z = np.asarray(logits, np.float64) / temperature
    if z.size == 0:
        return np.zeros(len(z))
    rows, top = np.arange(len(z)), z.argmax(1)
    best = z[rows, top].copy()
    z[rows, top] = -np.inf
    return best - logsumexp(z, axis=1)
