"""An MLflow pyfunc model that owns gene alignment and normalisation.

Input: a DataFrame whose columns are gene symbols (any subset, any order, any case; raw counts
or log1p(CP10k), detected or declared with the ``value_type`` param). Output: ``cell_type``,
``confidence`` and ``gene_overlap`` per cell, plus the 200-d embedding when asked.
The forward pass is numpy, so serving needs neither torch nor this package's training stack.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

try:
    import mlflow.pyfunc

    _Base = mlflow.pyfunc.PythonModel
except ImportError:  # pragma: no cover - mlflow is a core dependency
    _Base = object

WEIGHTS = "weights.npz"
META = "annotator.json"
MAX_CELLS_PER_REQUEST = 100_000  # larger jobs belong to batch annotation
_GENE_MAPS_CACHED = 16  # distinct request column lists remembered (clients repeat theirs)
_DENSE_ABOVE = 0.3  # multiply densely (BLAS) above this fraction of non-zero values
SPARSE_COLUMNS = ["indices", "values"]  # the sparse request format, see ``sparse_request``


class InputError(ValueError):
    """A request the annotator refuses; the message says what to fix."""


def export_annotator(model, genes: np.ndarray, classes: np.ndarray, out_dir: str | Path,
                     min_overlap: float = 0.2, lineage: dict | None = None) -> dict[str, str]:
    """Write the weights and metadata the pyfunc needs; returns its ``artifacts`` mapping."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    np.savez(out / WEIGHTS, enc_w=sd["encoder.weight"], enc_b=sd["encoder.bias"],
             hid_w=sd["hidden.weight"], hid_b=sd["hidden.bias"], out_w=sd["out.weight"], out_b=sd["out.bias"])
    meta = {"genes": [str(g).upper() for g in genes], "classes": [str(c) for c in classes],
            "normalisation": "log1p(CP10k)", "min_overlap": min_overlap, "lineage": lineage or {}}
    (out / META).write_text(json.dumps(meta))
    return {"weights": str(out / WEIGHTS), "meta": str(out / META)}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    from scipy.special import expit  # no overflow warnings for large negative inputs

    return expit(x)


@dataclass
class Predictions:
    """Per cell: predicted class, its probability, and the 200-d embedding when asked."""

    labels: np.ndarray  # object array of class names
    codes: np.ndarray  # int, index into ``Annotator.classes``
    confidence: np.ndarray  # float32
    overlap: float  # fraction of the model's genes found in the input
    n_matched: int
    value_type: str
    embedding: np.ndarray | None = None


@dataclass
class _GeneMap:
    src: np.ndarray  # input column of each matched gene
    dst: np.ndarray  # its row in the model's gene list
    enc_w: np.ndarray  # encoder rows of the matched genes (matched x 200), gathered once
    all_columns: bool  # every input column is a model gene (no column selection needed)


class Annotator:
    """The model itself, usable without MLflow."""

    def __init__(self, weights_path: str | Path, meta_path: str | Path):
        w = np.load(weights_path)
        self.w = {k: w[k].astype(np.float32) for k in w.files}
        meta = json.loads(Path(meta_path).read_text())
        self.genes = np.array(meta["genes"], dtype=object)
        self.classes = np.array(meta["classes"], dtype=object)
        self.min_overlap = float(meta.get("min_overlap", 0.2))
        self.lineage = meta.get("lineage", {})
        self._index = {g: i for i, g in enumerate(self.genes)}
        self._maps: dict[tuple, _GeneMap] = {}

    def gene_map(self, genes) -> _GeneMap:
        """Where each model gene sits in an input gene list (symbols, any case and order).

        Cached per gene list: a client or a batch job sends the same columns again and again,
        and building the mapping costs more than the forward pass for small requests."""
        key = tuple(genes)
        hit = self._maps.get(key)
        if hit is not None:
            return hit
        cols = [str(c).upper() for c in key]
        if len(set(cols)) != len(cols):
            raise InputError("the input repeats gene columns (case-insensitive); send each gene once")
        src = np.array([i for i, c in enumerate(cols) if c in self._index], dtype=np.int64)
        dst = np.array([self._index[cols[i]] for i in src], dtype=np.int64)
        hit = _GeneMap(src, dst, np.ascontiguousarray(self.w["enc_w"][dst]),
                       all_columns=len(src) == len(cols))
        if len(self._maps) >= _GENE_MAPS_CACHED:
            self._maps.pop(next(iter(self._maps)))
        self._maps[key] = hit
        return hit

    def _check_overlap(self, n_matched: int) -> float:
        overlap = n_matched / len(self.genes)
        if overlap < self.min_overlap:
            raise InputError(
                f"only {n_matched} of the model's {len(self.genes)} genes ({overlap:.1%}) are in the request; "
                f"at least {self.min_overlap:.0%} are needed to trust a prediction (are the columns gene symbols?)"
            )
        return overlap

    def check_genes(self, genes) -> float:
        """The overlap fraction of an input gene list; InputError when too small to trust."""
        return self._check_overlap(len(self.gene_map(genes).dst))

    def align(self, df: pd.DataFrame) -> tuple[np.ndarray, float, int]:
        """Cells x model genes (missing genes zero, extra ignored), overlap fraction, matches."""
        values, gm = self._request_values(df)
        overlap = self._check_overlap(len(gm.dst))
        X = np.zeros((values.shape[0], len(self.genes)), dtype=np.float32)
        X[:, gm.dst] = values[:, gm.src]
        return X, overlap, len(gm.dst)

    def _request_values(self, df: pd.DataFrame) -> tuple[np.ndarray, _GeneMap]:
        if not isinstance(df, pd.DataFrame) or df.shape[0] == 0 or df.shape[1] == 0:
            raise InputError("the request holds no cells or no gene columns; send a table of cells x gene symbols")
        if df.shape[0] > MAX_CELLS_PER_REQUEST:
            raise InputError(
                f"the request holds {df.shape[0]} cells, more than {MAX_CELLS_PER_REQUEST} per request; "
                "split it, or use `scpretrain annotate` for whole datasets"
            )
        gm = self.gene_map(df.columns)
        try:
            values = df.to_numpy(dtype=np.float32)
        except (TypeError, ValueError):
            bad = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
            raise InputError(f"gene columns must be numeric; non-numeric: {bad[:5]}") from None
        _check_values(values)
        return values, gm

    def predict_matrix(self, X, genes, value_type: str = "auto", return_embedding: bool = False) -> Predictions:
        """Cells x ``genes`` (dense or scipy sparse, counts or log-normalised) -> predictions.

        Only the model's genes found in ``genes`` are read; the library size of a cell is taken
        over them, exactly as for a DataFrame request, so batch and served predictions agree."""
        if X.shape[0] == 0 or X.shape[1] == 0:
            raise InputError("the input holds no cells or no genes")
        if X.shape[1] != len(genes):
            raise InputError(f"the matrix has {X.shape[1]} columns but {len(genes)} gene names are given")
        gm = self.gene_map(genes)
        overlap = self._check_overlap(len(gm.dst))
        if sp.issparse(X):
            X = sp.csr_matrix(X)
            _check_values(X.data)
        else:
            X = np.asarray(X)
            _check_values(X)
        return self._predict(X, gm, overlap, value_type, return_embedding)

    def _predict(self, X, gm: _GeneMap, overlap: float, value_type: str, return_embedding: bool) -> Predictions:
        from scpretrain_dist.data.normalize import TARGET_SUM, detect_value_type, to_linear

        Xm = X if gm.all_columns else X[:, gm.src]  # cells x matched genes
        if value_type == "auto":
            value_type = detect_value_type(Xm)
        if value_type not in ("counts", "lognorm", "log2norm"):
            raise InputError(f"value_type {value_type!r} must be auto, counts, lognorm or log2norm")
        if not sp.issparse(Xm) and np.count_nonzero(Xm) < _DENSE_ABOVE * Xm.size:
            Xm = sp.csr_matrix(np.asarray(Xm, dtype=np.float32))  # normalise and multiply non-zeros only
        if sp.issparse(Xm):
            Xm = sp.csr_matrix(Xm, dtype=np.float32, copy=True)
            Xm.data = to_linear(Xm.data, value_type)
            lib = np.asarray(Xm.sum(1)).ravel()
            scale = np.divide(TARGET_SUM, lib, out=np.zeros_like(lib), where=lib > 0)
            Xm.data *= np.repeat(scale, np.diff(Xm.indptr)).astype(np.float32)
            np.log1p(Xm.data, out=Xm.data)
            dense_enough = Xm.nnz > _DENSE_ABOVE * Xm.shape[0] * max(Xm.shape[1], 1)
            h = (Xm.toarray() @ gm.enc_w) if dense_enough else _sparse_times(Xm, gm.enc_w)
        else:
            Xm = to_linear(np.asarray(Xm, dtype=np.float32), value_type)
            lib = Xm.sum(1, keepdims=True)
            Xm = np.log1p(Xm * np.divide(TARGET_SUM, lib, out=np.zeros_like(lib), where=lib > 0))
            h = Xm @ gm.enc_w
        emb = _sigmoid(h + self.w["enc_b"])
        hid = _sigmoid(emb @ self.w["hid_w"].T + self.w["hid_b"])
        logits = hid @ self.w["out_w"].T + self.w["out_b"]
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(1, keepdims=True)
        codes = p.argmax(1)
        return Predictions(self.classes[codes], codes, p.max(1).astype(np.float32), overlap, len(gm.dst),
                           value_type, emb.astype(np.float32) if return_embedding else None)

    def predict(self, df: pd.DataFrame, value_type: str = "auto", return_embedding: bool = False,
                genes=None) -> pd.DataFrame:
        """``df``: cells x gene-symbol columns; or, with ``genes``, the sparse request format
        (columns ``indices``/``values``, one row per cell, see :func:`sparse_request`)."""
        if genes is not None and len(genes):
            X = decode_sparse_rows(df, len(genes))
            res = self.predict_matrix(X, np.asarray(genes, dtype=object), value_type, return_embedding)
        else:
            values, gm = self._request_values(df)
            overlap = self._check_overlap(len(gm.dst))
            res = self._predict(values, gm, overlap, value_type, return_embedding)
        overlap = res.overlap
        out = pd.DataFrame({"cell_type": res.labels, "confidence": res.confidence.astype(np.float64),
                            "gene_overlap": overlap}, index=df.index)
        if return_embedding:
            out = pd.concat([out, pd.DataFrame(res.embedding, index=df.index,
                                               columns=[f"emb_{i}" for i in range(res.embedding.shape[1])])], axis=1)
        return out


def _sparse_times(X: sp.csr_matrix, W: np.ndarray) -> np.ndarray:
    """CSR x dense. torch's ``embedding_bag`` (a fused gather-scale-sum over each cell's
    non-zeros) is about twice as fast as scipy's loop; scipy where torch is not installed."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:  # pragma: no cover - torch is a core dependency, not a serving one
        return np.asarray(X @ W)
    with torch.no_grad():
        return F.embedding_bag(
            torch.from_numpy(X.indices.astype(np.int64)), torch.from_numpy(W),
            torch.from_numpy(X.indptr[:-1].astype(np.int64)), mode="sum",
            per_sample_weights=torch.from_numpy(X.data.astype(np.float32, copy=False)),
        ).numpy()


def _b64_or_list(value, dtype: str, what: str, row: int) -> np.ndarray:
    import base64

    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except ValueError:
            raise InputError(f"cell {row}: {what} is not valid base64") from None
        if len(raw) % 4:
            raise InputError(f"cell {row}: {what} holds {len(raw)} bytes, not a whole number of 4-byte values")
        return np.frombuffer(raw, dtype=dtype)
    try:
        return np.asarray(value, dtype=dtype).ravel()
    except (TypeError, ValueError):
        raise InputError(f"cell {row}: {what} must be a list of numbers or base64 of {dtype}") from None


def decode_sparse_rows(df: pd.DataFrame, n_genes: int) -> sp.csr_matrix:
    """The sparse request format -> cells x ``n_genes`` CSR. Each row holds a cell's gene
    positions (into the ``genes`` parameter) and values, as lists or base64 of little-endian
    int32 / float32: a whole transcriptome costs its non-zeros, not every gene."""
    if not isinstance(df, pd.DataFrame) or list(df.columns) != SPARSE_COLUMNS:
        raise InputError(f"with the genes parameter, send columns {SPARSE_COLUMNS}, one row per cell")
    if df.shape[0] == 0:
        raise InputError("the request holds no cells")
    if df.shape[0] > MAX_CELLS_PER_REQUEST:
        raise InputError(f"the request holds {df.shape[0]} cells, more than {MAX_CELLS_PER_REQUEST} per request; "
                         "split it, or use `scpretrain annotate` for whole datasets")
    idx, val = [], []
    for row, (i, v) in enumerate(zip(df["indices"].tolist(), df["values"].tolist())):
        ii, vv = _b64_or_list(i, "<i4", "indices", row), _b64_or_list(v, "<f4", "values", row)
        if len(ii) != len(vv):
            raise InputError(f"cell {row}: {len(ii)} indices but {len(vv)} values")
        idx.append(ii)
        val.append(vv)
    indptr = np.concatenate([[0], np.cumsum([len(i) for i in idx])]).astype(np.int64)
    indices = np.concatenate(idx) if idx else np.zeros(0, np.int32)
    data = np.concatenate(val).astype(np.float32) if val else np.zeros(0, np.float32)
    if indices.size and (indices.min() < 0 or indices.max() >= n_genes):
        raise InputError(f"gene indices must lie in [0, {n_genes}) (positions in the genes parameter)")
    X = sp.csr_matrix((data, indices, indptr), shape=(len(idx), n_genes))
    if X.has_canonical_format is False:
        X.sort_indices()
        if np.any((np.diff(X.indices) == 0) & (np.diff(np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))) == 0)):
            raise InputError("a cell repeats a gene index; send each gene once per cell")
    return X


def sparse_request(X, genes, value_type: str = "auto", return_embedding: bool = False) -> dict:
    """A JSON payload for the scoring server from a cells x genes matrix: the non-zeros of
    each cell, base64-encoded, and the gene list once (``params.genes``)."""
    import base64

    X = sp.csr_matrix(X, dtype=np.float32)
    rows = [[base64.b64encode(X.indices[a:b].astype("<i4").tobytes()).decode(),
             base64.b64encode(X.data[a:b].astype("<f4").tobytes()).decode()]
            for a, b in zip(X.indptr[:-1], X.indptr[1:])]
    return {"dataframe_split": {"columns": SPARSE_COLUMNS, "data": rows},
            "params": {"genes": [str(g) for g in genes], "value_type": value_type,
                       "return_embedding": return_embedding}}


def _check_values(values: np.ndarray) -> None:
    if not np.isfinite(values).all():
        raise InputError("the request holds NaN or infinite values; send counts or log-normalised values")
    if (values < 0).any():
        raise InputError("the request holds negative values (scaled data?); send counts or log-normalised values")


class AnnotatorPyfunc(_Base):
    """MLflow wrapper: bad requests raise an MlflowException the scoring server turns into 400."""

    def load_context(self, context):
        self.annotator = Annotator(context.artifacts["weights"], context.artifacts["meta"])

    def predict(self, context, model_input, params=None):
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        params = params or {}
        try:
            return self.annotator.predict(
                model_input, params.get("value_type", "auto"), bool(params.get("return_embedding", False)),
                genes=params.get("genes") or None,
            )
        except InputError as e:
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    # No input schema: columns are gene symbols of any subset, case and order, and the model
    # aligns them itself (MLflow's column enforcement would drop case variants).
    return ModelSignature(
        inputs=None,
        outputs=Schema([ColSpec("string", "cell_type"), ColSpec("double", "confidence"), ColSpec("double", "gene_overlap")]),
        params=ParamSchema([ParamSpec("value_type", "string", "auto"), ParamSpec("return_embedding", "boolean", False),
                            ParamSpec("genes", "string", [], (-1,))]),
    )
