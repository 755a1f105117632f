"""Label budgets, label mapping, the comparison methods, paired tests and the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp

from scpretrain_dist import recipes
from scpretrain_dist.catalog.inputs import UNKNOWN_LABEL
from scpretrain_dist.config import ConfigError, resolve
from scpretrain_dist.evaluate import methods as methods_mod
from scpretrain_dist.evaluate.methods import (
    ALL_METHODS,
    PEERS,
    SEMI_SUPERVISED,
    Cells,
    check_methods,
    embed,
    run_method,
)
from scpretrain_dist.evaluate.metrics import clustering_metrics, paired_wilcoxon
from scpretrain_dist.evaluate.protocols import harmonise, load_mapping
from scpretrain_dist.evaluate.report import budget_curve, paired_tests, summary, write_report
from scpretrain_dist.evaluate.splits import budget_subset, split_cells
from scpretrain_dist.store import StoreError
from scpretrain_dist.train.finetune import epoch_batches


# ------------------------------------------------------------------ budgets
@pytest.mark.parametrize("budget", [1, 3, 5, 25, 50, 99])
def test_budget_subset_is_a_stratified_subset_of_the_split(budget):
    labels = np.repeat(np.arange(5), [200, 100, 50, 20, 5])
    split = split_cells(labels, seed=0, train_cap=1000)
    sub = budget_subset(labels, split.train, budget, seed=0)
    assert len(sub) == min(budget, len(split.train))
    assert set(sub) <= set(split.train) and len(set(sub)) == len(sub)
    present = np.unique(labels[sub])
    if budget >= 5:  # every class of the split gets a cell
        assert set(present) == set(np.unique(labels[split.train]))
    if budget >= 50:  # and the rest is roughly proportional
        frac = np.bincount(labels[sub], minlength=5) / len(sub)
        want = np.bincount(labels[split.train], minlength=5) / len(split.train)
        assert np.abs(frac - want).max() < 0.05


def test_budget_above_the_split_takes_it_whole_and_is_deterministic():
    labels = np.repeat([0, 1], [30, 30])
    split = split_cells(labels, seed=1, train_cap=1000)
    assert np.array_equal(budget_subset(labels, split.train, 10_000, 1), np.sort(split.train))
    a = budget_subset(labels, split.train, 10, 3)
    assert np.array_equal(a, budget_subset(labels, split.train, 10, 3))
    assert not np.array_equal(a, budget_subset(labels, split.train, 10, 4))
    with pytest.raises(ValueError, match="positive"):
        budget_subset(labels, split.train, 0, 1)


def test_small_budgets_still_train_for_the_minimum_number_of_steps():
    rng = np.random.default_rng(0)
    small = epoch_batches(25, 64, 16, rng)
    assert len(small) == 16 and all(len(b) == 25 for b in small)
    big = epoch_batches(1000, 64, 16, rng)
    assert len(big) == 16 and np.array_equal(np.sort(np.concatenate(big)), np.arange(1000))


# ------------------------------------------------------------------ label mapping
def test_mapping_maps_drops_and_refuses_uncovered_labels(tmp_path):
    m = tmp_path / "map.json"
    m.write_text(json.dumps({"a": {"T_CD4": "CD4 T", "HSC": None}}))
    mapping = load_mapping(m)
    out = harmonise("a", np.array(["T_CD4", "HSC", UNKNOWN_LABEL], dtype=object), mapping)
    assert list(out) == ["CD4 T", UNKNOWN_LABEL, UNKNOWN_LABEL]
    with pytest.raises(StoreError, match=r"does not cover labels \['B'\]"):
        harmonise("a", np.array(["B"], dtype=object), mapping)
    with pytest.raises(StoreError, match="no entry for dataset 'b'"):
        harmonise("b", np.array(["B"], dtype=object), mapping)


@pytest.mark.parametrize("text, msg", [("{not json", "not valid JSON"), ('["a"]', "object of objects"),
                                       ('{"a": {"x": 3}}', "non-strings")])
def test_bad_mapping_files_are_refused_with_the_reason(tmp_path, text, msg):
    p = tmp_path / "m.json"
    p.write_text(text)
    with pytest.raises(StoreError, match=msg):
        load_mapping(p)
    with pytest.raises(StoreError, match="does not exist"):
        load_mapping(tmp_path / "absent.json")


# ------------------------------------------------------------------ methods
def _toy(n=240, genes=60, types=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, types, n)
    X = rng.poisson(1.0, (n, genes)).astype(np.float32)
    for t in range(types):
        X[y == t, t * 10 : t * 10 + 10] += 6
    return sp.csr_matrix(np.log1p(X)), y


@pytest.mark.parametrize("method", [m for m in ALL_METHODS if m not in PEERS])
def test_every_method_returns_probabilities_over_all_types(method):
    X, y = _toy()
    cfg = resolve(recipes.tiny(), overrides=["finetune.max_epochs=15", "finetune.patience=5"])
    enc = {"weight": np.random.default_rng(1).normal(0, 0.1, (60, 200)).astype(np.float32),
           "bias": np.zeros(200, np.float32)}
    tr, va, te = Cells(X[:150], y[:150]), Cells(X[150:180], y[150:180]), Cells(X[180:], y[180:])
    fit = run_method(method, tr, va, te, 4, 0, cfg, enc, np.arange(60), {},
                     unlabelled=te.X if method in SEMI_SUPERVISED else None)
    assert fit.proba.shape == (60, 4)
    np.testing.assert_allclose(fit.proba.sum(1), 1.0, atol=1e-5)
    if method not in ("scpretrain", "no_pretrain", *SEMI_SUPERVISED):  # sklearn: a type absent from training gets none
        assert (fit.proba[:, 3] < 1e-6).all()
    assert (fit.proba.argmax(1) == te.y).mean() > 0.8  # the toy types are easy


def test_celltypist_runs_on_the_same_cells_and_scores_every_type():
    pytest.importorskip("celltypist")  # the bench extra; the core environment does not have it
    X, y = _toy()
    counts = np.expm1(X.toarray())
    X = sp.csr_matrix(np.log1p(counts / counts.sum(1, keepdims=True) * 1e4).astype(np.float32))  # what it checks for
    cfg = resolve(recipes.tiny())
    fit = run_method("celltypist", Cells(X[:150], y[:150]), Cells(X[150:180], y[150:180]),
                     Cells(X[180:], y[180:]), 4, 0, cfg)
    assert fit.proba.shape == (60, 4)
    assert (fit.proba[:, 3] == 0).all()  # a type absent from training gets no score
    assert ((fit.proba[:, :3] > 0) & (fit.proba[:, :3] < 1)).all()  # its per-type sigmoids
    assert (fit.proba.argmax(1) == y[180:]).mean() > 0.8
    assert fit.extra["n_features"] == 60


def test_peers_not_installed_leave_the_default_list_but_an_explicit_request_is_refused(monkeypatch):
    from scpretrain_dist.pipeline import installed_methods

    monkeypatch.setattr(methods_mod, "peer_installed", lambda m: False)
    cfg = resolve(recipes.tiny())
    said = []
    out = installed_methods(cfg, log=said.append)
    assert "celltypist" in cfg.evaluate.methods and "celltypist" not in out.evaluate.methods
    assert out.evaluate.methods == tuple(m for m in cfg.evaluate.methods if m != "celltypist")
    assert "celltypist not installed" in said[0] and "bench-venv" in said[0]
    asked = resolve(recipes.tiny(), overrides=['evaluate.methods=["scpretrain","celltypist"]'])
    with pytest.raises(ConfigError, match=r"asks for \['celltypist'\].*bench extra"):
        installed_methods(asked, log=said.append)
    monkeypatch.setattr(methods_mod, "peer_installed", lambda m: True)
    assert installed_methods(asked, log=said.append) is asked  # installed: nothing to drop
    with pytest.raises(ConfigError, match="unknown method"):
        installed_methods(resolve(recipes.tiny(), overrides=['evaluate.methods=["magic"]']))


def test_semi_supervised_methods_need_the_query():
    X, y = _toy()
    cfg = resolve(recipes.tiny(), overrides=["finetune.max_epochs=2"])
    enc = {"weight": np.zeros((60, 200), np.float32), "bias": np.zeros(200, np.float32)}
    with pytest.raises(ValueError, match="transfer protocol"):
        run_method("scpretrain_ssl", Cells(X[:150], y[:150]), Cells(X[150:180], y[150:180]),
                   Cells(X[180:], y[180:]), 4, 0, cfg, enc, np.arange(60), {})


def test_unknown_methods_are_named():
    with pytest.raises(ValueError, match="unknown method"):
        check_methods(["scpretrain", "magic"])


def test_embedding_ignores_genes_absent_from_pretraining():
    X = sp.csr_matrix(np.array([[1.0, 2.0], [0.0, 3.0]], np.float32))
    enc = {"weight": np.array([[1.0, 0.0], [0.0, 1.0]], np.float32), "bias": np.zeros(2, np.float32)}
    e = embed(enc, np.array([0, -1]), X)
    np.testing.assert_allclose(e, 1 / (1 + np.exp(-np.array([[1.0, 0.0], [0.0, 0.0]]))), rtol=1e-6)


# ------------------------------------------------------------------ metrics, tests, report
def test_clustering_metrics_are_one_for_a_relabelled_perfect_clustering():
    y = np.array([0, 0, 1, 1, 2, 2])
    assert clustering_metrics(y, np.array([5, 5, 3, 3, 9, 9])) == {"rand": 1.0, "ari": 1.0}
    assert clustering_metrics(y, np.array([0, 1, 0, 1, 0, 1]))["ari"] < 0.1


def test_paired_wilcoxon_counts_wins_and_detects_a_consistent_gain():
    a = np.linspace(0.8, 0.9, 12)
    r = paired_wilcoxon(a + 0.05, a)
    assert r["wins"] == 12 and r["losses"] == 0 and r["p_value"] < 0.01
    assert paired_wilcoxon(a, a)["p_value"] == 1.0
    assert paired_wilcoxon(np.array([np.nan]), np.array([1.0]))["n"] == 0


def _rows():
    rows = []
    for d in ("d1", "d2"):
        for seed in (0, 1, 2):
            for budget in (50, 1000):
                for method, k in (("scpretrain", 0.9), ("no_pretrain", 0.8), ("logreg", 0.85)):
                    k = k - (0.1 if budget == 50 else 0) + 0.01 * seed
                    rows.append({"dataset": d, "method": method, "seed": seed, "budget": budget, "accuracy": k,
                                 "kappa": k, "macro_f1": k, "macro_auprc": k, "macro_auroc": k})
    return rows


def test_report_tables_curve_tests_and_files(tmp_path):
    rows = _rows()
    s = summary(rows)
    mean = s[(s.dataset == "MEAN") & (s.method == "scpretrain")]["kappa"].item()
    assert mean == pytest.approx(0.91)  # the full budget only
    curve = budget_curve(rows)
    assert curve.loc["scpretrain", 50] == pytest.approx(0.81)
    tests = {(t["b"], t["metric"], t["budget"]): t for t in paired_tests(rows)}
    assert tests[("no_pretrain", "kappa", "full")]["wins"] == 6
    assert tests[("logreg", "kappa", 50)]["mean_diff"] == pytest.approx(0.05)
    assert {t["b"] for t in paired_tests(rows)} == {"no_pretrain", "logreg"}  # no celltypist rows: not tested
    peer = [{**r, "method": "celltypist", "kappa": r["kappa"] - 0.02} for r in rows
            if r["method"] == "logreg" and r["budget"] == 1000]  # a peer runs at the full budget only
    vs_peer = {(t["metric"], t["budget"]): t for t in paired_tests(rows + peer) if t["b"] == "celltypist"}
    assert vs_peer[("kappa", "full")]["n"] == 6 and vs_peer[("kappa", "full")]["mean_diff"] == pytest.approx(0.07)
    assert {b for _, b in vs_peer} == {"full", 1000}  # no rows for budgets it did not run at
    js, md = write_report(rows, tmp_path, {"protocol": "test"},
                          splits=[{"dataset": "d1", "seed": 0, "budget": 50, "train": ["c1"], "val": [], "test": ["c2"]}],
                          clustering=[{"dataset": "d1", "space": "embedding", "rand": 0.9, "ari": 0.7}])
    report = json.loads(js.read_text())
    assert {"dataset", "method", "seed", "accuracy", "kappa", "macro_f1", "macro_auprc", "macro_auroc"} <= set(report["rows"][0])
    assert report["splits"][0]["train"] == ["c1"]
    text = md.read_text()
    assert "Kappa by labelled training cells" in text and "Wilcoxon" in text and "ARI" in text
    assert "AUPRC by class" not in text  # rows without per-class terms: no such table


def test_auprc_by_class_table_averages_seeds_at_the_largest_budget(tmp_path):
    from scpretrain_dist.evaluate.metrics import class_auprc
    from scpretrain_dist.evaluate.protocols import by_class
    from scpretrain_dist.evaluate.report import class_auprc_table

    classes = np.array(["B", "MK"])
    proba = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.5, 0.5]])  # the MK cell ranked second
    terms = by_class(classes, np.array([0, 0, 0, 1]), class_auprc(np.array([0, 0, 0, 1]), proba))
    assert terms["n_train_by_class"] == {"B": 3, "MK": 1} and terms["auprc_by_class"]["MK"] == pytest.approx(1 / 2)
    base = {"dataset": "d", "accuracy": 1.0, "kappa": 1.0, "macro_f1": 1.0, "macro_auprc": 1.0, "macro_auroc": 1.0}
    rows = [{**base, "method": m, "seed": seed, "budget": b, "auprc_by_class": {"B": 1.0, "MK": ap},
             "n_train_by_class": {"B": 3, "MK": 1}}
            for m, seed, b, ap in [("scpretrain", 0, 100, 0.5), ("scpretrain", 1, 100, 1.0), ("celltypist", 0, 100, 1.0),
                                   ("scpretrain", 0, 10, 0.0)]]  # a smaller budget: not in the table
    table = class_auprc_table(rows).set_index("class")
    assert table.loc["MK", "scpretrain"] == pytest.approx(0.75) and table.loc["MK", "celltypist"] == 1.0
    assert table.loc["MK", "training cells"] == "1"
    _, md = write_report(rows, tmp_path, {"protocol": "test"})
    assert "## AUPRC by class" in md.read_text() and "| d | MK | 1" in md.read_text()


def test_fold_schemes_cover_every_target_once():
    from scpretrain_dist.pipeline import fold_exclusions

    t = ["a", "b", "c", "d", "e"]
    sizes = {"a": 5000, "b": 4000, "c": 300, "d": 200, "e": 100}
    assert fold_exclusions(t, "grouped") == [t]
    assert fold_exclusions(t, "per_target") == [[x] for x in t]
    two = fold_exclusions(t, "2", sizes)
    assert sorted(sum(two, [])) == t and len(two) == 2
    assert {"a", "b"} not in [set(f) for f in two]  # the two largest are in different folds
    with pytest.raises(StoreError, match="must be"):
        fold_exclusions(t, "sometimes")


def test_label_shift_adaptation_recovers_the_query_mix_without_labels():
    from scpretrain_dist.train.finetune import adapt_to_label_shift

    rng = np.random.default_rng(0)
    # a classifier calibrated for a 90/10 reference sees a 50/50 query
    y = np.repeat([0, 1], 500)
    score = rng.normal(np.where(y == 1, 1.0, -1.0), 1.0)
    lik1, lik0 = np.exp(-(score - 1) ** 2 / 2), np.exp(-(score + 1) ** 2 / 2)
    prior = np.array([0.9, 0.1])
    p1 = lik1 * prior[1] / (lik1 * prior[1] + lik0 * prior[0])
    P = np.stack([1 - p1, p1], 1)
    Q = adapt_to_label_shift(P, prior)
    assert abs(Q.mean(0)[1] - 0.5) < 0.05
    assert (Q.argmax(1) == y).mean() > (P.argmax(1) == y).mean() + 0.05
    np.testing.assert_allclose(Q.sum(1), 1.0)


def test_a_small_target_gets_every_method_once_its_split_is_used_whole():
    """A target whose training split (0.6 n) sits below the largest budgets: the first budget
    that reaches the whole split is the full protocol, so the classifiers on embeddings and PCA
    run there, and their rows are reported at the full budget."""
    from scpretrain_dist.evaluate.protocols import Encoder, TargetData, evaluate_target

    X, y = _toy(n=200)  # 120 training cells
    genes = np.array([f"g{i}" for i in range(X.shape[1])])
    target = TargetData("small", X, genes, y, np.array(list("abc")), np.array([f"c{i}" for i in range(200)]))
    enc = Encoder({"weight": np.random.default_rng(1).normal(0, 0.1, (60, 200)).astype(np.float32),
                   "bias": np.zeros(200, np.float32)}, genes, np.ones(60, bool))
    cfg = resolve(recipes.tiny(), overrides=["finetune.max_epochs=5", "finetune.patience=2", "finetune.seeds=[0]",
                                             "evaluate.budgets=[25, 250, 1000]",
                                             'evaluate.methods=["scpretrain", "logreg", "emb_logreg", "pca_logreg"]'])
    rows, splits, models, confusion = evaluate_target(cfg, target, enc, log=lambda *_: None)
    assert sum(sum(row.values()) for row in confusion["scpretrain"].values()) == len(splits[0]["test"])
    by_budget = {}
    for r in rows:
        by_budget.setdefault(r["budget"], set()).add(r["method"])
    assert by_budget[25] == {"scpretrain", "logreg"}  # logreg is swept by default
    assert by_budget[250] == {"scpretrain", "logreg"}  # the others report at the full budget only
    assert by_budget[1000] == {"scpretrain", "logreg", "emb_logreg", "pca_logreg"}
    full = {r["method"]: r for r in rows if r["budget"] == 1000}
    assert full["emb_logreg"]["n_train"] == full["scpretrain"]["n_train"] == 120
    assert set(models) == {0}


def test_a_confusion_matrix_figure_per_target(tmp_path):
    from scpretrain_dist.evaluate.figures import confusion_matrix, write_figures

    table = {"B": {"B": 40, "T": 2}, "T": {"T": 50, "NK": 3}, "NK": {"NK": 10}}
    path = confusion_matrix("query", table, "scpretrain", tmp_path / "c.png")
    assert path.stat().st_size > 5_000
    made = write_figures([], {}, tmp_path, {"q1": {"scpretrain": table, "logreg": table}, "q2": {"logreg": table}})
    assert [p.split("/")[-1] for p in made] == ["confusion_q1_scpretrain.png"]
    assert confusion_matrix("empty", {}, "scpretrain", tmp_path / "e.png") is None


def test_unknown_cell_metrics_separate_rank_and_reject():
    from scpretrain_dist.evaluate.metrics import unknown_cell_metrics

    is_unknown = np.array([True, True, False, False, False, False])
    score = np.array([0.2, 0.4, 0.3, 0.9, 0.8, 0.7])
    correct = np.array([False, False, False, True, True, False])
    m = unknown_cell_metrics(is_unknown, score, correct, threshold=0.5)
    # unknown cells score below 3 of the 4 known ones, one above: 7 of 8 pairs ranked right
    assert m["unknown_auroc"] == pytest.approx(7 / 8)
    assert m["unknown_rejected"] == 1.0 and m["known_rejected"] == 0.25
    assert m["known_accuracy"] == 0.5 and m["accepted_accuracy"] == pytest.approx(2 / 3)
    free = unknown_cell_metrics(is_unknown, score, correct)
    assert free["unknown_auroc"] == m["unknown_auroc"] and np.isnan(free["unknown_rejected"])


def test_unknown_scores_of_a_network_and_of_a_peer():
    from scpretrain_dist.evaluate.methods import Fitted, unknown_scores

    logits = np.array([[4.0, 0.0], [1.0, 1.0]])
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    net = unknown_scores(Fitted(proba, logits=logits, temperature=2.0))
    assert set(net) == {"confidence", "max_logit", "energy"}
    # the log-odds of the calibrated confidence: softmax(logits / 2) = [e^2, 1] / (e^2 + 1), [1/2, 1/2]
    np.testing.assert_allclose(net["confidence"], [2.0, 0.0])
    np.testing.assert_allclose(net["energy"], 2 * np.log(np.exp(logits / 2).sum(1)))
    assert set(unknown_scores(Fitted(proba))) == {"confidence"}


def test_figure_names_of_types_with_path_separators_stay_one_file():
    from pathlib import Path

    from scpretrain_dist.evaluate.figures import _file_stem

    stem = _file_stem("pbmc_5p without Megakaryocyte/Platelet")
    assert stem == "pbmc_5p_without_Megakaryocyte_Platelet" and Path(stem).name == stem


def test_pairwise_transfer_pairs_every_reference_alone_with_every_other_query():
    from scpretrain_dist.pipeline import transfer_pairs

    assert transfer_pairs(["a", "b"], ["c"]) == [(["a", "b"], "c")]
    pairs = transfer_pairs(["a", "b", "c"], ["a", "b", "c"], pairwise=True)
    assert len(pairs) == 6 and all(refs != [q] and len(refs) == 1 for refs, q in pairs)
    assert {(refs[0], q) for refs, q in pairs} == {(r, q) for r in "abc" for q in "abc" if r != q}


def test_transfer_matrix_averages_seeds_per_pair_then_pairs_and_names_the_worst():
    from scpretrain_dist.evaluate.report import transfer_matrix

    def row(ref, q, method, seed, acc):
        return {"dataset": f"{ref} -> {q}", "references": ref, "query": q, "method": method, "seed": seed,
                "budget": 1000, "accuracy": acc, "macro_f1": acc - 0.1, "kappa": acc, "macro_auprc": acc,
                "macro_auroc": acc}

    rows = [row("a", "b", "m", 0, 0.9), row("a", "b", "m", 1, 0.7), row("b", "a", "m", 0, 0.6),
            row("b", "a", "m", 1, 0.6), {**row("a", "b", "m", 0, 0.1), "held_out": "T", "dataset": "a -> b without T"}]
    table, grids = transfer_matrix(rows)
    (m,) = table.to_dict("records")
    assert m["pairs"] == 2 and m["accuracy"] == pytest.approx(0.7) and m["macro_f1"] == pytest.approx(0.6)
    assert m["worst_pair"] == "b -> a" and m["worst_accuracy"] == pytest.approx(0.6)
    assert grids["m"].loc["a", "b"] == pytest.approx(0.8) and np.isnan(grids["m"].loc["a", "a"])
    assert transfer_matrix([{**r, "dataset": r["query"]} for r in rows[:4]])[0].empty
    # `finetune --query` rows name the query the model was semi-supervised on, and no reference
    finetuned = [{k: v for k, v in r.items() if k != "references"} | {"dataset": "a"} for r in rows[:2]]
    summary, grids = transfer_matrix(finetuned)
    assert summary.empty and grids == {}
