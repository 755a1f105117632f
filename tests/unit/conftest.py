"""Shared fixtures for the unit tests: small synthetic atlases, h5ad writers and store snapshots.

Everything here is local and small: no Ray, no MLflow server.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import faiss
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scpretrain_dist.catalog import load_catalog
from scpretrain_dist.config import DemoDataConfig
from scpretrain_dist.demo import write_demo_atlas
from scpretrain_dist.store import Atlas, open_atlas

SMALL_DEMO = DemoDataConfig(
    n_datasets=3,
    cells_per_dataset=60,
    n_genes=80,
    n_types=3,
    markers_per_type=8,
    genes_kept=0.8,
    seed=0,
)


def write_h5ad(path, X, genes, labels=None, obs_names=None, uns=None):
    """Write an .h5ad with ``X`` (dense or sparse) over ``genes`` and return its path."""
    import anndata as ad

    n = X.shape[0]
    obs_names = obs_names if obs_names is not None else [f"cell{i:04d}" for i in range(n)]
    obs = pd.DataFrame(index=pd.Index([str(o) for o in obs_names]))
    if labels is not None:
        obs["cell_type"] = list(labels)
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index([str(g) for g in genes])))
    if uns:
        adata.uns.update(uns)
    path = Path(path)
    adata.write_h5ad(path)
    return path


def read_h5ad(path):
    import anndata as ad

    return ad.read_h5ad(path)


def log1p_cp10k(counts) -> np.ndarray:
    """Reference normalisation in float64: log1p(counts / library size * 1e4)."""
    counts = np.asarray(counts.toarray() if sp.issparse(counts) else counts, dtype=np.float64)
    lib = counts.sum(1, keepdims=True)
    scale = np.divide(1e4, lib, out=np.zeros_like(lib), where=lib > 0)
    return np.log1p(counts * scale)


def store_snapshot(store: Atlas) -> dict:
    """Everything on disk a reader could see, of either backend: the registry, gene space,
    metadata, obs and every stored value."""
    out = {"records": store.datasets(), "genes": list(store.genes())}
    if store.uri.endswith(".zarr"):
        import zarr

        g = zarr.open_group(store.uri, mode="r")
        out["metadata"] = dict(g.attrs)
        out["arrays"] = {name: np.asarray(a[...]) for name, a in g.members(max_depth=None) if isinstance(a, zarr.Array)}
        return out
    import tiledbsoma as soma

    with soma.Experiment.open(store.uri) as exp:
        X = exp.ms["RNA"].X["counts"]
        tbl = X.read().tables().concat()
        out["metadata"] = {k: v for k, v in exp.metadata.items() if str(k).startswith("scpretrain.")}
        obs = exp.obs.read().concat().to_pandas().sort_values("soma_joinid").reset_index(drop=True)
    order = np.lexsort((tbl["soma_dim_1"].to_numpy(), tbl["soma_dim_0"].to_numpy()))
    out["arrays"] = {"obs": obs, **{k: tbl[k].to_numpy()[order] for k in ("soma_dim_0", "soma_dim_1", "soma_data")}}
    return out


def assert_same_snapshot(a: dict, b: dict) -> None:
    assert a["records"] == b["records"]
    assert a["genes"] == b["genes"]
    assert a["metadata"] == b["metadata"]
    assert a["arrays"].keys() == b["arrays"].keys()
    for k, v in a["arrays"].items():
        if isinstance(v, pd.DataFrame):
            pd.testing.assert_frame_equal(v, b["arrays"][k])
        else:
            np.testing.assert_array_equal(v, b["arrays"][k], err_msg=k)


@contextmanager
def single_thread():
    """One thread each for torch and faiss, restored afterwards. The unit tests use tiny
    tensors, and several OpenMP threads spinning on a busy 2-core machine make a tiny training
    loop up to 50x slower."""
    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        faiss.omp_set_num_threads(faiss_threads)


@pytest.fixture(autouse=True)
def _single_thread():
    """Every unit test runs single-threaded; other suites in the same process are unaffected.
    (Module- and session-scoped fixtures that compute use ``helpers.single_thread()``.)"""
    with single_thread():
        yield


@pytest.fixture(scope="session")
def helpers():
    """The helper functions above, as a fixture (tests never import conftest directly)."""
    return SimpleNamespace(
        write_h5ad=write_h5ad,
        read_h5ad=read_h5ad,
        log1p_cp10k=log1p_cp10k,
        store_snapshot=store_snapshot,
        assert_same_snapshot=assert_same_snapshot,
        small_demo=SMALL_DEMO,
        single_thread=single_thread,
    )


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """A small demo atlas (3 datasets x 60 cells x 80 genes) written once per session.

    Treat it as read-only; copy files before changing them.
    """
    out = tmp_path_factory.mktemp("demo")
    write_demo_atlas(out, SMALL_DEMO)
    return out


@pytest.fixture(scope="session")
def demo_entries(demo_dir):
    return load_catalog(demo_dir / "catalog.toml")


@pytest.fixture
def demo_store(tmp_path, demo_entries) -> Atlas:
    """A fresh store with the three demo datasets ingested."""
    store = open_atlas(tmp_path / "atlas.soma")
    store.ingest(demo_entries, log=lambda m: None)
    return store


@pytest.fixture
def copy_file(tmp_path):
    def _copy(src, name):
        dst = tmp_path / name
        shutil.copy(src, dst)
        return dst

    return _copy
