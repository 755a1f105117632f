"""A registered annotator behind MLflow's real scoring server on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pandas as pd
import pytest

from scpretrain_dist import recipes
from scpretrain_dist.config import resolve
from scpretrain_dist.data.normalize import normalize_rows
from scpretrain_dist.model.networks import CellTypeClassifier
from scpretrain_dist.train.finetune import linear_gene_model

pytestmark = pytest.mark.slow
GENES = [f"GENE{i}" for i in range(60)]


def post(port: int, payload, content_type: str = "application/json") -> tuple[int, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                 headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def frame(df: pd.DataFrame) -> dict:
    return {"dataframe_split": {"columns": list(df.columns), "data": df.to_numpy().tolist()}}


@pytest.fixture(scope="module")
def server(tmp_path_factory, cli):
    import mlflow

    from scpretrain_dist.serve.pyfunc import register_annotator
    from scpretrain_dist.tracking.mlflow_runs import setup

    work = tmp_path_factory.mktemp("serve")
    cfg = resolve(recipes.tiny(), overrides=[f'work_dir="{work}"'])
    setup(cfg)
    model = CellTypeClassifier(len(GENES), 3)
    rng = np.random.default_rng(0)
    counts = pd.DataFrame(rng.poisson(3, (20, len(GENES))).astype(float), columns=GENES)
    # a pooled gene model whose check passes any set of 50 cells or more (validation agreement 0)
    model.gene_model = linear_gene_model(normalize_rows(counts.to_numpy(np.float32), "counts"), np.arange(20) % 3, 3)
    model.gene_model_weight, model.gene_model_agreement, model.gene_model_val_cells = 0.5, 0.0, 100
    with mlflow.start_run():
        register_annotator(model, np.array(GENES), np.array(["B", "T", "NK"]), counts.head(2),
                      {"finetune_dataset": "synthetic"}, "annot", "champion")
    port = cli.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "scpretrain_dist.cli", "serve", "--model", "models:/annot@champion",
         "--port", str(port), "--work-dir", str(work)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    cli.wait_for_http(f"http://127.0.0.1:{port}/ping", proc, proc.stdout.read)
    loaded = mlflow.pyfunc.load_model("models:/annot@champion")
    yield port, loaded, counts
    proc.terminate()
    proc.wait(30)


def test_predictions_equal_in_process(server):
    port, loaded, counts = server
    # shuffled columns, lower case, one extra gene, one missing gene
    df = counts.drop(columns=["GENE5"]).assign(NOTAGENE=1.0)
    df = df[list(reversed(df.columns))]
    df.columns = [c.lower() for c in df.columns]
    status, body = post(port, frame(df))
    assert status == 200, body
    served = pd.DataFrame(body["predictions"])
    local = loaded.predict(df)
    assert served["cell_type"].tolist() == local["cell_type"].tolist()
    np.testing.assert_allclose(served["confidence"], local["confidence"], rtol=1e-5)
    assert served["gene_overlap"].iloc[0] == pytest.approx(59 / 60)


def test_the_gene_model_is_checked_per_request_and_set_by_its_parameter(server):
    """A request of fewer than 50 cells is called by the network alone; of 60, with the gene
    model (its check passes); ``gene_model`` on/off sets it; each answer equals the in-process
    one with the same parameter, and its ``gene_model`` column says which."""
    port, loaded, counts = server
    big = pd.concat([counts] * 3, ignore_index=True)
    answers = {}
    for cells, param, used in ((counts, None, False), (big, None, True), (counts, "on", True), (big, "off", False)):
        payload = frame(cells) | ({"params": {"gene_model": param}} if param else {})
        status, body = post(port, payload)
        assert status == 200, body
        served = pd.DataFrame(body["predictions"])
        local = loaded.predict(cells, params={"gene_model": param} if param else None)
        assert served["gene_model"].tolist() == [used] * len(cells)
        assert served["cell_type"].tolist() == local["cell_type"].tolist()
        np.testing.assert_allclose(served["confidence"], local["confidence"], rtol=1e-5)
        answers[(len(cells), used)] = served["confidence"].to_numpy()
    # the gene model changes the answers: the first 20 of 60 cells are the 20 cells
    assert not np.allclose(answers[(60, True)][:20], answers[(20, False)])
    np.testing.assert_allclose(answers[(60, True)][:20], answers[(20, True)], rtol=1e-5)
    np.testing.assert_allclose(answers[(60, False)][:20], answers[(20, False)], rtol=1e-5)


def _sparse(indices, values, **params):
    return {"dataframe_split": {"columns": ["indices", "values"], "data": [[indices, values]]},
            "params": {"genes": ",".join(GENES), **params}}


ONES = [1.0] * len(GENES)
# payload -> words the error must hold; every one is a 400 that names its cause
BAD_PAYLOADS = {
    "non_numeric": ({"dataframe_split": {"columns": ["GENE1", "GENE2"], "data": [["a", "b"]]}}, "must hold numbers"),
    "no_known_gene": ({"dataframe_split": {"columns": ["XYZ1", "XYZ2"], "data": [[1, 2]]}}, "of the model's 60 genes"),
    "nulls": ({"dataframe_split": {"columns": GENES, "data": [[None] * len(GENES)]}}, "no value for gene"),
    "ragged_row": ({"dataframe_split": {"columns": GENES, "data": [ONES, ONES[:-3]]}}, "cell 1 has no value for gene 'GENE57'"),
    "record_missing_key": ({"dataframe_records": [dict(zip(GENES, ONES)), dict(zip(GENES[1:], ONES))]},
                           "cell 1 has no value for gene 'GENE0'"),
    "negative": ({"dataframe_split": {"columns": GENES, "data": [[-1.0] + ONES[1:]]}}, "negative"),
    "beyond_float32": ({"dataframe_split": {"columns": GENES, "data": [[1e39] + ONES[1:]]}}, "float32"),
    "no_cells": ({"dataframe_split": {"columns": GENES, "data": []}}, "no cells"),
    "not_json": (b"{not json", "not valid JSON"),
    "json_list": ([[1, 2, 3]], "JSON list"),
    "unknown_key": ({"dataframe_split": {"columns": GENES, "data": [ONES]}, "param": {"value_type": "counts"}},
                    "unknown request key(s) ['param']"),
    "unknown_param": ({"dataframe_split": {"columns": GENES, "data": [ONES]}, "params": {"value_typ": "counts"}},
                      "unknown parameter(s) ['value_typ']"),
    "two_formats": ({"dataframe_split": {"columns": GENES, "data": [ONES]}, "dataframe_records": []}, "exactly one"),
    "params_not_object": ({"dataframe_split": {"columns": GENES, "data": [ONES]}, "params": [1]}, "params must be"),
    "bad_value_type": ({"dataframe_split": {"columns": GENES, "data": [ONES]}, "params": {"value_type": "tpm"}},
                       "value_type 'tpm'"),
    "bad_gene_model": ({"dataframe_split": {"columns": GENES, "data": [ONES]}, "params": {"gene_model": "yes"}},
                       "gene_model 'yes' must be one of auto, on, off"),
    "invalid_base64": (_sparse("AAAA!!!!", "AACAPw=="), "not valid base64"),
    "base64_wrong_length": (_sparse("AAA=", "AACAPw=="), "not a whole number"),
    "indices_out_of_range": (_sparse([0, 99], [1, 1]), "must lie in [0, 60)"),
    "indices_not_whole": (_sparse([0.5], [1]), "whole numbers"),
    "sparse_negative": (_sparse([0, 1], [1, -4]), "negative"),
    "sparse_lengths_differ": (_sparse([0, 1], [1]), "2 indices but 1 values"),
    "repeated_index": (_sparse([3, 3], [1, 1]), "repeats a gene index"),
}


@pytest.mark.parametrize("name", sorted(BAD_PAYLOADS))
def test_malformed_requests_get_a_400_naming_the_cause_and_server_keeps_serving(server, name):
    port, loaded, counts = server
    payload, words = BAD_PAYLOADS[name]
    status, body = post(port, payload)
    assert status == 400, (status, body)
    assert words in body.get("message", ""), body
    assert set(body) == {"error_code", "message"}, body  # no stack trace, nothing else
    assert "Traceback" not in body["message"] and len(body["message"]) < 1200
    ok, _ = post(port, frame(counts.head(3)))
    assert ok == 200


def test_a_cell_without_model_genes_is_unassigned_over_http(server):
    port, loaded, counts = server
    df = counts.head(3).copy()
    df.iloc[1] = 0.0
    status, body = post(port, frame(df))
    assert status == 200, body
    got = pd.DataFrame(body["predictions"])
    assert got["cell_type"][1] == "Unassigned" and got["confidence"][1] == 0
    assert (got["confidence"].drop(1) > 0).all()  # the others measured: a confidence (if rejected, its own)


def test_huge_request_refused(server):
    port, loaded, counts = server
    big = {"dataframe_split": {"columns": GENES[:20], "data": [[1.0] * 20] * 100_001}}
    status, body = post(port, big)
    assert 400 <= status < 500
    assert "per request" in json.dumps(body)
    assert post(port, frame(counts.head(1)))[0] == 200


def test_sparse_request_format_over_http(server):
    import scipy.sparse as sp

    from scpretrain_dist.serve.pyfunc import sparse_request

    port, loaded, counts = server
    status, body = post(port, sparse_request(sp.csr_matrix(counts.to_numpy()), counts.columns))
    assert status == 200, body
    served = pd.DataFrame(body["predictions"])
    local = loaded.predict(counts)
    assert served["cell_type"].tolist() == local["cell_type"].tolist()
    np.testing.assert_allclose(served["confidence"], local["confidence"], rtol=1e-5)
    bad = sparse_request(sp.csr_matrix(counts.to_numpy()[:2]), counts.columns)
    bad["dataframe_split"]["data"][0][0] = [0, 1]  # two indices, more values
    status, body = post(port, bad)
    assert status == 400 and "indices but" in json.dumps(body)


PARQUET = "application/vnd.apache.parquet"


def test_parquet_request_over_http(server):
    import scipy.sparse as sp

    from scpretrain_dist.serve.pyfunc import sparse_request_parquet

    port, loaded, counts = server
    shuffled = counts[list(reversed(counts.columns))]
    status, body = post(port, sparse_request_parquet(sp.csr_matrix(shuffled.to_numpy()), shuffled.columns,
                                                     return_embedding=True), PARQUET)
    assert status == 200, body
    served = pd.DataFrame(body["predictions"])
    local = loaded.predict(counts)
    assert served["cell_type"].tolist() == local["cell_type"].tolist()
    np.testing.assert_allclose(served["confidence"], local["confidence"], rtol=1e-5)
    # the embedding was asked for in the table's metadata (the 4: cell_type, confidence,
    # gene_overlap and the pooled model's gene_model)
    assert served.shape[1] == 4 + 200 and "emb_199" in served
    # not Parquet at all, and a Parquet table without the parameters: 4xx, and the server goes on
    status, body = post(port, b"PAR1 not really", PARQUET)
    assert 400 <= status < 500, body
    assert set(body) == {"error_code", "message"} and "Parquet" in body["message"], body  # no stack trace
    import io

    buf = io.BytesIO()
    pd.DataFrame({"indices": [b"\x00\x00"], "values": [b"\x01\x00"]}).to_parquet(buf)
    status, body = post(port, buf.getvalue(), PARQUET)
    assert 400 <= status < 500 and "gene" in json.dumps(body).lower(), body
    assert post(port, frame(counts.head(2)))[0] == 200
