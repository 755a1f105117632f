"""Mouse symbols as their human one-to-one orthologs: the table, ingest and the annotator."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from scpretrain_dist.catalog.entries import CatalogError, DatasetEntry
from scpretrain_dist.catalog.inputs import prepare_dataset
from scpretrain_dist.catalog.orthologs import load_orthologs

with warnings.catch_warnings(record=True):
    from scpretrain_dist.serve.pyfunc import Annotator, export_annotator


def test_the_builtin_table_holds_the_pairs_named_differently():
    t = load_orthologs()
    assert len(t.mouse_to_human) > 1000
    assert t.mouse_to_human["TRP53INP2"] == "TP53INP2"
    assert t.mouse_to_human["MT-CYTB"] == "MT-CYB"
    assert t.mouse_to_human["CXCL5"] == "CXCL6"  # upper-casing alone pairs it with the wrong gene
    assert "CD3E" not in t.mouse_to_human  # same name in both: upper-casing already matches it
    assert t.looks_mouse(["Trp53inp2", "Zfp24", "Cd3e"]) and not t.looks_mouse(["TP53INP2", "ZNF24", "CD3E"])


def test_a_users_table_keeps_one_to_one_pairs_and_drops_names_of_another_genes_ortholog(tmp_path):
    path = tmp_path / "orth.csv"
    path.write_text("human,mouse\nAAA1,Aaa2\nBBB,Bbb1\nBBB,Bbb2\nCCC,Ccc\n")
    t = load_orthologs(str(path))
    assert t.mouse_to_human == {"AAA2": "AAA1"}  # BBB is one-to-many; CCC/Ccc differ only in case
    # mouse Aaa1 is named like human AAA1, which is mouse Aaa2's ortholog: dropped
    assert t.to_human(["Aaa2", "Aaa1", "Ccc", "Zzz"]).tolist() == ["AAA1", None, "CCC", "ZZZ"]
    bad = tmp_path / "bad.csv"
    bad.write_text("h,m\nA,B\n")
    with pytest.raises(ValueError, match="needs columns 'human' and 'mouse'"):
        load_orthologs(str(bad))


def _mouse_file(helpers, path, genes):
    X = np.arange(1, 3 * len(genes) + 1, dtype=np.float32).reshape(3, len(genes))
    return helpers.write_h5ad(path, X, genes, labels=["a", "b", "a"]), X


def test_ingest_renames_a_mouse_datasets_genes_and_their_values_follow(helpers, tmp_path):
    genes = ["Trp53inp2", "Cd3e", "Zfp24", "Gm12345"]
    path, X = _mouse_file(helpers, tmp_path / "m.h5ad", genes)
    logs = []
    p = prepare_dataset(DatasetEntry(name="m", path=str(path), species="mouse"), log=logs.append)
    assert p.symbols.tolist() == ["TP53INP2", "CD3E", "ZNF24", "GM12345"]
    np.testing.assert_array_equal(p.matrix.toarray(), X)
    assert any("2 mouse gene symbols renamed" in m for m in logs)
    plain = prepare_dataset(DatasetEntry(name="m", path=str(path), species="mouse", orthologs="none"), log=logs.append)
    assert plain.symbols.tolist() == ["TRP53INP2", "CD3E", "ZFP24", "GM12345"]
    human = prepare_dataset(DatasetEntry(name="m", path=str(path), species="human"), log=logs.append)
    assert human.symbols.tolist() == plain.symbols.tolist()
    logs.clear()  # symbols the table does not list (the demo's): kept, and nothing said
    path, _ = _mouse_file(helpers, tmp_path / "g.h5ad", ["Gene0001", "Gene0002"])
    assert prepare_dataset(DatasetEntry(name="g", path=str(path), species="mouse"), log=logs.append).symbols.tolist() \
        == ["GENE0001", "GENE0002"] and not logs


def test_a_mouse_dataset_with_human_homolog_symbols_is_kept_and_a_missing_table_is_named(helpers, tmp_path):
    path, _ = _mouse_file(helpers, tmp_path / "h.h5ad", ["TP53INP2", "ZNF24", "CXCL5"])
    logs = []
    p = prepare_dataset(DatasetEntry(name="h", path=str(path), species="mouse"), log=logs.append)
    assert p.symbols.tolist() == ["TP53INP2", "ZNF24", "CXCL5"]
    assert any("human ones (homologs); kept" in m for m in logs)
    with pytest.raises(CatalogError, match=r"dataset h .*no_such\.csv does not exist"):
        prepare_dataset(DatasetEntry(name="h", path=str(path), species="mouse", orthologs=str(tmp_path / "no_such.csv")))


def test_the_annotator_matches_a_mouse_query_on_a_human_model_through_orthologs(tmp_path):
    from scpretrain_dist.model import CellTypeClassifier

    genes = np.array(["TP53INP2", "CD3E", "ZNF24", "MT-CYB", "ACTB"])
    torch.manual_seed(0)
    a = Annotator(*export_annotator(CellTypeClassifier(len(genes), 2), genes, np.array(["x", "y"]), tmp_path).values())
    X = np.ones((2, 5), np.float32)
    mouse = ["Trp53inp2", "Cd3e", "Zfp24", "mt-Cytb", "Actb"]
    gm = a.gene_map(mouse)
    assert gm.n_matched == 5 and gm.row.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(a.predict_matrix(X, mouse).confidence, a.predict_matrix(X, list(genes)).confidence)
    # a column that holds the model gene by name keeps it; the ortholog of another is not added to it
    assert a.gene_map(["ZNF24", "Zfp24"]).row.tolist() == [2, -1]
