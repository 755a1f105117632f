"""Plain nn.Modules: the shared encoder, multi-task heads and the fine-tune classifier."""

from scpretrain_dist.model.networks import (
    CellTypeClassifier,
    Encoder,
    GeneModel,
    MultiTaskHeads,
    PretrainModel,
    SparseBatch,
)

__all__ = ["CellTypeClassifier", "Encoder", "GeneModel", "MultiTaskHeads", "PretrainModel", "SparseBatch"]
