"""An MLflow pyfunc model that owns gene alignment and normalisation.

Input: a DataFrame whose columns are gene symbols (any subset, any order, any case; raw counts
or log1p(CP10k), detected or declared with the ``value_type`` param). Output: ``cell_type``,
``confidence`` and ``gene_overlap`` per cell, plus the 200-d embedding when asked.
The forward pass is numpy, so serving needs neither torch nor this package's training stack.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

try:
    import mlflow.pyfunc

    _Base = mlflow.pyfunc.PythonModel
except ImportError:  # pragma: no cover - mlflow is a core dependency
    _Base = object

WEIGHTS = "weights.npz"
META = "annotator.json"
MAX_CELLS_PER_REQUEST = 100_000  # larger jobs belong to batch annotation


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
    return 1.0 / (1.0 + np.exp(-x))


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

    def align(self, df: pd.DataFrame) -> tuple[np.ndarray, float, int]:
        """Cells x model genes (missing genes zero, extra ignored), overlap fraction, matches."""
        if not isinstance(df, pd.DataFrame) or df.shape[0] == 0 or df.shape[1] == 0:
            raise InputError("the request holds no cells or no gene columns; send a table of cells x gene symbols")
        if df.shape[0] > MAX_CELLS_PER_REQUEST:
            raise InputError(
                f"the request holds {df.shape[0]} cells, more than {MAX_CELLS_PER_REQUEST} per request; "
                "split it, or use `scpretrain annotate` for whole datasets"
            )
        cols = [str(c).upper() for c in df.columns]
        if len(set(cols)) != len(cols):
            raise InputError("the request repeats gene columns (case-insensitive); send each gene once")
        try:
            values = df.to_numpy(dtype=np.float32)
        except (TypeError, ValueError):
            bad = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
            raise InputError(f"gene columns must be numeric; non-numeric: {bad[:5]}") from None
        if not np.isfinite(values).all():
            raise InputError("the request holds NaN or infinite values; send counts or log-normalised values")
        if (values < 0).any():
            raise InputError("the request holds negative values (scaled data?); send counts or log-normalised values")
        src = np.array([i for i, c in enumerate(cols) if c in self._index], dtype=np.int64)
        dst = np.array([self._index[cols[i]] for i in src], dtype=np.int64)
        overlap = len(dst) / len(self.genes)
        if overlap < self.min_overlap:
            raise InputError(
                f"only {len(dst)} of the model's {len(self.genes)} genes ({overlap:.1%}) are in the request; "
                f"at least {self.min_overlap:.0%} are needed to trust a prediction (are the columns gene symbols?)"
            )
        X = np.zeros((values.shape[0], len(self.genes)), dtype=np.float32)
        X[:, dst] = values[:, src]
        return X, overlap, len(dst)

    def predict(self, df: pd.DataFrame, value_type: str = "auto", return_embedding: bool = False) -> pd.DataFrame:
        from scpretrain_dist.data.normalize import detect_value_type, normalize_dense

        X, overlap, _ = self.align(df)
        if value_type == "auto":
            value_type = detect_value_type(X)
        if value_type not in ("counts", "lognorm", "log2norm"):
            raise InputError(f"value_type {value_type!r} must be auto, counts, lognorm or log2norm")
        X = normalize_dense(X, value_type)
        emb = _sigmoid(X @ self.w["enc_w"] + self.w["enc_b"])
        h = _sigmoid(emb @ self.w["hid_w"].T + self.w["hid_b"])
        logits = h @ self.w["out_w"].T + self.w["out_b"]
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(1, keepdims=True)
        out = pd.DataFrame({"cell_type": self.classes[p.argmax(1)], "confidence": p.max(1),
                            "gene_overlap": overlap}, index=df.index)
        if return_embedding:
            out = pd.concat([out, pd.DataFrame(emb, index=df.index, columns=[f"emb_{i}" for i in range(emb.shape[1])])], axis=1)
        return out


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
                model_input, params.get("value_type", "auto"), bool(params.get("return_embedding", False))
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
        params=ParamSchema([ParamSpec("value_type", "string", "auto"), ParamSpec("return_embedding", "boolean", False)]),
    )
