"""Pure K-means: arrays in, labels and stats out.

Lloyd iterations from a k-means++ start, with every partition of a dataset (one k each) run in
lockstep over one pass of its cells. An iteration is written as (partial sums over a shard of
cells -> reduce -> update), so a dataset split over several workers gives exactly the
single-process result: :func:`lloyd` is :func:`run_lloyd` with one shard. Assignment is exact
and done by one :class:`Engine`, chosen in one place (:func:`engine`): ``blas``, per block of
cells and chunk of a partition's centroids one float32 GEMM whose distance table stays in cache
for the argmin; ``faiss``, faiss's exact search (CPU or GPU); ``torch``, the GEMM + argmin in
torch with the cells kept on the device. Empty clusters are re-seeded as faiss does (split a
large cluster in two).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

# rows per block of the faiss (GPU) search and of the float64 copy of the cells in the sums
BLOCK_ROWS = 32768
# rows per block of the CPU assignment, and centroids per chunk of a partition: the block's
# distance table (rows x chunk) stays in cache between the GEMM that writes it and the argmin
CPU_BLOCK_ROWS = 1024
CPU_CHUNK_COLS = 512
# cells whose float64 copy (for exact per-centroid sums) is kept across iterations, in bytes
CACHE_FLOAT64_BYTES = 256 << 20


def n_clusters(n_cells: int, cluster_sizes: tuple[int, ...], min_k: int = 2) -> list[int]:
    """One k per partition: mean cluster size s gives k = n / s, at least ``min_k``, at most n."""
    return [int(min(n_cells, max(min_k, round(n_cells / s)))) for s in cluster_sizes]


def kmeans_plusplus_init(x: np.ndarray, k: int, seed: int, n_local_trials: int | None = None,
                         weights: np.ndarray | None = None) -> np.ndarray:
    """Greedy k-means++ (Arthur & Vassilvitskii; scikit-learn's variant): each new centre is
    the best of ``2 + ln k`` candidates drawn with probability ~ squared distance to the
    nearest centre so far. Written as one float32 GEMM per centre (scikit-learn upcasts
    float32 data to float64 in chunks, which made it the slowest step of a refresh).
    ``weights``: each point counts that many times (the reduction step of k-means||)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must lie between 1 and the number of points ({n})")
    rng = np.random.default_rng(seed)
    trials = n_local_trials or 2 + int(np.log(k))
    x_sq = np.einsum("ij,ij->i", x, x)
    centers = np.empty((k, d), dtype=np.float32)
    first = int(rng.integers(n))
    centers[0] = x[first]
    w = None if weights is None else np.asarray(weights, np.float64)
    closest = np.maximum(x_sq - 2 * (x @ x[first]) + x_sq[first], 0).astype(np.float64)
    pot = closest.sum() if w is None else (w * closest).sum()
    for c in range(1, k):
        if pot <= 0:  # fewer distinct points than k: take any not yet chosen
            centers[c] = x[rng.integers(n)]
            continue
        cand = np.searchsorted(np.cumsum(closest if w is None else w * closest), rng.random(trials) * pot)
        cand = np.minimum(cand, n - 1)
        dist = x_sq[cand][:, None] - 2 * (x[cand] @ x.T) + x_sq[None, :]  # (trials, n)
        np.maximum(dist, 0, out=dist)
        np.minimum(dist, closest[None, :], out=dist)
        pots = dist.sum(1, dtype=np.float64) if w is None else dist @ w
        best = int(np.argmin(pots))
        closest, pot = dist[best].astype(np.float64), pots[best]
        centers[c] = x[cand[best]]
    return centers


def init_sample(n_cells: int, max_cells: int, seed: int) -> np.ndarray:
    """Sorted positions of the cells k-means++ (and PCA) start from: all of them up to
    ``max_cells``, else a seeded uniform sample of that size (independent of any sharding)."""
    if n_cells <= max_cells:
        return np.arange(n_cells)
    return np.sort(np.random.default_rng([seed, n_cells]).choice(n_cells, max_cells, replace=False))


# above this k, the start is k-means|| (the greedy start's pass over every point per centre
# took most of a refresh at atlas scale: 555 of 1,067 s summed on 1M cells)
PARALLEL_INIT_K = 256


def parallel_candidates(x: np.ndarray, k: int, seed: int, rounds: int = 2,
                        oversample: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """The oversampling rounds of k-means|| (Bahmani et al. 2012): (kept points, weights).
    Each round keeps every point with probability ~ oversample * k * (squared distance to the
    nearest kept point) / total, a pass that is one GEMM against the new points; a kept
    point's weight is the number of points nearest to it (tracked through the rounds)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    rng = np.random.default_rng([seed, k])
    kept = [x[int(rng.integers(n))][None]]
    closest = _assign_blas(x, kept)[1][:, 0].astype(np.float64)
    nearest = np.zeros(n, dtype=np.int64)  # index of each point's nearest kept point
    for _ in range(rounds):
        pot = closest.sum()
        if pot <= 0:
            break
        new = x[rng.random(n) < oversample * k * closest / pot]
        if len(new):
            label, dist = _assign_blas(x, [new])
            better = dist[:, 0] < closest
            nearest[better] = sum(len(c) for c in kept) + label[better, 0]
            closest[better] = dist[better, 0]
            kept.append(new)
    candidates = np.vstack(kept)
    return candidates, np.bincount(nearest, minlength=len(candidates))


def reduce_candidates(x: np.ndarray, candidates: tuple[np.ndarray, np.ndarray], k: int, seed: int) -> np.ndarray:
    """k centres from k-means|| candidates by weighted k-means++, one draw per centre (as
    Bahmani et al. reduce); the greedy start on all of ``x`` when too few distinct points were
    kept."""
    points, weights = candidates
    if len(points) <= k:
        return kmeans_plusplus_init(x, k, seed)
    return kmeans_plusplus_init(points, k, seed, n_local_trials=1, weights=weights)


def kmeans_parallel_init(x: np.ndarray, k: int, seed: int, rounds: int = 2, oversample: float = 2.0) -> np.ndarray:
    """k-means|| (Bahmani et al. 2012): :func:`parallel_candidates` reduced to k centres by
    :func:`reduce_candidates`. Two rounds and one draw: on a 160k-cell embedding at k = 3,206
    the start took 5.4 s instead of 27 s (5 rounds, greedy reduction), and the objective after
    10 Lloyd iterations was 0.2% higher (0.01% after 20 at k = 1,249)."""
    return reduce_candidates(x, parallel_candidates(x, k, seed, rounds, oversample), k, seed)


def plusplus_inits(x_sample: np.ndarray, ks: Sequence[int], seed: int) -> list[np.ndarray]:
    """One k-means++ start per partition (seed + partition). Greedy k-means++ when every k is at
    most ``PARALLEL_INIT_K``; otherwise k-means|| for every partition, its candidates drawn
    once, for the largest k, and reduced to each partition's k. The rounds are most of a
    k-means|| start, and candidates drawn for a larger k only oversample a smaller one more; a
    greedy start at k = 200 on 40k cells took 3x as long as drawing every partition's
    candidates, for an objective within 0.1% after 30 Lloyd iterations (three seeds)."""
    for k in ks:
        if not 1 <= k <= len(x_sample):
            raise ValueError(f"k={k} must lie between 1 and the number of points ({len(x_sample)})")
    if max(ks) <= PARALLEL_INIT_K:
        return [kmeans_plusplus_init(x_sample, k, seed + p) for p, k in enumerate(ks)]
    candidates = parallel_candidates(x_sample, max(ks), seed)
    return [reduce_candidates(x_sample, candidates, k, seed + p) for p, k in enumerate(ks)]


# ------------------------------------------------------------------ assignment
_GPU_RES = None
# rows per block of the torch (GPU) assignment: the block's distance table is rows x centroids
TORCH_BLOCK_ROWS = 16384


@functools.cache
def gpu_backend() -> str:
    """``"faiss"`` where faiss has GPU support and sees a GPU, else ``"torch"`` where torch sees
    a CUDA device; a clear error where neither does."""
    try:
        import faiss

        if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            return "faiss"
    except ImportError:
        pass
    import torch

    if torch.cuda.is_available():
        return "torch"
    raise RuntimeError(
        "pseudolabel.use_gpu=true but neither faiss-gpu nor torch sees a GPU: run on a CUDA "
        "machine (torch with CUDA is enough; faiss-gpu-cu12 is used where installed), or set "
        "pseudolabel.use_gpu=false"
    )


def _gpu_resources():
    """faiss GPU resources, once per process."""
    global _GPU_RES
    import faiss

    if _GPU_RES is None:
        _GPU_RES = faiss.StandardGpuResources()
    return _GPU_RES


def is_tensor(x) -> bool:
    return type(x).__module__.startswith("torch")


def _stacked_torch(xt, centroids: Sequence[np.ndarray]):
    import torch

    stacked = torch.as_tensor(np.vstack([np.asarray(c, dtype=np.float32) for c in centroids])).to(xt.device)
    bounds = np.concatenate([[0], np.cumsum([len(c) for c in centroids])]).tolist()
    return stacked, (stacked * stacked).sum(1), bounds


def _torch_blocks(xt, stacked, c_sq, bounds):
    """Per block of cells: (first row, block, [(labels, squared distances) per partition]),
    the distance table one GEMM (``addmm``: ||c||^2 - 2 x.c) against every partition at once."""
    import torch

    for lo in range(0, len(xt), TORCH_BLOCK_ROWS):
        block = xt[lo : lo + TORCH_BLOCK_ROWS]
        table = torch.addmm(c_sq, block, stacked.T, alpha=-2.0)
        x_sq = (block * block).sum(1)
        parts = []
        for p in range(len(bounds) - 1):
            best, label = table[:, bounds[p] : bounds[p + 1]].min(1)
            parts.append((label, (best + x_sq).clamp_min_(0)))
        yield lo, block, parts


def assign_torch(xt, centroids: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`assign` for cells held as a float32 torch tensor, on its device."""
    import torch

    stacked, c_sq, bounds = _stacked_torch(xt, centroids)
    labels = torch.empty((len(xt), len(centroids)), dtype=torch.int64, device=xt.device)
    dist = torch.empty((len(xt), len(centroids)), dtype=torch.float32, device=xt.device)
    for lo, block, parts in _torch_blocks(xt, stacked, c_sq, bounds):
        for p, (label, d) in enumerate(parts):
            labels[lo : lo + len(block), p] = label
            dist[lo : lo + len(block), p] = d
    return labels.cpu().numpy(), dist.cpu().numpy()


def partial_step_torch(xt, centroids: Sequence[np.ndarray]) -> LloydPartial:
    """:func:`partial_step` for cells held as a float32 torch tensor, on its device: sums in
    float64 (``index_add_``), counts by ``bincount``; only the (k, d) sums leave the device."""
    import torch

    stacked, c_sq, bounds = _stacked_torch(xt, centroids)
    d = xt.shape[1]
    sums = [torch.zeros((len(c), d), dtype=torch.float64, device=xt.device) for c in centroids]
    counts = [torch.zeros(len(c), dtype=torch.int64, device=xt.device) for c in centroids]
    objective = torch.zeros(len(centroids), dtype=torch.float64, device=xt.device)
    for _lo, block, parts in _torch_blocks(xt, stacked, c_sq, bounds):
        block64 = block.double()
        for p, (label, dist) in enumerate(parts):
            sums[p].index_add_(0, label, block64)
            counts[p] += torch.bincount(label, minlength=len(centroids[p]))
            objective[p] += dist.sum(dtype=torch.float64)
    return LloydPartial([s.cpu().numpy() for s in sums], [c.cpu().numpy() for c in counts],
                        objective.cpu().tolist())


def _assign_faiss(x: np.ndarray, centroids: Sequence[np.ndarray], gpu: bool) -> tuple[np.ndarray, np.ndarray]:
    """faiss's exact search (``IndexFlatL2``, or ``GpuIndexFlatL2``) per partition."""
    import faiss

    labels = np.empty((len(x), len(centroids)), dtype=np.int64)
    dist = np.empty((len(x), len(centroids)), dtype=np.float32)
    for p, c in enumerate(centroids):
        d = c.shape[1]
        index = faiss.GpuIndexFlatL2(_gpu_resources(), d) if gpu else faiss.IndexFlatL2(d)
        index.add(np.ascontiguousarray(c, dtype=np.float32))
        for lo in range(0, len(x), BLOCK_ROWS):
            dd, i = index.search(x[lo : lo + BLOCK_ROWS], 1)
            labels[lo : lo + BLOCK_ROWS, p] = i[:, 0]
            dist[lo : lo + BLOCK_ROWS, p] = dd[:, 0]
    return labels, dist


def cpu_gemm() -> str:
    """The float32 GEMM the CPU assignment calls: ``"torch"`` (MKL in the x86 wheels) on Intel
    CPUs, ``"numpy"`` (OpenBLAS) elsewhere; ``SCPRETRAIN_CPU_GEMM=torch|numpy`` overrides. MKL
    runs a slower code path on other vendors' CPUs: one thread on an AMD EPYC (Zen 4), the
    assignment's products at 1,024 x 208 x 512 ran at 104 GFLOP/s in OpenBLAS vs 99 in MKL
    (2,048^3: 103 vs 96); on the Intel machine measured before, MKL was 7% faster. Fixed per
    machine (not timed at start-up), so every process of a pool computes the same labels."""
    choice = os.environ.get("SCPRETRAIN_CPU_GEMM", "auto")
    if choice in ("numpy", "torch"):
        return choice
    if choice != "auto":
        raise ValueError(f"SCPRETRAIN_CPU_GEMM={choice!r}: use auto, numpy or torch")
    return _default_cpu_gemm()


@functools.cache
def _default_cpu_gemm() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            intel = any(line.startswith("vendor_id") and "GenuineIntel" in line for line in fh)
    except OSError:
        intel = False
    if intel:
        import torch

        if torch.backends.mkl.is_available():
            return "torch"
    return "numpy"


def _chunked_weights(c: np.ndarray, width: int) -> np.ndarray:
    """[-2 c^T; ||c||^2] (``width`` rows, zeros below), split into equal chunks of at most
    ``CPU_CHUNK_COLS`` centroids: (chunks, width, chunk columns), contiguous per chunk. The last
    chunk is padded with columns whose "distance" is float32's largest value (never nearest)."""
    k, d = c.shape
    n_chunks = -(-k // CPU_CHUNK_COLS)
    cols = -(-k // n_chunks)
    w = np.zeros((width, n_chunks * cols), dtype=np.float32)
    w[:d, :k] = -2.0 * c.T
    w[d, :k] = np.einsum("ij,ij->i", c, c)
    w[d, k:] = np.finfo(np.float32).max
    return np.ascontiguousarray(w.reshape(width, n_chunks, cols).transpose(1, 0, 2))


def _chunk_product(gemm: str, wide: np.ndarray, weights: list[np.ndarray], tables: dict[int, np.ndarray]):
    """``product(m, p, j)``: the first ``m`` rows of ``wide`` times chunk ``j`` of partition
    ``p``'s weights, written into the table of that chunk's width. torch's GEMM writes into the
    numpy tables through views of the same memory, made once here."""
    if gemm == "numpy":
        def product(m: int, p: int, j: int) -> None:
            w = weights[p][j]
            np.matmul(wide[:m], w, out=tables[w.shape[1]][:m])
        return product
    import torch

    wide_t = torch.from_numpy(wide)
    weights_t = [torch.from_numpy(w) for w in weights]
    tables_t = {cols: torch.from_numpy(t) for cols, t in tables.items()}

    def product(m: int, p: int, j: int) -> None:
        w = weights_t[p][j]
        torch.matmul(wide_t[:m], w, out=tables_t[w.shape[1]][:m])
    return product


def _assign_blas(x: np.ndarray, centroids: Sequence[np.ndarray], gemm: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, per block of ``CPU_BLOCK_ROWS`` cells, per
    partition and per chunk of at most ``CPU_CHUNK_COLS`` of its centroids, one GEMM of the
    block, widened by a column of ones (and zeros up to a multiple of 8 columns), against
    [-2 c^T; ||c||^2]: the GEMM writes -2 x.c + ||c||^2 into a table of at most 1,024 x 512
    floats (2 MiB, the size of a core's L2 here) that the argmin reads while it is in cache;
    a running minimum merges the chunks, and ||x||^2 is added to the minimum only. Without
    chunks a 160k-cell dataset's table (1,024 x 3,200 centroids, 13 MiB) went to the shared
    L3: with two actors side by side the assignment ran at 65-77 GFLOP/s a process, chunked
    at 83-89 (OpenBLAS, AMD EPYC). ``gemm``: see :func:`cpu_gemm`."""
    n, d = x.shape
    width = (d + 1 + 7) // 8 * 8
    weights = [_chunked_weights(np.asarray(c, dtype=np.float32), width) for c in centroids]
    rows = min(n, CPU_BLOCK_ROWS)
    wide = np.zeros((rows, width), dtype=np.float32)
    wide[:, d] = 1.0
    tables = {w.shape[2]: np.empty((rows, w.shape[2]), dtype=np.float32) for w in weights}
    product = _chunk_product(gemm or cpu_gemm(), wide, weights, tables)
    index = np.arange(rows)
    labels = np.empty((n, len(weights)), dtype=np.int64)
    dist = np.empty((n, len(weights)), dtype=np.float32)
    best_value = np.empty(rows, dtype=np.float32)
    for lo in range(0, n, CPU_BLOCK_ROWS):
        block = x[lo : lo + CPU_BLOCK_ROWS]
        m = len(block)
        wide[:m, :d] = block
        x_sq = np.einsum("ij,ij->i", block, block)
        for p, w in enumerate(weights):
            n_chunks, _, cols = w.shape
            t, value, label = tables[cols][:m], best_value[:m], labels[lo : lo + m, p]
            for j in range(n_chunks):
                product(m, p, j)
                best = t.argmin(1)
                v = t[index[:m], best]
                closer = v < value if j else slice(None)  # the first chunk sets every row
                value[closer] = v[closer]
                label[closer] = best[closer] + j * cols
            dist[lo : lo + m, p] = np.maximum(value + x_sq, 0)
    return labels, dist


# ------------------------------------------------------------------ one Lloyd iteration
@dataclass
class LloydPartial:
    """A shard's contribution to one iteration: per partition, the float64 sum of the cells
    assigned to each centroid, their count, and the summed squared distance."""

    sums: list[np.ndarray]  # (k_p, d) float64
    counts: list[np.ndarray]  # (k_p,) int64
    objective: list[float]

    @staticmethod
    def reduce(parts: Sequence[LloydPartial]) -> LloydPartial:
        first = parts[0]
        sums = [s.copy() for s in first.sums]
        counts = [c.copy() for c in first.counts]
        objective = list(first.objective)
        for part in parts[1:]:
            for p in range(len(sums)):
                sums[p] += part.sums[p]
                counts[p] += part.counts[p]
                objective[p] += part.objective[p]
        return LloydPartial(sums, counts, objective)


def _partial_step_arrays(x: np.ndarray, centroids: Sequence[np.ndarray], assign_fn,
                        x64: np.ndarray | None = None) -> LloydPartial:
    """Assign a shard's cells (a float32 array) to every partition's centroids with
    ``assign_fn`` and sum them per centroid. ``x64``: the cells as float64 (see
    :func:`float64_copy`), else converted block by block."""
    d = x.shape[1]
    sums = [np.zeros((len(c), d), dtype=np.float64) for c in centroids]
    counts = [np.zeros(len(c), dtype=np.int64) for c in centroids]
    objective = [0.0] * len(centroids)
    for lo in range(0, len(x), BLOCK_ROWS):
        block = x[lo : lo + BLOCK_ROWS]
        labels, dist = assign_fn(block, centroids)
        block64 = x64[lo : lo + BLOCK_ROWS] if x64 is not None else block.astype(np.float64)
        for p, c in enumerate(centroids):
            sums[p] += _sum_by_label(block64, labels[:, p], len(c))
            counts[p] += np.bincount(labels[:, p], minlength=len(c))
            objective[p] += float(dist[:, p].sum(dtype=np.float64))
    return LloydPartial(sums, counts, objective)


# ------------------------------------------------------------------ the engine
# The CPU engine of engine="auto" (``bench kmeans --engines`` times them on identical features,
# starts and iterations): see docs/benchmarks.md for the measurement behind it.
CPU_DEFAULT_ENGINE = "blas"


@dataclass(frozen=True)
class Engine:
    """How cells are held and assigned to centroids (faiss ``contrib/clustering.py``'s
    DatasetAssign, for every partition of a dataset at once): ``"blas"``, the CPU GEMM above;
    ``"faiss"``, faiss's exact search (its GPU index with ``gpu``); ``"torch"``, the GEMM in
    torch on the cells' device (a GPU with ``gpu``). Lloyd, k-means++ and the pool are the same
    whichever it is."""

    name: str
    gpu: bool = False

    def hold(self, x):
        """The cells in the form this engine runs on, held across iterations (one copy)."""
        if self.name == "torch":
            import torch

            t = x if is_tensor(x) else torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32))
            return t.to("cuda") if self.gpu else t
        return np.ascontiguousarray(x.cpu().numpy() if is_tensor(x) else x, dtype=np.float32)

    def assign(self, x, centroids: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Nearest centroid of every cell in every partition: labels (n, P) int64 and squared
        distances (n, P) float32."""
        x = self.hold(x)
        if self.name == "torch":
            return assign_torch(x, centroids)
        if self.name == "faiss":
            return _assign_faiss(x, centroids, self.gpu)
        return _assign_blas(x, centroids)

    def partial_step(self, x, centroids: Sequence[np.ndarray], x64: np.ndarray | None = None) -> LloydPartial:
        """One iteration's sums over a shard's cells, for every partition."""
        x = self.hold(x)
        if self.name == "torch":
            return partial_step_torch(x, centroids)
        return _partial_step_arrays(x, centroids, self.assign, x64)

    def float64_cells(self, held) -> np.ndarray | None:
        """The float64 copy the sums reuse across iterations (None on torch, or when too large)."""
        return None if self.name == "torch" else float64_copy(held)


def engine(name: str = "auto", gpu: bool = False) -> Engine:
    """The one place the K-means backend is chosen (``pseudolabel.engine``). ``"auto"``: on a
    GPU faiss-gpu where installed, else torch; on CPUs :data:`CPU_DEFAULT_ENGINE`."""
    if name == "auto":
        name = gpu_backend() if gpu else CPU_DEFAULT_ENGINE
    if name not in ("blas", "faiss", "torch"):
        raise ValueError(f"K-means engine {name!r}: use auto, blas, faiss or torch")
    if gpu and name == "blas":
        raise ValueError("the blas K-means engine runs on CPUs; on a GPU use faiss or torch (or auto)")
    if gpu and name == "faiss" and gpu_backend() != "faiss":
        raise RuntimeError("pseudolabel.engine = faiss with use_gpu needs faiss-gpu (the [gpu] extra); "
                           "use engine = torch or auto")
    return Engine(name, gpu)


def float64_copy(x: np.ndarray) -> np.ndarray | None:
    """The cells as float64 for the per-centroid sums of every iteration, when that copy is at
    most ``CACHE_FLOAT64_BYTES`` (else None: each iteration converts block by block)."""
    return x.astype(np.float64) if x.size * 8 <= CACHE_FLOAT64_BYTES else None


def _sum_by_label(x64: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(k, d) float64 sums of the cells (n, d) float64 per label: a one-hot (k x n) CSR times
    the cells, one pass over them (each label's cells summed in cell order, so deterministic)."""
    n = len(labels)
    onehot = sp.csr_matrix((np.ones(n), (labels, np.arange(n))), shape=(k, n))
    return np.asarray(onehot @ x64)


def update_centroids(previous: Sequence[np.ndarray], total: LloydPartial, seed: int, iteration: int) -> list[np.ndarray]:
    """Means of the assigned cells; an empty cluster takes half of a large one, as faiss does
    (copy a centroid chosen with probability ~ its size - 1, then push the two copies apart by
    a relative 1/1024 in alternating directions)."""
    rng = np.random.default_rng([seed, iteration])
    out = []
    for c_prev, s, cnt in zip(previous, total.sums, total.counts):
        k, d = c_prev.shape
        cnt = cnt.astype(np.float64)
        c = np.where(cnt[:, None] > 0, s / np.maximum(cnt, 1)[:, None], c_prev.astype(np.float64))
        empty = np.flatnonzero(cnt == 0)
        if len(empty):
            sign = np.where(np.arange(d) % 2 == 0, 1.0, -1.0) / 1024.0
            for ci in empty:
                weight = np.maximum(cnt - 1, 0)
                if weight.sum() <= 0:
                    break
                cj = int(rng.choice(k, p=weight / weight.sum()))
                c[ci] = c[cj] * (1 + sign)
                c[cj] = c[cj] * (1 - sign)
                cnt[ci] = np.floor(cnt[cj] / 2)
                cnt[cj] -= cnt[ci]
        out.append(c.astype(np.float32))
    return out


def run_lloyd(
    step: Callable[[list[np.ndarray]], Sequence[LloydPartial]],
    inits: Sequence[np.ndarray],
    niter: int,
    seed: int,
    stop_at_fixed_point: bool = True,
) -> tuple[list[np.ndarray], list[int]]:
    """At most ``niter`` Lloyd iterations where ``step(centroids)`` returns the partial sums of
    every shard (computed wherever the shards live) for the partitions it is given; returns the
    final centroids and the iterations each partition ran.

    A partition whose update leaves its centroids bitwise unchanged is at a fixed point (the
    same centroids give the same assignment, sums and update again), so it leaves the step:
    the result equals ``niter`` full iterations (bitwise on CPUs, where each partition has its
    own GEMMs; on a GPU the partitions share one GEMM, whose rounding may depend on how many
    there are). It drew nothing from the iteration's generator (no cluster was empty), so the
    partitions after it draw exactly as before. ``stop_at_fixed_point=False`` runs every
    partition ``niter`` times (benchmarks that compare engines at equal iterations)."""
    centroids = [np.ascontiguousarray(c, dtype=np.float32) for c in inits]
    iterations = [0] * len(centroids)
    active = list(range(len(centroids)))
    for it in range(niter):
        if not active:
            break
        current = [centroids[p] for p in active]
        updated = update_centroids(current, LloydPartial.reduce(step(current)), seed, it)
        still = []
        for p, c in zip(active, updated):
            iterations[p] += 1
            if not stop_at_fixed_point or not np.array_equal(c, centroids[p]):
                still.append(p)
            centroids[p] = c
        active = still
    return centroids, iterations


def lloyd(
    x, inits: Sequence[np.ndarray], niter: int, seed: int, eng: Engine | None = None, stop_at_fixed_point: bool = True,
) -> tuple[np.ndarray, list[np.ndarray], list[float], list[int]]:
    """Single-process Lloyd: (labels (n, P), final centroids, objective per partition,
    iterations per partition), on ``eng`` (default: :func:`engine`'s choice for a CPU)."""
    eng = eng or engine()
    x = eng.hold(x)  # on a GPU (torch) the cells stay there for every iteration
    x64 = eng.float64_cells(x)
    centroids, iterations = run_lloyd(lambda c: [eng.partial_step(x, c, x64)], inits, niter, seed,
                                      stop_at_fixed_point)
    labels, dist = eng.assign(x, centroids)
    return labels, centroids, [float(v) for v in dist.sum(0, dtype=np.float64)], iterations


def lloyd_flops(n_cells: int, ks: Sequence[int], dims: int, iterations: int | Sequence[int]) -> float:
    """Floating-point operations of the Lloyd iterations (``iterations``: one count for every
    partition, or one per partition) plus the final assignment: 2 n k d per assignment (the
    distance GEMM) and n d per update (the sums), per partition."""
    its = [iterations] * len(ks) if isinstance(iterations, int) else list(iterations)
    per_assign = [2.0 * n_cells * k * dims for k in ks]
    return sum(i * (a + float(n_cells) * dims) + a for i, a in zip(its, per_assign))


# ------------------------------------------------------------------ a whole dataset
def cluster_cells(x, ks: Sequence[int], niter: int, seed: int, init_sample_cells: int = 100_000,
                  eng: Engine | None = None) -> tuple[np.ndarray, dict]:
    """Every partition of one dataset's cells (features n x d, one k each): k-means++ starts
    on a seeded sample of at most ``init_sample_cells`` cells, then Lloyd. Returns labels
    (n, len(ks)) and stats (objectives, iterations per partition, FLOPs, seconds)."""
    t0 = time.perf_counter()
    x = np.ascontiguousarray(x, dtype=np.float32) if not is_tensor(x) else x
    sample = init_sample(len(x), init_sample_cells, seed)
    inits = plusplus_inits(x[sample], ks, seed)
    t_init = time.perf_counter()
    labels, _, objectives, iterations = lloyd(x, inits, niter, seed, eng)
    t_end = time.perf_counter()
    return labels, {"init_seconds": t_init - t0, "lloyd_seconds": t_end - t_init, "objectives": objectives,
                    "lloyd_iterations": iterations, "lloyd_flops": lloyd_flops(len(x), ks, int(x.shape[1]), iterations)}
