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
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from scpretrain_dist.config import ConfigError
from scpretrain_dist.data.distributed import rank_and_world
from scpretrain_dist.train.optim import coalesced_rows

SYNC_DTYPES = ("float32", "bfloat16")


def check_sync_dtype(name: str) -> str:
    """``pretrain.gradient_sync_dtype`` if it is one the sync can send, else a clear error."""
    if name not in SYNC_DTYPES:
        raise ConfigError(f"pretrain.gradient_sync_dtype={name!r}: use one of {', '.join(SYNC_DTYPES)}")
    return name


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
                 wire_dtype: torch.dtype = torch.float32):
        """``sparse_params``: the parameters whose gradients are sparse over rows. Every rank
        must pass the same ones (the buffer layout depends on it); a rank whose batch did not
        use one contributes no rows, a missing dense gradient counts as zeros. ``wire_dtype``:
        what the all-reduce sends (``torch.bfloat16`` halves the bytes; the sum comes back in
        the gradients' own dtype, the same on every rank)."""
        self.wire_dtype = wire_dtype
        self.params = [p for p in model.parameters() if p.requires_grad]
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
        # 1. how many rows each rank touched, per sparse parameter
        local = [_row_sparse(p) for p in sparse]
        rows_local = [g.indices()[0] for g in local]
        counts = torch.tensor([len(r) for r in rows_local], dtype=torch.int64, device=device)
        all_counts = [torch.empty_like(counts) for _ in range(self.world)]
        dist.all_gather(all_counts, counts)
        all_counts = torch.stack(all_counts)  # (world, n_sparse)
        # 2. the row ids themselves, padded to the longest rank
        totals = all_counts.sum(1)
        width = int(totals.max())
        flat = torch.cat(rows_local) if rows_local else torch.empty(0, dtype=torch.int64, device=device)
        padded = torch.full((width,), -1, dtype=torch.int64, device=device)
        padded[: len(flat)] = flat
        gathered = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(gathered, padded)
        unions = []
        for j in range(len(sparse)):
            parts = []
            for r in range(self.world):
                lo = int(all_counts[r, :j].sum())
                parts.append(gathered[r][lo : lo + int(all_counts[r, j])])
            unions.append(torch.unique(torch.cat(parts), sorted=True))
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
