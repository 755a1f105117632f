"""Synthetic multi-dataset atlas: negative-binomial counts with marker-gene cell types.

Every dataset shares the cell types (marker-gene programs over a common baseline) but has
its own batch effects: library size, gene-wise scaling, technology dropout, and a different
subset of measured genes. Odd-numbered datasets are "mouse" and spell their gene symbols in
title case, so ingest has to match species by upper-case symbol. Deterministic by seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp

from scpretrain_dist.config import DemoDataConfig

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
            {"cell_type": type_names[sim["labels"]], "dataset": name},
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
