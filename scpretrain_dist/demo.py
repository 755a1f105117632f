"""Synthetic multi-dataset atlas: negative-binomial counts with marker-gene cell types.

Every dataset shares the cell types (marker-gene programs over a common baseline) but has
its own batch effects: library size, gene-wise scaling, technology dropout, and a different
subset of measured genes. Odd-numbered datasets are "mouse" and spell their gene symbols in
title case, so ingest has to match species by upper-case symbol. Deterministic by seed.

``write_demo_atlas`` writes the small demo as .h5ad files; the atlas-size demo (below) streams
cells of the same kind of model straight into a store, chunk by chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from scpretrain_dist.config import ConfigError, DemoDataConfig

TECHNOLOGIES = ("10x 3' v3", "Drop-seq", "Smart-seq2", "inDrops", "CEL-seq2")


def gene_symbols(n_genes: int) -> list[str]:
    return [f"SYN{i:05d}" for i in range(n_genes)]


def type_programs(cfg: DemoDataConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Baseline log-mean per gene and a (n_types, n_genes) log-fold-change matrix.

    Types come in pairs that share half their markers, so neighbours are harder to tell apart.
    """
    base = rng.normal(-1.0, 1.2, cfg.n_genes)
    lfc = np.zeros((cfg.n_types, cfg.n_genes))
    m = cfg.markers_per_type
    for t in range(cfg.n_types):
        markers = rng.choice(cfg.n_genes, m, replace=False)
        lfc[t, markers] = rng.uniform(1.0, 2.5, m)
        if t % 2 == 1:  # share half the markers of the previous type
            shared = np.flatnonzero(lfc[t - 1])[: m // 2]
            lfc[t, shared] = lfc[t - 1, shared] * rng.uniform(0.6, 1.0, shared.size)
    return base, lfc


def simulate_dataset(
    index: int,
    n_cells: int,
    base: np.ndarray,
    lfc: np.ndarray,
    cfg: DemoDataConfig,
    rng: np.random.Generator,
) -> dict:
    """One dataset: counts (cells x measured genes), labels, and the measured gene indices."""
    n_types, n_genes = lfc.shape
    genes = np.sort(rng.choice(n_genes, int(round(cfg.genes_kept * n_genes)), replace=False))
    proportions = rng.dirichlet(np.full(n_types, 3.0))
    labels = rng.choice(n_types, n_cells, p=proportions)
    gene_scale = rng.normal(0.0, 0.35, n_genes)  # batch effect per gene
    log_mu = base[None, :] + lfc[labels] + gene_scale[None, :]
    profile = np.exp(log_mu[:, genes])
    profile /= profile.sum(1, keepdims=True)
    lib_mean = rng.uniform(np.log(1500), np.log(6000))
    library = np.exp(rng.normal(lib_mean, 0.35, n_cells))
    mu = profile * library[:, None]
    theta = rng.uniform(3.0, 10.0)  # NB dispersion of this technology
    counts = rng.poisson(rng.gamma(theta, mu / theta))
    dropout = rng.uniform(0.0, 0.25)  # technology dropout on top of sampling zeros
    counts[rng.random(counts.shape) < dropout] = 0
    return {
        "counts": sp.csr_matrix(counts.astype(np.float32)),
        "labels": labels,
        "genes": genes,
        "technology": TECHNOLOGIES[index % len(TECHNOLOGIES)],
    }


def write_demo_atlas(out_dir: str | Path, cfg: DemoDataConfig) -> list[Path]:
    """Write ``demo_XX.h5ad`` files (and ``catalog.toml``) into ``out_dir``; return the files."""
    import anndata as ad
    import pandas as pd

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    base, lfc = type_programs(cfg, rng)
    symbols = np.array(gene_symbols(cfg.n_genes))
    type_names = np.array([f"type_{chr(ord('A') + t)}" for t in range(cfg.n_types)])
    paths = []
    lines = ['[defaults]\nroot = "."\nlabel_key = "cell_type"\n']
    for d in range(cfg.n_datasets):
        name = f"demo_{d:02d}"
        sim = simulate_dataset(d, cfg.cells_per_dataset, base, lfc, cfg, rng)
        species = "mouse" if d % 2 else "human"
        names = symbols[sim["genes"]]
        if species == "mouse":
            names = np.array([s.title() for s in names])
        obs = pd.DataFrame(
            {"cell_type": pd.Categorical(type_names[sim["labels"]]), "dataset": pd.Categorical([name] * cfg.cells_per_dataset)},
            index=[f"{name}_cell{i:05d}" for i in range(cfg.cells_per_dataset)],
        )
        adata = ad.AnnData(X=sim["counts"], obs=obs, var=pd.DataFrame(index=names))
        adata.uns.update(
            species=species, tissue="synthetic", technology=sim["technology"], values="raw counts"
        )
        path = out / f"{name}.h5ad"
        adata.write_h5ad(path, compression="gzip")
        paths.append(path)
        lines.append(
            f'[[dataset]]\nname = "{name}"\npath = "{path.name}"\nspecies = "{species}"\n'
            f'tissue = "synthetic"\ntechnology = "{sim["technology"]}"\ngroup = "demo"\n'
        )
    (out / "catalog.toml").write_text("\n".join(lines))
    return paths


# ---------------------------------------------------------------------------- atlas scale
#
# The atlas-size demo never holds the atlas in memory: cells are drawn chunk by chunk, each chunk
# from its own seeded generator, so any chunk can be regenerated on its own (``simulate_chunk``)
# and checked against what a store returns. Counts are multinomial reads: a cell's library size
# is split over genes by sampling reads from a per-(dataset, cell type) profile, which gives
# realistic sparsity (a few hundred to a few thousand genes per cell) in O(reads) work instead
# of O(genes) per cell.

CHUNK_CELLS = 4096  # cells per generator chunk: the unit of regeneration
PROFILE_SLOTS = 1 << 16  # a profile is a table of gene ids; a read picks a uniform slot


@dataclass(frozen=True)
class AtlasPlan:
    """What defines a synthetic atlas: dataset names and sizes, the gene-expression programs."""

    cfg: DemoDataConfig
    names: tuple[str, ...]
    sizes: np.ndarray  # cells per dataset (log-normal, uneven)
    base: np.ndarray  # (n_genes,) baseline log-expression, heavy-tailed like real genes
    lfc: np.ndarray  # (n_types, n_genes) marker log-fold-changes

    @property
    def n_cells(self) -> int:
        return int(self.sizes.sum())

    @property
    def starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)

    def type_names(self) -> np.ndarray:
        n = self.cfg.n_types
        if n <= 26:
            return np.array([f"type_{chr(ord('A') + t)}" for t in range(n)], dtype=object)
        return np.array([f"type_{t:03d}" for t in range(n)], dtype=object)


@dataclass(frozen=True)
class DatasetModel:
    """One dataset's batch effects, drawn from (seed, dataset index)."""

    index: int
    genes: np.ndarray  # sorted atlas gene ids this dataset measures
    proportions: np.ndarray  # (n_types,) cell-type frequencies
    log_library: float  # mean log library size (reads per cell)
    ambient: float  # mean fraction of a cell's reads from the dataset's ambient profile
    tables: np.ndarray  # (n_types + 1, PROFILE_SLOTS) gene ids; the last row is ambient
    species: str
    technology: str


def plan_atlas(cfg: DemoDataConfig) -> AtlasPlan:
    """Dataset sizes and programs of an atlas of ``cfg.n_cells`` cells."""
    if cfg.n_datasets < 1 or cfg.n_cells < cfg.n_datasets:
        raise ConfigError(
            f"a synthetic atlas needs at least one cell per dataset: {cfg.n_cells} cells for "
            f"{cfg.n_datasets} datasets; raise --cells or lower --datasets"
        )
    if cfg.n_types < 1 or cfg.markers_per_type < 1 or cfg.n_genes < 2 * cfg.markers_per_type:
        raise ConfigError(
            f"{cfg.n_genes} genes cannot hold {cfg.n_types} cell types of {cfg.markers_per_type} "
            "marker genes (needs at least twice the markers per type); raise --genes"
        )
    rng = np.random.default_rng([cfg.seed, 0])
    weights = np.exp(rng.normal(0.0, 1.0, cfg.n_datasets))
    sizes = 1 + np.floor(weights / weights.sum() * (cfg.n_cells - cfg.n_datasets)).astype(np.int64)
    sizes[np.argmax(weights)] += cfg.n_cells - sizes.sum()  # exact total
    base = rng.normal(-1.0, 2.0, cfg.n_genes)  # a few genes take most reads, as in real data
    lfc = np.zeros((cfg.n_types, cfg.n_genes))
    m = cfg.markers_per_type
    # markers among the better-expressed half, so a cell's few thousand reads see them
    candidates = np.argsort(base)[cfg.n_genes // 2 :]
    for t in range(cfg.n_types):
        markers = rng.choice(candidates, m, replace=False)
        lfc[t, markers] = rng.uniform(1.5, 3.0, m)
        if t % 2 == 1:  # pairs share half their markers, so neighbours are harder to tell apart
            shared = np.flatnonzero(lfc[t - 1])[: m // 2]
            lfc[t, shared] = lfc[t - 1, shared] * rng.uniform(0.6, 1.0, shared.size)
    width = max(2, len(str(cfg.n_datasets - 1)))
    names = tuple(f"demo_{d:0{width}d}" for d in range(cfg.n_datasets))
    return AtlasPlan(cfg, names, sizes, base, lfc)


def _profile_table(log_weights: np.ndarray, genes: np.ndarray) -> np.ndarray:
    """Gene ids laid out so that a uniform slot picks gene g with its profile probability
    (resolution 1/PROFILE_SLOTS; rarer genes are never drawn)."""
    w = np.exp(log_weights[genes] - log_weights[genes].max())
    cdf = np.cumsum(w)
    cdf /= cdf[-1]
    slots = np.searchsorted(cdf, (np.arange(PROFILE_SLOTS) + 0.5) / PROFILE_SLOTS)
    return genes[np.minimum(slots, len(genes) - 1)]


def dataset_model(plan: AtlasPlan, d: int) -> DatasetModel:
    cfg = plan.cfg
    rng = np.random.default_rng([cfg.seed, 1, d])
    n_kept = max(2 * cfg.markers_per_type, int(round(cfg.genes_kept * cfg.n_genes)))
    genes = np.sort(rng.choice(cfg.n_genes, min(n_kept, cfg.n_genes), replace=False))
    gene_scale = rng.normal(0.0, 0.35, cfg.n_genes)  # batch effect per gene
    proportions = rng.dirichlet(np.full(cfg.n_types, 3.0))
    log_library = rng.uniform(np.log(cfg.min_reads), np.log(cfg.max_reads))
    ambient = rng.uniform(0.02, 0.15)
    dtype = np.uint16 if cfg.n_genes <= np.iinfo(np.uint16).max + 1 else np.int32
    rows = [_profile_table(plan.base + plan.lfc[t] + gene_scale, genes) for t in range(cfg.n_types)]
    mean_type = np.log(np.exp(plan.lfc).T @ proportions)  # ambient RNA: the dataset's average cell
    rows.append(_profile_table(plan.base + mean_type + gene_scale, genes))
    return DatasetModel(
        index=d, genes=genes, proportions=proportions, log_library=float(log_library),
        ambient=float(ambient), tables=np.stack(rows).astype(dtype),
        species="mouse" if d % 2 else "human", technology=TECHNOLOGIES[d % len(TECHNOLOGIES)],
    )


def simulate_chunk(plan: AtlasPlan, model: DatasetModel, chunk: int) -> tuple[np.ndarray, sp.csr_matrix]:
    """Cell-type ids and counts (cells x atlas genes, float32 CSR with sorted indices) of
    cells ``chunk * CHUNK_CELLS ...`` of dataset ``model.index``; deterministic."""
    cfg = plan.cfg
    n_genes, n_types = cfg.n_genes, cfg.n_types
    lo = chunk * CHUNK_CELLS
    n = int(min(CHUNK_CELLS, plan.sizes[model.index] - lo))
    if n <= 0:
        raise ValueError(f"chunk {chunk} is past the end of dataset {plan.names[model.index]}")
    rng = np.random.default_rng([cfg.seed, 2, model.index, chunk])
    labels = rng.choice(n_types, n, p=model.proportions)
    library = np.maximum(50, np.exp(rng.normal(model.log_library, 0.35, n))).astype(np.int64)
    n_ambient = rng.binomial(library, rng.beta(2.0, 2.0 / model.ambient - 2.0, n))
    # reads of cell c: n_ambient[c] from the ambient row, the rest from its type's row
    table = np.stack([np.full(n, n_types), labels], 1).ravel()
    counts = np.stack([n_ambient, library - n_ambient], 1).ravel()
    slot = rng.integers(0, PROFILE_SLOTS, int(library.sum()), dtype=np.uint32)
    slot += np.repeat((table * PROFILE_SLOTS).astype(np.uint32), counts)
    gene = model.tables.ravel()[slot]
    key_type = np.uint32 if n * n_genes < 2**32 else np.uint64
    key = np.repeat(np.arange(n, dtype=key_type) * key_type(n_genes), library)
    key += gene.astype(key_type)
    key.sort()
    first = np.empty(len(key), dtype=bool)
    first[0] = True
    np.not_equal(key[1:], key[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    values = np.diff(np.append(starts, len(key))).astype(np.float32)
    key = key[starts]
    rows = (key // key_type(n_genes)).astype(np.int64)
    cols = (key - rows.astype(key_type) * key_type(n_genes)).astype(np.int32)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    X = sp.csr_matrix((values, cols, indptr), shape=(n, n_genes))
    X.has_sorted_indices = True
    return labels, X


def iter_dataset_blocks(
    plan: AtlasPlan, d: int, block_cells: int = 8 * CHUNK_CELLS, model: DatasetModel | None = None
):
    """(first local cell, cell-type ids, counts CSR) of dataset ``d``, block by block."""
    model = model or dataset_model(plan, d)
    per_block = max(1, block_cells // CHUNK_CELLS)
    n_chunks = -(-int(plan.sizes[d]) // CHUNK_CELLS)
    for c0 in range(0, n_chunks, per_block):
        parts = [simulate_chunk(plan, model, c) for c in range(c0, min(n_chunks, c0 + per_block))]
        labels = np.concatenate([p[0] for p in parts])
        X = parts[0][1] if len(parts) == 1 else sp.vstack([p[1] for p in parts], format="csr")
        yield c0 * CHUNK_CELLS, labels, X


ATLAS_GENERATOR = "scpretrain-synthetic-atlas/1"  # bump when the model changes: content hashes follow


def dataset_sha256(plan: AtlasPlan, d: int) -> str:
    """Content hash of a synthetic dataset: what generated it (a rerun is recognised as same)."""
    import hashlib
    import json
    from dataclasses import asdict

    blob = json.dumps({"generator": ATLAS_GENERATOR, "cfg": asdict(plan.cfg), "dataset": d}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def demo_datasets(plan: AtlasPlan, block_cells: int = 4 * CHUNK_CELLS):
    """The atlas as (gene symbols, one StreamedDataset per dataset) for a store to write.

    Obs ids decode to where a cell came from: ``demo_03:c0001234`` is local cell 1234 of
    dataset 3, i.e. row 1234 % CHUNK_CELLS of ``simulate_chunk(plan, dataset_model(plan, 3),
    1234 // CHUNK_CELLS)``.
    """
    from scpretrain_dist.store.atlas import StreamedDataset

    cfg = plan.cfg
    type_names = plan.type_names()
    width = max(7, len(str(int(plan.sizes.max()))))
    datasets = []
    for d, name in enumerate(plan.names):
        def blocks(d=d, name=name):
            model = dataset_model(plan, d)
            for lo, labels, X in iter_dataset_blocks(plan, d, block_cells, model):
                ids = np.array([f"{name}:c{i:0{width}d}" for i in range(lo, lo + X.shape[0])], dtype=object)
                yield ids, type_names[labels], X

        model = dataset_model(plan, d)
        mask = np.zeros(cfg.n_genes, dtype=bool)
        mask[model.genes] = True
        datasets.append(
            StreamedDataset(
                name=name, n_cells=int(plan.sizes[d]), gene_mask=mask, blocks=blocks,
                value_type="counts", species=model.species, tissue="synthetic",
                technology=model.technology, label_key="cell_type",
                source=f"synthetic:{ATLAS_GENERATOR}:seed={cfg.seed}:dataset={d}",
                sha256=dataset_sha256(plan, d), group="demo",
            )
        )
    return np.array(gene_symbols(cfg.n_genes), dtype=object), datasets


def write_demo_store(cfg: DemoDataConfig, uri: str | Path, fmt: str = "soma", log=print):
    """Stream the atlas of ``cfg`` (``cfg.n_cells`` cells) into a SOMA experiment or a zarr CSR
    store at ``uri``, block by block; return the store's ingest report."""
    plan = plan_atlas(cfg)
    genes, datasets = demo_datasets(plan)
    log(f"demo-data: {plan.n_cells} cells in {len(datasets)} datasets "
        f"({int(plan.sizes.min())} to {int(plan.sizes.max())} cells), {cfg.n_genes} genes -> {uri}")
    if fmt not in ("soma", "zarr"):
        raise ConfigError(f"unknown store format {fmt!r}; use 'soma' or 'zarr'")
    from scpretrain_dist.store.atlas import open_atlas

    return open_atlas(uri, fmt).append_streamed(genes, datasets, log=log)
