"""One optimisation step each; no Ray, no MLflow."""

from __future__ import annotations

import torch

from scpretrain_dist.model.networks import PretrainLoss, PretrainModel, SparseBatch


def pretrain_step(
    model: torch.nn.Module,
    x: SparseBatch | torch.Tensor,
    dataset_idx: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
) -> PretrainLoss:
    """Summed cross-entropy over partitions of a batch that mixes datasets.

    ``model`` may be DDP-wrapped; the loss is computed by the unwrapped module.
    """
    inner: PretrainModel = getattr(model, "module", model)
    optimizer.zero_grad(set_to_none=True)
    logits = model(x, dataset_idx)
    loss = inner.loss(logits, labels, dataset_idx)
    loss.total.backward()
    optimizer.step()
    return loss
