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


# ---------------------------------------------------------------------------- chunked shards
#
# The streaming loader shards by contiguous chunks of cells, not single cells: a store reads a
# run of consecutive cells far faster than the same cells scattered (one query and a few data
# tiles per run). Shards are kept as (starts, stops) ranges, O(cells / chunk) memory.


def _cut(starts: np.ndarray, stops: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Cells ``lo`` to ``hi`` (exclusive) of the sequence the ranges spell out, as ranges."""
    lengths = stops - starts
    cum = np.concatenate([[0], np.cumsum(lengths)])
    if not 0 <= lo <= hi <= cum[-1]:
        raise ValueError(f"cells {lo}..{hi} are outside a sequence of {cum[-1]}")
    if lo == hi:
        return starts[:0], stops[:0]
    k0 = int(np.searchsorted(cum, lo, side="right")) - 1
    k1 = int(np.searchsorted(cum, hi, side="left"))
    s, e = starts[k0:k1].copy(), stops[k0:k1].copy()
    s[0] += lo - cum[k0]
    e[-1] -= cum[k1] - hi
    return s, e


def ranges_to_positions(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Every position the ranges cover, in range order."""
    lengths = stops - starts
    if lengths.sum() == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.repeat(starts - offsets, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)


def shard_ranges(
    n_cells: int, rank: int, world: int, seed: int, chunk_cells: int
) -> tuple[np.ndarray, np.ndarray]:
    """Position ranges (starts, stops) owned by ``rank``.

    A seeded permutation of contiguous chunks of ``chunk_cells`` positions is laid end to end and
    cut into ``world`` pieces of ``ceil(n / world)`` cells; the sequence wraps around to pad the
    last pieces (as :func:`shard_positions` does), so every rank gets the same number of cells
    and shards overlap only by that padding (< ``world`` cells).
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world size {world}")
    if n_cells <= 0:
        raise ValueError("cannot shard an empty set of cells")
    if chunk_cells < 1:
        raise ValueError(f"chunk_cells must be >= 1, got {chunk_cells}")
    n_chunks = -(-n_cells // chunk_cells)
    perm = np.random.default_rng(seed).permutation(n_chunks).astype(np.int64)
    starts = perm * chunk_cells
    stops = np.minimum(starts + chunk_cells, n_cells)
    per_rank = -(-n_cells // world)
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    pieces_s, pieces_e = [], []
    while lo < hi:  # at most a few turns: only padding wraps
        a = lo % n_cells
        take = min(hi - lo, n_cells - a)
        s, e = _cut(starts, stops, a, a + take)
        pieces_s.append(s)
        pieces_e.append(e)
        lo += take
    return np.concatenate(pieces_s), np.concatenate(pieces_e)
