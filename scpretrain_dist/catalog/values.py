"""What an expression matrix and its gene names must be, checked in one place for every way
cells arrive (ingest, batch annotation, the scoring server), and the value type of its values."""

from __future__ import annotations

import re

import numpy as np
import scipy.sparse as sp

VALUE_TYPES = ("counts", "lognorm", "log2norm")
FLOAT32_MAX = float(np.finfo(np.float32).max)
# log1p of a cell's values scaled to 1e6 stays below ~13.8; above that, non-integer values are
# either log2-scaled (scater's logNormCounts) or linear (TPM, estimated counts).
_MAX_LN = float(np.log1p(1e6))
_MAX_LOG2 = 30.0
# Ensembl gene, transcript or protein ids (ENSG..., ENSMUSG..., ENSDARG...), with a version or not
_ENSEMBL = re.compile(r"^ENS[A-Z]*[GTP]\d{6,}(\.\d+)?$", re.IGNORECASE)


def stored_values(X) -> np.ndarray:
    """The values a matrix stores (a sparse matrix's non-zeros, or every entry of a dense one)."""
    return X.data if sp.issparse(X) else np.asarray(X).ravel()


def value_problem(values: np.ndarray) -> str | None:
    """What makes ``values`` unusable as counts or log-normalised expression, or None: NaN,
    infinity, magnitudes past float32 (every stage computes in float32), negative values."""
    values = np.asarray(values)
    if values.size == 0:
        return None
    if values.dtype.kind not in "biuf":
        return f"values of type {values.dtype} (expected numbers)"
    lo, hi = values.min(), values.max()  # two passes, no temporaries; a NaN makes both NaN
    if values.dtype.kind == "f":
        if not (np.isfinite(lo) and np.isfinite(hi)):
            return f"{int(np.isnan(values).sum())} NaN and {int(np.isinf(values).sum())} infinite values"
        largest = max(-float(lo), float(hi))
        if largest > FLOAT32_MAX:
            return (f"{int((np.abs(values) > FLOAT32_MAX).sum())} values beyond float32's range "
                    f"(|x| > {FLOAT32_MAX:.3g}, largest {largest:.3g})")
    if lo < 0:
        return f"{int((values < 0).sum())} negative values (smallest {float(lo):.4g}; scaled or centred data?)"
    return None


def whole_number_fraction(values: np.ndarray, sample: int = 200_000) -> float:
    """The fraction of (a strided sample of) the non-zero values that are whole numbers."""
    values = np.asarray(values)
    values = values[values != 0]
    if values.size == 0:
        return 1.0
    if values.size > sample:
        values = values[:: values.size // sample]
    return float(np.mean(np.abs(values - np.round(values)) <= 1e-3))


def detect_value_type(X: sp.spmatrix | np.ndarray, sample: int = 200_000) -> str:
    """"counts" for whole numbers or large linear values (TPM, estimated counts), "lognorm"
    for natural-log values, "log2norm" for log2 values."""
    data = stored_values(X)
    data = data[data != 0]
    if data.size == 0:
        return "counts"
    vmax = float(data.max())
    if 1 - whole_number_fraction(data, sample) < 1e-3 or vmax > _MAX_LOG2:
        return "counts"
    return "lognorm" if vmax <= _MAX_LN else "log2norm"


def declared_type_problem(X, declared: str) -> str | None:
    """Why values declared as ``declared`` cannot be that type, or None. Counts are whole
    numbers, or large linear values (TPM, estimated counts); small non-integer values declared
    as counts are log-normalised data, and whole numbers declared as log values are counts."""
    data = stored_values(X)
    data = data[data != 0]
    if data.size == 0 or declared not in VALUE_TYPES:
        return None
    found = detect_value_type(data)
    if declared == "counts" and found != "counts":
        share = 1 - whole_number_fraction(data)
        return (f"declared counts, but {share:.0%} of its values are not whole numbers and the largest is "
                f"{float(data.max()):.3g}: they look {found} (declare value_type = \"{found}\" or \"auto\")")
    if declared in ("lognorm", "log2norm") and found == "counts":
        what = "whole numbers" if whole_number_fraction(data) > 0.999 else f"as large as {float(data.max()):.3g}"
        return (f"declared {declared}, but its values are {what}: they look like counts "
                "(declare value_type = \"counts\" or \"auto\")")
    return None


def ensembl_fraction(genes) -> float:
    """The fraction of gene names that are Ensembl ids rather than symbols."""
    genes = [str(g) for g in genes]
    return sum(bool(_ENSEMBL.match(g)) for g in genes) / max(len(genes), 1)
