"""Adam for parameters with sparse (row) gradients: the encoder's gene rows and the heads' rows.

``LazyAdam`` is ``torch.optim.Adam`` (no weight decay, no amsgrad) for dense gradients. For a
sparse gradient it updates only the rows present in it, and each row keeps its own step count
for the bias correction: a row moves as if it had its own Adam that is stepped only on the
batches that touch it. For a head this is exact per-head Adam (every row of a dataset's head is
touched on the same steps, and ``torch.optim.Adam`` skips a parameter whose gradient is
``None``, which is what one-head-per-dataset training does). For the encoder it is the one
deviation from dense Adam: a gene absent from a batch keeps its moments and its weight instead
of decaying its moments and drifting along its old momentum. Dense and lazy Adam agree exactly
on any step where every row is touched, and on every row at the first step.
"""

from __future__ import annotations

import math

import torch


class LazyAdam(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if lr <= 0 or eps <= 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid Adam settings lr={lr}, betas={betas}, eps={eps}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if p.grad.is_sparse:
                    _sparse_step(p, p.grad, state, lr, b1, b2, eps)
                else:
                    _dense_step(p, p.grad, state, lr, b1, b2, eps)
        return loss


def _dense_step(p, grad, state, lr, b1, b2, eps) -> None:
    """torch.optim.Adam's single-tensor update."""
    state["step"] = state.get("step", 0) + 1
    step = state["step"]
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.lerp_(grad, 1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    step_size = lr / (1 - b1**step)
    denom = (v.sqrt() / math.sqrt(1 - b2**step)).add_(eps)
    p.addcdiv_(m, denom, value=-step_size)


def coalesced_rows(grad: torch.Tensor) -> torch.Tensor:
    """A sparse gradient over rows, coalesced. One whose row ids are already strictly
    increasing (the encoder's and the block heads' gradients: autograd's accumulation drops
    their coalesced flag) is only marked so, skipping a sort and a copy of every row."""
    if grad.is_coalesced():
        return grad
    rows = grad._indices()[0]
    if grad.sparse_dim() == 1 and bool((rows[1:] > rows[:-1]).all()):
        return grad._coalesced_(True)
    return grad.coalesce()


# rows per chunk of a sparse Adam step: 512 x 200 float32 moments are 400 KiB each
SPARSE_CHUNK_ROWS = 512


def _sparse_step(p, grad, state, lr, b1, b2, eps) -> None:
    """Adam on the rows present in a sparse gradient, with per-row step counts.

    Same update as the dense one, rearranged to save passes over the rows:
    lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps) == (lr sqrt(bc2) / bc1) * m / (sqrt(v) + eps sqrt(bc2)).
    The rows are updated ``SPARSE_CHUNK_ROWS`` at a time so that the gathered moments (a few hundred
    KiB) stay in the core's cache through the update's passes: twice as fast as whole-gradient
    passes over tens of MB when a batch touches tens of thousands of gene rows; the same
    numbers, since each row's update depends on that row alone.
    """
    if "row_step" not in state:
        state["row_step"] = torch.zeros(p.shape[0], dtype=torch.int64, device=p.device)
    grad = coalesced_rows(grad)
    rows = grad.indices()[0]
    g = grad.values()
    if rows.numel() == 0:
        return
    steps = state["row_step"].index_select(0, rows).add_(1)
    state["row_step"].index_copy_(0, rows, steps)
    shape = (-1,) + (1,) * (g.dim() - 1)
    steps64 = steps.to(torch.float64)
    bc2_sqrt = torch.sqrt(1 - b2**steps64)
    scale = (lr * bc2_sqrt / (1 - b1**steps64)).to(p.dtype).view(shape)
    eps_row = (eps * bc2_sqrt).to(p.dtype).view(shape)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    # on a GPU one chunk: it wants the largest kernels, not cache-sized ones
    chunk_rows = len(rows) if p.is_cuda else SPARSE_CHUNK_ROWS
    for lo in range(0, len(rows), chunk_rows):
        r, gc = rows[lo : lo + chunk_rows], g[lo : lo + chunk_rows]
        m = exp_avg.index_select(0, r).lerp_(gc, 1 - b1)
        exp_avg.index_copy_(0, r, m)
        v = exp_avg_sq.index_select(0, r).mul_(b2).addcmul_(gc, gc, value=1 - b2)
        exp_avg_sq.index_copy_(0, r, v)
        denom = v.sqrt_().add_(eps_row[lo : lo + chunk_rows])  # v is stored already
        p.index_add_(0, r, m.mul_(scale[lo : lo + chunk_rows]).div_(denom), alpha=-1)  # so is m
