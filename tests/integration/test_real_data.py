"""Ingest and fine-tune on a few real datasets from ../shared/data/scrna (skipped without it)."""

from __future__ import annotations

import numpy as np
import pytest

from scpretrain_dist import recipes
from scpretrain_dist.catalog import entries_from_paths
from scpretrain_dist.config import resolve
from scpretrain_dist.data.normalize import normalized_rows
from scpretrain_dist.store import open_atlas

pytestmark = pytest.mark.realdata
NAMES = ["pbmc_symphony_3pv1", "pbmc_symphony_5p", "mouse_fetal_liver_gse87795", "pancreas_baron_human_cider",
         "pancreas_baron_mouse_cider", "pancreas_cepo_3batch"]


@pytest.fixture(scope="module")
def store(shared_data, tmp_path_factory):
    st = open_atlas(tmp_path_factory.mktemp("real") / "atlas.soma")
    st.ingest(entries_from_paths([shared_data / f"{n}.h5ad" for n in NAMES]), log=lambda m: None)
    return st


def test_value_types_detected(store):
    vt = {r.name: r.value_type for r in store.datasets()}
    assert vt["pbmc_symphony_3pv1"] == "counts"
    assert vt["mouse_fetal_liver_gse87795"] == "log2norm"  # scater logNormCounts, max ~17.7
    assert vt["pancreas_cepo_3batch"] == "counts"  # non-integer but linear-scale values


def test_mouse_and_human_symbols_meet(store):
    human = store.dataset_gene_mask("pancreas_baron_human_cider")
    mouse = store.dataset_gene_mask("pancreas_baron_mouse_cider")
    assert (human & mouse).sum() > 0.9 * min(human.sum(), mouse.sum())


def test_normalised_values_are_finite_and_cp10k(store):
    for r in store.datasets():
        X = normalized_rows(store, r.joinids, r.value_type)
        assert np.isfinite(X.data).all()
        lib = np.asarray(np.expm1(X).sum(1)).ravel()
        np.testing.assert_allclose(lib[lib > 0], 1e4, rtol=1e-3)


def test_finetune_without_pretraining_on_real_pbmc(store, tmp_path):
    from scpretrain_dist.pipeline import finetune_and_evaluate

    cfg = resolve(recipes.tiny(), overrides=[f'work_dir="{tmp_path}"', f'store.uri="{store.uri}"',
                                             "finetune.seeds=[0]", "evaluate.budgets=[50, 1000]",
                                             "evaluate.cluster=false"])
    rows = finetune_and_evaluate(cfg, ["pbmc_symphony_3pv1"], None, None, tmp_path / "report",
                                 register=False, log=lambda m: None)
    full = {r["method"]: r["accuracy"] for r in rows if r["budget"] == 1000}
    # without an encoder, the methods that need one are left out; CellTypist runs where installed
    from scpretrain_dist.evaluate.methods import missing_peers

    peers = {"celltypist"} - set(missing_peers(["celltypist"]))
    assert set(full) == {"no_pretrain", "logreg", "pca_rf", "pca_logreg", "pca_svm"} | peers
    assert full["logreg"] > 0.7 and full["no_pretrain"] > 0.6
    small = [r for r in rows if r["budget"] == 50]
    assert {r["n_train"] for r in small} == {50}
    assert (tmp_path / "report" / "fig5_kappa_vs_label_budget.png").exists()


def test_transfer_between_real_pbmc_sets_with_the_shared_mapping(store, shared_data, tmp_path):
    from scpretrain_dist.evaluate.protocols import evaluate_transfer, load_mapping

    cfg = resolve(recipes.tiny(), overrides=[f'work_dir="{tmp_path}"', f'store.uri="{store.uri}"',
                                             "finetune.seeds=[0]", 'evaluate.methods=["no_pretrain", "logreg"]'])
    mapping = load_mapping(shared_data / "pbmc_coarse_labels.json")
    rows, splits, out = evaluate_transfer(cfg, store, ["pbmc_symphony_5p"], "pbmc_symphony_3pv1", mapping, None,
                                          log=lambda m: None)
    acc = {r["method"]: r["accuracy"] for r in rows}
    assert acc["logreg"] > 0.8 and acc["no_pretrain"] > 0.7
    assert "Megakaryocyte/Platelet" in out["classes"] and "HSC" not in out["classes"]
    # the HSC cells the mapping drops are not scored; the rest of the query is
    assert rows[0]["query_cells_dropped"] > 0
    assert len(splits[0]["test"]) + rows[0]["query_cells_dropped"] == store.dataset("pbmc_symphony_3pv1").n_cells
