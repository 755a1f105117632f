"""The streamed demo atlas through the rest of the pipeline on a real local Ray: pseudo-labels
on its datasets track the cell types it was generated with, and 2 Ray Train workers pretrain
with ``pretrain.loader = "stream"`` and sparse row updates (the default), their replicas identical
after every step."""

from __future__ import annotations

import math

import numpy as np
import pytest

from scpretrain_dist import recipes
from scpretrain_dist.config import DemoDataConfig, resolve
from scpretrain_dist.demo import write_demo_store
from scpretrain_dist.store import open_atlas

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def streamed_atlas(tmp_path_factory, ray_session):
    work = tmp_path_factory.mktemp("ldr")
    demo = DemoDataConfig(n_cells=2400, n_datasets=3, n_genes=500, n_types=4, markers_per_type=15, seed=2)
    write_demo_store(demo, work / "atlas.soma", log=lambda m: None)
    cfg = resolve(recipes.tiny(), overrides=[f'work_dir="{work}"', "pseudolabel.niter=8",
                                             'pseudolabel.phase1_space="pca"'])
    return cfg, open_atlas(work / "atlas.soma")


def test_streamed_atlas_pseudo_labels_and_stream_loader_pretraining(streamed_atlas):
    from sklearn.metrics import normalized_mutual_info_score

    from scpretrain_dist.pseudolabel.pool import refresh_pseudo_labels
    from scpretrain_dist.train.pretrain import load_encoder, loop_config, train_iterations

    cfg, store = streamed_atlas
    cfg = resolve(cfg, overrides=["pretrain.epochs=3", "pretrain.num_workers=2", "pretrain.batch_size=64",
                                  'pretrain.loader="stream"', "stream.chunk_cells=32", "stream.buffer_cells=512",
                                  "model.embedding_dim=32"])
    locator = store.locator.pinned()
    datasets = [r.name for r in store.datasets()]
    labels = refresh_pseudo_labels(locator, datasets, cfg.pseudolabel, 0)
    for d in datasets:  # the registry entries serve the pipeline as ingested ones do
        truth = store.read_obs(d)["cell_type"].to_numpy()
        coarsest = labels.labels[d][:, int(np.argmin(labels.ks[d]))]
        assert normalized_mutual_info_score(truth, coarsest) > 0.3
    path = labels.save(f"{cfg.work_dir}/labels.npz")
    n_genes = len(store.genes())
    worker_cfg = loop_config(cfg, locator, datasets, path, n_genes, final_eval=True, check_replicas=True)
    assert worker_cfg.pretrain.loader == "stream" and worker_cfg.stream.buffer_cells == 512
    assert worker_cfg.pretrain.sparse_updates
    ckpt, epochs = train_iterations(cfg, worker_cfg, "stream-test")
    last = epochs[-1]
    assert last["replica_max_diff"] == 0.0  # both workers hold the same model after every step
    assert len(last["peak_rss_mib_per_worker"]) == 2 and min(last["peak_rss_mib_per_worker"]) > 0
    uniform = sum(math.log(k) for k in labels.ks[datasets[0]])
    assert last["final_eval_loss"] < uniform
    enc = load_encoder(f"{ckpt}/encoder.pt")
    assert enc["weight"].shape == (n_genes, 32) and np.isfinite(enc["weight"]).all()


def test_a_bad_loader_setting_is_refused_before_workers_start(streamed_atlas):
    from scpretrain_dist.config import ConfigError

    cfg, store = streamed_atlas
    # refused when the settings are built, so no worker can ever receive them
    for override, match in [('pretrain.loader="disk"', "pretrain.loader"), ("stream.chunk_cells=0", "chunk_cells")]:
        with pytest.raises(ConfigError, match=match):
            resolve(cfg, overrides=[override])
