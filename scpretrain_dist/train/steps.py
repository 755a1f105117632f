"""One optimisation step each; no Ray, no MLflow."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from scpretrain_dist.model.networks import PretrainLoss, PretrainModel, SparseBatch


def pretrain_step(
    model: torch.nn.Module,
    x: SparseBatch | torch.Tensor,
    dataset_idx: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    sync_gradients: Callable[[], None] | None = None,
) -> PretrainLoss:
    """Summed cross-entropy over partitions of a batch that mixes datasets.

    ``model`` may be DDP-wrapped; the loss is computed by the unwrapped module.
    ``sync_gradients`` runs between backward and the optimizer step (data parallelism that
    is not DDP, see ``train/parallel.py``).
    """
    inner: PretrainModel = getattr(model, "module", model)
    optimizer.zero_grad(set_to_none=True)
    logits = model(x, dataset_idx)
    loss = inner.loss(logits, labels, dataset_idx)
    loss.total.backward()
    if sync_gradients is not None:
        sync_gradients()
    optimizer.step()
    return loss


@torch.no_grad()
def pretrain_eval(
    model: torch.nn.Module, batches: Iterable[tuple[SparseBatch | torch.Tensor, torch.Tensor, torch.Tensor]]
) -> tuple[float, float, int]:
    """(summed loss x cells, accuracy x cells, cells) over ``batches``, without updates."""
    inner: PretrainModel = getattr(model, "module", model)
    loss_sum = acc_sum = 0.0
    n = 0
    for x, didx, labels in batches:
        out = inner.loss(inner(x, didx), labels)
        loss_sum += float(out.total) * len(didx)
        acc_sum += out.accuracy * len(didx)
        n += len(didx)
    return loss_sum, acc_sum, n
