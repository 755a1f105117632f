"""The quickstart as a user runs it: a subprocess with real Ray, a SOMA store on disk and
MLflow on sqlite in a temp dir. One pipeline run serves every check in this module."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(cli):
    # started in the background once the tests were collected (conftest), in a work dir as users
    # have them: long (120 characters, past where Ray's sockets once broke), with a space and
    # non-ASCII letters
    work, proc = cli.quickstart()
    assert len(str(work)) == 120 and " " in str(work) and "ö" in str(work)
    return work, proc


def test_prints_pretrained_vs_baseline_table(run):
    work, proc = run
    assert "scpretrain" in proc.stdout and "no_pretrain" in proc.stdout and "logreg" in proc.stdout
    assert "registered models:/scpretrain-annotator/1 with alias @champion" in proc.stdout
    # UMAP's warning that it cannot embed new cells (the evaluation never asks it to) stays off
    assert "precomputed_knn" not in proc.stdout + proc.stderr


def test_report_rows_and_splits(run):
    from scpretrain_dist.evaluate.methods import ALL_METHODS, SEMI_SUPERVISED, missing_peers

    work, proc = run
    report = json.loads((work / "report" / "report.json").read_text())
    rows = report["rows"]
    # every method but those that learn from an unlabelled query (transfer only) and the peer
    # tools this environment lacks (said in the output)
    missing = missing_peers(ALL_METHODS)
    assert {r["method"] for r in rows} == set(ALL_METHODS) - set(SEMI_SUPERVISED) - set(missing)
    for m in missing:
        assert f"{m} not installed here" in proc.stdout + proc.stderr
    for r in rows:
        assert r["dataset"] == "demo_03"
        for k in ("accuracy", "kappa", "macro_f1", "macro_auprc", "macro_auroc"):
            assert 0.0 <= r[k] <= 1.0
    # the synthetic types are learnable: every method beats chance (1/6) by far at the full budget
    full = [r for r in rows if r["budget"] == 1000]
    assert len(full) == len(ALL_METHODS) - len(SEMI_SUPERVISED) - len(missing) and min(r["accuracy"] for r in full) > 0.6
    assert {r["n_train"] for r in rows if r["budget"] == 25} == {25}
    splits = {s["budget"]: s for s in report["splits"]}
    assert set(splits) == {25, 100, 1000}
    train, val, test = map(set, (splits[1000]["train"], splits[1000]["val"], splits[1000]["test"]))
    assert not (train & val or train & test or val & test)
    assert len(test) == 150 and len(val) == 50 and len(train) == 300  # min(1000, 0.6 n)
    # a smaller budget: a subset of the same training cells, the same validation and test cells
    assert set(splits[25]["train"]) <= train and set(splits[25]["test"]) == test
    assert {c["space"] for c in report["clustering"]} == {"pca", "umap_pca", "embedding"}
    assert {t["b"] for t in report["paired_tests"]} == {"no_pretrain", "logreg"}
    for fig in ("fig2_pretrained_vs_not", "fig3_umap_embedding_vs_pca", "fig4_classifiers_embedding_vs_pca",
                "fig5_kappa_vs_label_budget"):
        assert (work / "report" / f"{fig}.png").stat().st_size > 10_000
    assert (work / "report" / "confusion_demo_03_scpretrain.png").stat().st_size > 5_000  # one per target
    assert (work / "report" / "report.md").read_text().startswith("# scPretrain evaluation")


def test_target_never_seen_in_pretraining(run):
    work, _ = run
    (result,) = list((work / "pretrain").glob("*/result.json"))
    res = json.loads(result.read_text())
    assert res["datasets"] == ["demo_00", "demo_01", "demo_02"]
    assert res["iterations_run"] == 2
    from scpretrain_dist.train.pretrain import labels_file

    labels = np.load(labels_file(Path(result).parent, 1))
    assert "labels/demo_03" not in labels.files
    # k = n / (50, 100, 200) with 500 cells per dataset
    assert labels["ks/demo_00"].tolist() == [10, 5, 2]
    assert Path(res["encoder_path"]).exists()


def test_mlflow_runs_nested_with_metrics_and_registry(run):
    work, _ = run
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("scpretrain")
    runs = client.search_runs([exp.experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert {"quickstart", "ingest", "pretrain", "finetune-evaluate"} <= set(by_name)
    parent = by_name["quickstart"].info.run_id
    for child in ("ingest", "pretrain", "finetune-evaluate"):
        assert by_name[child].data.tags["mlflow.parentRunId"] == parent
    assert by_name["quickstart"].data.params["pretrain.epochs"] == "6"
    pre = by_name["pretrain"].info.run_id
    losses = client.get_metric_history(pre, "pretrain_loss")
    assert len(losses) == 2 * 6  # iterations x epochs, logged once (rank 0 only)
    assert len(client.get_metric_history(pre, "pseudo_label_nmi_mean")) == 1
    mv = client.get_model_version_by_alias("scpretrain-annotator", "champion")
    assert mv.tags["finetune_dataset"] == "demo_03"
    assert "demo_03" not in json.loads(mv.tags["pretrain_datasets"])
    assert mv.tags["encoder_run"] == pre


def test_registered_model_annotates_target(run, cli):
    work, _ = run
    import anndata as ad
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/scpretrain-annotator@champion")
    adata = ad.read_h5ad(work / "demo_data" / "demo_03.h5ad")
    import pandas as pd

    df = pd.DataFrame(adata.X.toarray(), columns=list(adata.var_names))
    pred = model.predict(df)
    acc = float(np.mean(pred["cell_type"].to_numpy() == adata.obs["cell_type"].to_numpy()))
    assert acc > 0.8
    assert pred["confidence"].between(0, 1).all()
    r = cli.run("models", "list", "--work-dir", str(work))
    assert r.returncode == 0, r.stderr
    listing = r.stdout
    assert "models:/scpretrain-annotator/1" in listing and "champion" in listing


def test_reingest_is_noop_and_bad_file_leaves_store_unchanged(run, tmp_path, cli):
    work, _ = run
    from scpretrain_dist.store import open_atlas

    store = open_atlas(work / "atlas.soma")
    before = [r.name for r in store.datasets()], store.genes().tolist()
    r = cli.run("ingest", str(work / "demo_data"), "--work-dir", str(work))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "already in the atlas" in out and "0 added" in out
    bad = tmp_path / "broken.h5ad"
    bad.write_bytes(b"this is not an HDF5 file")
    proc = cli.run("ingest", str(bad), "--work-dir", str(work))
    assert proc.returncode == 2
    assert "broken" in proc.stderr and "not an HDF5 file" in proc.stderr
    assert ([r.name for r in store.datasets()], store.genes().tolist()) == before


# the evaluations below on the quickstart's atlas: one seed, at most 25 epochs per fit (the
# quickstart's own 80 are not needed for what they check)
SHORT_FINETUNE = ("--set", "finetune.seeds=[0]", "--set", "finetune.max_epochs=25")


def test_finetune_with_a_query_registers_the_semi_supervised_model(run, tmp_path, cli, ray_session):
    """`finetune --query` as docs/evaluation.md runs it, figures on: the target fine-tuned with and
    without the query's unlabelled cells, the report and its figures written, and the registered
    model's lineage naming the query and whether the guard fell back. A copy of the atlas in a
    work dir of its own, so the quickstart's registry keeps its champion."""
    import shutil

    from mlflow import MlflowClient

    work, _ = run
    (result,) = (work / "pretrain").glob("*/result.json")
    mine = tmp_path / "work"
    shutil.copytree(work / "atlas.soma", mine / "atlas.soma")
    r = cli.run("finetune", "--work-dir", mine, "--target", "demo_03", "--query", "demo_02", "--pretrain-result", result,
                *SHORT_FINETUNE, "--set", "evaluate.budgets=[100]", "--set", "evaluate.cluster=false",
                "--set", 'evaluate.methods=["scpretrain","scpretrain_ssl"]', "--out", mine / "report")
    assert r.returncode == 0, r.stderr
    rows = json.loads((mine / "report" / "report.json").read_text())["rows"]
    ssl = [x for x in rows if x["method"] == "scpretrain_ssl"]
    assert ssl and all(x["query"] == "demo_02" and x["ssl_guard"] for x in ssl)
    assert "confusion_demo_03_scpretrain.png" in r.stdout
    assert (mine / "report" / "confusion_demo_03_scpretrain.png").stat().st_size > 5_000
    mv = MlflowClient(f"sqlite:///{mine / 'mlflow.db'}").get_model_version_by_alias("scpretrain-annotator", "champion")
    assert mv.tags["semi_supervised_query"] == "demo_02" and mv.tags["ssl_fallback"] in ("true", "false")


def test_transfer_protocol_reuses_the_encoder_and_refuses_bad_input(run, tmp_path, cli, ray_session):
    work, _ = run
    common = ["--work-dir", str(work), *SHORT_FINETUNE, "--set", 'pretrain.exclude_datasets=["demo_03"]']
    bad = cli.run("evaluate", "--protocol", "transfer", "--references", "demo_00", "--queries", "demo_00",
                     *common)
    assert bad.returncode == 2 and "both reference and query" in bad.stderr
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"demo_00": {"type_A": "A"}}))
    bad = cli.run("evaluate", "--protocol", "transfer", "--references", "demo_00", "--queries", "demo_03",
                     "--label-mapping", str(mapping), *common)
    assert bad.returncode == 2 and "does not cover labels" in bad.stderr
    assert not (work / "report_transfer").exists()
    proc = cli.run("evaluate", "--protocol", "transfer", "--references", "demo_00", "demo_01",
                      "--queries", "demo_03", "--methods", "scpretrain", "no_pretrain", "logreg", "emb_svm",
                      "scpretrain_ssl", *common)
    assert proc.returncode == 0, proc.stderr
    assert "reusing cached encoder" in proc.stdout  # the quickstart's: demo_03 was left out of it too
    report = json.loads((work / "report_transfer" / "report.json").read_text())
    acc = {r["method"]: r["accuracy"] for r in report["rows"]}
    # label-shift EM only where probabilities are likelihood-fitted: not on an SVM's margins
    assert set(acc) == {"scpretrain", "no_pretrain", "logreg", "emb_svm", "scpretrain_ssl",
                        "scpretrain+shift", "no_pretrain+shift", "logreg+shift", "scpretrain_ssl+shift"}
    assert acc["scpretrain"] > 0.8 and acc["logreg"] > 0.8 and acc["scpretrain_ssl"] > 0.8
    (split,) = report["splits"]
    assert all(c.startswith(("demo_00", "demo_01")) for c in split["train"])
    assert len(split["test"]) == 500


def test_pairwise_transfer_reports_each_reference_alone_as_a_matrix(run, cli, ray_session):
    """--pairwise: each reference alone to the query, rows named by pair, the matrix section and
    one heat-map per method; asked of the lodo protocol it is refused."""
    work, _ = run
    bad = cli.run("evaluate", "--work-dir", str(work), "--pairwise")
    assert bad.returncode == 2 and "--protocol transfer" in bad.stderr
    out = work / "report_pairs"
    proc = cli.run("evaluate", "--work-dir", str(work), *SHORT_FINETUNE, "--set",
                   'pretrain.exclude_datasets=["demo_03"]', "--protocol", "transfer", "--pairwise",
                   "--references", "demo_00", "demo_01", "--queries", "demo_03", "--methods", "scpretrain", "logreg",
                   "--set", "evaluate.label_shift=false", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "reusing cached encoder" in proc.stdout and "registered models:/" not in proc.stdout
    report = json.loads((out / "report.json").read_text())
    pairs = {(r["dataset"], r["references"], r["query"], r["method"]) for r in report["rows"]}
    assert pairs == {(f"{ref} -> demo_03", ref, "demo_03", m) for ref in ("demo_00", "demo_01")
                     for m in ("scpretrain", "logreg")}
    assert {s["references"][0] for s in report["splits"]} == {"demo_00", "demo_01"}
    md = (out / "report.md").read_text()
    assert "## Transfer matrix" in md and "| demo_00 | " in md
    names = {Path(f).name for f in report["figures"]}
    assert {"transfer_matrix_scpretrain.png", "transfer_matrix_logreg.png"} <= names
    assert sum(n.startswith("confusion_demo_0") and "demo_03" in n for n in names) == 2  # one per pair
    assert all((out / Path(f).name).stat().st_size > 0 for f in report["figures"])


def test_each_held_out_type_is_scored_as_unknown_cells(run, cli, ray_session):
    """--hold-out-types all: every reference type removed in turn; the query's cells of it are
    found by low confidence, rejected by the model's own threshold, and no model is registered."""
    work, _ = run
    common = ["--work-dir", str(work), *SHORT_FINETUNE, "--set", 'pretrain.exclude_datasets=["demo_03"]',
              "--protocol", "transfer", "--references", "demo_00", "demo_01", "--queries", "demo_03"]
    bad = cli.run("evaluate", *common, "--hold-out-types", "type_Z")
    assert bad.returncode == 2 and "'type_Z' is not a type of the references" in bad.stderr
    bad = cli.run("evaluate", "--work-dir", str(work), "--hold-out-types", "all")
    assert bad.returncode == 2 and "--protocol transfer" in bad.stderr
    out = work / "report_unknown"
    proc = cli.run("evaluate", *common, "--hold-out-types", "all", "--methods", "scpretrain", "logreg", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "reusing cached encoder" in proc.stdout and "registered models:/" not in proc.stdout
    report = json.loads((out / "report.json").read_text())
    rows = report["rows"]
    types = sorted({r["held_out"] for r in rows})
    assert len(types) >= 3 and {r["dataset"] for r in rows} == {f"demo_03 without {t}" for t in types}
    mine = [r for r in rows if r["method"] == "scpretrain"]
    assert len(mine) == len(types)
    for r in mine:  # per type, a few unknown cells can all be confident: the rates compare on average
        assert r["n_unknown"] > 0 and 0 <= r["known_rejected"] <= 1 and 0 <= r["unknown_rejected"] <= 1
        assert r["n_types"] == len(types) - 1
    assert np.mean([r["unknown_rejected"] for r in mine]) > np.mean([r["known_rejected"] for r in mine])
    assert np.mean([r["unknown_auroc"] for r in mine]) > 0.8
    assert np.mean([r["accepted_accuracy"] for r in mine]) >= np.mean([r["known_accuracy"] for r in mine])
    assert all(np.isnan(r["unknown_rejected"]) and r["unknown_auroc"] > 0 for r in rows if r["method"] == "logreg")
    md = (out / "report.md").read_text()
    assert "## Unknown cells" in md and f"demo_03 without {types[0]}" in md


LODO = ("--protocol", "lodo", "--targets", "demo_03", "--methods", "scpretrain", "logreg", "--budgets", "50", "300",
        *SHORT_FINETUNE, "--set", "evaluate.cluster=false")


@pytest.fixture(scope="module")
def soma_lodo(run, cli, ray_session):
    work, _ = run
    proc = cli.run("evaluate", "--work-dir", str(work), *LODO)
    assert proc.returncode == 0, proc.stderr
    return work, proc


def test_lodo_protocol_from_the_cli_reuses_the_encoder(soma_lodo, cli):
    work, proc = soma_lodo
    assert "reusing cached encoder" in proc.stdout
    report = json.loads((work / "report_lodo" / "report.json").read_text())
    assert {(r["method"], r["budget"]) for r in report["rows"]} == {
        ("scpretrain", 50), ("scpretrain", 300), ("logreg", 50), ("logreg", 300)}
    assert "demo_03" not in report["context"]["folds"].split("<-")[1]
    bad = cli.run("evaluate", "--protocol", "lodo", "--group", "nosuchgroup", "--work-dir", str(work))
    assert bad.returncode == 2 and "no dataset of group 'nosuchgroup'" in bad.stderr


METRICS = ("accuracy", "kappa", "macro_f1", "macro_auprc", "macro_auroc")


def test_the_zarr_backend_runs_the_pipeline_with_the_same_results(soma_lodo, cli, tmp_path):
    """The quickstart's demo files ingested into a zarr atlas (``store.backend = "zarr"``), then
    pretraining, fine-tuning and evaluation (lodo, two methods) and store annotation read and
    write it: every number equals the SOMA atlas's (the same cells in the same order reach the
    same seeds), the encoder bit for bit."""
    import torch
    import zarr

    work, _ = soma_lodo
    zwork = tmp_path / "zarr work"
    zarr_backend = ("--work-dir", str(zwork), "--set", "store.backend=zarr")
    r = cli.run("ingest", str(work / "demo_data"), *zarr_backend)
    assert r.returncode == 0, r.stderr
    assert (zwork / "atlas.zarr" / "zarr.json").is_file() and not (zwork / "atlas.soma").exists()
    assert zarr.open_group(zwork / "atlas.zarr", mode="r").attrs["scpretrain.format"] == "csr/1"
    r = cli.run("evaluate", *zarr_backend, *LODO)
    assert r.returncode == 0, r.stderr
    assert "reusing cached encoder" not in r.stdout  # pretrained on the zarr atlas

    def rows(w):
        return {(r["method"], r["budget"], r["seed"]): [r[k] for k in METRICS]
                for r in json.loads((w / "report_lodo" / "report.json").read_text())["rows"]}

    zarr_rows = rows(zwork)
    assert {k[0] for k in zarr_rows} == {"scpretrain", "logreg"} and zarr_rows == rows(work)
    encoders = [json.loads(next((w / "pretrain").glob("*/result.json")).read_text())["encoder_path"]
                for w in (work, zwork)]
    soma_state, zarr_state = (torch.load(p, map_location="cpu", weights_only=True) for p in encoders)
    assert soma_state.keys() == zarr_state.keys()
    for k in soma_state:
        assert torch.equal(soma_state[k], zarr_state[k]), k

    # annotation of the zarr atlas in place by the quickstart's model: the same labels as the
    # SOMA atlas gets, and a rerun finds every block done
    annotate = ("annotate", "--model", "models:/scpretrain-annotator/1", "--work-dir", work, "--datasets", "demo_03",
                "--workers", "0", "--embedding")
    for uri in (work / "atlas.soma", zwork / "atlas.zarr"):
        r = cli.run(*annotate, "--store-uri", uri)
        assert r.returncode == 0, r.stderr
    again = cli.run(*annotate, "--store-uri", zwork / "atlas.zarr")
    assert again.returncode == 0 and re.search(r"\b0 of \d+ blocks to do", again.stdout + again.stderr), again.stdout
    from scpretrain_dist.store import open_atlas

    soma_atlas, zarr_atlas = open_atlas(work / "atlas.soma"), open_atlas(zwork / "atlas.zarr")
    col = "scpretrain__scpretrain_annotator__v1"
    rec = zarr_atlas.dataset("demo_03")
    z = zarr.open_group(zwork / "atlas.zarr", mode="r")
    zarr_labels = z[f"obs/{col}__label"][rec.joinid_start : rec.joinid_start + rec.n_cells]
    import tiledbsoma as soma

    srec = soma_atlas.dataset("demo_03")
    with soma.DataFrame.open(str(work / "atlas.soma" / "obs")) as obs:
        tbl = obs.read(coords=(slice(srec.joinid_start, srec.joinid_start + srec.n_cells - 1),),
                       column_names=["soma_joinid", f"{col}__label"]).concat().to_pandas().sort_values("soma_joinid")
    assert list(zarr_labels) == tbl[f"{col}__label"].tolist()
    truth = zarr_atlas.read_obs("demo_03")["cell_type"].to_numpy()
    assert np.mean(np.asarray(zarr_labels) == truth) > 0.8
    emb = z[f"obsm/{col}"][rec.joinid_start : rec.joinid_start + rec.n_cells]
    assert emb.shape[0] == rec.n_cells and emb.shape[1] > 0 and np.isfinite(emb).all()
    assert zarr_atlas.annotations()[col]["datasets"]["demo_03"]["status"] == "complete"
