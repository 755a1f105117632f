"""An existing SOMA experiment as the atlas, read in place: a CELLxGENE Census-schema
experiment the test builds itself (``tiledbsoma.io.from_anndata`` of the demo atlas with
Census's obs and var columns, ``X/raw``, the feature-dataset presence matrix and
``census_info/datasets`` beside it) is pretrained on, fine-tuned on, evaluated (lodo and
transfer) and annotated with an obs value filter, and not one of its files changes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scpretrain_dist.config import DemoDataConfig
from scpretrain_dist.demo import write_demo_atlas

pytestmark = pytest.mark.slow

FILTER = "is_primary_data == True and tissue_general == 'blood'"


def _census_like(root, demo_dir):
    """<root>/census_data/homo_sapiens (the experiment) and <root>/census_info/datasets: the demo
    datasets in one gene space, each dataset's measured genes in the presence matrix; demo_02 is
    lung tissue and demo_00's cells come twice (the copy not primary data), for the filter."""
    import anndata as ad
    import pandas as pd
    import pyarrow as pa
    import scipy.sparse as sp
    import tiledbsoma as soma
    import tiledbsoma.io

    files = sorted(demo_dir.glob("demo_*.h5ad"))
    parts = [ad.read_h5ad(f) for f in files]
    genes = sorted({g.upper() for a in parts for g in a.var_names})
    col = {g: i for i, g in enumerate(genes)}
    blocks, obs, presence = [], [], []
    for i, (f, a) in enumerate(zip(files, parts)):
        cols = np.array([col[g.upper()] for g in a.var_names])
        coo = sp.coo_matrix(a.X)
        X = sp.csr_matrix((coo.data, (coo.row, cols[coo.col])), shape=(a.n_obs, len(genes)), dtype=np.float32)
        copies = 2 if f.stem == "demo_00" else 1
        for c in range(copies):
            blocks.append(X)
            obs.append(pd.DataFrame({
                "dataset_id": f.stem, "cell_type": a.obs["cell_type"].astype(str).to_numpy(),
                "is_primary_data": c == 0, "tissue_general": "lung" if f.stem == "demo_02" else "blood",
                "assay": "10x 3' v3"}, index=[f"{f.stem}-{c}-{n}" for n in a.obs_names]))
        presence.append((i, cols))
    adata = ad.AnnData(sp.vstack(blocks).tocsr(), obs=pd.concat(obs),
                       var=pd.DataFrame({"feature_id": [f"ENSG{i:011d}" for i in range(len(genes))],
                                         "feature_name": genes}, index=[f"ENSG{i:011d}" for i in range(len(genes))]))
    exp_uri = root / "census_data" / "homo_sapiens"
    exp_uri.parent.mkdir(parents=True)
    tiledbsoma.io.from_anndata(str(exp_uri), adata, "RNA", X_layer_name="raw")
    rows = np.concatenate([np.full(len(c), i) for i, c in presence])
    with soma.SparseNDArray.create(str(exp_uri / "ms" / "RNA" / "feature_dataset_presence_matrix"),
                                   type=pa.bool_(), shape=(len(files), len(genes))) as P:
        P.write(pa.Table.from_pydict({"soma_dim_0": rows.astype(np.int64),
                                      "soma_dim_1": np.concatenate([c for _, c in presence]).astype(np.int64),
                                      "soma_data": np.ones(len(rows), dtype=bool)}))
    with soma.Experiment.open(str(exp_uri), "w") as exp:
        exp.ms["RNA"].set("feature_dataset_presence_matrix", P)
    (root / "census_info").mkdir()
    with soma.DataFrame.create(str(root / "census_info" / "datasets"), schema=pa.schema(
            [("soma_joinid", pa.int64()), ("dataset_id", pa.large_string())]), domain=[[0, len(files) - 1]]) as D:
        D.write(pa.table({"soma_joinid": np.arange(len(files), dtype=np.int64),
                          "dataset_id": pa.array([f.stem for f in files], pa.large_string())}))
    return exp_uri, {f.stem: a for f, a in zip(files, parts)}


@pytest.fixture(scope="module")
def census(tmp_path_factory):
    root = tmp_path_factory.mktemp("census")
    demo = DemoDataConfig(n_datasets=4, cells_per_dataset=400, n_genes=500, n_types=4, markers_per_type=15, seed=3)
    write_demo_atlas(root / "demo", demo)
    return _census_like(root / "census", root / "demo")


def test_a_census_schema_experiment_is_pretrained_on_and_annotated_in_place(census, cli, ray_session, tmp_path):
    exp_uri, files = census
    before = cli.digest(exp_uri.parent.parent)
    work = tmp_path / "work"
    store = ["--work-dir", work, "--set", "store.backend=experiment", "--set", f'store.uri="{exp_uri}"',
             "--set", f'store.value_filter="{FILTER}"']
    small = ["--set", "pretrain.iterations=2", "--set", "pretrain.epochs=2", "--set", "pretrain.num_workers=1",
             "--set", "finetune.seeds=[0]", "--set", "finetune.max_epochs=25",
             "--set", 'evaluate.methods=["scpretrain","logreg"]',
             "--set", "evaluate.budgets=[200]", "--set", "evaluate.cluster=false", "--set", "evaluate.figures=false"]

    r = cli.run("pretrain", *store, *small, "--exclude", "demo_03")
    assert r.returncode == 0, r.stderr
    [result] = (work / "pretrain").glob("*/result.json")
    res = json.loads(result.read_text())
    # the filter: demo_02 (lung) is gone, demo_00 counted once (its copy is not primary data)
    assert res["datasets"] == ["demo_00", "demo_01"]
    from scpretrain_dist import recipes
    from scpretrain_dist.config import resolve
    from scpretrain_dist.store.atlas import atlas_for

    cfg = resolve(recipes.get("tiny"), overrides=[f'work_dir="{work}"', "store.backend=\"experiment\"",
                                                  f'store.uri="{exp_uri}"', f'store.value_filter="{FILTER}"'])
    atlas = atlas_for(cfg)
    records = {r.name: r for r in atlas.datasets()}
    assert set(records) == {"demo_00", "demo_01", "demo_03"}
    assert records["demo_00"].n_cells == files["demo_00"].n_obs and records["demo_00"].value_type == "counts"
    # the measured genes come from the presence matrix, the values are the file's
    genes = atlas.genes()
    for name in ("demo_01", "demo_03"):
        assert set(genes[atlas.dataset_gene_mask(name)]) == {g.upper() for g in files[name].var_names}
        X = atlas.read_rows(records[name].joinids)
        cols = {g: i for i, g in enumerate(genes)}
        own = np.array([cols[g.upper()] for g in files[name].var_names])
        np.testing.assert_array_equal(X[:, own].toarray(), np.asarray(files[name].X.todense()))
    assert (atlas.read_obs("demo_03")["cell_type"].to_numpy() == files["demo_03"].obs["cell_type"].astype(str)).all()
    # the streaming loader reads it too: every filtered cell once per epoch
    from scpretrain_dist.data.loader import StreamingCells

    ds = StreamingCells(atlas.locator, ["demo_00", "demo_01"], 40, 0, rank=0, world=1, chunk_cells=20, buffer_cells=400)
    seen = np.concatenate([b.joinids for b in ds.epoch_batches(0)])
    assert sorted(seen.tolist()) == list(range(800))

    r = cli.run("finetune", "--target", "demo_03", "--pretrain-result", result, *store, *small)
    assert r.returncode == 0, r.stderr
    rows = json.loads((work / "report" / "report.json").read_text())["rows"]
    assert {row["method"] for row in rows} == {"scpretrain", "logreg"}
    assert min(row["accuracy"] for row in rows) > 0.8

    # both evaluation protocols on it, reusing the encoder pretrained without demo_03
    r = cli.run("evaluate", "--protocol", "lodo", "--targets", "demo_03", *store, *small)
    assert r.returncode == 0, r.stderr
    assert "reusing cached encoder" in r.stdout
    lodo = json.loads((work / "report_lodo" / "report.json").read_text())
    assert {row["method"] for row in lodo["rows"]} == {"scpretrain", "logreg"}
    assert min(row["accuracy"] for row in lodo["rows"]) > 0.8
    r = cli.run("evaluate", "--protocol", "transfer", "--references", "demo_01", "--queries", "demo_03", *store,
                *small, "--set", 'pretrain.exclude_datasets=["demo_03"]')
    assert r.returncode == 0, r.stderr
    assert "reusing cached encoder" in r.stdout
    transfer = json.loads((work / "report_transfer" / "report.json").read_text())
    assert {row["method"] for row in transfer["rows"]} >= {"scpretrain", "logreg"}
    assert min(row["accuracy"] for row in transfer["rows"] if row["method"] in ("scpretrain", "logreg")) > 0.8
    (split,) = transfer["splits"]
    assert len(split["test"]) == files["demo_03"].n_obs and all(c.startswith("demo_01") for c in split["train"])

    r = cli.run("annotate", "--model", "models:/scpretrain-annotator/1", "--store-uri", exp_uri, *store,
                "--datasets", "demo_03", "--workers", "0", "--embedding")
    assert r.returncode == 0, r.stderr
    import tiledbsoma as soma

    prefix = "scpretrain__scpretrain_annotator__v1"
    sidecar = work / "atlas-index" / "annotations" / prefix
    with soma.DataFrame.open(str(sidecar / "obs")) as df:
        ann = df.read().concat().to_pandas().set_index("soma_joinid")
    with soma.Experiment.open(str(exp_uri)) as exp:
        obs = exp.obs.read(column_names=["soma_joinid", "dataset_id", "cell_type"],
                           value_filter="dataset_id == 'demo_03'").concat().to_pandas().set_index("soma_joinid")
    assert sorted(ann.index) == sorted(obs.index)  # keyed by the experiment's own soma_joinid
    assert (ann.loc[obs.index, "label"] == obs["cell_type"]).mean() > 0.8
    assert ann["confidence"].between(0, 1).all()
    again = cli.run("annotate", "--model", "models:/scpretrain-annotator/1", "--store-uri", exp_uri, *store,
                    "--datasets", "demo_03", "--workers", "0", "--embedding")
    assert again.returncode == 0 and " 0 of " in again.stdout + again.stderr
    # nothing of the experiment (or the Census folder around it) was written
    assert cli.digest(exp_uri.parent.parent) == before

    # written back when asked, into an experiment of the user's own (a copy): two obs columns
    # and the embedding under obsm; every other obs value and X as they were
    import shutil

    import pandas as pd

    own = tmp_path / "own" / "homo_sapiens"
    shutil.copytree(exp_uri, own)

    def obs_of(uri):
        with soma.Experiment.open(str(uri)) as exp:
            return exp.obs.read().concat().to_pandas().sort_values("soma_joinid").reset_index(drop=True)

    obs_before, x_before = obs_of(own), cli.digest(own / "ms" / "RNA" / "X")
    back = ["--work-dir", work, "--set", "store.backend=experiment", "--set", f'store.uri="{own}"',
            "--set", f'store.value_filter="{FILTER}"', "--set", 'store.annotations="experiment"']
    annotate_own = ["annotate", "--model", "models:/scpretrain-annotator/1", "--store-uri", own, *back,
                    "--datasets", "demo_03", "--workers", "0", "--embedding", "--block-size", "150"]
    r = cli.run(*annotate_own)
    assert r.returncode == 0, r.stderr
    obs_after = obs_of(own)
    label, conf = f"{prefix}__label", f"{prefix}__confidence"
    assert sorted(obs_after.columns) == sorted([*obs_before.columns, label, conf])
    pd.testing.assert_frame_equal(obs_after[obs_before.columns], obs_before)
    mine = (obs_after["dataset_id"] == "demo_03").to_numpy()
    assert obs_after.loc[mine, label].tolist() == ann.loc[obs_after.loc[mine, "soma_joinid"], "label"].tolist()
    assert obs_after.loc[~mine, label].isna().all() and obs_after.loc[mine, conf].between(0, 1).all()
    with soma.Experiment.open(str(own)) as exp:
        emb = exp.ms["RNA"]["obsm"][prefix].read().tables().concat().to_pandas()
    assert set(emb["soma_dim_0"]) == set(obs_after.loc[mine, "soma_joinid"])
    assert cli.digest(own / "ms" / "RNA" / "X") == x_before
    again = cli.run(*annotate_own)
    assert again.returncode == 0 and " 0 of " in again.stdout + again.stderr
    assert obs_of(own).equals(obs_after)

    # what cannot be done in place is refused before any work, naming the fix
    r = cli.run("ingest", exp_uri.parents[2] / "demo" / "demo_00.h5ad", *store)
    assert r.returncode == 2 and "never written" in r.stderr and "store.backend" in r.stderr
    bad = cli.run("pretrain", "--work-dir", tmp_path / "w2", "--set", "store.backend=experiment",
                  "--set", f'store.uri="{exp_uri}"', "--set", 'store.label_column="celltype"')
    assert bad.returncode == 2 and "celltype" in bad.stderr and "store.label_column" in bad.stderr
    bad = cli.run("pretrain", "--work-dir", tmp_path / "w3", "--set", "store.backend=experiment",
                  "--set", f'store.uri="{exp_uri}"', "--set", "store.value_filter=\"tissue_general == 'brain'\"")
    assert bad.returncode == 2 and "passes store.value_filter" in bad.stderr
    assert cli.digest(exp_uri.parent.parent) == before
