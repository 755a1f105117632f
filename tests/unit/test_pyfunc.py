"""The exported annotator: gene alignment, normalisation, input validation, embeddings."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from scpretrain_dist.data.normalize import normalize_rows
from scpretrain_dist.model import CellTypeClassifier

# mlflow warns that AnnotatorPyfunc.predict has no type hints, from inside its own
# catch_warnings (so filterwarnings cannot silence it); record and drop it here.
with warnings.catch_warnings(record=True):
    from scpretrain_dist.serve.pyfunc import (
        Annotator,
        AnnotatorPyfunc,
        InputError,
        export_annotator,
    )

N_GENES = 40
CLASSES = np.array(["alpha", "beta", "gamma"])
# the model's genes, in the mixed case a mouse dataset might have had
GENES = np.array([f"Gene{i:02d}" if i % 3 else f"GENE{i:02d}" for i in range(N_GENES)])


def _programme_counts(n, seed, background_seed=None):
    """Counts whose cells follow one of three gene programmes (the cell's class), over background
    levels of each gene drawn from ``background_seed`` (default: ``seed``; another draw is as
    another technology's levels)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % len(CLASSES)
    rates = np.random.default_rng(seed if background_seed is None else background_seed).uniform(0.2, 6.0, (1, N_GENES))
    if background_seed is not None:
        rng.uniform(0.2, 6.0, (1, N_GENES))  # the same draws for the cells as with their own levels
    X = rng.poisson(rates, (n, N_GENES)).astype(np.float32)
    block = N_GENES // len(CLASSES)
    for t in range(len(CLASSES)):
        X[y == t, t * block : (t + 1) * block] += rng.poisson(8, ((y == t).sum(), block))
    X[:, -1] += 1  # no empty cell
    return X, y


@pytest.fixture(scope="module")
def model(helpers):
    """A classifier trained for a moment, so that predictions differ between cells."""
    with helpers.single_thread():
        return _train_model()


def _train_model():
    torch.manual_seed(0)
    clf = CellTypeClassifier(N_GENES, len(CLASSES))
    X, y = _programme_counts(90, seed=1)
    Xt = torch.from_numpy(normalize_rows(X, "counts"))
    yt = torch.from_numpy(y)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(clf(Xt), yt).backward()
        opt.step()
    clf.eval()
    return clf


@pytest.fixture(scope="module")
def annotator(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("annotator")
    artifacts = export_annotator(model, GENES, CLASSES, out, min_overlap=0.2, lineage={"run": "x"})
    assert set(artifacts) == {"weights", "meta"}
    return Annotator(artifacts["weights"], artifacts["meta"])


@pytest.fixture(scope="module")
def counts():
    X, _ = _programme_counts(30, seed=2)
    return pd.DataFrame(X, columns=[g.upper() for g in GENES], index=[f"c{i}" for i in range(30)])


def _lognorm(df: pd.DataFrame) -> pd.DataFrame:
    X = df.to_numpy(np.float64)
    return pd.DataFrame(np.log1p(X / X.sum(1, keepdims=True) * 1e4), columns=df.columns, index=df.index)


def _assert_same_prediction(a: pd.DataFrame, b: pd.DataFrame, rtol=1e-5):
    assert a["cell_type"].tolist() == b["cell_type"].tolist()
    np.testing.assert_allclose(a["confidence"], b["confidence"], rtol=rtol, atol=rtol)


def test_predictions_match_the_torch_model(annotator, model, counts):
    out = annotator.predict(counts)
    assert list(out.columns) == ["cell_type", "confidence", "gene_overlap"]
    assert out.index.equals(counts.index)
    with torch.no_grad():
        X = torch.from_numpy(normalize_rows(counts.to_numpy(), "counts"))
        proba = torch.softmax(model(X), 1).numpy()
    assert out["cell_type"].tolist() == CLASSES[proba.argmax(1)].tolist()
    np.testing.assert_allclose(out["confidence"], proba.max(1), rtol=1e-4)
    assert (out["gene_overlap"] == 1.0).all()
    assert out["cell_type"].tolist() == CLASSES[np.arange(30) % 3].tolist(), "the fixture model has learnt"
    assert annotator.lineage == {"run": "x"}
    assert list(annotator.genes) == [g.upper() for g in GENES]


def test_column_order_and_case_do_not_matter(annotator, counts):
    ref = annotator.predict(counts)
    rng = np.random.default_rng(1)
    shuffled = counts[rng.permutation(counts.columns)]
    _assert_same_prediction(annotator.predict(shuffled), ref)
    lower = counts.rename(columns=str.lower)
    _assert_same_prediction(annotator.predict(lower), ref)
    title = shuffled.rename(columns=str.title)
    _assert_same_prediction(annotator.predict(title), ref)


def test_missing_genes_are_filled_with_zero(annotator, counts):
    dropped = list(counts.columns[5:15])
    partial = counts.drop(columns=dropped)
    zeroed = counts.copy()
    zeroed[dropped] = 0.0
    out = annotator.predict(partial)
    _assert_same_prediction(out, annotator.predict(zeroed))
    assert out["gene_overlap"].iloc[0] == pytest.approx(30 / 40)


def test_extra_columns_are_ignored(annotator, counts):
    extra = counts.copy()
    extra["NOT_A_MODEL_GENE"] = 1000.0
    extra["Other"] = np.arange(len(extra), dtype=float)
    out = annotator.predict(extra)
    _assert_same_prediction(out, annotator.predict(counts))
    assert (out["gene_overlap"] == 1.0).all()


def test_counts_and_lognorm_give_the_same_prediction(annotator, counts):
    ref = annotator.predict(counts)
    log = _lognorm(counts)
    _assert_same_prediction(annotator.predict(log), ref, rtol=1e-4)
    _assert_same_prediction(annotator.predict(log, value_type="lognorm"), ref, rtol=1e-4)
    _assert_same_prediction(annotator.predict(counts, value_type="counts"), ref)
    # log-normalised over a request with extra and missing genes: still consistent
    req = counts.drop(columns=counts.columns[:6])
    req["EXTRA"] = 50.0
    _assert_same_prediction(annotator.predict(_lognorm(req)), annotator.predict(req), rtol=1e-4)
    # log2 of counts per million (log2norm) and linear non-integer values (TPM-like)
    X = counts.to_numpy(np.float64)
    cpm = X / X.sum(1, keepdims=True) * 1e6
    log2 = pd.DataFrame(np.log2(1 + cpm), columns=counts.columns, index=counts.index)
    assert log2.to_numpy().max() > 14  # unambiguously log2
    _assert_same_prediction(annotator.predict(log2), ref, rtol=1e-4)
    _assert_same_prediction(annotator.predict(log2, value_type="log2norm"), ref, rtol=1e-4)
    tpm = pd.DataFrame(cpm, columns=counts.columns, index=counts.index)
    _assert_same_prediction(annotator.predict(tpm), ref, rtol=1e-4)
    # declaring the wrong type changes the answer, so detection is doing the work
    wrong = annotator.predict(counts, value_type="lognorm")
    assert not np.allclose(wrong["confidence"], ref["confidence"], rtol=1e-3)


def test_unknown_value_type_is_refused(annotator, counts):
    with pytest.raises(InputError, match="tpm"):
        annotator.predict(counts, value_type="tpm")


def test_too_small_overlap_is_refused(annotator, counts):
    few = counts.iloc[:, :5]  # 5 of 40 genes = 12.5% < 20%
    with pytest.raises(InputError) as info:
        annotator.predict(few)
    msg = str(info.value)
    assert "5 of" in msg and "40" in msg and "12.5%" in msg
    # just enough overlap is accepted
    out = annotator.predict(counts.iloc[:, :8])
    assert out["gene_overlap"].iloc[0] == pytest.approx(0.2)
    with pytest.raises(InputError, match="0 of"):
        annotator.predict(pd.DataFrame({"FOO": [1.0], "BAR": [2.0]}))


def test_invalid_values_are_refused(annotator, counts):
    nan = counts.copy()
    nan.iloc[3, 4] = np.nan
    with pytest.raises(InputError, match="NaN"):
        annotator.predict(nan)
    inf = counts.copy()
    inf.iloc[0, 0] = np.inf
    with pytest.raises(InputError, match="infinite"):
        annotator.predict(inf)
    neg = counts.copy()
    neg.iloc[2, 7] = -0.5
    with pytest.raises(InputError, match="negative"):
        annotator.predict(neg)


def test_value_problem_counts_each_kind_of_bad_value():
    from scpretrain_dist.catalog.values import value_problem

    ok = np.array([0, 1.5, 3e4], np.float32)
    assert value_problem(ok) is None and value_problem(ok.astype(np.float64)) is None
    assert value_problem(np.array([], np.float32)) is None and value_problem(np.array([0, 7])) is None
    assert value_problem(np.array([1, np.nan, np.inf, -np.inf, np.nan], np.float32)) == "2 NaN and 2 infinite values"
    assert value_problem(np.array([1, -np.inf])) == "0 NaN and 1 infinite values"
    assert value_problem(np.array([1.0, 5e38, -6e38])).startswith("2 values beyond float32's range")
    assert "largest 6e+38" in value_problem(np.array([1.0, 5e38, -6e38]))
    assert value_problem(np.array([2.0, -0.5, -1.0], np.float32)).startswith("2 negative values (smallest -1;")
    assert value_problem(np.array([3, -2])).startswith("1 negative values (smallest -2;")
    assert value_problem(np.array(["a"])) == "values of type <U1 (expected numbers)"


def test_empty_requests_are_refused(annotator, counts):
    with pytest.raises(InputError, match="no cells"):
        annotator.predict(counts.iloc[:0])
    with pytest.raises(InputError, match="no cells"):
        annotator.predict(pd.DataFrame(index=["c1", "c2"]))
    with pytest.raises(InputError):
        annotator.predict(counts.to_numpy())  # not a DataFrame


def test_oversized_requests_are_refused(annotator, counts, monkeypatch):
    from scpretrain_dist.serve import pyfunc

    monkeypatch.setattr(pyfunc, "MAX_CELLS_PER_REQUEST", 10)
    with pytest.raises(InputError, match="30 cells"):
        annotator.predict(counts)
    assert len(annotator.predict(counts.iloc[:10])) == 10


def test_non_numeric_column_is_refused(annotator, counts):
    bad = counts.copy()
    bad["GENE03"] = "high"
    with pytest.raises(InputError, match="GENE03"):
        annotator.predict(bad)


def test_repeated_columns_are_refused(annotator, counts):
    dup = counts.copy()
    dup["gene01"] = dup["GENE01"]
    with pytest.raises(InputError, match="repeats"):
        annotator.predict(dup)


def test_return_embedding_adds_200_columns(annotator, model, counts):
    out = annotator.predict(counts, return_embedding=True)
    emb_cols = [f"emb_{i}" for i in range(200)]
    assert list(out.columns) == ["cell_type", "confidence", "gene_overlap", *emb_cols]
    _assert_same_prediction(out, annotator.predict(counts))
    emb = out[emb_cols].to_numpy()
    assert ((emb >= 0) & (emb <= 1)).all() and emb.std() > 0.05
    with torch.no_grad():
        ref = model.embed(torch.from_numpy(normalize_rows(counts.to_numpy(), "counts"))).numpy()
    np.testing.assert_allclose(emb, ref, rtol=1e-4, atol=1e-5)


def test_mlflow_wrapper_turns_input_errors_into_mlflow_exceptions(annotator, model, tmp_path, counts):
    from mlflow.exceptions import MlflowException

    artifacts = export_annotator(model, GENES, CLASSES, tmp_path)
    wrapper = AnnotatorPyfunc()
    wrapper.load_context(SimpleNamespace(artifacts=artifacts))
    out = wrapper.predict(None, counts, params={"return_embedding": True})
    assert out.shape == (len(counts), 203)
    _assert_same_prediction(out, annotator.predict(counts))
    with pytest.raises(MlflowException, match="negative"):
        wrapper.predict(None, counts * -1.0)


def test_the_fitted_temperature_travels_with_the_model(model, counts, tmp_path):
    """A fine-tuned model's temperature is exported with it: same calls, confidence from
    softmax(logits / T)."""
    import copy

    from scpretrain_dist.serve.pyfunc import Annotator, export_annotator

    hot = copy.deepcopy(model)
    hot.temperature = 3.0
    art = export_annotator(hot, GENES, CLASSES, tmp_path / "hot")
    plain = export_annotator(model, GENES, CLASSES, tmp_path / "plain")
    a, b = Annotator(art["weights"], art["meta"]), Annotator(plain["weights"], plain["meta"])
    assert a.temperature == 3.0 and b.temperature == 1.0
    pa, pb = a.predict(counts), b.predict(counts)
    assert pa["cell_type"].tolist() == pb["cell_type"].tolist()
    assert (pa["confidence"] < pb["confidence"]).all()
    with torch.no_grad():
        X = torch.from_numpy(normalize_rows(counts.to_numpy(), "counts"))
        expected = torch.softmax(model(X) / 3.0, 1).max(1).values.numpy()
    np.testing.assert_allclose(pa["confidence"], expected, rtol=1e-4)


@pytest.mark.parametrize("how", ["energy", "confidence", "stored before the score was"])
def test_cells_below_the_models_threshold_are_unassigned_under_its_name(model, counts, tmp_path, how):
    """The rejection score, its threshold and the name of rejected cells travel with the model:
    cells scoring below it get that name and code -1 but keep their confidence; the others are
    the plain model's calls. A cell with no model gene is unassigned with confidence 0. A model
    exported before the score was stored thresholds the confidence's log-odds."""
    import copy

    from scpretrain_dist.model.networks import known_type_score

    score_name = "confidence" if how.startswith("stored") else how
    plain = Annotator(*export_annotator(model, GENES, CLASSES, tmp_path / "plain").values())
    base = plain.predict(counts)
    with torch.no_grad():
        logits = model(torch.from_numpy(normalize_rows(counts.to_numpy(), "counts"))).numpy()
    score = known_type_score(logits, 1.0, score_name)
    cut = float(np.median(score))
    strict = copy.deepcopy(model)
    strict.reject_threshold, strict.unassigned, strict.reject_score = cut, "unknown type", score_name
    paths = export_annotator(strict, GENES, CLASSES, tmp_path / "strict")
    if how.startswith("stored"):
        meta = json.loads(Path(paths["meta"]).read_text())
        del meta["reject_score"]
        Path(paths["meta"]).write_text(json.dumps(meta))
    a = Annotator(*paths.values())
    assert (a.reject_threshold, a.unassigned, a.reject_score) == (cut, "unknown type", score_name)
    assert plain.reject_threshold == -np.inf
    out = a.predict(counts)
    low = score < cut
    assert 0 < low.sum() < len(low)
    assert (out["cell_type"][low] == "unknown type").all()
    assert out["cell_type"][~low].tolist() == base["cell_type"][~low].tolist()
    np.testing.assert_allclose(out["confidence"], base["confidence"], rtol=1e-6)
    empty = counts.iloc[:2].copy()
    empty.iloc[1] = 0
    got = a.predict_matrix(empty.to_numpy(), list(empty.columns))
    assert got.codes[1] == -1 and got.labels[1] == "unknown type" and got.confidence[1] == 0


def test_a_class_named_like_rejected_cells_is_refused(model, tmp_path):
    with pytest.raises(ValueError, match="finetune.unassigned"):
        export_annotator(model, GENES, np.array(["alpha", "Unassigned", "gamma"]), tmp_path / "x")


@pytest.fixture(scope="module")
def pooled_annotator(model, tmp_path_factory):
    """The fixture model pooled, at weight 0.5, with a gene model of its training cells
    (``finetune.gene_model``)."""
    import copy

    from scpretrain_dist.train.finetune import linear_gene_model

    pooled = copy.deepcopy(model)
    X, y = _programme_counts(90, seed=1)
    X[:, -1] = np.random.default_rng(7).poisson(60, len(X))  # a gene every cell expresses well
    pooled.gene_model, pooled.gene_model_weight = linear_gene_model(normalize_rows(X, "counts"), y, len(CLASSES)), 0.5
    artifacts = export_annotator(pooled, GENES, CLASSES, tmp_path_factory.mktemp("pooled"))
    return Annotator(artifacts["weights"], artifacts["meta"])


@pytest.mark.parametrize("which", ["network", "pooled with a gene model"])
def test_saliency_markers_come_from_each_types_own_programme(annotator, pooled_annotator, which):
    """Markers are each type's own programme genes, for a pooled model too: there the gene
    model's share of a gene is its gradient times the gene's scaled value above the training
    cells' mean (times the value itself, the last gene, which every cell expresses well, led
    alpha's)."""
    import scipy.sparse as sp

    annotator = annotator if which == "network" else pooled_annotator
    # cells of the training cells' levels (the gene model's scaling is theirs)
    X, y = _programme_counts(300, seed=5, background_seed=1)
    X[:, -1] = np.random.default_rng(8).poisson(60, len(X))
    block = N_GENES // len(CLASSES)
    markers = annotator.marker_genes(sp.csr_matrix(X), [g.lower() for g in GENES], top=5, block=64)
    assert set(markers) == set(CLASSES)
    assert sum(m["cells"] for m in markers.values()) == 300
    for t, name in enumerate(CLASSES):
        top = [int(g[-2:]) for g, _ in markers[name]["genes"]]
        assert all(t * block <= j < (t + 1) * block for j in top), (name, top)
        scores = [s for _, s in markers[name]["genes"]]
        assert scores == sorted(scores, reverse=True) and scores[0] > 0
    with pytest.raises(InputError, match="columns"):
        annotator.marker_genes(sp.csr_matrix(X), list(GENES[:5]))
