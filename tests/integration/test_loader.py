"""The atlas-scale path on real stores in tmp_path: demo data streamed into SOMA and zarr, the
streaming loader's guarantees (equal steps, disjoint complete shards, mixed batches, exact
normalisation, same batches from both backends, the shard cache) and its refusals."""

from __future__ import annotations

import json
import pickle
import time
from dataclasses import replace

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scpretrain_dist.config import ConfigError, DemoDataConfig
from scpretrain_dist.data.loader import StreamingCells
from scpretrain_dist.data.normalize import normalize_rows
from scpretrain_dist.demo import (
    dataset_model,
    demo_datasets,
    plan_atlas,
    simulate_chunk,
    write_demo_store,
)
from scpretrain_dist.store import StoreError, open_atlas
from scpretrain_dist.store.atlas import StreamedDataset, copy_atlas
from scpretrain_dist.store.zarr_csr import ZarrLocator

CFG = DemoDataConfig(n_cells=3000, n_datasets=5, n_genes=400, n_types=4, markers_per_type=10, seed=1)


def _quiet(_msg):
    pass


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    root = tmp_path_factory.mktemp("atlas")
    uri = root / "atlas.soma"
    report = write_demo_store(CFG, uri, log=_quiet)
    assert len(report.added) == CFG.n_datasets
    return open_atlas(uri)


@pytest.fixture(scope="module")
def zarr_atlas(tmp_path_factory):
    uri = tmp_path_factory.mktemp("zarr") / "atlas.zarr"
    write_demo_store(CFG, uri, fmt="zarr", log=_quiet)
    return ZarrLocator(str(uri))


def _names(store):
    return [r.name for r in store.datasets()]


def _dense(batch, n_genes):
    x = batch.x
    out = np.zeros((len(x), n_genes), dtype=np.float32)
    counts = np.diff(np.append(x.offsets.numpy(), len(x.indices)))
    out[np.repeat(np.arange(len(x)), counts), x.indices.numpy()] = x.values.numpy()
    return out


def _entropy(codes, n):
    p = np.bincount(codes, minlength=n) / len(codes)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


# ---------------------------------------------------------------------------- demo data


def test_demo_store_has_the_asked_cells_genes_sparsity_and_registry(atlas):
    records = atlas.datasets()
    plan = plan_atlas(CFG)
    assert [r.name for r in records] == list(plan.names)
    assert sum(r.n_cells for r in records) == CFG.n_cells
    assert [r.n_cells for r in records] == plan.sizes.tolist()
    assert max(r.n_cells for r in records) > 2 * min(r.n_cells for r in records), "uneven sizes"
    assert [r.joinid_start for r in records] == np.concatenate([[0], np.cumsum(plan.sizes)[:-1]]).tolist()
    genes = atlas.genes()
    assert len(genes) == CFG.n_genes and len(set(genes)) == CFG.n_genes
    for rec in records:
        assert rec.value_type == "counts" and rec.label_key == "cell_type" and rec.sha256
        mask = atlas.dataset_gene_mask(rec.name)
        assert mask.sum() == rec.n_genes == round(CFG.genes_kept * CFG.n_genes)
        raw, obs = atlas.read_dataset(rec.name)
        assert raw.shape == (rec.n_cells, CFG.n_genes)
        assert not raw[:, ~mask].nnz, "values only in the dataset's measured genes"
        nnz = np.diff(raw.indptr)
        assert nnz.min() >= 20 and 100 <= np.median(nnz) <= 400, "sparse: hundreds of genes of 400"
        assert (obs["dataset_id"] == rec.name).all()
        assert rec.n_types == obs["cell_type"].nunique() >= 2
        assert obs["obs_id"].iloc[7] == f"{rec.name}:c{7:07d}", "obs ids decode to dataset and cell"


def test_demo_values_and_labels_regenerate_from_the_seed(atlas):
    """A cell's values decode from where it sits: its dataset's chunk, regenerated alone."""
    plan = plan_atlas(CFG)
    d = int(np.argmax(plan.sizes))
    rec = atlas.dataset(plan.names[d])
    labels, X = simulate_chunk(plan, dataset_model(plan, d), 0)
    n = min(X.shape[0], rec.n_cells)
    raw = atlas.read_rows(rec.joinids[:n])
    np.testing.assert_array_equal(raw.toarray(), X[:n].toarray())
    obs = atlas.read_obs(rec.name)
    np.testing.assert_array_equal(obs["cell_type"].to_numpy()[:n], plan.type_names()[labels[:n]])


def test_demo_data_rerun_is_a_noop_and_other_content_is_refused(atlas, helpers_snapshot):
    before = helpers_snapshot(atlas)
    report = write_demo_store(CFG, atlas.uri, log=_quiet)
    assert report.added == [] and len(report.skipped) == CFG.n_datasets
    with pytest.raises(StoreError, match="other content"):
        write_demo_store(replace(CFG, seed=2), atlas.uri, log=_quiet)
    assert helpers_snapshot(atlas) == before


def test_a_failed_streamed_append_leaves_the_store_as_it_was(tmp_path):
    uri = tmp_path / "atlas.soma"
    small = replace(CFG, n_cells=600, n_datasets=2)
    write_demo_store(small, uri, log=_quiet)
    store = open_atlas(uri)
    records_before = store.datasets()
    genes = store.genes()
    good = demo_datasets(plan_atlas(replace(small, seed=9)))[1][0]

    def broken():
        yield from good.blocks()
        raise RuntimeError("disk full")  # after every cell is written, before the commit

    bad = StreamedDataset(name="extra", n_cells=good.n_cells, gene_mask=good.gene_mask, blocks=broken, sha256="x")
    with pytest.raises(RuntimeError, match="disk full"):
        store.append_streamed(genes, [bad], log=_quiet)
    assert store.datasets() == records_before, "the registry is the commit marker: nothing changed"
    # the next append overwrites what the failed one left behind
    ok = replace(good, name="extra")
    store.append_streamed(genes, [ok], log=_quiet)
    rec = store.dataset("extra")
    assert rec.joinid_start == sum(r.n_cells for r in records_before)
    expected = sp.vstack([b[2] for b in ok.blocks()]).toarray()
    got = store.read_rows(rec.joinids).toarray()
    np.testing.assert_array_equal(got, expected)
    with pytest.raises(StoreError, match="gene space"):
        store.append_streamed(genes[::-1], [replace(ok, name="extra2")], log=_quiet)


@pytest.fixture
def helpers_snapshot():
    def snap(store):
        import tiledbsoma as soma

        with soma.Experiment.open(store.uri) as exp:
            n = exp.ms["RNA"].X["counts"].read().tables().concat().num_rows
            meta = {k: v for k, v in exp.metadata.items() if str(k).startswith("scpretrain.")}
        return {"records": store.datasets(), "nnz": n, "meta": meta}

    return snap


# ---------------------------------------------------------------------------- loader guarantees


@pytest.mark.parametrize("datasets", [None, ["demo_03"], ["demo_04", "demo_00"]])
@pytest.mark.parametrize("world", [1, 2, 3, 7, 16])
def test_every_rank_runs_the_same_number_of_steps(atlas, datasets, world):
    names = datasets or _names(atlas)
    n = sum(atlas.dataset(d).n_cells for d in names)
    bs = 8
    if -(-n // world) < bs:  # fewer cells per rank than a batch: zero steps would hang DDP
        with pytest.raises(ConfigError, match="larger than the"):
            StreamingCells(atlas.locator, names, bs, seed=3, rank=0, world=world)
        return
    lengths = []
    for rank in range(world):
        ds = StreamingCells(atlas.locator, names, bs, seed=3, rank=rank, world=world, chunk_cells=8,
                            buffer_cells=256)
        lengths.append(len(ds))
        if rank in (0, world - 1):  # iterating checks the count (a mismatch raises)
            batches = list(ds.epoch_batches(0))
            assert len(batches) == len(ds) and all(len(b) == bs for b in batches)
    assert lengths == [(-(-n // world)) // bs] * world


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_are_disjoint_and_every_cell_is_seen_once_per_epoch(atlas, world):
    names = _names(atlas)
    n = CFG.n_cells
    per_rank = -(-n // world)
    bs = next(b for b in range(40, 0, -1) if per_rank % b == 0)  # whole batches: nothing dropped
    for epoch in (0, 1):
        seen = []
        for rank in range(world):
            ds = StreamingCells(atlas.locator, names, bs, seed=7, rank=rank, world=world, chunk_cells=16,
                                buffer_cells=10 * bs)
            ids = np.concatenate([b.joinids for b in ds.epoch_batches(epoch)])
            assert len(ids) == per_rank and len(np.unique(ids)) == len(ids)
            np.testing.assert_array_equal(np.sort(ids), np.sort(atlas_joinids_of(ds, ds.shard_positions())))
            seen.append(ids)
        counts = np.bincount(np.concatenate(seen), minlength=n)
        assert (counts >= 1).all(), "every cell once per epoch"
        assert counts.sum() - n == per_rank * world - n, "repeats only the padding"


def atlas_joinids_of(ds, positions):
    return ds.joinids_of(positions)


def test_short_last_batch_only_without_ddp(atlas):
    names = _names(atlas)
    ds = StreamingCells(atlas.locator, names, 64, seed=0, rank=0, world=1, drop_last=False, chunk_cells=32,
                        buffer_cells=640)
    sizes = [len(b) for b in ds.epoch_batches(0)]
    assert sizes[:-1] == [64] * (len(sizes) - 1) and sizes[-1] == CFG.n_cells - 64 * (len(sizes) - 1)
    ids = np.concatenate([b.joinids for b in ds.epoch_batches(1)])
    assert np.array_equal(np.sort(ids), np.arange(CFG.n_cells))


def test_batches_mix_datasets(atlas):
    names = _names(atlas)
    sizes = np.array([atlas.dataset(d).n_cells for d in names])
    origin = np.random.default_rng(0).permutation(np.repeat(np.arange(len(names)), sizes))
    bs = 64
    uniform = np.mean([_entropy(origin[i : i + bs], len(names)) for i in range(0, len(origin) - bs, bs)])
    ds = StreamingCells(atlas.locator, names, bs, seed=0, rank=0, world=1, chunk_cells=16, buffer_cells=1024)
    ours = np.mean([_entropy(b.dataset_idx.numpy(), len(names)) for b in ds.epoch_batches(0)])
    assert ours / uniform > 0.9
    # a buffer of one chunk cannot mix: the measure is able to fail
    ds = StreamingCells(atlas.locator, names, bs, seed=0, rank=0, world=1, chunk_cells=256, buffer_cells=256)
    poor = np.mean([_entropy(b.dataset_idx.numpy(), len(names)) for b in ds.epoch_batches(0)])
    assert poor / uniform < 0.5


def test_values_are_exactly_normalize_rows_of_the_same_cells(atlas):
    names = ["demo_02", "demo_00", "demo_04"]
    ds = StreamingCells(atlas.locator, names, 50, seed=2, rank=1, world=2, chunk_cells=20, buffer_cells=500)
    n_checked = 0
    for b in ds.epoch_batches(0):
        raw = atlas.read_rows(b.joinids)
        np.testing.assert_array_equal(_dense(b, ds.n_genes), normalize_rows(raw, "counts").toarray())
        d = b.dataset_idx.numpy()
        starts = np.array([atlas.dataset(names[i]).joinid_start for i in d])
        sizes = np.array([atlas.dataset(names[i]).n_cells for i in d])
        assert ((b.joinids >= starts) & (b.joinids < starts + sizes)).all(), "dataset index of each cell"
        n_checked += 1
    assert n_checked == len(ds)


def test_labels_travel_with_their_cells(atlas):
    names = _names(atlas)
    labels = np.stack([np.arange(CFG.n_cells), np.arange(CFG.n_cells) % 7], 1)  # position-coded
    ds = StreamingCells(atlas.locator, names, 32, seed=1, rank=0, world=2, labels=labels, chunk_cells=16,
                        buffer_cells=320)
    for x, didx, lab in ds.batches(32, 1, epoch=0):
        assert lab.shape == (len(x), 2) and len(didx) == len(x)
        np.testing.assert_array_equal(lab[:, 1].numpy(), lab[:, 0].numpy() % 7)
    b = next(iter(ds.epoch_batches(3)))
    np.testing.assert_array_equal(b.labels[:, 0].numpy(), b.joinids)  # position == joinid here


def test_zarr_gives_the_same_batches_as_soma(atlas, zarr_atlas, tmp_path):
    exported = ZarrLocator(str(tmp_path / "exported.zarr"))
    copy_atlas(atlas.locator.pinned().atlas(), exported.uri, log=_quiet)
    names = ["demo_01", "demo_03", "demo_04"]
    kw = dict(rank=1, world=2, chunk_cells=24, buffer_cells=480)
    soma_ds = StreamingCells(atlas.locator, names, 40, 5, **kw)
    for loc in (zarr_atlas, exported):
        z = loc.atlas()
        assert [(r.name, r.n_cells, r.n_genes) for r in z.datasets()] == [
            (r.name, r.n_cells, r.n_genes) for r in atlas.datasets()]
        assert list(z.genes()) == list(atlas.genes())
        zarr_ds = StreamingCells(loc, names, 40, 5, **kw)
        assert len(zarr_ds) == len(soma_ds)
        for a, b in zip(soma_ds.epoch_batches(2), zarr_ds.epoch_batches(2), strict=True):
            np.testing.assert_array_equal(a.joinids, b.joinids)
            np.testing.assert_array_equal(a.x.indices.numpy(), b.x.indices.numpy())
            np.testing.assert_array_equal(a.x.offsets.numpy(), b.x.offsets.numpy())
            np.testing.assert_array_equal(a.x.values.numpy(), b.x.values.numpy())
            np.testing.assert_array_equal(a.dataset_idx.numpy(), b.dataset_idx.numpy())


def test_shard_cache_serves_later_epochs_when_it_fits(atlas):
    names = _names(atlas)
    kw = dict(rank=0, world=2, chunk_cells=16, buffer_cells=256)
    streamed = StreamingCells(atlas.locator, names, 32, 4, **kw)
    cached = StreamingCells(atlas.locator, names, 32, 4, cache_bytes=1 << 30, **kw)
    first_s, first_c = list(streamed.epoch_batches(0)), list(cached.epoch_batches(0))
    assert cached.cached and not streamed.cached
    for a, b in zip(first_s, first_c, strict=True):  # the filling epoch is the streamed one
        np.testing.assert_array_equal(a.joinids, b.joinids)
    shard = set(cached.joinids_of(cached.shard_positions()).tolist())
    for epoch in (1, 2):
        batches = list(cached.epoch_batches(epoch))
        assert len(batches) == len(cached)
        ids = np.concatenate([b.joinids for b in batches])
        assert len(np.unique(ids)) == len(ids) and set(ids.tolist()) <= shard
        b = batches[3]
        raw = atlas.read_rows(b.joinids)
        np.testing.assert_array_equal(_dense(b, cached.n_genes), normalize_rows(raw, "counts").toarray())
    too_small = StreamingCells(atlas.locator, names, 32, 4, cache_bytes=10_000, **kw)
    list(too_small.epoch_batches(0))
    assert not too_small.cached, "a shard over budget keeps streaming"
    assert len(list(too_small.epoch_batches(1))) == len(too_small)


def test_loader_pickles_without_its_handles(atlas):
    names = _names(atlas)
    ds = StreamingCells(atlas.locator, names, 32, 4, rank=0, world=1, chunk_cells=16, buffer_cells=256)
    first = next(iter(ds.epoch_batches(0)))
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.locator.timestamp_ms is not None, "pinned to one version of the store"
    np.testing.assert_array_equal(next(iter(clone.epoch_batches(0))).joinids, first.joinids)


def test_stopping_early_releases_the_reader(atlas):
    names = _names(atlas)
    ds = StreamingCells(atlas.locator, names, 16, 4, rank=0, world=1, chunk_cells=8, buffer_cells=64)
    for _ in range(3):
        it = ds.epoch_batches(0)
        next(it)
        it.close()  # the background thread stops and joins
    import threading

    assert not [t for t in threading.enumerate() if t.name == "scpretrain-loader-io"]


def test_close_stops_the_reader_of_an_unfinished_iterator(atlas):
    # an iterator stopped early and still referenced keeps its reader; closing the source under a
    # reader that is still reading corrupted the heap (the loader benchmark aborted now and then)
    import threading

    ds = StreamingCells(atlas.locator, _names(atlas), 16, 4, rank=0, world=1, chunk_cells=8, buffer_cells=64)
    it = ds.epoch_batches(0)
    next(it)
    time.sleep(1)  # the reader has read ahead and waits for a free slot
    assert [t for t in threading.enumerate() if t.name == "scpretrain-loader-io"]
    ds.close()
    assert not [t for t in threading.enumerate() if t.name == "scpretrain-loader-io"]
    assert ds._source is None
    it.close()  # the iterator's own clean-up after close() is harmless


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=0), "batch size must be an integer >= 1"),
    (dict(batch_size=-4), "batch size"),
    (dict(batch_size=2.5), "batch size"),
    (dict(batch_size=True), "batch size"),
    (dict(world=2, rank=0, drop_last=False), "drop_last=False under DDP"),
    (dict(world=2, rank=2), "outside world size"),
    (dict(buffer_cells=8, batch_size=16), "at least one batch"),
    (dict(chunk_cells=512, buffer_cells=256), "at least one chunk"),
    (dict(batch_size=5000, buffer_cells=5000), "larger than the"),
    (dict(world=4, rank=0, batch_size=1000, buffer_cells=1000), "larger than the"),
    (dict(cache_bytes=-1), "cache_bytes"),
    (dict(seed=None), "seed"),
    (dict(labels=np.zeros((5, 2))), "labels have 5 rows"),
    (dict(datasets=[]), "at least one dataset"),
    (dict(datasets=["demo_00", "demo_00"]), "more than once"),
])
def test_loader_refuses_arguments_that_break_its_guarantees(atlas, kwargs, match):
    args = dict(datasets=_names(atlas), batch_size=16, seed=0, rank=0, world=1, chunk_cells=16, buffer_cells=256)
    args.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        StreamingCells(atlas.locator, args.pop("datasets"), args.pop("batch_size"), args.pop("seed"), **args)


def test_unknown_datasets_and_stores_are_named(atlas, tmp_path):
    with pytest.raises(StoreError, match="not in the atlas.*demo_00"):
        StreamingCells(atlas.locator, ["nope"], 16, 0, rank=0, world=1)
    with pytest.raises(StoreError, match="no atlas at .*missing.zarr"):
        StreamingCells(ZarrLocator(str(tmp_path / "missing.zarr")), ["demo_00"], 16, 0, rank=0, world=1)


def test_dataloader_workers_are_refused(atlas):
    ds = StreamingCells(atlas.locator, _names(atlas), 16, 0, rank=0, world=1, chunk_cells=16, buffer_cells=256)
    with pytest.raises(ConfigError, match="built for batch size 16 and seed 0"):
        next(iter(ds.batches(8, 0, 0)))
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    batches = iter(loader)
    try:
        with pytest.raises(Exception, match="num_workers=0 or 1"):
            next(batches)
    finally:
        batches._shutdown_workers()  # the other worker, at once (left to the collector, 10 s)


def test_cli_demo_data_and_export_errors_exit_2(tmp_path, atlas, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args, match in [
        (["demo-data", "--cells", "0"], "expected an integer >= 1"),
        (["demo-data", "--cells", "3", "--datasets", "4"], "at least one cell per dataset"),
        (["demo-data", "--cells", "100", "--out", "x"], "--out is for the .h5ad demo"),
        (["demo-data", "--store-uri", "x.soma"], "need --cells"),
        (["export", "zarr", str(tmp_path), "--store-uri", atlas.uri], "already exists"),
        (["export", "zarr", str(tmp_path / "z.zarr"), "--store-uri", str(tmp_path / "none.soma")], "no atlas"),
        (["bench", "loader", "--store-uri", atlas.uri, "--batch-size", "0", "--loaders", "ours"], "batch-size"),
        (["bench", "loader", "--store-uri", atlas.uri, "--loaders", "ours,annbatch", "--annbatch-python",
          str(tmp_path / "none" / "python")], "make annbatch-venv"),
        (["bench", "loader", "--store-uri", atlas.uri, "--loaders", "ours,petastorm"], "annbatch, scdataset"),
    ]:
        out = cli.run(*args, "--work-dir", str(tmp_path / "w"))
        assert out.returncode == 2, (args, out.stderr)
        assert match in out.stderr, (args, out.stderr)


def test_cli_demo_data_writes_a_zarr_atlas(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = cli.run("demo-data", "--cells", "500", "--datasets", "3", "--genes", "300", "--format", "zarr",
                  "--store-uri", str(tmp_path / "a.zarr"), "--set", "demo.markers_per_type=10")
    assert out.returncode == 0, out.stderr
    z = ZarrLocator(str(tmp_path / "a.zarr")).atlas()
    assert sum(r.n_cells for r in z.datasets()) == 500 and z.n_genes == 300
    X = z.read_rows(np.arange(500))
    assert X.shape == (500, 300) and X.nnz > 0


def test_bench_loader_runs_ours_on_a_small_store(tmp_path, atlas, cli):
    """Ours from the atlas, densified, and from a Census-schema experiment of the same cells."""
    out = cli.process("bench", "loader", "--store-uri", atlas.uri, "--loaders", "ours,ours_dense,ours_experiment",
                      "--batches", "5",
               "--warmup", "1", "--repeats", "1", "--batch-size", "32", "--set", "stream.chunk_cells=16",
               "--set", "stream.buffer_cells=256", "--json", str(tmp_path / "b.json"), cwd=tmp_path, check=False)
    assert out.returncode == 0, out.stderr
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["benchmark"] == "loader" and res["ours"] > 0
    assert 0.5 < res["shuffle_quality"]["ours"] <= 1.2 and res["peak_rss_mib"]["ours"] > 0
    assert res["store"]["n_cells"] == CFG.n_cells
    assert res["cells_per_s"]["ours_experiment"] > 0 and 0.5 < res["shuffle_quality"]["ours_experiment"] <= 1.2
    assert res["peer_layouts"]["experiment"]["mib"] > 0
    import tiledbsoma

    with tiledbsoma.Experiment.open(f"{atlas.uri}.census") as exp:  # Census's columns
        assert {"dataset_id"} <= set(exp.obs.keys()) and "feature_name" in exp.ms["RNA"].var.keys()
        assert set(exp.ms["RNA"].X.keys()) == {"raw"} and exp.obs.count == CFG.n_cells



def test_bench_kmeans_times_a_second_refresh_from_the_actors_cache(tmp_path, atlas, cli, ray_session):
    import ray

    # in this process, on the session's Ray, which the command leaves running
    out = cli.run("bench", "kmeans", "--store", atlas.uri, "--encoder", "random", "--peers", "faiss",
                  "--set", "pseudolabel.niter=5", "--gemm-size", "512", "--work-dir", str(tmp_path / "w"),
                  "--json", str(tmp_path / "k.json"))
    assert out.returncode == 0, out.stderr
    assert ray.is_initialized()
    res = json.loads((tmp_path / "k.json").read_text())
    later = res["ours_detail"]["later_refresh"]
    assert res["benchmark"] == "kmeans" and res["ours"] > 0 and later["seconds"] > 0
    assert res["what_is_clustered"]["ours"].startswith("embedding")
    assert later["datasets_from_actor_cache"] == CFG.n_datasets and later["labels_equal_first_refresh"]
    assert res["ratios"]["faiss_sequential_expression"] > 0
    assert 0 < res["targets"]["fraction_of_machine_matmul_rate_later_refreshes"] < 1
    iterations = res["ours_detail"]["lloyd_iterations"]
    assert len(iterations) == CFG.n_datasets and all(len(its) == 3 and all(1 <= i <= 5 for i in its)
                                                     for its in iterations.values())
    memory = res["actor_memory"]
    assert len(memory["peak_rss_mib"]) == 2 and min(memory["peak_rss_mib"]) > 0 and sum(memory["cached_mib"]) > 0
