"""The synthetic demo atlas: deterministic, count-valued, batch-affected, catalogued."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from scpretrain_dist.catalog import CatalogError, entries_from_paths, load_catalog
from scpretrain_dist.config import DemoDataConfig
from scpretrain_dist.demo import gene_symbols, write_demo_atlas

CFG = DemoDataConfig(
    n_datasets=3, cells_per_dataset=40, n_genes=60, n_types=3, markers_per_type=6, genes_kept=0.8
)


def _dense(adata) -> np.ndarray:
    return adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)


@pytest.fixture(scope="module")
def atlases(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return {
        "a": write_demo_atlas(root / "a", dataclasses.replace(CFG, seed=0)),
        "b": write_demo_atlas(root / "b", dataclasses.replace(CFG, seed=0)),
        "c": write_demo_atlas(root / "c", dataclasses.replace(CFG, seed=1)),
    }


def test_writes_one_file_per_dataset(atlases):
    paths = atlases["a"]
    assert [p.name for p in paths] == ["demo_00.h5ad", "demo_01.h5ad", "demo_02.h5ad"]
    assert all(p.exists() for p in paths)
    assert (paths[0].parent / "catalog.toml").exists()


def test_deterministic_by_seed(atlases, helpers):
    for pa_, pb, pc in zip(atlases["a"], atlases["b"], atlases["c"]):
        a, b, c = (helpers.read_h5ad(p) for p in (pa_, pb, pc))
        np.testing.assert_array_equal(_dense(a), _dense(b))
        assert list(a.var_names) == list(b.var_names)
        assert a.obs.equals(b.obs)
        # another seed gives another dataset
        assert _dense(a).shape != _dense(c).shape or not np.array_equal(_dense(a), _dense(c))


def test_counts_are_non_negative_integers(atlases, helpers):
    for p in atlases["a"]:
        X = _dense(helpers.read_h5ad(p))
        assert X.shape == (CFG.cells_per_dataset, round(CFG.genes_kept * CFG.n_genes))
        assert (X >= 0).all()
        np.testing.assert_array_equal(X, np.round(X))
        assert X.sum() > 0
        assert (X.sum(1) > 0).all(), "every cell has some counts"


def test_datasets_measure_different_gene_subsets(atlases, helpers):
    universe = set(gene_symbols(CFG.n_genes))
    subsets = []
    for p in atlases["a"]:
        genes = {g.upper() for g in helpers.read_h5ad(p).var_names}
        assert len(genes) == round(CFG.genes_kept * CFG.n_genes)
        assert genes <= universe
        subsets.append(frozenset(genes))
    assert len(set(subsets)) == len(subsets), "each dataset measures its own subset"


def test_odd_datasets_use_title_case_symbols(atlases, helpers):
    for i, p in enumerate(atlases["a"]):
        adata = helpers.read_h5ad(p)
        names = list(adata.var_names)
        if i % 2:
            assert all(n == n.upper().title() and n != n.upper() for n in names)
            assert adata.uns["species"] == "mouse"
        else:
            assert all(n == n.upper() for n in names)
            assert adata.uns["species"] == "human"


def test_obs_has_cell_type_and_dataset(atlases, helpers):
    types = {f"type_{c}" for c in "ABC"}
    for p in atlases["a"]:
        adata = helpers.read_h5ad(p)
        assert {"cell_type", "dataset"} <= set(adata.obs.columns)
        assert (adata.obs["dataset"] == p.stem).all()
        assert set(adata.obs["cell_type"]) <= types
        assert adata.obs["cell_type"].nunique() >= 2
        assert adata.obs_names.is_unique


def test_catalog_loads(atlases):
    paths = atlases["a"]
    entries = load_catalog(paths[0].parent / "catalog.toml")
    assert [e.name for e in entries] == [p.stem for p in paths]
    assert [Path(e.path).resolve() for e in entries] == [p.resolve() for p in paths]
    assert [e.species for e in entries] == ["human", "mouse", "human"]
    assert all(e.label_key == "cell_type" for e in entries)
    assert all(e.group == "demo" and e.tissue == "synthetic" for e in entries)
    assert len({e.technology for e in entries}) == 3


def test_entries_from_a_folder(atlases):
    folder = atlases["a"][0].parent
    entries = entries_from_paths([folder])
    assert [e.name for e in entries] == ["demo_00", "demo_01", "demo_02"]
    assert all(e.value_type == "auto" and e.label_key == "cell_type" for e in entries)


@pytest.mark.parametrize("toml_first", [False, True])
def test_a_catalog_next_to_other_inputs_drops_nothing(atlases, toml_first, tmp_path):
    import shutil

    catalog = atlases["a"][0].parent / "catalog.toml"
    extra = tmp_path / "extra.h5ad"
    shutil.copy(atlases["c"][0], extra)
    inputs = [catalog, extra] if toml_first else [extra, catalog]
    try:
        entries = entries_from_paths(inputs)
    except CatalogError:
        return  # refusing the mix outright would be fine too
    names = {e.name for e in entries}
    assert {"extra", "demo_00", "demo_01", "demo_02"} <= names
