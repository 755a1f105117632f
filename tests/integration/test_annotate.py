"""Batch annotation on a real SOMA store, a real local Ray and a real MLflow registry (sqlite).

Two versions of a small fine-tuned classifier (no pretraining) are registered once per module;
every test works on its own copy of a two-dataset demo atlas.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scpretrain_dist import recipes
from scpretrain_dist.config import DemoDataConfig, resolve

pytestmark = pytest.mark.slow

DEMO = DemoDataConfig(n_datasets=3, cells_per_dataset=240, n_genes=150, n_types=3, markers_per_type=12, seed=3)
MODEL = "annot"


class Interrupt(RuntimeError):
    """Raised from a block hook to stop a run partway, as a crash would."""


@pytest.fixture(scope="module")
def env(tmp_path_factory, ray_session):
    import mlflow

    from scpretrain_dist.catalog import load_catalog
    from scpretrain_dist.demo import write_demo_atlas
    from scpretrain_dist.evaluate.protocols import load_target
    from scpretrain_dist.serve.pyfunc import register_annotator
    from scpretrain_dist.store import open_atlas
    from scpretrain_dist.tracking.mlflow_runs import setup
    from scpretrain_dist.train.finetune import finetune

    work = tmp_path_factory.mktemp("annotate")
    cfg = resolve(recipes.tiny(), overrides=[
        f'work_dir="{work}"', "ray.num_cpus=4", "annotate.cpus_per_worker=0.25", "annotate.workers=2",
        "finetune.max_epochs=25", "finetune.patience=5",
    ])
    demo = work / "demo"
    write_demo_atlas(demo, DEMO)
    entries = load_catalog(demo / "catalog.toml")
    pristine = work / "pristine.soma"
    store = open_atlas(pristine)
    store.ingest(entries[:2], log=lambda m: None)
    target = load_target(store, "demo_00")
    setup(cfg)
    for seed in (0, 1):  # version 1 and version 2 of the same registered model
        res = finetune(target.X[:160], target.labels[:160], target.X[160:], target.labels[160:],
                       len(target.classes), cfg.finetune, cfg.model, seed)
        example = pd.DataFrame(np.expm1(target.X[:2].toarray()).round(0), columns=target.genes)
        lineage = {"store_uri": str(pristine), "store_version": "1", "pretrain_datasets": [],
                   "pseudo_label_version": "none", "encoder_run": "", "finetune_dataset": "demo_00",
                   "metrics": {"val_accuracy": round(res.best_val_accuracy, 4)}}
        with mlflow.start_run():
            register_annotator(res.model, target.genes, target.classes, example, lineage, MODEL, "champion")
    return {"cfg": cfg, "work": work, "pristine": pristine, "entries": entries, "demo": demo}


@pytest.fixture
def store(env, tmp_path):
    from scpretrain_dist.store import open_atlas

    shutil.copytree(env["pristine"], tmp_path / "atlas.soma")
    return open_atlas(tmp_path / "atlas.soma")


def read_obs(store) -> pd.DataFrame:
    import tiledbsoma as soma

    with soma.Experiment.open(store.uri) as exp:
        return exp.obs.read().concat().to_pandas().sort_values("soma_joinid").reset_index(drop=True)


def snapshot(store) -> dict:
    """Everything a reader sees: obs (all columns), metadata, the X layer, the ms/RNA members."""
    import tiledbsoma as soma

    with soma.Experiment.open(store.uri) as exp:
        X = exp.ms["RNA"].X["counts"].read().tables().concat().to_pandas()
        meta = dict(exp.metadata.items())
        members = sorted(exp.ms["RNA"].keys())
    return {"obs": read_obs(store), "meta": meta, "members": members,
            "X": X.sort_values(["soma_dim_0", "soma_dim_1"]).reset_index(drop=True)}


def assert_unchanged(a: dict, b: dict) -> None:
    pd.testing.assert_frame_equal(a["obs"], b["obs"])
    assert a["meta"] == b["meta"]
    assert a["members"] == b["members"]
    pd.testing.assert_frame_equal(a["X"], b["X"])


def reference_predictions(env, store, dataset: str, version: int) -> pd.DataFrame:
    """What the served model answers for the dataset's raw cells (the DataFrame request path)."""
    from scpretrain_dist.serve.annotate import load_annotator
    from scpretrain_dist.tracking.registry import ModelFetch

    annotator = load_annotator(ModelFetch(f"models:/{MODEL}/{version}", env["cfg"].tracking_uri))
    rec = store.dataset(dataset)
    cols = np.flatnonzero(store.dataset_gene_mask(dataset))
    X = store.read_rows(rec.joinids)[:, cols].toarray()
    df = pd.DataFrame(X, columns=store.genes()[cols], index=rec.joinids)
    return annotator.predict(df, return_embedding=True)


def col(version: int, what: str) -> str:
    return f"scpretrain__{MODEL}__v{version}__{what}"


def test_store_annotation_on_ray_pool_matches_served_predictions(env, store):
    import tiledbsoma as soma

    from scpretrain_dist.serve.annotate import annotate_store

    before = snapshot(store)
    rep = annotate_store(env["cfg"], f"models:/{MODEL}@champion", store.uri, embedding=True, block_size=100,
                         workers=2, progress=False, log=lambda m: None)
    assert rep.model_uri == f"models:/{MODEL}/2"  # the alias points at the latest version
    assert rep.blocks_total == rep.blocks_computed == 6 and rep.blocks_skipped == 0
    obs = read_obs(store)
    assert len(obs) == 480 and obs["soma_joinid"].is_unique
    assert obs[col(2, "label")].notna().all() and obs[col(2, "confidence")].between(0, 1).all()
    # the original columns are untouched; no other column appeared
    pd.testing.assert_frame_equal(obs[before["obs"].columns], before["obs"])
    assert set(obs.columns) - set(before["obs"].columns) == {col(2, "label"), col(2, "confidence")}
    with soma.SparseNDArray.open(f"{store.uri}/ms/RNA/obsm/scpretrain__{MODEL}__v2") as A:
        t = A.read().tables().concat()
    emb = np.zeros((480, 200), np.float32)
    emb[t["soma_dim_0"].to_numpy(), t["soma_dim_1"].to_numpy()] = t["soma_data"].to_numpy()
    assert len(t) == 480 * 200
    for d in ("demo_00", "demo_01"):
        ref = reference_predictions(env, store, d, 2)
        rows = obs.set_index("soma_joinid").loc[ref.index]
        assert rows[col(2, "label")].tolist() == ref["cell_type"].tolist()
        np.testing.assert_allclose(rows[col(2, "confidence")], ref["confidence"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(emb[ref.index], ref[[f"emb_{i}" for i in range(200)]], rtol=1e-4, atol=1e-5)
    own = obs[obs["dataset_id"] == "demo_00"]
    assert (own[col(2, "label")] == own["cell_type"]).mean() > 0.8, "the model has learnt its dataset"
    record = store.annotations()[f"scpretrain__{MODEL}__v2"]
    assert record["model"] == MODEL and record["version"] == 2
    assert {d: r["status"] for d, r in record["datasets"].items()} == {"demo_00": "complete", "demo_01": "complete"}
    pd.testing.assert_frame_equal(snapshot(store)["X"], before["X"])


def test_a_pooled_gene_model_is_checked_once_per_dataset_as_the_served_model_checks_a_request(env, store):
    """A model with a pooled gene model (``finetune.gene_model``): the store run decides per
    dataset whether it joins (on a sample of the dataset: here every cell), records the verdict,
    and writes what the served model answers for the dataset's cells in one request."""
    import mlflow
    import torch

    from scpretrain_dist.evaluate.protocols import load_target
    from scpretrain_dist.serve.annotate import annotate_store, load_annotator
    from scpretrain_dist.serve.pyfunc import register_annotator
    from scpretrain_dist.tracking.registry import ModelFetch
    from scpretrain_dist.train.finetune import finetune, linear_gene_model

    target = load_target(store, "demo_00")
    res = finetune(target.X[:160], target.labels[:160], target.X[160:], target.labels[160:],
                   len(target.classes), env["cfg"].finetune, env["cfg"].model, 0)
    m = res.model
    m.gene_model, m.gene_model_weight = linear_gene_model(target.X[:160], target.labels[:160], len(target.classes)), 0.5
    with torch.no_grad():
        xv = torch.from_numpy(target.X[160:].toarray())
        m.gene_model_agreement = float((m.classify(m.encoder(xv)).argmax(1) == m.gene_model(xv).argmax(1)).float().mean())
    m.gene_model_val_cells = target.X.shape[0] - 160
    example = pd.DataFrame(np.expm1(target.X[:2].toarray()).round(0), columns=target.genes)
    with mlflow.start_run():
        register_annotator(m, target.genes, target.classes, example, {"finetune_dataset": "demo_00"}, "pooled", "champion")
    lines = []
    rep = annotate_store(env["cfg"], "models:/pooled/1", store.uri, block_size=100, workers=2, progress=False,
                         log=lines.append)
    annotator = load_annotator(ModelFetch("models:/pooled/1", env["cfg"].tracking_uri))
    assert annotator.model.pooled
    record = store.annotations()["scpretrain__pooled__v1"]["datasets"]
    obs = read_obs(store).set_index("soma_joinid")
    for d in ("demo_00", "demo_01"):
        rec = store.dataset(d)
        cols = np.flatnonzero(store.dataset_gene_mask(d))
        served = annotator.predict(pd.DataFrame(store.read_rows(rec.joinids)[:, cols].toarray(),
                                                columns=store.genes()[cols], index=rec.joinids))
        used = bool(served["gene_model"].all())
        assert served["gene_model"].nunique() == 1
        assert rep.gene_model[d] == record[d]["gene_model"]
        assert record[d]["gene_model"].startswith(f"gene model {'pooled' if used else 'left out'}: ")
        assert (f"{d}: gene model left out" in "\n".join(lines)) is not used
        rows = obs.loc[served.index]
        assert rows["scpretrain__pooled__v1__label"].tolist() == served["cell_type"].tolist()
        np.testing.assert_allclose(rows["scpretrain__pooled__v1__confidence"], served["confidence"], rtol=1e-4, atol=1e-5)
    assert rep.gene_model["demo_00"].startswith("gene model pooled"), rep.gene_model  # its own dataset


def test_second_model_gets_its_own_columns_and_first_stays(env, store):
    from scpretrain_dist.serve.annotate import annotate_store

    quiet = dict(progress=False, log=lambda m: None, workers=0, block_size=64)
    annotate_store(env["cfg"], f"models:/{MODEL}/1", store.uri, **quiet)
    first = read_obs(store)
    rep = annotate_store(env["cfg"], f"models:/{MODEL}/2", store.uri, datasets=["demo_01"], **quiet)
    assert rep.datasets == ["demo_01"] and rep.n_cells == 240
    obs = read_obs(store)
    pd.testing.assert_frame_equal(obs[first.columns], first)  # v1 columns exactly as they were
    assert obs.loc[obs["dataset_id"] == "demo_01", col(2, "label")].notna().all()
    assert obs.loc[obs["dataset_id"] == "demo_00", col(2, "label")].isna().all()
    # the two versions are different models: they disagree somewhere, so the columns are distinct
    assert (obs[col(1, "confidence")] != obs[col(2, "confidence")]).any()
    # the same version again: every block is already done, nothing is rewritten
    again = annotate_store(env["cfg"], f"models:/{MODEL}/1", store.uri, **quiet)
    assert again.blocks_computed == 0 and again.blocks_skipped == again.blocks_total == 8
    pd.testing.assert_frame_equal(read_obs(store), obs)


def test_ingest_after_annotation_then_annotate_only_the_new_dataset(env, store):
    from scpretrain_dist.serve.annotate import annotate_store

    quiet = dict(progress=False, log=lambda m: None, workers=0, block_size=100)
    annotate_store(env["cfg"], f"models:/{MODEL}/1", store.uri, **quiet)
    annotated = read_obs(store)
    rep = store.ingest(env["entries"][2:], log=lambda m: None)
    assert rep.added == ["demo_02"]
    obs = read_obs(store)
    new = obs[obs["dataset_id"] == "demo_02"]
    assert len(new) == 240 and new[col(1, "label")].isna().all() and new[col(1, "confidence")].isna().all()
    pd.testing.assert_frame_equal(obs.iloc[:480], annotated)
    assert len(store.read_obs("demo_02")) == 240
    seen = []
    rep = annotate_store(env["cfg"], f"models:/{MODEL}/1", store.uri, on_block=lambda r: seen.append(r.block), **quiet)
    assert {b.source.dataset for b in seen} == {"demo_02"} and rep.blocks_computed == 3
    obs = read_obs(store)
    assert obs[col(1, "label")].notna().all()
    pd.testing.assert_frame_equal(obs.iloc[:480], annotated)


def test_store_annotation_survives_a_killed_worker(env, store, cli):
    """A pool worker killed (SIGKILL, as a native crash or the OOM killer would) after the first
    block: it is restarted, its blocks run again, and the result is whole and exact."""
    import signal

    from scpretrain_dist.serve.annotate import annotate_store

    before = {a["ActorID"] for a in cli.job_actors("_BlockWorker")}
    killed: list = []

    def kill_one_worker(res):
        if killed:
            return
        alive = [a for a in cli.job_actors("_BlockWorker") if a["ActorID"] not in before and a["State"] == "ALIVE"]
        assert alive, "the run's pool workers are visible"
        os.kill(alive[0]["Pid"], signal.SIGKILL)
        killed.append(alive[0]["ActorID"])

    rep = annotate_store(env["cfg"], f"models:/{MODEL}/2", store.uri, block_size=40, workers=2,
                         on_block=kill_one_worker, progress=False, log=lambda m: None)
    assert killed
    assert rep.blocks_computed == 12 and rep.blocks_skipped == 0
    restarted = [a for a in cli.job_actors("_BlockWorker") if a["ActorID"] == killed[0]]
    assert restarted and restarted[0]["NumRestarts"] >= 1
    obs = read_obs(store)
    assert len(obs) == 480 and obs["soma_joinid"].is_unique
    for d in ("demo_00", "demo_01"):
        ref = reference_predictions(env, store, d, 2)
        assert obs.set_index("soma_joinid").loc[ref.index, col(2, "label")].tolist() == ref["cell_type"].tolist()


def test_worker_death_past_its_restarts_is_a_clear_error_and_the_rerun_resumes(env, store, cli):
    import dataclasses
    import signal

    from scpretrain_dist.serve.annotate import AnnotateError, annotate_store

    cfg = dataclasses.replace(env["cfg"], annotate=dataclasses.replace(env["cfg"].annotate, worker_restarts=0))
    before = {a["ActorID"] for a in cli.job_actors("_BlockWorker")}
    written: list = []

    def kill_one_worker(res):
        written.append(res.block.index)
        if len(written) == 1:
            alive = [a for a in cli.job_actors("_BlockWorker") if a["ActorID"] not in before and a["State"] == "ALIVE"]
            os.kill(alive[0]["Pid"], signal.SIGKILL)

    kw = dict(block_size=40, workers=2, progress=False, log=lambda m: None)
    with pytest.raises(AnnotateError, match=r"worker died after 0 restart.*rerun the same command to resume"):
        annotate_store(cfg, f"models:/{MODEL}/2", store.uri, on_block=kill_one_worker, **kw)
    assert read_obs(store)[col(2, "label")].notna().sum() == 40 * len(written)  # finished blocks kept
    rep = annotate_store(cfg, f"models:/{MODEL}/2", store.uri, **kw)
    assert rep.blocks_skipped == len(written) and rep.blocks_computed == 12 - len(written)
    assert read_obs(store)[col(2, "label")].notna().all()


def test_interrupted_store_run_resumes_without_redoing_or_duplicating(env, store):
    from scpretrain_dist.serve.annotate import annotate_store

    before = snapshot(store)
    kw = dict(embedding=True, block_size=40, workers=1, progress=False, log=lambda m: None)
    written: list = []

    def crash_after_five(res):
        written.append((res.block.source.dataset, res.block.index))
        if len(written) == 5:
            raise Interrupt("stop")

    with pytest.raises(Interrupt):
        annotate_store(env["cfg"], f"models:/{MODEL}/1", store.uri, on_block=crash_after_five, **kw)
    obs = read_obs(store)
    assert obs[col(1, "label")].notna().sum() == 5 * 40  # exactly the finished blocks, no more
    resumed: list = []
    rep = annotate_store(env["cfg"], f"models:/{MODEL}/1", store.uri,
                         on_block=lambda r: resumed.append((r.block.source.dataset, r.block.index)), **kw)
    assert rep.blocks_skipped == 5 and rep.blocks_computed == 7
    assert not set(written) & set(resumed), "a finished block was computed again"
    assert set(written) | set(resumed) == {(d, i) for d in ("demo_00", "demo_01") for i in range(6)}
    obs = read_obs(store)
    assert len(obs) == 480 and obs["soma_joinid"].is_unique and obs[col(1, "label")].notna().all()
    pd.testing.assert_frame_equal(obs[before["obs"].columns], before["obs"])
    for d in ("demo_00", "demo_01"):
        ref = reference_predictions(env, store, d, 1)
        assert obs.set_index("soma_joinid").loc[ref.index, col(1, "label")].tolist() == ref["cell_type"].tolist()
    import tiledbsoma as soma

    with soma.SparseNDArray.open(f"{store.uri}/ms/RNA/obsm/scpretrain__{MODEL}__v1") as A:
        t = A.read().tables().concat().to_pandas()
    assert len(t) == 480 * 200 and not t.duplicated(["soma_dim_0", "soma_dim_1"]).any()
    pd.testing.assert_frame_equal(snapshot(store)["X"], before["X"])


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_h5ad_in_place_interrupted_then_resumed(env, tmp_path, cli):
    import anndata as ad

    from scpretrain_dist.serve.annotate import annotate_h5ad, load_annotator
    from scpretrain_dist.tracking.registry import ModelFetch

    path = tmp_path / "query.h5ad"
    shutil.copy(env["demo"] / "demo_02.h5ad", path)
    original = ad.read_h5ad(path)
    digest = sha256(path)
    kw = dict(embedding=True, block_size=50, workers=1, progress=False, log=lambda m: None, in_place=True)
    written: list = []

    def crash_after_two(res):
        written.append(res.block.index)
        if len(written) == 2:
            raise Interrupt("stop")

    with pytest.raises(Interrupt):
        annotate_h5ad(env["cfg"], f"models:/{MODEL}@champion", path, on_block=crash_after_two, **kw)
    assert sha256(path) == digest, "the input must be untouched until every block is done"
    progress = tmp_path / "query.h5ad.annotate-progress"
    assert sorted(p.name for p in progress.glob("block_*.npz")) == [f"block_{i:06d}.npz" for i in sorted(written)]
    resumed: list = []
    rep = annotate_h5ad(env["cfg"], f"models:/{MODEL}@champion", path,
                        on_block=lambda r: resumed.append(r.block.index), **kw)
    assert rep.blocks_computed == 3 and rep.blocks_skipped == 2
    assert sorted(written + resumed) == [0, 1, 2, 3, 4]
    assert not progress.exists()
    out = ad.read_h5ad(path)
    assert (out.X != original.X).nnz == 0 and list(out.var_names) == list(original.var_names)
    pd.testing.assert_frame_equal(out.obs[original.obs.columns], original.obs)
    assert out.obsm["X_scpretrain"].shape == (240, 200)
    annotator = load_annotator(ModelFetch(f"models:/{MODEL}/2", env["cfg"].tracking_uri))
    ref = annotator.predict(original.to_df(), return_embedding=True)
    assert out.obs["scpretrain_label"].astype(str).tolist() == ref["cell_type"].tolist()
    assert isinstance(out.obs["scpretrain_label"].dtype, pd.CategoricalDtype)
    np.testing.assert_allclose(out.obs["scpretrain_confidence"], ref["confidence"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.obsm["X_scpretrain"], ref[[f"emb_{i}" for i in range(200)]], rtol=1e-4, atol=1e-5)
    assert out.uns["scpretrain_annotation"]["model_uri"] == f"models:/{MODEL}/2"


def run_cli(cli, env, *args):
    return cli.run(*args, "--work-dir", env["work"])


def test_cli_annotates_h5ad_to_out_and_refuses_to_clobber(env, tmp_path, cli):
    import anndata as ad

    src = env["demo"] / "demo_01.h5ad"
    digest = sha256(src)
    out = tmp_path / "annotated.h5ad"
    r = run_cli(cli, env, "annotate", "--model", f"models:/{MODEL}/1", "--h5ad", str(src), "--out", str(out),
                "--workers", "0", "--block-size", "100")
    assert r.returncode == 0, r.stderr
    assert "240 cells" in r.stdout and "obs.scpretrain_label" in r.stdout
    assert sha256(src) == digest
    a = ad.read_h5ad(out)
    assert a.obs["scpretrain_label"].notna().all() and "X_scpretrain" not in a.obsm
    r = run_cli(cli, env, "annotate", "--model", f"models:/{MODEL}/1", "--h5ad", str(out), "--workers", "0")
    assert r.returncode == 2 and "already has" in r.stderr and "--overwrite" in r.stderr


def test_a_new_process_fetches_the_model_beside_itself(env, tmp_path, cli):
    """`scpretrain annotate` as a user runs it (a new process, MLflow not loaded yet) resolves and
    downloads the model in a helper process while it loads torch and opens the file: the same
    calls as in this process, the registry's refusal as its error, a killed helper replaced by
    the process itself, and no model folder left in the temp dir in any case."""
    src = str(env["demo"] / "demo_01.h5ad")
    here = run_cli(cli, env, "annotate", "--model", f"models:/{MODEL}/1", "--h5ad", src, "--out",
                   str(tmp_path / "here.csv"), "--workers", "0")
    assert here.returncode == 0, here.stderr
    temp = tmp_path / "temp"
    temp.mkdir()

    def fresh(model: str, out: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "scpretrain_dist.cli", "annotate", "--model", model, "--h5ad", src,
                               "--out", str(out), "--workers", "0", "--work-dir", str(env["work"])],
                              capture_output=True, text=True, timeout=300, env=os.environ | {"TMPDIR": str(temp)})

    r = fresh(f"models:/{MODEL}/1", tmp_path / "fresh.csv")
    assert r.returncode == 0, r.stderr
    log = Path(re.search(r"full log: (\S+)", r.stdout).group(1)).read_text()
    assert f"fetching models:/{MODEL}/1 from {env['cfg'].tracking_uri} in a helper process" in log
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "fresh.csv"), pd.read_csv(tmp_path / "here.csv"))
    bad = fresh(f"models:/{MODEL}/9", tmp_path / "bad.csv")
    assert bad.returncode == 2 and f"model models:/{MODEL}/9 is not in the registry" in bad.stderr, bad.stderr
    assert not (tmp_path / "bad.csv").exists() and list(temp.iterdir()) == []
    # a helper killed before it answers: the model is fetched in the process itself
    code = ("import logging, multiprocessing, os, signal, sys\n"
            "from scpretrain_dist.tracking.registry import ModelFetch\n"
            "logging.basicConfig(level=logging.INFO)\n"
            "with ModelFetch(sys.argv[1], sys.argv[2]) as f:\n"
            "    [os.kill(c.pid, signal.SIGKILL) for c in multiprocessing.active_children()]\n"
            "    print(f.ref.uri, sorted(f.result()[1]))")
    killed = subprocess.run([sys.executable, "-c", code, f"models:/{MODEL}@champion", env["cfg"].tracking_uri],
                            capture_output=True, text=True, timeout=300, env=os.environ | {"TMPDIR": str(temp)})
    assert killed.returncode == 0 and killed.stdout.split("\n")[0] == f"models:/{MODEL}/2 ['meta', 'weights']", \
        killed.stderr
    assert "the model's helper process died" in killed.stderr
    assert list(temp.iterdir()) == []


def test_cli_writes_the_calls_as_a_table_without_copying_the_file(env, tmp_path, cli):
    """--out calls.csv / .tsv / .parquet: one row per cell in the input's order, keyed by obs name,
    the same calls as the annotated copy; the input unchanged, and one that already holds
    scpretrain_* entries needs no --overwrite (nothing of it is replaced)."""
    import anndata as ad

    copy = tmp_path / "annotated.h5ad"
    r = run_cli(cli, env, "annotate", "--model", f"models:/{MODEL}/1", "--h5ad", str(env["demo"] / "demo_01.h5ad"),
                "--out", str(copy), "--workers", "0", "--embedding")
    assert r.returncode == 0, r.stderr
    a = ad.read_h5ad(copy)
    digest = sha256(copy)
    for name, read in (("calls.csv", pd.read_csv), ("calls.tsv", lambda p: pd.read_csv(p, sep="\t")),
                       ("calls.parquet", pd.read_parquet)):
        extra = ["--embedding"] if name.endswith(".parquet") else []
        r = run_cli(cli, env, "annotate", "--model", f"models:/{MODEL}/1", "--h5ad", str(copy), "--out",
                    str(tmp_path / name), "--workers", "0", "--block-size", "100", *extra)
        assert r.returncode == 0, r.stderr
        t = read(tmp_path / name)
        assert t["cell"].astype(str).tolist() == a.obs_names.tolist()
        assert t["scpretrain_label"].astype(str).tolist() == a.obs["scpretrain_label"].astype(str).tolist()
        np.testing.assert_allclose(t["scpretrain_confidence"], a.obs["scpretrain_confidence"], rtol=1e-6)
        emb = [c for c in t.columns if c.startswith("X_scpretrain_")]
        if extra:
            np.testing.assert_allclose(t[emb].to_numpy(), a.obsm["X_scpretrain"], rtol=1e-6)
        else:
            assert not emb
    assert sha256(copy) == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["annotated.h5ad", "calls.csv", "calls.parquet", "calls.tsv"]


def test_cli_markers_of_a_registered_model(env, tmp_path, cli):
    import anndata as ad

    src = env["demo"] / "demo_01.h5ad"
    out = tmp_path / "markers.json"
    r = run_cli(cli, env, "markers", "--model", f"models:/{MODEL}/1", "--h5ad", str(src), "--top", "5", "--json", str(out))
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())["markers"]
    genes = {g.upper() for g in ad.read_h5ad(src, backed="r").var_names}
    assert report and sum(m["cells"] for m in report.values()) == 240
    for m in report.values():
        assert len(m["genes"]) == 5 and {g for g, _ in m["genes"]} <= genes
        scores = [s for _, s in m["genes"]]
        assert scores == sorted(scores, reverse=True)
    # too few of the model's genes: a clear error, exit 2
    small = ad.read_h5ad(src)[:, :3].copy()
    small.write_h5ad(tmp_path / "three_genes.h5ad")
    r = run_cli(cli, env, "markers", "--model", f"models:/{MODEL}/1", "--h5ad", str(tmp_path / "three_genes.h5ad"))
    assert r.returncode == 2 and "of the model's" in r.stderr


def test_bad_inputs_give_clear_errors_and_leave_everything_unchanged(env, store, tmp_path, cli):
    import anndata as ad
    import scipy.sparse as sp

    from scpretrain_dist.catalog.entries import DatasetEntry
    from scpretrain_dist.serve.annotate import AnnotateError, annotate_h5ad, annotate_store
    from scpretrain_dist.store import StoreError
    from scpretrain_dist.tracking.registry import RegistryError

    cfg = env["cfg"]
    quiet = dict(progress=False, log=lambda m: None, workers=0)
    # a dataset whose genes the model hardly knows (2 atlas genes, enough for ingest to accept it)
    odd = tmp_path / "odd.h5ad"
    X = sp.random(30, 40, density=0.3, format="csr", dtype=np.float32, random_state=0) * 10
    X = sp.csr_matrix(np.round(X.toarray()) + 1)
    ad.AnnData(X=X, var=pd.DataFrame(index=[*store.genes()[:2], *(f"OTHER{i}" for i in range(38))])).write_h5ad(odd)
    store.ingest([DatasetEntry(name="odd", path=str(odd))], log=lambda m: None)
    before = snapshot(store)

    with pytest.raises(RegistryError, match="not in the registry") as e:
        annotate_store(cfg, "models:/no-such-model@champion", store.uri, **quiet)
    assert "models:/annot" in str(e.value)  # lists what is there
    with pytest.raises(RegistryError, match="NAME@ALIAS"):
        annotate_store(cfg, "runs:/abc/annotator", store.uri, **quiet)
    with pytest.raises(StoreError, match="not in the atlas") as e:
        annotate_store(cfg, f"models:/{MODEL}/1", store.uri, datasets=["demo_00", "nope"], **quiet)
    assert "demo_00" in str(e.value) and "'nope'" in str(e.value)
    with pytest.raises(AnnotateError, match=r"dataset odd: only \d of the model's"):
        annotate_store(cfg, f"models:/{MODEL}/1", store.uri, **quiet)  # demo_00/01 fine, odd is not
    assert_unchanged(snapshot(store), before)

    digest = sha256(odd)
    with pytest.raises(AnnotateError, match=r"odd.h5ad: only \d of the model's .* gene symbols"):
        annotate_h5ad(cfg, f"models:/{MODEL}/1", odd, **quiet)
    assert sha256(odd) == digest and not (tmp_path / "odd.h5ad.annotate-progress").exists()

    # a bad value far into a file (past the cells checked up front): the run stops at that block
    demo = ad.read_h5ad(env["demo"] / "demo_02.h5ad")
    big = ad.concat([demo] * 11, index_unique="-", keys=[str(i) for i in range(11)])
    big.X = sp.csr_matrix(big.X)
    big.X.data[-1] = -3.0
    late = tmp_path / "late.h5ad"
    big.write_h5ad(late)
    digest = sha256(late)
    with pytest.raises(AnnotateError, match=r"late.h5ad, cells 2000..2639: .*negative"):
        annotate_h5ad(cfg, f"models:/{MODEL}/1", late, block_size=1000, **quiet)
    assert sha256(late) == digest

    # columns of this version's name that no annotation record accounts for: refused, untouched
    store.add_annotation_columns(col(1, "label"), col(1, "confidence"), None, 1, 0)
    before = snapshot(store)
    with pytest.raises(AnnotateError, match="refusing to overwrite"):
        annotate_store(cfg, f"models:/{MODEL}/1", store.uri, datasets=["demo_00"], **quiet)
    assert_unchanged(snapshot(store), before)

    r = run_cli(cli, env, "annotate", "--model", "models:/no-such-model@champion", "--store-uri", store.uri)
    assert r.returncode == 2 and "not in the registry" in r.stderr and "Traceback" not in r.stderr


def test_registered_versions_carry_signature_example_and_lineage(env, cli):
    import mlflow

    info = mlflow.models.get_model_info(f"models:/{MODEL}/1")
    assert info.signature is not None and info.signature.params is not None
    assert info.saved_input_example_info is not None
    r = run_cli(cli, env, "models", "list")
    assert r.returncode == 0, r.stderr
    assert f"models:/{MODEL}/2  aliases=['champion']" in r.stdout
    assert "fine-tuned on demo_00" in r.stdout and "signature: yes; input example: yes" in r.stdout
    assert "val_accuracy" in r.stdout and "pseudo-labels vnone" in r.stdout
    assert json.loads(mlflow.MlflowClient().get_model_version(MODEL, "1").tags["pretrain_datasets"]) == []
