"""DDP-safe partitioning of cells: seeded, disjoint, complete, and equal in length per rank."""

from __future__ import annotations

import numpy as np


def shard_positions(n_cells: int, rank: int, world: int, seed: int) -> np.ndarray:
    """Positions (0..n_cells-1) owned by ``rank``.

    A seeded permutation is dealt round-robin, so shards are disjoint and mix datasets. When
    ``n_cells`` is not a multiple of ``world`` the permutation wraps around to pad the short
    shards: every rank gets ``ceil(n / world)`` cells and therefore the same number of steps
    (unequal step counts make DDP ranks wait on each other forever).
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world size {world}")
    if n_cells <= 0:
        raise ValueError("cannot shard an empty set of cells")
    perm = np.random.default_rng(seed).permutation(n_cells)
    per_rank = -(-n_cells // world)
    padded = np.resize(perm, per_rank * world)  # np.resize repeats from the start
    return padded[rank::world]


def steps_per_epoch(n_cells: int, world: int, batch_size: int) -> int:
    per_rank = -(-n_cells // world)
    return -(-per_rank // batch_size)


def epoch_batches(n_local: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """A fresh shuffle of a rank's cells each epoch, cut into batches (last one may be short)."""
    order = np.random.default_rng([seed, epoch]).permutation(n_local)
    return [order[i : i + batch_size] for i in range(0, n_local, batch_size)]
