"""An MLflow pyfunc model that owns gene alignment and normalisation.

Input: a DataFrame whose columns are gene symbols (any subset, any order, any case; raw counts
or log1p(CP10k), detected or declared with the ``value_type`` param). Output: ``cell_type``,
``confidence`` and ``gene_overlap`` per cell, plus the 200-d embedding when asked.
The forward pass is the fine-tuning network itself (the torch module that was trained), after
the one normalisation every stage uses.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from scpretrain_dist.catalog.values import VALUE_TYPES, detect_value_type, value_problem
from scpretrain_dist.config import UserError
from scpretrain_dist.data.normalize import keep_columns, normalize_rows
from scpretrain_dist.model.networks import (
    CellTypeClassifier,
    GeneModel,
    GeneModelCheck,
    SparseBatch,
    known_type_score,
)

WEIGHTS = "weights.npz"
META = "annotator.json"
MAX_CELLS_PER_REQUEST = 100_000  # larger jobs belong to batch annotation
_GENE_MAPS_CACHED = 16  # distinct request column lists remembered (clients repeat theirs)
# guards every annotator's gene-map cache in this process (batch annotation predicts on threads);
# module-level, so an annotator still pickles (Ray's object store)
_GENE_MAPS_LOCK = threading.Lock()
_DENSE_ABOVE = 0.3  # multiply densely (BLAS) above this fraction of non-zero values
# drop an input's unknown genes' values (not zero them in place) where the model knows fewer than
# this fraction of its columns
_COMPACT_BELOW = 0.5
SPARSE_COLUMNS = ["indices", "values"]  # the sparse request format, see ``sparse_request``
PARQUET_PARAMS = "scpretrain_params"  # DataFrame.attrs key of a Parquet request's parameters
GENE_MODEL_PARAM = {"auto": None, "on": True, "off": False}  # Annotator.predict's gene_model
# the call for a cell with no value over the model's genes (nothing to base a type on) or below
# the model's rejection threshold; a model stores its own name for it (``finetune.unassigned``)
UNASSIGNED = "Unassigned"


class InputError(UserError):
    """A request the annotator refuses; the message says what to fix."""


def export_annotator(model, genes: np.ndarray, classes: np.ndarray, out_dir: str | Path,
                     min_overlap: float = 0.2, lineage: dict | None = None) -> dict[str, str]:
    """Write the weights and metadata the pyfunc needs; returns its ``artifacts`` mapping. A
    model that reads only some of its genes (``model.gene_mask``) is written with those only."""
    sd = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    mask = getattr(model, "gene_mask", None)
    if mask is not None:
        genes, sd["encoder.weight"] = np.asarray(genes)[mask], sd["encoder.weight"][mask]
    upper = [str(g).upper() for g in genes]
    if len(set(upper)) != len(upper):
        raise ValueError("the model's genes repeat once upper-cased; sum those columns before training "
                         "(as ingest does)")
    unassigned = str(getattr(model, "unassigned", UNASSIGNED))
    if unassigned in {str(c) for c in classes}:
        raise ValueError(f"a cell type of the reference is named {unassigned!r}, the name of rejected cells; "
                         "set finetune.unassigned to another name or map that label")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {"enc_w": sd["encoder.weight"], "enc_b": sd["encoder.bias"], "hid_w": sd["hidden.weight"],
              "hid_b": sd["hidden.bias"], "out_w": sd["out.weight"], "out_b": sd["out.bias"]}
    if getattr(model, "gene_model", None) is not None:  # finetune.gene_model: the pooled linear gene model
        keep = slice(None) if mask is None else mask
        arrays |= {f"gene_{k}": sd[f"gene_model.{k}"][keep] for k in ("inv_scale", "cap", "coef")}
        arrays["gene_intercept"] = sd["gene_model.intercept"]
    np.savez(out / WEIGHTS, **arrays)
    meta = {"genes": [str(g).upper() for g in genes], "classes": [str(c) for c in classes],
            "normalisation": "log1p(CP10k)", "min_overlap": min_overlap, "lineage": lineage or {},
            # softmax temperature fitted on the fine-tuning validation cells: calibrated confidence
            "temperature": float(getattr(model, "temperature", 1.0)),
            # the score (model.networks.known_type_score: "energy" or "confidence") below which a
            # cell is ``unassigned`` (an unknown type); None: never
            "reject_score": str(getattr(model, "reject_score", "energy")),
            "reject_threshold": _finite_or_none(getattr(model, "reject_threshold", None)), "unassigned": unassigned,
            "gene_model_weight": float(getattr(model, "gene_model_weight", 0.0))}
    if meta["gene_model_weight"] > 0:  # the check of each set of cells, and the calls without the gene model
        meta |= {"gene_model_agreement": _finite_or_none(model.gene_model_agreement),
                 "gene_model_val_cells": int(model.gene_model_val_cells),
                 "network_temperature": float(model.network_temperature),
                 "network_reject_threshold": _finite_or_none(model.network_reject_threshold)}
    (out / META).write_text(json.dumps(meta))
    return {"weights": str(out / WEIGHTS), "meta": str(out / META)}


def _finite_or_none(x) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def _threshold(x) -> float:
    """A stored rejection threshold (:func:`_finite_or_none`'s inverse): None is never."""
    return float("-inf") if x is None else float(x)


def register_annotator(model, genes: np.ndarray, classes: np.ndarray, example: pd.DataFrame, lineage: dict,
                       registered_model: str, alias: str) -> tuple[str, int]:
    """Log ``model`` as the annotator pyfunc in the active MLflow run, register it under
    ``registered_model`` with ``alias`` and its lineage tags. Returns (model name, version)."""
    import tempfile

    import scpretrain_dist
    from scpretrain_dist.tracking.registry import log_pyfunc_model

    with tempfile.TemporaryDirectory() as tmp:
        artifacts = export_annotator(model, genes, classes, tmp, lineage=lineage)
        return log_pyfunc_model(_pyfunc_class()(), artifacts, signature(), example,
                                code_paths=[str(Path(scpretrain_dist.__file__).parent)],
                                pip_requirements=["mlflow", "numpy", "pandas", "scipy", "torch"],
                                lineage=lineage, registered_model=registered_model, alias=alias)


@dataclass
class Predictions:
    """Per cell: predicted class, its probability, and the 200-d embedding when asked."""

    labels: np.ndarray  # object array of class names, or the model's unassigned name
    codes: np.ndarray  # int, index into ``Annotator.classes``; -1: unassigned
    confidence: np.ndarray  # float32: the best type's calibrated probability (0 for a cell with no model gene)
    overlap: float  # fraction of the model's genes found in the input
    n_matched: int
    value_type: str
    embedding: np.ndarray | None = None
    gene_model: GeneModelCheck | None = None  # a pooled gene model's check of these cells


@dataclass
class _GeneMap:
    """An input gene list mapped onto the model's genes; built once per distinct list."""

    row: np.ndarray  # input column -> the model's gene row, -1 for a gene the model does not know
    safe_row: np.ndarray  # the same with unknown genes pointed at row 0 (their values are zeroed)
    known: np.ndarray  # float32 1/0 per input column
    src: np.ndarray  # input columns of known genes
    n_matched: int  # distinct model genes found
    repeats: bool  # two input columns name one model gene (summed, as ingest does)
    same_order: bool  # the input columns are the model's genes, in its order

    @property
    def all_known(self) -> bool:
        """Every input column is a model gene."""
        return len(self.src) == len(self.row)


class Annotator:
    """The model itself, usable without MLflow: the fine-tuning network
    (:class:`~scpretrain_dist.model.networks.CellTypeClassifier`, the module that was trained)
    behind gene alignment by symbol and the normalisation of ``data/normalize.py``."""

    def __init__(self, weights_path: str | Path, meta_path: str | Path):
        w = np.load(weights_path)
        meta = json.loads(Path(meta_path).read_text())
        self.genes = np.array(meta["genes"], dtype=object)
        self.classes = np.array(meta["classes"], dtype=object)
        self.min_overlap = float(meta.get("min_overlap", 0.2))
        self.lineage = meta.get("lineage", {})
        # models registered before the score was stored threshold the confidence's log-odds
        self.reject_score = str(meta.get("reject_score", "confidence"))
        self.unassigned = str(meta.get("unassigned", UNASSIGNED))
        enc_w = w["enc_w"].astype(np.float32)
        self.embedding_dim = enc_w.shape[1]
        self.model = m = CellTypeClassifier(len(self.genes), len(self.classes), self.embedding_dim, w["hid_w"].shape[0])
        state = {"encoder.weight": enc_w, "encoder.bias": w["enc_b"], "hidden.weight": w["hid_w"],
                 "hidden.bias": w["hid_b"], "out.weight": w["out_w"], "out.bias": w["out_b"]}
        m.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in state.items()})
        m.temperature, m.reject_threshold = float(meta.get("temperature", 1.0)), _threshold(meta.get("reject_threshold"))
        m.network_temperature, m.network_reject_threshold = m.temperature, m.reject_threshold
        if "gene_coef" in w:
            m.gene_model = GeneModel(w["gene_inv_scale"], w["gene_cap"], w["gene_coef"], w["gene_intercept"])
            m.gene_model_weight = float(meta.get("gene_model_weight", 0.0))
            a = meta.get("gene_model_agreement")
            m.gene_model_agreement = float("nan") if a is None else float(a)
            m.gene_model_val_cells = int(meta.get("gene_model_val_cells", 0))
            m.network_temperature = float(meta.get("network_temperature", m.temperature))
            m.network_reject_threshold = _threshold(meta.get("network_reject_threshold"))
        self.model.eval()
        self._index = {g: i for i, g in enumerate(self.genes)}
        self._maps: dict[tuple, _GeneMap] = {}
        self._names = np.append(self.classes, self.unassigned).astype(object)

    @property
    def temperature(self) -> float:
        """The softmax temperature of the pooled calls (the model's; see its ``calibration``)."""
        return self.model.temperature

    @property
    def reject_threshold(self) -> float:
        return self.model.reject_threshold

    def label_names(self, codes: np.ndarray) -> np.ndarray:
        """Class names of prediction codes; code -1 is the model's ``unassigned`` name."""
        return self._names[codes]

    def gene_map(self, genes, merge_repeats: bool = False) -> _GeneMap:
        """Where each input gene (symbols, any case and order) sits among the model's genes.

        Repeated symbols (once upper-cased) are refused, or with ``merge_repeats`` summed before
        normalising, as ingest does. Cached per gene list: clients and batch jobs send the same
        columns again and again, and building the map costs more than a small request."""
        key = (tuple(genes), merge_repeats)
        hit = self._maps.get(key)
        if hit is not None:
            return hit
        cols = [str(c).upper() for c in key[0]]
        if not merge_repeats and len(set(cols)) != len(cols):
            raise InputError("the input repeats gene columns (case-insensitive); send each gene once")
        row = np.array([self._index.get(c, -1) for c in cols], dtype=np.int64)
        if (row < 0).any():
            row = self._ortholog_rows(cols, row)
        known = row >= 0
        matched = np.unique(row[known])
        # int32 gene rows: the CSR's own index type, half the memory traffic of int64
        index = np.int32 if len(self.genes) < 2**31 else np.int64
        hit = _GeneMap(row, np.where(known, row, 0).astype(index), known.astype(np.float32), np.flatnonzero(known),
                       len(matched), len(matched) < int(known.sum()),
                       len(row) == len(self.genes) and bool((row == np.arange(len(row))).all()))
        with _GENE_MAPS_LOCK:
            if len(self._maps) >= _GENE_MAPS_CACHED:
                self._maps.pop(next(iter(self._maps)))  # the oldest out
            self._maps[key] = hit
        return hit

    def _ortholog_rows(self, cols: list[str], row: np.ndarray) -> np.ndarray:
        """Input genes the model does not know by name, matched through their one-to-one
        human/mouse ortholog (catalog/orthologs.py: a mouse query on a human model, or the
        reverse) where no other input column already holds that model gene."""
        from scpretrain_dist.catalog.orthologs import load_orthologs

        table = load_orthologs()
        m2h, h2m = table.mouse_to_human, table.human_to_mouse
        row = row.copy()
        taken = set(row[row >= 0].tolist())
        for j in np.flatnonzero(row < 0):
            for name in (m2h.get(cols[j]), h2m.get(cols[j])):
                i = self._index.get(name, -1) if name else -1
                if i >= 0 and i not in taken:
                    row[j] = i
                    taken.add(i)
                    break
        return row

    def _check_overlap(self, n_matched: int) -> float:
        overlap = n_matched / len(self.genes)
        if overlap < self.min_overlap:
            raise InputError(
                f"only {n_matched} of the model's {len(self.genes)} genes ({overlap:.1%}) are in the input; "
                f"at least {self.min_overlap:.0%} are needed to trust a prediction (are the columns gene symbols?)"
            )
        return overlap

    def check_genes(self, genes, merge_repeats: bool = False) -> float:
        """The overlap fraction of an input gene list; InputError when too small to trust."""
        return self._check_overlap(self.gene_map(genes, merge_repeats).n_matched)

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
            with np.errstate(over="ignore"):  # values past float32 become inf here, told apart below
                values = df.to_numpy(dtype=np.float32)
        except (TypeError, ValueError):
            bad = [str(c) for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
            raise InputError(f"gene columns must hold numbers; these do not: {bad[:5]}") from None
        if not np.isfinite(values).all():
            original = df.to_numpy(dtype=np.float64)
            missing = np.isnan(original)
            if missing.any():
                r, c = (int(i[0]) for i in np.nonzero(missing))
                raise InputError(
                    f"cell {r} has no value for gene {str(df.columns[c])!r} ({int(missing.sum())} missing values in "
                    "all): a row shorter than the columns, a record without that key, or null/NaN; send a number "
                    "for every gene column (0 where a gene was not detected)")
            _check_values(original)
        _check_values(values)
        return values, gm

    def predict_matrix(self, X, genes, value_type: str = "auto", return_embedding: bool = False,
                       merge_repeats: bool = False, gene_model: bool | None = None) -> Predictions:
        """Cells x ``genes`` (dense or scipy sparse, counts or log-normalised) -> predictions.

        Only the model's genes found in ``genes`` are read; the library size of a cell is taken
        over them, exactly as for a DataFrame request, so batch and served predictions agree.
        ``gene_model``: whether a pooled gene model (``finetune.gene_model``) joins the calls;
        None: as its check of these cells says (:meth:`CellTypeClassifier.check_gene_model`),
        so give the cells of one dataset together, or :meth:`check_gene_model`'s verdict."""
        if X.shape[0] == 0 or X.shape[1] == 0:
            raise InputError("the input holds no cells or no genes")
        if X.shape[1] != len(genes):
            raise InputError(f"the matrix has {X.shape[1]} columns but {len(genes)} gene names are given")
        gm = self.gene_map(genes, merge_repeats)
        overlap = self._check_overlap(gm.n_matched)
        if sp.issparse(X):
            X = sp.csr_matrix(X)
            _check_values(X.data)
        else:
            X = np.asarray(X)
            _check_values(X)
        return self._predict(X, gm, overlap, value_type, return_embedding, gene_model)

    def check_gene_model(self, X, genes, value_type: str = "auto") -> GeneModelCheck | None:
        """The pooled gene model's check of cells ``X`` (a sample of one dataset; None: the
        model has no gene model)."""
        return self.predict_matrix(X, genes, value_type, merge_repeats=True).gene_model if self.model.pooled else None

    def _normalised(self, X, gm: _GeneMap, value_type: str):
        """The cells over the model's genes, log1p(CP10k) over the ones found: a CSR whose columns
        are the model's gene rows (a sparse input; unknown genes zeroed in place), or a dense
        cells x model genes array (a dense input), and the value type used."""
        if not sp.issparse(X) and np.count_nonzero(X) < _DENSE_ABOVE * X.size:
            X = sp.csr_matrix(X)  # normalise and multiply the non-zeros only
        if sp.issparse(X):
            X = sp.csr_matrix(X)
            if gm.repeats or len(gm.src) < _COMPACT_BELOW * len(gm.row):
                # the known genes' values only, as the model's rows: where the model reads a small
                # panel of the input's genes, most values would be zeros its first layer still
                # gathers; and columns of one gene summed before the log
                Xm = keep_columns(X, gm.row, len(self.genes))
                if gm.repeats:
                    Xm.sum_duplicates()
            else:  # unknown genes keep their slots with value 0: cheaper than compacting them out
                data = X.data.astype(np.float32)
                if not gm.all_known:
                    data *= gm.known[X.indices]
                cols = X.indices if gm.same_order else gm.safe_row[X.indices]
                Xm = sp.csr_matrix((data, cols, X.indptr), shape=(X.shape[0], len(self.genes)))
        else:
            Xm = np.zeros((X.shape[0], len(self.genes)), np.float32)
            np.add.at(Xm.T, gm.row[gm.src], np.asarray(X, np.float32)[:, gm.src].T)
        if value_type == "auto":
            known = Xm.data[Xm.data != 0] if sp.issparse(Xm) else Xm[Xm != 0]
            step = max(1, known.size // 100_000)  # a strided sample of the non-zeros, plus the largest
            value_type = detect_value_type(np.append(known[::step], known.max(initial=0)))
        if value_type not in VALUE_TYPES:
            raise InputError(f"value_type {value_type!r} must be auto, {', '.join(VALUE_TYPES)}")
        return normalize_rows(Xm, value_type, copy=False), value_type

    @staticmethod
    def _batch(Xm):
        """The module's input: a SparseBatch over the model's gene rows, or a dense tensor."""
        return SparseBatch.from_csr(Xm, gathered=False) if sp.issparse(Xm) else torch.from_numpy(Xm)

    def _predict(self, X, gm: _GeneMap, overlap: float, value_type: str, return_embedding: bool,
                 gene_model: bool | None = None) -> Predictions:
        Xm, value_type = self._normalised(X, gm, value_type)
        m = self.model
        with torch.no_grad():
            batch = self._batch(Xm)
            pre = m.encoder(batch)  # x W + b, the network's own first layer
            decision = m.gene_model(batch) if m.pooled and gene_model is not False else None
            logits, check = m.called(m.classify(pre), decision, gene_model)
            temperature, reject_threshold = m.calibration(check)
            # divided by the temperature fitted at fine-tuning: the softmax is the calibrated confidence
            p = torch.softmax(logits / temperature, dim=1).numpy()
            emb = torch.sigmoid(pre).numpy() if return_embedding else None
        codes = p.argmax(1)
        confidence = p.max(1).astype(np.float32)
        empty = _empty_rows(Xm)
        confidence[empty] = 0.0
        unknown = empty
        if np.isfinite(reject_threshold):  # less confident than the model's threshold: an unknown type
            unknown = empty | (known_type_score(logits.numpy(), temperature, self.reject_score) < reject_threshold)
        codes[unknown] = -1
        return Predictions(self.label_names(codes), codes, confidence, overlap, gm.n_matched, value_type, emb, check)

    def marker_genes(self, X, genes, value_type: str = "auto", top: int = 20, block: int = 2048) -> dict:
        """Saliency-derived markers of each cell type, as scNym reports them: per cell, the
        gradient of log p(predicted type) with respect to its normalised expression, times that
        expression (gradient x input), averaged over the cells called that type; the genes of
        largest mean attribution per type, with the number of cells behind them. Only genes a
        cell expresses get attribution, so a marker is a gene whose presence drives the call.
        A pooled gene model's share (``finetune.gene_model``) is the gradient with respect to the
        scaled value times how far that value is above the gene's training mean (0 below it): its
        inputs are the scaled genes, for which zero is not the cell without the gene (times the
        value itself, the genes every cell expresses at their usual level would lead). The gene
        model takes part as its check of all the cells says (:meth:`check_gene_model`)."""
        if X.shape[1] != len(genes):
            raise InputError(f"the matrix has {X.shape[1]} columns but {len(genes)} gene names are given")
        gm = self.gene_map(genes, merge_repeats=True)
        self._check_overlap(gm.n_matched)
        check = self.check_gene_model(X, genes, value_type)
        pooled = check is not None and check.used
        temperature = self.model.calibration(check)[0]
        n_types, n_genes = len(self.classes), len(self.genes)
        total = np.zeros((n_types, n_genes), np.float64)
        called = np.zeros(n_types, np.int64)
        for start in range(0, X.shape[0], block):
            part = X[start : start + block]
            part = sp.csr_matrix(part) if sp.issparse(part) else sp.csr_matrix(np.asarray(part))
            _check_values(part.data)
            Xm, _ = self._normalised(part, gm, value_type)  # CSR in, CSR out
            batch = SparseBatch.from_csr(Xm)
            batch.values.requires_grad_(True)
            logits = self.model.classify(self.model.encoder(batch))
            scaled = None
            if pooled:  # the gene model reads a leaf of its own: its share of the gradient apart
                scaled = self.model.gene_model.scaled(batch).detach().requires_grad_(True)
                logits = self.model.combine(logits, self.model.gene_model(batch, scaled))
            logp = torch.log_softmax(logits / temperature, dim=1)
            codes = logp.argmax(1)
            logp.gather(1, codes[:, None]).sum().backward()  # d log p(called type) / d each value
            codes = codes.numpy()
            share = batch.values.grad.numpy() * Xm.data
            if scaled is not None:
                above_mean = (scaled.detach() - self.model.gene_model.mean_scaled()[batch.indices]).clamp(min=0)
                share = share + (scaled.grad * above_mean).numpy()
            attribution = sp.csr_matrix((share, Xm.indices, Xm.indptr), shape=Xm.shape)
            weight = (~_empty_rows(Xm)).astype(np.float64)  # an empty cell is called nothing
            onehot = sp.csr_matrix((weight, (codes, np.arange(len(codes)))), shape=(n_types, len(codes)))
            total += (onehot @ attribution).toarray()
            called += np.bincount(codes, weights=weight, minlength=n_types).astype(np.int64)
        found = np.zeros(n_genes, bool)
        found[gm.row[gm.src]] = True
        out = {}
        for c in np.flatnonzero(called):
            mean = np.where(found, total[c] / called[c], -np.inf)
            order = np.argsort(-mean, kind="stable")[: min(top, int(found.sum()))]
            out[str(self.classes[c])] = {"cells": int(called[c]),
                                         "genes": [[str(self.genes[j]), float(mean[j])] for j in order]}
        return out

    def predict(self, df: pd.DataFrame, value_type: str = "auto", return_embedding: bool = False,
                genes=None, sparse_dtypes: str = "i4,f4", gene_model: str = "auto") -> pd.DataFrame:
        """``df``: cells x gene-symbol columns; or, with ``genes`` (a list or one comma-separated
        string), the sparse request format (columns ``indices``/``values``, one row per cell, see
        :func:`sparse_request`). ``gene_model`` (a model with a pooled gene model): ``auto``, as
        its check of the request's cells says (see :meth:`predict_matrix`); ``on``; ``off``. Such
        a model's answer has a column ``gene_model``: whether it took part."""
        if not isinstance(gene_model, str) or gene_model not in GENE_MODEL_PARAM:
            raise InputError(f"gene_model {gene_model!r} must be one of {', '.join(GENE_MODEL_PARAM)}")
        use = GENE_MODEL_PARAM[gene_model]
        if genes is not None and not isinstance(genes, (str, list, tuple, np.ndarray, pd.Index)):
            raise InputError("the genes parameter must be a comma-separated string or a list of gene symbols")
        if genes is not None and len(genes):
            genes = genes.split(",") if isinstance(genes, str) else [str(g) for g in genes]
            X = decode_sparse_rows(df, len(genes), sparse_dtypes)
            res = self.predict_matrix(X, genes, value_type, return_embedding, gene_model=use)
        else:
            values, gm = self._request_values(df)
            overlap = self._check_overlap(gm.n_matched)
            res = self._predict(values, gm, overlap, value_type, return_embedding, use)
        overlap = res.overlap
        out = pd.DataFrame({"cell_type": res.labels, "confidence": res.confidence.astype(np.float64),
                            "gene_overlap": overlap}, index=df.index)
        if res.gene_model is not None:
            out["gene_model"] = res.gene_model.used
        if return_embedding:
            out = pd.concat([out, pd.DataFrame(res.embedding, index=df.index,
                                               columns=[f"emb_{i}" for i in range(res.embedding.shape[1])])], axis=1)
        return out


_SPARSE_DTYPES = {"indices": ("i4", "u2"), "values": ("f4", "u2", "u1")}


def _decode(value, dtype: str, what: str, row: int) -> np.ndarray:
    import binascii

    if isinstance(value, (bytes, bytearray, memoryview)):  # a binary column (Parquet request)
        raw = bytes(value)
    elif isinstance(value, str):
        try:
            raw = binascii.a2b_base64(value, strict_mode=True)
        except (binascii.Error, ValueError):
            raise InputError(f"cell {row}: {what} is not valid base64 (of little-endian {dtype} values)") from None
    else:
        try:
            out = np.asarray(value, dtype=np.float64).ravel()
        except (TypeError, ValueError):
            raise InputError(f"cell {row}: {what} must be a list of numbers or base64 of {dtype}") from None
        if what == "indices":
            if not np.all(np.isfinite(out)) or np.any(out != np.round(out)):
                raise InputError(f"cell {row}: indices must be whole numbers (positions in the genes parameter)")
            return out.astype(np.int64)
        return out
    size = np.dtype(dtype).itemsize
    if len(raw) % size:
        raise InputError(f"cell {row}: {what} holds {len(raw)} bytes, not a whole number of {dtype} values")
    return np.frombuffer(raw, dtype="<" + dtype)


def _decode_column(items: list, dtype: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    """One request column (a cell per item) -> every cell's values end to end, and the number
    per cell. Base64 text or raw bytes in every row are decoded in one pass and joined once
    (a per-row array would cost more than the decoding); anything else row by row."""
    import binascii

    if all(type(v) is str for v in items):
        try:
            raw = [binascii.a2b_base64(v, strict_mode=True) for v in items]
        except (binascii.Error, ValueError):
            raw = None  # the row-by-row pass below names the bad cell
    elif all(type(v) is bytes for v in items):
        raw = items
    else:
        raw = None
    if raw is None:
        parts = [_decode(v, dtype, what, row) for row, v in enumerate(items)]
        lens = np.fromiter(map(len, parts), np.int64, len(parts))
        flat = np.concatenate(parts) if parts else np.zeros(0)
        return flat, lens
    size = np.dtype(dtype).itemsize
    nbytes = np.fromiter(map(len, raw), np.int64, len(raw))
    bad = np.flatnonzero(nbytes % size)
    if bad.size:
        row = int(bad[0])
        raise InputError(f"cell {row}: {what} holds {nbytes[row]} bytes, not a whole number of {dtype} values")
    return np.frombuffer(b"".join(raw), dtype="<" + dtype), nbytes // size


def _sparse_dtypes(text: str) -> tuple[str, str]:
    parts = [p.strip() for p in (text or "i4,f4").split(",")]
    if len(parts) != 2 or parts[0] not in _SPARSE_DTYPES["indices"] or parts[1] not in _SPARSE_DTYPES["values"]:
        raise InputError(f"sparse_dtypes {text!r} must be '<indices>,<values>' with indices in "
                         f"{_SPARSE_DTYPES['indices']} and values in {_SPARSE_DTYPES['values']}")
    return parts[0], parts[1]


def decode_sparse_rows(df: pd.DataFrame, n_genes: int, dtypes: str = "i4,f4") -> sp.csr_matrix:
    """The sparse request format -> cells x ``n_genes`` CSR. Each row holds a cell's gene
    positions (into the ``genes`` parameter) and values, as JSON lists or base64 of
    little-endian arrays (``dtypes``, e.g. ``u2,u2`` for counts below 65536 over fewer than
    65536 genes): a whole transcriptome costs its non-zeros, not every gene."""
    if not isinstance(df, pd.DataFrame) or list(df.columns) != SPARSE_COLUMNS:
        raise InputError(f"with the genes parameter, send columns {SPARSE_COLUMNS}, one row per cell")
    if df.shape[0] == 0:
        raise InputError("the request holds no cells")
    if df.shape[0] > MAX_CELLS_PER_REQUEST:
        raise InputError(f"the request holds {df.shape[0]} cells, more than {MAX_CELLS_PER_REQUEST} per request; "
                         "split it, or use `scpretrain annotate` for whole datasets")
    idt, vdt = _sparse_dtypes(dtypes)
    indices, n_ind = _decode_column(df["indices"].tolist(), idt, "indices")
    data, n_val = _decode_column(df["values"].tolist(), vdt, "values")
    differ = np.flatnonzero(n_ind != n_val)
    if differ.size:
        row = int(differ[0])
        raise InputError(f"cell {row}: {n_ind[row]} indices but {n_val[row]} values")
    indptr = np.zeros(len(n_ind) + 1, dtype=np.int64)
    np.cumsum(n_ind, out=indptr[1:])
    problem = value_problem(data)
    if problem:
        row = int(np.searchsorted(indptr, _first_bad(data), side="right") - 1)
        raise InputError(f"cell {row}: the values hold {problem}; send raw counts or log-normalised values")
    data = data.astype(np.float32)
    if indices.size and (indices.min() < 0 or indices.max() >= n_genes):
        raise InputError(f"gene indices must lie in [0, {n_genes}) (positions in the genes parameter)")
    X = sp.csr_matrix((data, indices.astype(np.int32), indptr), shape=(len(n_ind), n_genes))
    if not X.has_canonical_format:
        X.sort_indices()
        same_row = np.diff(np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))) == 0
        if np.any((np.diff(X.indices) == 0) & same_row):
            raise InputError("a cell repeats a gene index; send each gene once per cell")
    return X


def _first_bad(values: np.ndarray) -> int:
    """Position of the first value :func:`value_problem` objects to."""
    values = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(values) | (np.abs(values) > np.finfo(np.float32).max) | (values < 0)
    return int(np.flatnonzero(bad)[0]) if bad.any() else 0


def _sparse_parts(X, genes) -> tuple[str, str, sp.csr_matrix, np.ndarray, np.ndarray]:
    """The comma-joined gene list, the dtypes parameter, and the CSR's indices and values in
    the narrowest exact little-endian dtypes."""
    genes = [str(g) for g in genes]
    if any("," in g for g in genes):
        raise ValueError("gene symbols must not contain commas")
    X = sp.csr_matrix(X, dtype=np.float32)
    idt = "u2" if len(genes) <= np.iinfo(np.uint16).max + 1 else "i4"
    vdt = "f4"
    if X.nnz == 0 or (np.all(X.data == np.round(X.data)) and X.data.min() >= 0):
        top = X.data.max(initial=0)
        vdt = "u1" if top <= np.iinfo(np.uint8).max else "u2" if top <= np.iinfo(np.uint16).max else "f4"
    return ",".join(genes), f"{idt},{vdt}", X, X.indices.astype("<" + idt), X.data.astype("<" + vdt)


def sparse_request(X, genes, value_type: str = "auto", return_embedding: bool = False) -> dict:
    """A JSON payload for the scoring server from a cells x genes matrix: each cell's
    non-zeros, base64-encoded in the narrowest exact dtypes, and the gene list once, as one
    comma-separated parameter (a list parameter costs MLflow a check per gene)."""
    import base64

    genes, dtypes, X, ind, dat = _sparse_parts(X, genes)
    rows = [[base64.b64encode(ind[a:b].tobytes()).decode(), base64.b64encode(dat[a:b].tobytes()).decode()]
            for a, b in zip(X.indptr[:-1], X.indptr[1:])]
    return {"dataframe_split": {"columns": SPARSE_COLUMNS, "data": rows},
            "params": {"genes": genes, "sparse_dtypes": dtypes, "value_type": value_type,
                       "return_embedding": return_embedding}}


def sparse_request_parquet(X, genes, value_type: str = "auto", return_embedding: bool = False) -> bytes:
    """The same request as a Parquet body (``Content-Type: application/vnd.apache.parquet``,
    which MLflow's scoring server reads with pandas): binary columns instead of base64 and no
    JSON to parse, the cheapest format for large requests. Parquet requests carry no MLflow
    params, so the parameters travel in the table's metadata (``DataFrame.attrs``)."""
    import io

    genes, dtypes, X, ind, dat = _sparse_parts(X, genes)
    bounds = list(zip(X.indptr[:-1].tolist(), X.indptr[1:].tolist()))
    df = pd.DataFrame({"indices": [ind[a:b].tobytes() for a, b in bounds],
                       "values": [dat[a:b].tobytes() for a, b in bounds]})
    df.attrs[PARQUET_PARAMS] = {"genes": genes, "sparse_dtypes": dtypes, "value_type": value_type,
                                "return_embedding": return_embedding}
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def _check_values(values: np.ndarray) -> None:
    problem = value_problem(values)
    if problem:
        raise InputError(f"the input holds {problem}; send raw counts or log-normalised values")


def _empty_rows(Xm) -> np.ndarray:
    """Cells with no value over the model's genes (after normalisation, so all-zero rows)."""
    return np.asarray(Xm.sum(1)).ravel() == 0  # normalised values are >= 0


@functools.cache
def _pyfunc_class():
    """The MLflow wrapper class, made on first use: importing this module (as the annotation
    workers do) does not import MLflow."""
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    # MLflow advises type hints on predict() when the class is made (for its own input checks),
    # past any warning filter; this model checks its input itself (Annotator.predict)
    with contextlib.redirect_stderr(io.StringIO()):

        class AnnotatorPyfunc(mlflow.pyfunc.PythonModel):
            """MLflow wrapper: bad requests raise an MlflowException the scoring server turns into 400."""

            def load_context(self, context):
                self.annotator = Annotator(context.artifacts["weights"], context.artifacts["meta"])

            def predict(self, context, model_input, params=None):
                params = dict(params or {})
                # a Parquet request carries its parameters in the table's metadata
                # (sparse_request_parquet); MLflow fills the schema's defaults in, so those give way
                attrs = getattr(model_input, "attrs", {}).get(PARQUET_PARAMS)
                if attrs is not None:
                    if not isinstance(attrs, dict):
                        raise MlflowException(f"the Parquet metadata {PARQUET_PARAMS!r} must be a mapping of parameters",
                                              error_code=INVALID_PARAMETER_VALUE)
                    if not params.get("genes"):
                        params.update(attrs)
                try:
                    return self.annotator.predict(
                        model_input, params.get("value_type", "auto"), bool(params.get("return_embedding", False)),
                        genes=params.get("genes") or None, sparse_dtypes=params.get("sparse_dtypes") or "i4,f4",
                        gene_model=params.get("gene_model") or "auto",
                    )
                except InputError as e:
                    raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None

    AnnotatorPyfunc.__qualname__ = "AnnotatorPyfunc"  # pickled by reference, as this module's attribute
    return AnnotatorPyfunc


def __getattr__(name: str):
    if name == "AnnotatorPyfunc":  # what registered models' pickles name
        return _pyfunc_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    # No input schema: columns are gene symbols of any subset, case and order, and the model
    # aligns them itself (MLflow's column enforcement would drop case variants).
    return ModelSignature(
        inputs=None,
        outputs=Schema([ColSpec("string", "cell_type"), ColSpec("double", "confidence"), ColSpec("double", "gene_overlap")]),
        params=ParamSchema([ParamSpec("value_type", "string", "auto"), ParamSpec("return_embedding", "boolean", False),
                            ParamSpec("genes", "string", ""), ParamSpec("sparse_dtypes", "string", "i4,f4"),
                            ParamSpec("gene_model", "string", "auto")]),
    )
