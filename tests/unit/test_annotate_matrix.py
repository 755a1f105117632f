"""The annotator's matrix path (batch annotation) against its DataFrame path (serving), blocks
and the column names of a model version. No Ray, no MLflow server."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scpretrain_dist.model import CellTypeClassifier

with warnings.catch_warnings(record=True):
    from scpretrain_dist.serve.annotate import H5adSource, make_blocks
    from scpretrain_dist.serve.pyfunc import Annotator, InputError, export_annotator
    from scpretrain_dist.tracking.registry import ModelRef

GENES = np.array([f"G{i:03d}" for i in range(50)])
CLASSES = np.array(["a", "b", "c", "d"])


@pytest.fixture(scope="module")
def annotator(tmp_path_factory):
    torch.manual_seed(0)
    model = CellTypeClassifier(len(GENES), len(CLASSES))
    with torch.no_grad():  # spread the weights so that cells get different classes
        model.encoder.weight.mul_(20)
        model.out.weight.mul_(10)
    art = export_annotator(model, GENES, CLASSES, tmp_path_factory.mktemp("m"))
    return Annotator(art["weights"], art["meta"])


def counts(n=64, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.poisson(rng.uniform(0.05, 3, len(GENES)), (n, len(GENES))).astype(np.float32)
    X[:, 0] += 1
    return X


def test_sparse_dense_and_dataframe_paths_agree(annotator):
    X = counts()
    # input genes: a shuffled subset of the model's, in lower case, plus genes it does not know
    rng = np.random.default_rng(1)
    keep = rng.permutation(len(GENES))[:40]
    genes = np.concatenate([np.char.lower(GENES[keep].astype(str)), ["EXTRA1", "EXTRA2"]])
    Xin = np.concatenate([X[:, keep], rng.poisson(5, (len(X), 2))], axis=1).astype(np.float32)
    df = annotator.predict(pd.DataFrame(Xin, columns=genes), return_embedding=True)
    for M in (Xin, sp.csr_matrix(Xin), sp.csc_matrix(Xin)):
        p = annotator.predict_matrix(M, genes, return_embedding=True)
        assert p.labels.tolist() == df["cell_type"].tolist()
        np.testing.assert_allclose(p.confidence, df["confidence"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(p.embedding, df[[f"emb_{i}" for i in range(200)]], rtol=1e-5, atol=1e-6)
        assert p.overlap == pytest.approx(40 / 50) and p.n_matched == 40 and p.value_type == "counts"
    assert len(set(df["cell_type"])) > 1, "the fixture model predicts more than one class"


def test_sparse_path_dense_and_sparse_multiply_agree(annotator, monkeypatch):
    from scpretrain_dist.serve import pyfunc

    X = sp.csr_matrix(counts(seed=3))
    a = annotator.predict_matrix(X, GENES)
    monkeypatch.setattr(pyfunc, "_DENSE_ABOVE", 2.0)  # force the sparse product (torch's)
    b = annotator.predict_matrix(X, GENES)
    assert a.labels.tolist() == b.labels.tolist()
    np.testing.assert_allclose(a.confidence, b.confidence, rtol=1e-5)
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)  # as in a process that has not loaded torch: scipy's
    c = annotator.predict_matrix(X, GENES)
    assert a.labels.tolist() == c.labels.tolist()
    np.testing.assert_allclose(a.confidence, c.confidence, rtol=1e-5)


def test_lognormalised_sparse_input_is_detected(annotator):
    X = counts(seed=4)
    lib = X.sum(1, keepdims=True)
    log = sp.csr_matrix(np.log1p(X / lib * 1e4).astype(np.float32))
    a = annotator.predict_matrix(sp.csr_matrix(X), GENES)
    b = annotator.predict_matrix(log, GENES)
    assert b.value_type == "lognorm"
    assert a.labels.tolist() == b.labels.tolist()
    np.testing.assert_allclose(a.confidence, b.confidence, rtol=1e-4, atol=1e-5)


def test_gene_map_is_cached_per_column_list(annotator):
    m1 = annotator.gene_map(list(GENES))
    assert annotator.gene_map(list(GENES)) is m1 and m1.n_matched == 50 and not m1.repeats
    m2 = annotator.gene_map([g.lower() for g in GENES[::-1]])
    assert m2 is not m1
    # input column j is the model's gene row 49 - j, whatever the case
    np.testing.assert_array_equal(m2.row, np.arange(50)[::-1])
    m3 = annotator.gene_map(["NOPE", *GENES[:30]])
    assert m3.row[0] == -1 and m3.known[0] == 0 and m3.src.tolist() == list(range(1, 31)) and m3.n_matched == 30
    assert annotator.gene_map([*GENES[:3], GENES[0].lower()], merge_repeats=True).repeats
    # at most _GENE_MAPS_CACHED lists are kept, the oldest goes first
    from scpretrain_dist.serve.pyfunc import _GENE_MAPS_CACHED

    lists = [list(GENES[i : i + 30]) for i in range(_GENE_MAPS_CACHED + 1)]
    first = annotator.gene_map(lists[0])
    for cols in lists[1:]:
        annotator.gene_map(cols)
    assert len(annotator._maps) == _GENE_MAPS_CACHED
    assert annotator.gene_map(lists[0]) is not first  # evicted, built again
    # the shortcuts of the sparse path: the model's own columns, all of them known
    assert (m1.same_order, m1.all_known) == (True, True)
    assert (m2.same_order, m2.all_known) == (False, True)
    assert (m3.same_order, m3.all_known) == (False, False)


def test_the_models_own_columns_predict_as_any_other_order_and_the_input_is_left_alone(annotator, monkeypatch):
    from scpretrain_dist.serve import pyfunc

    monkeypatch.setattr(pyfunc, "_DENSE_ABOVE", 2.0)  # the sparse path at any density
    X = sp.csr_matrix(counts(40, seed=8))
    before = (X.data.copy(), X.indices.copy(), X.indptr.copy())
    own = annotator.predict_matrix(X, GENES, return_embedding=True)  # same order: no remapping
    for a, b in zip(before, (X.data, X.indices, X.indptr)):
        np.testing.assert_array_equal(a, b)
    perm = np.random.default_rng(2).permutation(len(GENES))
    shuffled = annotator.predict_matrix(sp.csr_matrix(X[:, perm]), GENES[perm], return_embedding=True)
    extra = annotator.predict_matrix(sp.hstack([X, sp.csr_matrix(np.ones((40, 1), np.float32))]).tocsr(),
                                     np.append(GENES, "NOT_A_MODEL_GENE"), return_embedding=True)
    for other in (shuffled, extra):
        assert other.labels.tolist() == own.labels.tolist()
        np.testing.assert_allclose(other.confidence, own.confidence, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(other.embedding, own.embedding, rtol=1e-5, atol=1e-6)


def test_an_input_of_mostly_unknown_genes_predicts_as_the_models_own_columns(annotator, monkeypatch):
    """Where the model knows under half of the input's genes, their values are dropped rather
    than zeroed in place: the same calls, confidences and embeddings, for cells with no value at
    all (first, middle and last rows) and a cell whose values are all in unknown genes."""
    from scpretrain_dist.serve import pyfunc

    monkeypatch.setattr(pyfunc, "_DENSE_ABOVE", 2.0)  # the sparse path at any density
    X = counts(40, seed=9)
    unknown = np.random.default_rng(3).poisson(2, (40, 150)).astype(np.float32)
    X[[0, 17, 39]] = 0
    unknown[[0, 17, 39]] = 0
    X[5] = 0  # values in unknown genes only
    # the model's genes split among the unknown ones (a cell's first value is then a known gene's)
    wide = np.concatenate([X[:, :25], unknown[:, :75], X[:, 25:], unknown[:, 75:]], axis=1)
    names = np.concatenate([GENES[:25], [f"U{i}" for i in range(75)], GENES[25:], [f"U{i}" for i in range(75, 150)]])
    assert len(annotator.gene_map(names).src) < pyfunc._COMPACT_BELOW * len(names)
    own = annotator.predict_matrix(sp.csr_matrix(X), GENES, return_embedding=True)
    got = annotator.predict_matrix(sp.csr_matrix(wide), names, return_embedding=True)
    assert got.labels.tolist() == own.labels.tolist()
    assert set(got.labels[[0, 5, 17, 39]]) == {annotator.unassigned}
    np.testing.assert_allclose(got.confidence, own.confidence, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.embedding, own.embedding, rtol=1e-5, atol=1e-6)


def _h5ad(path, X):
    import anndata as ad

    ad.AnnData(sp.csr_matrix(X), var=pd.DataFrame(index=GENES)).write_h5ad(path)
    return path


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_in_process_blocks_come_back_in_order_with_the_whole_matrix_answer(annotator, tmp_path, threads):
    """Also: the predicting threads share the cores out (torch's threads per thread: the CPUs over
    the threads; by default one thread per CPU), and torch's setting is restored afterwards."""
    import os

    from scpretrain_dist.config import RunConfig, resolve
    from scpretrain_dist.serve.annotate import MAX_THREADS, stream_results

    X = counts(1000, seed=9)
    whole = annotator.predict_matrix(sp.csr_matrix(X), GENES, "counts")
    blocks = make_blocks(H5adSource(str(_h5ad(tmp_path / "q.h5ad", X)), "counts"), len(X), 64)
    cfg = resolve(RunConfig(), overrides=[f"annotate.threads={threads}"])
    cpus, outer = len(os.sched_getaffinity(0)), torch.get_num_threads()
    torch.set_num_threads(4)  # more than the share of any thread here (test processes run on one)
    try:
        got, during = [], set()
        for r in stream_results(blocks, annotator, False, cfg, workers=0):
            got.append(r)
            during.add(torch.get_num_threads())
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(outer)
    assert during == {max(1, min(4, cpus // (threads or min(cpus, MAX_THREADS))))}
    assert after == 4
    assert [r.block.index for r in got] == list(range(len(blocks)))
    np.testing.assert_array_equal(np.concatenate([r.codes for r in got]), whole.codes)
    np.testing.assert_allclose(np.concatenate([r.confidence for r in got]), whole.confidence, rtol=1e-6)


def test_in_process_a_bad_block_is_named_and_stops_the_run(annotator, tmp_path):
    from scpretrain_dist.config import RunConfig
    from scpretrain_dist.serve.annotate import AnnotateError, stream_results

    X = counts(300, seed=10)
    X[130, 4] = np.nan
    blocks = make_blocks(H5adSource(str(_h5ad(tmp_path / "bad.h5ad", X)), "counts"), len(X), 64)
    seen = []
    with pytest.raises(AnnotateError, match=r"bad\.h5ad, cells 128\.\.191: .*NaN"):
        for r in stream_results(blocks, annotator, False, RunConfig(), workers=0):
            seen.append(r.block.index)
    assert seen == [0, 1]  # the blocks before it, in order


def test_matrix_path_refuses_bad_input(annotator):
    X = sp.csr_matrix(counts(8))
    with pytest.raises(InputError, match="columns"):
        annotator.predict_matrix(X, GENES[:10])
    neg = X.copy()
    neg.data[0] = -1
    with pytest.raises(InputError, match="negative"):
        annotator.predict_matrix(neg, GENES)
    with pytest.raises(InputError, match="only 5 of"):
        annotator.predict_matrix(X[:, :5], GENES[:5])
    with pytest.raises(InputError, match="repeats"):
        annotator.predict_matrix(X[:, :2], np.array(["G001", "g001"]))


def test_blocks_cover_every_cell_once():
    blocks = make_blocks(H5adSource("x.h5ad", "counts"), 1001, 250)
    assert [(b.start, b.stop) for b in blocks] == [(0, 250), (250, 500), (500, 750), (750, 1000), (1000, 1001)]
    assert [b.index for b in blocks] == list(range(5))


def test_column_names_are_per_model_version():
    ref = ModelRef("scpretrain-annotator", 3, "run", "sqlite:///x", "models:/scpretrain-annotator@champion")
    assert ref.uri == "models:/scpretrain-annotator/3"
    assert ref.label_column == "scpretrain__scpretrain_annotator__v3__label"
    assert ref.confidence_column == "scpretrain__scpretrain_annotator__v3__confidence"


def _payload_frame(payload: dict) -> pd.DataFrame:
    """What the scoring server hands the model: the JSON parsed into a DataFrame."""
    import json

    split = json.loads(json.dumps(payload))["dataframe_split"]
    return pd.DataFrame(split["data"], columns=split["columns"])


def test_sparse_request_format_gives_the_dense_answer(annotator):
    from scpretrain_dist.serve.pyfunc import sparse_request

    X = counts(20, seed=5)
    X[3] = 0  # a cell with no counts at all
    X[3, 7] = 1
    genes = np.char.lower(GENES.astype(str))
    dense = annotator.predict(pd.DataFrame(X, columns=genes), return_embedding=True)
    payload = sparse_request(sp.csr_matrix(X), genes)
    assert payload["params"]["genes"] == ",".join(genes) and payload["params"]["sparse_dtypes"] == "u2,u1"
    out = annotator.predict(_payload_frame(payload), genes=payload["params"]["genes"],
                            sparse_dtypes=payload["params"]["sparse_dtypes"], return_embedding=True)
    assert out["cell_type"].tolist() == dense["cell_type"].tolist()
    np.testing.assert_allclose(out.drop(columns="cell_type").to_numpy(float),
                               dense.drop(columns="cell_type").to_numpy(float), rtol=1e-5, atol=1e-6)
    # plain JSON lists work too, in any order within a cell
    Xc = sp.csr_matrix(X)
    rows = [[Xc.indices[a:b][::-1].tolist(), Xc.data[a:b][::-1].tolist()] for a, b in zip(Xc.indptr[:-1], Xc.indptr[1:])]
    lists = annotator.predict(pd.DataFrame(rows, columns=["indices", "values"]), genes=list(genes))
    assert lists["cell_type"].tolist() == dense["cell_type"].tolist()
    # non-integer values travel as float32
    logn = sparse_request(sp.csr_matrix(np.log1p(X)), genes)
    assert logn["params"]["sparse_dtypes"] == "u2,f4"
    out = annotator.predict(_payload_frame(logn), genes=logn["params"]["genes"], sparse_dtypes="u2,f4")
    assert out["cell_type"].tolist() == annotator.predict(pd.DataFrame(np.log1p(X), columns=genes))["cell_type"].tolist()
    with pytest.raises(InputError, match="sparse_dtypes"):
        annotator.predict(_payload_frame(logn), genes=logn["params"]["genes"], sparse_dtypes="f8,f4")
    # counts above 255 take two bytes each
    big = X * 100
    wide = sparse_request(sp.csr_matrix(big), genes)
    assert wide["params"]["sparse_dtypes"] == "u2,u2"
    out = annotator.predict(_payload_frame(wide), genes=wide["params"]["genes"], sparse_dtypes="u2,u2")
    assert out["cell_type"].tolist() == annotator.predict(pd.DataFrame(big, columns=genes))["cell_type"].tolist()


def test_parquet_request_carries_its_parameters_and_gives_the_dense_answer(annotator):
    import io

    from scpretrain_dist.serve.pyfunc import PARQUET_PARAMS, AnnotatorPyfunc, sparse_request_parquet

    X = counts(12, seed=8)
    genes = list(np.char.lower(GENES.astype(str)))[::-1]
    X = X[:, ::-1].copy()
    wrapper = AnnotatorPyfunc()
    wrapper.annotator = annotator
    body = sparse_request_parquet(sp.csr_matrix(X), genes, return_embedding=True)
    table = pd.read_parquet(io.BytesIO(body))  # what the scoring server does with the body
    assert list(table.columns) == ["indices", "values"] and len(table) == 12
    # MLflow passes the signature's defaults as params; the table's own parameters win over them
    defaults = {"genes": "", "sparse_dtypes": "i4,f4", "value_type": "auto", "return_embedding": False}
    out = wrapper.predict(None, table, params=defaults)
    dense = annotator.predict(pd.DataFrame(X, columns=genes), return_embedding=True)
    assert out["cell_type"].tolist() == dense["cell_type"].tolist()
    np.testing.assert_allclose(out.drop(columns="cell_type").to_numpy(float),
                               dense.drop(columns="cell_type").to_numpy(float), rtol=1e-5, atol=1e-6)
    from mlflow.exceptions import MlflowException

    table.attrs[PARQUET_PARAMS] = "genes=A,B"
    with pytest.raises(MlflowException, match="mapping"):
        wrapper.predict(None, table, params=defaults)
    table.attrs[PARQUET_PARAMS] = {"genes": 7}
    with pytest.raises(MlflowException, match="genes parameter"):
        wrapper.predict(None, table, params=defaults)


def test_repeated_symbols_are_summed_in_the_batch_path(annotator):
    X = counts(16, seed=6)
    genes = list(GENES)
    split = np.concatenate([X, X[:, :1] * 0 + 2], axis=1)  # a second column for gene 0, in other case
    split[:, 0] -= 2
    split[:, 0] = np.maximum(split[:, 0], 0)
    merged = split[:, :-1].copy()
    merged[:, 0] += split[:, -1]
    a = annotator.predict_matrix(sp.csr_matrix(split), genes + [genes[0].lower()], merge_repeats=True)
    b = annotator.predict_matrix(sp.csr_matrix(merged), genes)
    assert a.n_matched == 50 and a.labels.tolist() == b.labels.tolist()
    np.testing.assert_allclose(a.confidence, b.confidence, rtol=1e-5)
    with pytest.raises(InputError, match="repeats"):
        annotator.predict_matrix(sp.csr_matrix(split), genes + [genes[0].lower()])


@pytest.mark.parametrize("rows, words", [
    ([[[0, 1], [1.0]]], "2 indices but 1 values"),
    ([[[0, 99], [1.0, 2.0]]], "must lie in"),
    ([[[3, 3], [1.0, 2.0]]], "repeats a gene index"),
    ([["not base64!", "AAAA"]], "base64"),
    ([[[0, 1], ["x", "y"]]], "list of numbers"),
])
def test_sparse_request_format_refuses_bad_rows(annotator, rows, words):
    with pytest.raises(InputError, match=words):
        annotator.predict(pd.DataFrame(rows, columns=["indices", "values"]), genes=list(GENES))
    with pytest.raises(InputError, match="columns"):
        annotator.predict(pd.DataFrame({"a": [1]}), genes=list(GENES))


def test_the_actor_pool_needs_a_cluster_and_a_large_job_unless_workers_are_given(monkeypatch):
    import dataclasses

    import ray

    from scpretrain_dist.config import RunConfig
    from scpretrain_dist.serve.annotate import _choose_workers

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # whatever else runs in this process
    cfg = RunConfig()
    big = cfg.annotate.ray_min_cells
    said = []
    # one machine, no Ray: in-process whatever the size
    assert _choose_workers(cfg, None, 10 * big, said.append) == 0 and "no Ray cluster" in said[0]
    assert _choose_workers(cfg, 3, 10, said.append) == 3
    # a cluster (by address or RAY_ADDRESS): the pool for large jobs, in-process for small ones
    clustered = dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, address="ray://head:10001"))
    assert _choose_workers(clustered, None, big, said.append) == cfg.annotate.workers
    assert _choose_workers(clustered, None, big - 1, said.append) == 0 and "without starting actors" in said[-1]
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert _choose_workers(cfg, None, big, said.append) == cfg.annotate.workers
    no_pool = dataclasses.replace(cfg, annotate=dataclasses.replace(cfg.annotate, workers=0))
    assert _choose_workers(no_pool, None, big, said.append) == 0


def test_cells_without_counts_in_the_sparse_path(annotator, monkeypatch):
    from scpretrain_dist.serve import pyfunc

    X = counts(6, seed=7)
    X[[0, 3, 5]] = 0  # empty cells first, in the middle and last
    dense = annotator.predict_matrix(X, GENES, "counts")  # dense enough for the dense branch
    monkeypatch.setattr(pyfunc, "_DENSE_ABOVE", 2.0)
    sparse = annotator.predict_matrix(sp.csr_matrix(X), GENES, "counts")
    assert sparse.labels.tolist() == dense.labels.tolist()
    np.testing.assert_allclose(sparse.confidence, dense.confidence, rtol=1e-5)
    assert sparse.confidence[0] == sparse.confidence[3] == sparse.confidence[5]
