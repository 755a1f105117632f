"""Data parallelism for a model with sparse (row) gradients, without DDP's dense all-reduce.

After ``backward`` every rank holds sparse gradients over the rows its batch touched (the
encoder's genes, the heads of its batch's datasets) and small dense gradients. ``RowGradSync``
averages them over the ranks in three collectives per step: an all-gather of how many rows each
rank touched per parameter, an all-gather of those row ids, and one all-reduce of a flat buffer
holding the union of touched rows of every sparse parameter plus every dense gradient. Rows no
rank touched are never sent. Every rank ends with the same averaged gradients (the union
is computed identically everywhere), so replicas that start equal stay equal, as with DDP.

The model knows nothing of this; the training loop calls ``sync()`` between backward and the
optimizer step.

``GeneRowExchange`` shards the encoder's weight instead (``pretrain.encoder_sharding =
"genes"``, on CPUs): gene g's row belongs to rank g % world, which alone steps it. Every step each
rank multiplies every rank's batch over its own genes (batches that
:class:`~scpretrain_dist.data.dataset.GeneShardedCells` already holds so, without communication;
otherwise the ranks all-gather their sparse batches, a few MB against tens of MB of gradient
rows), one all-reduce of those products (cells x dim) gives every rank its batch's full
products, and backward all-gathers the output gradients (cells x dim) so each rank forms the
mean gradient of its own rows. Nothing is computed twice:
the union of the ranks' genes is gathered, multiplied and stepped by Adam once, a share on each
rank, where a replicated encoder steps every union row on every rank. ``assemble`` puts the whole
weight back on every rank at the end.
"""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp
import torch
import torch.distributed as dist

from scpretrain_dist.data.distributed import rank_and_world
from scpretrain_dist.train.optim import coalesced_rows


def broadcast_parameters(model: torch.nn.Module, src: int = 0) -> None:
    """Every rank takes rank ``src``'s parameters and buffers (what DDP does at wrap time)."""
    if rank_and_world()[1] <= 1:
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src)


class RowGradSync:
    """Averages the gradients of ``model`` over all ranks (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, sparse_params: list[torch.nn.Parameter],
                 wire_dtype: torch.dtype = torch.float32, skip: tuple[torch.nn.Parameter, ...] = ()):
        """``sparse_params``: the parameters whose gradients are sparse over rows. Every rank
        must pass the same ones (the buffer layout depends on it); a rank whose batch did not
        use one contributes no rows, a missing dense gradient counts as zeros. ``wire_dtype``:
        what the all-reduce sends (``torch.bfloat16`` halves the bytes; the sum comes back in
        the gradients' own dtype, the same on every rank). ``skip``: parameters whose gradient
        is already the mean over the ranks (a :class:`GeneRowExchange` encoder's weight)."""
        self.wire_dtype = wire_dtype
        skipped = {id(p) for p in skip}
        self.params = [p for p in model.parameters() if p.requires_grad and id(p) not in skipped]
        ids = {id(p) for p in sparse_params}
        self.sparse = [p for p in self.params if id(p) in ids]
        self.dense = [p for p in self.params if id(p) not in ids]
        self.world = rank_and_world()[1]
        self.rows_sent = 0  # rows all-reduced so far, for the record
        self.seconds = 0.0  # time spent in __call__ so far

    def __call__(self) -> None:
        if self.world <= 1:
            return
        t0 = time.perf_counter()
        try:
            self._sync()
        finally:
            self.seconds += time.perf_counter() - t0

    def _sync(self) -> None:
        device = self.params[0].device
        sparse, dense = self.sparse, self.dense
        # 1. every rank's touched rows: its count per sparse parameter, then the row ids
        local = [_row_sparse(p) for p in sparse]
        counts = torch.tensor([g.indices().shape[1] for g in local], dtype=torch.int64, device=device)
        packed = torch.cat([counts, *(g.indices()[0] for g in local)])
        unions = [[] for _ in sparse]
        for part in _all_gather_varlen(packed, self.world):
            ids = torch.split(part[len(sparse) :], part[: len(sparse)].tolist())
            for j, r in enumerate(ids):
                unions[j].append(r)
        unions = [torch.unique(torch.cat(u), sorted=True) for u in unions]
        # 3. one all-reduce: each sparse parameter's union rows, then the dense gradients
        sizes = [len(u) * p[0].numel() for u, p in zip(unions, sparse)]
        sizes += [p.numel() for p in dense]
        buf = torch.zeros(sum(sizes), dtype=self.params[0].dtype, device=device)
        views = list(torch.split(buf, sizes))
        for j, (p, g, u) in enumerate(zip(sparse, local, unions)):
            block = views[j].view(len(u), *p.shape[1:])
            block[torch.searchsorted(u, g.indices()[0])] = g.values()
        for j, p in enumerate(dense, start=len(sparse)):
            if p.grad is not None:
                views[j].copy_(p.grad.reshape(-1))
        if self.wire_dtype != buf.dtype:
            wire = buf.to(self.wire_dtype)
            dist.all_reduce(wire)
            buf.copy_(wire)
        else:
            dist.all_reduce(buf)
        buf /= self.world
        for j, (p, u) in enumerate(zip(sparse, unions)):
            values = views[j].view(len(u), *p.shape[1:])
            p.grad = torch.sparse_coo_tensor(u.unsqueeze(0), values, p.shape, is_coalesced=True,
                                             check_invariants=False)
            self.rows_sent += len(u)
        for j, p in enumerate(dense, start=len(sparse)):
            p.grad = views[j].view_as(p)


def _row_sparse(p: torch.nn.Parameter) -> torch.Tensor:
    """The gradient of ``p`` as a coalesced sparse tensor over rows (no rows if it has none)."""
    g = p.grad
    if g is None:
        return torch.sparse_coo_tensor(
            torch.empty(1, 0, dtype=torch.int64, device=p.device),
            torch.empty(0, *p.shape[1:], dtype=p.dtype, device=p.device), p.shape,
        ).coalesce()
    if not g.is_sparse:
        raise ValueError("a parameter declared row-sparse got a dense gradient; build the "
                         "model with sparse_grad=True")
    return coalesced_rows(g)


def shard_by_gene(encoder, exchange: GeneRowExchange) -> None:
    """Data parallelism over genes for ``encoder`` (built with ``sparse_grad``): a sparse batch
    is multiplied as this rank's gene rows times every rank's batch (``exchange.combine``),
    summed over the ranks into this batch's products (``exchange.own_cells``). The encoder
    itself knows nothing of it; :func:`unshard` undoes it."""
    from scpretrain_dist.model.networks import SparseBatch

    if not encoder.sparse_grad:
        raise ValueError("an encoder sharded by gene needs sparse_grad=True (gradients over its rows)")
    plain = type(encoder).forward

    def forward(x):
        if not isinstance(x, SparseBatch):
            return plain(encoder, x)
        combined = exchange.combine(x)
        return exchange.own_cells(encoder.rows_product(combined), combined.cells_per_rank) + encoder.bias

    encoder.forward = forward  # an instance attribute: nn.Module.__call__ finds it first


def unshard(encoder) -> None:
    encoder.__dict__.pop("forward", None)


class GeneRowExchange:
    """The encoder's weight rows sharded over the ranks by gene (see the module docstring).

    Installed on an encoder with ``sparse_grad`` by :func:`shard_by_gene`; its weight's gradient is
    then already the mean over the ranks, over this rank's genes only (pass the weight as
    ``skip`` to :class:`RowGradSync`). Every rank must start from the same weight and run the
    same number of steps; rows of other ranks' genes go stale on a rank until :meth:`assemble`.
    """

    def __init__(self, n_genes: int, rank: int, world: int):
        self.rank, self.world = rank, world
        self.owned = np.arange(n_genes) % world == rank
        self.seconds = 0.0  # time in the exchange's own work and collectives so far

    def combine(self, x) -> object:
        """Every rank's batch (in rank order) over this rank's genes, one SparseBatch with
        ``cells_per_rank`` set; a batch that already is one (from
        :class:`~scpretrain_dist.data.dataset.GeneShardedCells`) is used as it is."""
        from scpretrain_dist.model.networks import SparseBatch

        if x.cells_per_rank is not None:
            if len(x.cells_per_rank) != self.world:
                raise ValueError(f"a batch of {len(x.cells_per_rank)} ranks' cells on a world of {self.world}")
            return x
        t0 = time.perf_counter()
        genes, local = x.gathered()
        header = torch.tensor([len(x.offsets), len(genes), len(local)], dtype=torch.int32)
        packed = torch.cat([header, genes.to(torch.int32), local.to(torch.int32),
                            x.offsets.to(torch.int32), x.values.to(torch.float32).view(torch.int32)])
        cols, values, per_cell = [], [], []
        for part in _all_gather_varlen(packed, self.world):
            genes, local, offsets, vals = _unpack(part.numpy())
            kept = np.flatnonzero(self.owned[genes][local])  # values of this rank's genes, in order
            # values kept per cell: kept positions below each cell's end, minus below its start
            per_cell.append(np.diff(np.searchsorted(kept, np.append(offsets, len(local)))))
            cols.append(genes.take(local.take(kept)))
            values.append(vals.take(kept))
        counts = np.concatenate(per_cell)
        X = sp.csr_matrix((np.concatenate(values), np.concatenate(cols), np.concatenate([[0], np.cumsum(counts)])),
                          shape=(len(counts), len(self.owned)))
        batch = SparseBatch.from_csr(X)
        batch.cells_per_rank = tuple(len(c) for c in per_cell)
        self.seconds += time.perf_counter() - t0
        return batch

    def own_cells(self, products: torch.Tensor, cells_per_rank: tuple[int, ...]) -> torch.Tensor:
        """This rank's cells of the products (of the ranks' batches, ``cells_per_rank`` cells
        each) summed over the ranks; backward hands every rank the mean of the ranks' output
        gradients for all cells."""
        return _OwnCells.apply(products, self, cells_per_rank)

    @torch.no_grad()
    def assemble(self, weight: torch.Tensor) -> None:
        """Every rank's rows into ``weight`` on every rank (each row from its owner, exactly)."""
        t0 = time.perf_counter()
        weight[torch.from_numpy(~self.owned)] = 0
        dist.all_reduce(weight)
        self.seconds += time.perf_counter() - t0


class _OwnCells(torch.autograd.Function):
    @staticmethod
    def forward(ctx, products, exchange, cells):
        t0 = time.perf_counter()
        total = products.detach().clone()
        dist.all_reduce(total)
        lo = sum(cells[: exchange.rank])
        ctx.exchange, ctx.cells = exchange, cells
        exchange.seconds += time.perf_counter() - t0
        return total[lo : lo + cells[exchange.rank]]

    @staticmethod
    def backward(ctx, grad_own):
        ex = ctx.exchange
        t0 = time.perf_counter()
        grad = torch.cat(_all_gather_padded(grad_own, list(ctx.cells))) / ex.world
        ex.seconds += time.perf_counter() - t0
        return grad, None, None


def _unpack(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A batch packed by :meth:`GeneRowExchange.combine`: (distinct genes, each value's
    position among them, cell offsets, values)."""
    n, g, nnz = (int(v) for v in p[:3])
    genes = p[3 : 3 + g]
    local = p[3 + g : 3 + g + nnz]
    offsets = p[3 + g + nnz : 3 + g + nnz + n]
    return genes, local, offsets, p[3 + g + nnz + n :].view(np.float32)


def _all_gather_varlen(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Every rank's 1-d tensor ``t`` (lengths may differ), in rank order."""
    size = torch.tensor([len(t)], dtype=torch.int64, device=t.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    return _all_gather_padded(t, [int(s) for s in sizes])


def _all_gather_padded(t: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Every rank's tensor ``t``, whose first dimension is ``sizes[rank]`` on each rank (known
    to all), in rank order: one all-gather of copies padded to the longest."""
    padded = t.new_zeros((max(sizes), *t.shape[1:]))
    padded[: len(t)] = t
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return [o[:n] for o, n in zip(out, sizes)]
