"""What K-means clusters: a dataset's cells as normalised (or raw) expression over its own
genes, a PCA projection of that, or the encoder's embedding. Pure functions on arrays plus one
reader that takes its rows from the store, so any process holding a locator can featurise its
own rows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from scpretrain_dist.config import PHASE1_SPACES
from scpretrain_dist.data.normalize import normalized_rows
from scpretrain_dist.store.atlas import Atlas

SPACES = (*PHASE1_SPACES, "embedding")  # the first phase's spaces, then the encoder's


def read_encoder(path: str | Path) -> dict[str, np.ndarray]:
    """An ``encoder.pt`` checkpoint as numpy arrays ({"weight": genes x dim, "bias": dim})."""
    import torch

    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    return {"weight": state["weight"].numpy(), "bias": state["bias"].numpy()}


def write_encoder(encoder, path: str | Path) -> Path:
    """An encoder module's weights as an ``encoder.pt`` checkpoint (what :func:`read_encoder`
    reads)."""
    import torch

    torch.save({"weight": encoder.weight.detach().cpu(), "bias": encoder.bias.detach().cpu()}, path)
    return Path(path)


def embed(X: sp.csr_matrix, encoder: dict[str, np.ndarray], block: int = 8192) -> np.ndarray:
    """sigmoid(X W + b) for a cells x atlas-genes matrix, in blocks, through the model's own
    ``Encoder`` on ``SparseBatch`` input (``embedding_bag`` over the non-zero values: about
    twice scipy's CSR x dense product here)."""
    import torch

    from scpretrain_dist.model.networks import Encoder, SparseBatch

    X = sp.csr_matrix(X, dtype=np.float32)
    weight = torch.from_numpy(np.asarray(encoder["weight"], np.float32))
    model = Encoder(*weight.shape)
    model.load_state_dict({"weight": weight, "bias": torch.from_numpy(np.asarray(encoder["bias"], np.float32))})
    out = np.empty((X.shape[0], weight.shape[1]), dtype=np.float32)
    with torch.no_grad():
        for lo in range(0, X.shape[0], block):
            hi = min(lo + block, X.shape[0])
            a, z = X.indptr[lo], X.indptr[hi]
            batch = SparseBatch(torch.from_numpy(X.indices[a:z].astype(np.int64)),
                                torch.from_numpy((X.indptr[lo:hi] - a).astype(np.int64)), torch.from_numpy(X.data[a:z]))
            out[lo:hi] = model.embed(batch).numpy()
    return out


@dataclass
class Projection:
    """PCA over some of a dataset's genes: ``(x[:, genes] - mean) @ components``."""

    genes: np.ndarray  # (used,) column indices into the matrix the PCA was fitted on
    mean: np.ndarray  # (used,) float64
    components: np.ndarray  # (used, dims) float64

    def apply(self, X: sp.csr_matrix | np.ndarray, block: int = 2048) -> np.ndarray:
        """Dense float32 GEMMs over blocks of rows (faster than a sparse product at the
        densities of expression data); each row's result depends on that row alone."""
        offset = (self.mean @ self.components).astype(np.float32)
        components = self.components.astype(np.float32)
        out = np.empty((X.shape[0], self.components.shape[1]), dtype=np.float32)
        X = sp.csr_matrix(X)[:, self.genes] if sp.issparse(X) else np.asarray(X)[:, self.genes]
        for lo in range(0, X.shape[0], block):  # the columns taken once, not per block
            rows = X[lo : lo + block]
            rows = rows.toarray() if sp.issparse(rows) else rows
            out[lo : lo + block] = rows.astype(np.float32, copy=False) @ components - offset
        return out


def column_moments(X: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """float64 mean and variance of every column of a CSR matrix: two products of its transpose
    with a vector of ones (the values, then their squares), summing each column in row order."""
    n = max(X.shape[0], 1)
    X = sp.csr_matrix(X)
    values = sp.csr_matrix((X.data.astype(np.float64), X.indices, X.indptr), shape=X.shape)
    ones = np.ones(X.shape[0])
    mean = (values.T @ ones) / n
    values.data *= values.data
    var = (values.T @ ones) / n - mean**2
    return mean, var


def most_variable_genes(X: sp.csr_matrix, n_genes: int, var: np.ndarray | None = None) -> np.ndarray:
    """Sorted column indices of the ``n_genes`` columns of highest variance (all if fewer);
    ``var``: the columns' variances when already computed."""
    if X.shape[1] <= n_genes:
        return np.arange(X.shape[1])
    var = column_moments(sp.csr_matrix(X))[1] if var is None else var
    return np.sort(np.argsort(-var, kind="stable")[:n_genes])


def _normalise_columns(M: np.ndarray) -> np.ndarray:
    """An orthonormal-enough basis of M's columns for a power iteration: the permuted-L factor
    of an LU decomposition (scikit-learn's normaliser; several times cheaper than QR here)."""
    import scipy.linalg

    return scipy.linalg.lu(M, permute_l=True, check_finite=False)[0]


def fit_pca(X: sp.csr_matrix, dims: int, seed: int, n_genes: int = 2000, n_iter: int = 2,
            oversample: int = 10, return_fitted: bool = False) -> Projection | tuple[Projection, np.ndarray]:
    """Randomized PCA (Halko et al.) of the cells ``X`` (a sample of a dataset) over their
    ``n_genes`` most variable genes, as single-cell PCA is usually done: the centred sample as
    one dense float32 matrix, ``n_iter`` LU-normalised power iterations, a QR, then the SVD of
    the small projected matrix through its Gram matrix. ``return_fitted``: also the fitted
    cells' coordinates (what :meth:`Projection.apply` gives them), from the dense matrix
    already built."""
    X = sp.csr_matrix(X)
    mean_all, var_all = column_moments(X)
    genes = most_variable_genes(X, n_genes, var_all)
    A = np.asarray(X[:, genes].toarray(), dtype=np.float32)
    n, g = A.shape
    dims = max(1, min(dims, g - 1 if g > 1 else 1, n - 1 if n > 1 else 1))
    mean = mean_all[genes]
    A -= mean.astype(np.float32)
    width = min(dims + oversample, g, n)
    rng = np.random.default_rng(seed)
    Q = rng.standard_normal((g, width)).astype(np.float32)
    for _ in range(n_iter):
        Q = _normalise_columns(A @ Q)
        Q = _normalise_columns(A.T @ Q)
    Q = np.linalg.qr(A @ Q)[0]  # (n, width) orthonormal basis of A's range
    B = (A.T @ Q).T.astype(np.float64)  # (width, g) = Q^T A
    evals, U = np.linalg.eigh(B @ B.T)  # B = U S V^T, so B B^T = U S^2 U^T
    order = np.argsort(evals)[::-1][:dims]
    s = np.sqrt(np.maximum(evals[order], 0))
    keep = s > s[0] * 1e-6 if s[0] > 0 else np.zeros_like(s, dtype=bool)
    # V = B^T U S^-1; directions with no variance (rank below dims) get a zero component
    components = np.zeros((g, dims))
    components[:, keep] = (B.T @ U[:, order[keep]]) / s[keep]
    projection = Projection(genes, mean, np.ascontiguousarray(components))
    if not return_fitted:
        return projection
    return projection, A @ components.astype(np.float32)


def read_cells(store: Atlas, dataset: str, lo: int, hi: int, space: str) -> sp.csr_matrix:
    """Cells ``lo:hi`` of a dataset (in joinid order) as CSR. For the expression spaces, over the
    dataset's own genes: genes it never measured are zero in all its cells, so dropping them
    leaves every distance unchanged and shrinks the problem."""
    rec = store.dataset(dataset)
    ids = rec.joinids[lo:hi]
    X = store.read_rows(ids) if space == "raw" else normalized_rows(store, ids, rec.value_type)
    if space in ("expression", "pca", "raw"):
        X = select_genes(X, store.dataset_gene_mask(dataset))
    return X.tocsr()


def select_genes(X: sp.csr_matrix, mask: np.ndarray) -> sp.csr_matrix:
    """``X[:, mask]``. When every stored value lies in a kept column (a dataset's cells over
    the genes it measured), only the column numbers change: one gather, the values shared
    (about half the general selection's time on the real datasets)."""
    X = sp.csr_matrix(X)
    kept = int(np.count_nonzero(mask))
    position = np.full(len(mask), -1, dtype=X.indices.dtype)
    position[mask] = np.arange(kept, dtype=X.indices.dtype)
    cols = position[X.indices]
    if cols.size and cols.min() < 0:  # values in dropped columns: the general selection
        return X[:, np.flatnonzero(mask)]
    return sp.csr_matrix((X.data, cols, X.indptr), shape=(X.shape[0], kept))


def featurize(X: sp.csr_matrix, space: str, encoder: dict | None = None,
              projection: Projection | None = None) -> np.ndarray:
    """Dense float32 features of cells read by :func:`read_cells`."""
    if space == "embedding":
        if encoder is None:
            raise ValueError("the embedding space needs an encoder")
        return embed(X, encoder)
    if space == "pca":
        if projection is None:
            raise ValueError("the pca space needs a fitted projection")
        return projection.apply(X)
    if space in ("expression", "raw"):
        return np.ascontiguousarray(X.toarray(), dtype=np.float32)
    raise ValueError(f"unknown clustering space {space!r}; choose one of {', '.join(SPACES)}")
