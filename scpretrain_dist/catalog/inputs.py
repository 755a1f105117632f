"""One input dataset (an ``.h5ad``) read and checked in memory, ready for any store to write.

Everything about the file alone is checked here, before a store is touched: the values (finite,
within float32, not negative, not all zero, of the declared type), the gene names (symbols, not
Ensembl ids), the label column. What needs the atlas (gene overlap, the same file under another
name) is checked by the store's ingest, also before it writes anything.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scpretrain_dist.catalog.entries import CatalogError, DatasetEntry, read_h5ad
from scpretrain_dist.catalog.values import (
    declared_type_problem,
    detect_value_type,
    ensembl_fraction,
    stored_values,
    value_problem,
)

UNKNOWN_LABEL = "unknown"
# var columns that hold gene symbols in files from common pipelines (CELLxGENE, scanpy, Seurat)
SYMBOL_COLUMNS = ("feature_name", "gene_symbols", "gene_symbol", "gene_name", "gene_names", "symbol", "Symbol")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class PreparedDataset:
    """A dataset read and validated in memory, ready to be written."""

    entry: DatasetEntry
    matrix: sp.csr_matrix  # cells x own genes, duplicates summed
    symbols: np.ndarray  # upper-case, unique
    obs_ids: np.ndarray
    labels: np.ndarray
    value_type: str
    n_types: int
    sha256: str
    species: str
    tissue: str
    technology: str
    label_key: str  # the obs column the labels came from ("" when the dataset has none)


def prepare_dataset(entry: DatasetEntry, log=print) -> PreparedDataset:
    """Read and check one ``.h5ad``; a CatalogError names the dataset, the file, what is wrong and
    the fix. Surprising but usable inputs (cells without counts, repeated genes or cell names, no
    label column) are accepted and said in ``log``."""
    path = Path(entry.path)
    where = f"dataset {entry.name} ({path})"
    adata = read_h5ad(path, f"dataset {entry.name}")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise CatalogError(f"{where} has {adata.n_obs} cells x {adata.n_vars} genes; nothing to ingest")
    if adata.n_obs < 2:
        raise CatalogError(f"{where} holds a single cell: too few to cluster, split or compare; "
                           "ingest it together with its dataset")
    X = adata.X
    if X is None:
        raise CatalogError(f"{where} has no X matrix (its values may be in a layer; set adata.X first)")
    if not sp.issparse(X):
        X = np.asarray(X)
    problem = value_problem(stored_values(X))
    if problem:
        raise CatalogError(f"{where}: X holds {problem}; ingest raw counts or log-normalised values")
    X = sp.csr_matrix(X, dtype=np.float32) if not sp.issparse(X) else X.tocsr().astype(np.float32)
    X.sum_duplicates()
    X.eliminate_zeros()
    if X.nnz == 0:
        raise CatalogError(f"{where}: every value of X is 0; nothing to learn from (check that X holds the data)")
    empty = int((np.diff(X.indptr) == 0).sum())
    if empty:
        log(f"warning: {where}: {empty} of {adata.n_obs} cells have no counts at all; they carry no signal "
            "(filter them, e.g. scanpy.pp.filter_cells(adata, min_counts=1))")
    symbols = _gene_symbols(adata, entry, where)
    species = entry.species if entry.species != "unknown" else str(adata.uns.get("species", "unknown"))
    symbols, X = _as_human_orthologs(symbols, X, entry, species, where, log)
    if symbols.has_duplicates:  # sum columns of genes that collide once upper-cased
        codes, uniques = pd.factorize(symbols)
        log(f"warning: {where}: {len(symbols) - len(uniques)} gene symbols repeat (case-insensitive); "
            "their columns are summed")
        merge = sp.csr_matrix(
            (np.ones(len(codes), np.float32), (np.arange(len(codes)), codes)),
            shape=(len(codes), len(uniques)),
        )
        X = (X @ merge).tocsr()
        symbols = pd.Index(uniques)
    if entry.value_type == "auto":
        value_type = detect_value_type(X)
    else:
        value_type = entry.value_type
        problem = declared_type_problem(X, value_type)
        if problem:
            raise CatalogError(f"{where}: {problem}")
    labels, label_key = _labels(adata, entry, where, log)
    n_types = len(set(labels) - {UNKNOWN_LABEL, "nan", ""})
    names = adata.obs_names.astype(str)
    obs_ids = np.array([f"{entry.name}:{n}" for n in names], dtype=object)
    if len(set(obs_ids)) != len(obs_ids):
        log(f"warning: {where}: {len(obs_ids) - len(set(obs_ids))} cell names repeat; each cell's id gets "
            "its position (#i)")
        obs_ids = np.array([f"{o}#{i}" for i, o in enumerate(obs_ids)], dtype=object)
    uns = adata.uns

    def meta(key: str) -> str:
        value = getattr(entry, key)
        return value if value != "unknown" else str(uns.get(key, "unknown"))

    return PreparedDataset(
        entry=entry,
        matrix=X,
        symbols=np.asarray(symbols, dtype=object),
        obs_ids=obs_ids,
        labels=labels.astype(object),
        value_type=value_type,
        n_types=n_types,
        sha256=file_sha256(path),
        species=meta("species"),
        tissue=meta("tissue"),
        technology=meta("technology"),
        label_key=label_key,
    )


def _gene_symbols(adata, entry: DatasetEntry, where: str) -> pd.Index:
    """Upper-case gene symbols: ``var_names``, or the var column the entry's ``gene_key`` names."""
    if entry.gene_key:
        if entry.gene_key not in adata.var:
            raise CatalogError(f"{where}: gene_key {entry.gene_key!r} is not a var column; it has "
                               f"{', '.join(map(str, adata.var.columns)) or 'none'}")
        names = adata.var[entry.gene_key]
        if names.isna().any():
            raise CatalogError(f"{where}: var[{entry.gene_key!r}] is empty for {int(names.isna().sum())} genes")
        source = f"var[{entry.gene_key!r}]"
    else:
        names = adata.var_names
        source = "var_names"
    symbols = pd.Index(pd.Series(names).astype(str).str.strip().to_numpy()).str.upper()
    if (symbols.str.len() == 0).any():
        raise CatalogError(f"{where}: {int((symbols.str.len() == 0).sum())} gene names in {source} are empty")
    if ensembl_fraction(symbols) > 0.5 and not entry.own_genes:
        present = [c for c in SYMBOL_COLUMNS if c in adata.var and c != entry.gene_key]
        hint = (f"its var column {present[0]!r} looks like symbols: set gene_key = \"{present[0]}\" in a catalog entry"
                if present else "map them to symbols first (e.g. with the Ensembl table of your annotation)")
        raise CatalogError(f"{where}: {source} are Ensembl ids (e.g. {symbols[0]}), but the atlas matches genes by "
                           f"symbol; {hint} (or set own_genes = true to keep them as they are)")
    return symbols


def _as_human_orthologs(symbols: pd.Index, X: sp.csr_matrix, entry: DatasetEntry, species: str, where: str,
                        log) -> tuple[pd.Index, sp.csr_matrix]:
    """A mouse dataset's symbols as their human orthologs (see catalog/orthologs.py), the genes
    without one dropped; anything else as it is."""
    from scpretrain_dist.catalog.orthologs import OrthologError, is_mouse, load_orthologs

    if not is_mouse(species) or entry.orthologs.lower() in ("", "none"):
        return symbols, X
    try:
        table = load_orthologs(entry.orthologs)
    except OrthologError as e:
        raise CatalogError(f"{where}: {e}") from None
    if not table.looks_mouse(symbols):
        if table.name_hits(symbols)[1]:  # named like human genes, not merely unlisted
            log(f"{where}: species {species}, but its gene symbols are human ones (homologs); kept as they are")
        return symbols, X
    human = table.to_human(symbols)
    keep = np.flatnonzero(human != None)  # noqa: E711 - elementwise over an object array
    renamed = int((human[keep] != np.asarray(symbols)[keep]).sum())
    log(f"{where}: {renamed} mouse gene symbols renamed to their human orthologs, {len(symbols) - len(keep)} "
        f"dropped (named like a human gene that is another mouse gene's ortholog)")
    return pd.Index(human[keep].astype(str)), X[:, keep].tocsr()


def _labels(adata, entry: DatasetEntry, where: str, log) -> tuple[np.ndarray, str]:
    """Cell-type labels (UNKNOWN_LABEL for unlabelled cells) and the obs column they came from."""
    key = entry.label_key
    if key not in adata.obs:
        if entry.label_required:
            raise CatalogError(f"{where}: label_key {key!r} is not an obs column; it has "
                               f"{', '.join(map(str, adata.obs.columns)) or 'none'} (give the column of cell types, or "
                               "leave label_key out for an unlabelled dataset)")
        log(f"note: {where} has no obs[{key!r}]: ingested as unlabelled (it takes part in pretraining only; "
            "a catalog entry's label_key names another column)")
        return np.full(adata.n_obs, UNKNOWN_LABEL, dtype=object), ""
    col = adata.obs[key]
    labels = col.astype(object).where(col.notna(), UNKNOWN_LABEL).astype(str).to_numpy()
    if not (set(labels) - {UNKNOWN_LABEL, "nan", ""}):
        log(f"note: {where}: obs[{key!r}] labels no cell; ingested as unlabelled")
    return labels, key
