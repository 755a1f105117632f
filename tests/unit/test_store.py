"""The atlas store on both backends (TileDB-SOMA and zarr): ingest, gene-space alignment,
normalisation, failure atomicity and pinned versions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scpretrain_dist.catalog import DatasetEntry
from scpretrain_dist.config import UserError
from scpretrain_dist.data.normalize import normalized_rows
from scpretrain_dist.store import StoreError, open_atlas


def _quiet(_msg):
    pass


@pytest.fixture(params=["soma", "zarr"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def demo_store(tmp_path, demo_entries, backend):
    """The three demo datasets ingested into a fresh atlas of each backend."""
    store = open_atlas(tmp_path / f"atlas.{backend}")
    store.ingest(demo_entries, log=_quiet)
    return store


def _file_matrix(helpers, path):
    adata = helpers.read_h5ad(path)
    X = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    return X.astype(np.float64), [str(g) for g in adata.var_names], adata


def _columns(store, genes):
    index = {g: i for i, g in enumerate(store.genes())}
    return np.array([index[g.upper()] for g in genes])


def _normalized(store, name):
    rec = store.dataset(name)
    return normalized_rows(store, rec.joinids, rec.value_type)


def _counts_file(helpers, path, n_cells=30, genes=None, seed=0, labels=True):
    rng = np.random.default_rng(seed)
    genes = genes if genes is not None else [f"GENE{i}" for i in range(12)]
    X = rng.poisson(2.0, (n_cells, len(genes))).astype(np.float32)
    X[:, 0] += 1  # no empty cell
    lab = rng.choice(["t1", "t2"], n_cells) if labels else None
    helpers.write_h5ad(path, sp.csr_matrix(X), genes, labels=lab)
    return X


# ---------------------------------------------------------------------------- gene space


def test_human_and_mouse_meet_in_one_upper_case_gene_space(demo_store, demo_entries, helpers):
    genes = list(demo_store.genes())
    assert all(g == g.upper() for g in genes)
    assert len(genes) == len(set(genes))
    union = set()
    for e in demo_entries:
        _, file_genes, _ = _file_matrix(helpers, e.path)
        union |= {g.upper() for g in file_genes}
    assert set(genes) == union
    records = {r.name: r for r in demo_store.datasets()}
    assert records["demo_01"].species == "mouse"
    assert records["demo_00"].species == "human"
    # the mouse dataset's title-case genes land on the same columns as the human upper-case ones
    _, mouse_genes, _ = _file_matrix(helpers, records["demo_01"].source)
    _, human_genes, _ = _file_matrix(helpers, records["demo_00"].source)
    assert any(g != g.upper() for g in mouse_genes)
    shared = {g.upper() for g in mouse_genes} & set(human_genes)
    assert shared
    mask0, mask1 = demo_store.dataset_gene_mask("demo_00"), demo_store.dataset_gene_mask("demo_01")
    assert (mask0 & mask1).sum() == len(shared)


def test_read_dataset_equals_log1p_cp10k_of_the_file(demo_store, helpers):
    for rec in demo_store.datasets():
        counts, genes, adata = _file_matrix(helpers, rec.source)
        cols = _columns(demo_store, genes)
        X = normalized_rows(demo_store, rec.joinids, rec.value_type).toarray()
        obs = demo_store.read_obs(rec.name)
        assert X.shape == (adata.n_obs, len(demo_store.genes()))
        np.testing.assert_allclose(X[:, cols], helpers.log1p_cp10k(counts), rtol=1e-6, atol=1e-6)  # float32 rounding
        others = np.setdiff1d(np.arange(X.shape[1]), cols)
        assert not X[:, others].any(), "genes the dataset never measured read as zero"
        # the stored values themselves are the file's, bit for bit
        raw, _ = demo_store.read_dataset(rec.name)
        np.testing.assert_array_equal(raw.toarray()[:, cols], counts.astype(np.float32))
        # cells come back in file order with their labels
        assert obs["obs_id"].tolist() == [f"{rec.name}:{o}" for o in adata.obs_names]
        assert obs["cell_type"].tolist() == adata.obs["cell_type"].astype(str).tolist()
        assert (obs["dataset_id"] == rec.name).all()
        assert rec.value_type == "counts"
        assert rec.n_cells == adata.n_obs and rec.n_genes == len(genes)
        assert rec.n_types == adata.obs["cell_type"].nunique()


def test_read_rows_keeps_request_order_and_repeats(demo_store):
    rec = demo_store.dataset("demo_02")
    ids = rec.joinids[[5, 0, 5, 17]]
    rows = demo_store.read_rows(ids).toarray()
    full, _ = demo_store.read_dataset("demo_02")
    np.testing.assert_array_equal(rows, full.toarray()[[5, 0, 5, 17]])


def test_reads_run_without_tiledbs_background_tile_merge():
    """Our read contexts and tiledbsoma's default one have TileDB's background tile-merge
    preprocessing off (a race in it crashed a process; scpretrain_dist/store/__init__.py)."""
    import tiledbsoma as soma

    from scpretrain_dist.store.soma import STREAM_READ_CONFIG, WHOLE_READ_CONFIG, _context

    key = "sm.query.sparse_global_order.preprocess_tile_merge"
    for context in (_context(STREAM_READ_CONFIG), _context(WHOLE_READ_CONFIG), soma.SOMATileDBContext()):
        assert context.native_context.config()[key] == "0"


def test_a_run_read_in_many_small_tables_equals_the_run_read_in_one(tmp_path, demo_entries, helpers):
    """A whole-dataset read arrives as several Arrow tables (cells split between two of them);
    the pieces are counted and copied table by table into one CSR."""
    from scpretrain_dist.store.soma import LAYER, MEASUREMENT
    from scpretrain_dist.store.sources import read_run

    demo_store = open_atlas(tmp_path / "atlas.soma")  # SOMA's read buffers
    demo_store.ingest(demo_entries, log=_quiet)

    rec = demo_store.dataset("demo_01")
    a, b = int(rec.joinids[0]), int(rec.joinids[-1]) + 1
    pieces = {}
    for name, buffer in (("small", 4096), ("large", 64 << 20)):
        with demo_store.locator.open({"soma.init_buffer_bytes": str(buffer)}) as exp:
            X = exp.ms[MEASUREMENT].X[LAYER]
            pieces[name] = (sum(t.num_rows > 0 for t in X.read(coords=(slice(a, b - 1),)).tables()),
                            read_run(X, a, b))
    tables, (ptr, cols, vals) = pieces["small"]
    assert tables > 2, "the small buffer must split the run into several tables"
    _, (ptr1, cols1, vals1) = pieces["large"]
    np.testing.assert_array_equal(ptr, ptr1)
    np.testing.assert_array_equal(cols, cols1)
    np.testing.assert_array_equal(vals, vals1)
    counts, _, _ = _file_matrix(helpers, rec.source)  # the file itself: its non-zeros per cell
    np.testing.assert_array_equal(np.diff(ptr), (np.asarray(counts) != 0).sum(1))
    assert cols.dtype == np.int32 and vals.dtype == np.float32 and vals.flags.writeable


def test_dataset_gene_mask_marks_exactly_that_datasets_genes(demo_store, demo_entries, helpers, tmp_path):
    extra = tmp_path / "extra.h5ad"
    _counts_file(helpers, extra, genes=["SYN00000", "NEWGENE1", "Newgene2"])
    demo_store.ingest([DatasetEntry("extra", str(extra))], log=_quiet)
    genes = demo_store.genes()
    assert {"NEWGENE1", "NEWGENE2"} <= set(genes)
    for name, path in [(e.name, e.path) for e in demo_entries] + [("extra", str(extra))]:
        _, file_genes, _ = _file_matrix(helpers, path)
        mask = demo_store.dataset_gene_mask(name)
        assert mask.dtype == bool and mask.shape == (len(genes),)
        np.testing.assert_array_equal(mask, np.isin(genes, [g.upper() for g in file_genes]))
        assert mask.sum() == demo_store.dataset(name).n_genes
    with pytest.raises(StoreError, match="nope"):
        demo_store.dataset_gene_mask("nope")


# ---------------------------------------------------------------------------- re-ingest


def test_reingesting_the_same_entries_is_a_noop(demo_store, demo_entries, helpers):
    before = helpers.store_snapshot(demo_store)
    logged = []
    report = demo_store.ingest(demo_entries, log=logged.append)
    assert report.added == []
    assert report.skipped == [e.name for e in demo_entries]
    assert len(logged) == len(demo_entries)
    assert all("already" in m for m in logged)
    assert report.messages == logged
    helpers.assert_same_snapshot(before, helpers.store_snapshot(demo_store))


def test_changed_file_under_the_same_name_is_refused(demo_store, demo_entries, helpers, copy_file):
    path = copy_file(demo_entries[0].path, "mine.h5ad")
    adata = helpers.read_h5ad(path)
    adata.X = adata.X * 3  # not the same content as demo_00, which is in the atlas already
    adata.write_h5ad(path)
    demo_store.ingest([DatasetEntry("mine", str(path))], log=_quiet)
    before = helpers.store_snapshot(demo_store)
    adata.X = adata.X * 2
    adata.write_h5ad(path)
    with pytest.raises(StoreError, match="mine"):
        demo_store.ingest([DatasetEntry("mine", str(path))], log=_quiet)
    helpers.assert_same_snapshot(before, helpers.store_snapshot(demo_store))


def test_duplicate_names_in_one_ingest_are_refused(tmp_path, helpers, backend):
    path = tmp_path / "a.h5ad"
    _counts_file(helpers, path)
    store = open_atlas(tmp_path / f"s.{backend}")
    with pytest.raises(StoreError, match="dup"):
        store.ingest([DatasetEntry("dup", str(path)), DatasetEntry("dup", str(path))], log=_quiet)
    assert not (tmp_path / f"s.{backend}").exists()  # refused before the atlas came into being


# ---------------------------------------------------------------------------- bad inputs


def _bad_nan(helpers, path):
    X = np.ones((5, 4), np.float32)
    X[2, 1] = np.nan
    helpers.write_h5ad(path, sp.csr_matrix(X), list("ABCD"))


def _bad_inf(helpers, path):
    X = np.ones((5, 4), np.float32)
    X[0, 0] = np.inf
    helpers.write_h5ad(path, X, list("ABCD"))


def _bad_negative(helpers, path):
    X = np.ones((5, 4), np.float32)
    X[3, 2] = -1.5
    helpers.write_h5ad(path, X, list("ABCD"))


def _bad_not_h5ad(helpers, path):
    path.write_text("cell,A,B\nc1,1,2\n")


def _bad_zero_cells(helpers, path):
    helpers.write_h5ad(path, np.zeros((0, 4), np.float32), list("ABCD"))


def _bad_zero_genes(helpers, path):
    helpers.write_h5ad(path, np.zeros((3, 0), np.float32), [])


def _bad_missing(helpers, path):
    pass  # never written


# kind -> (writer, what the message must say)
BAD = {
    "nan": (_bad_nan, "NaN"),
    "inf": (_bad_inf, "infinite"),
    "negative": (_bad_negative, "negative"),
    "not_h5ad": (_bad_not_h5ad, "not an HDF5 file"),
    "zero_cells": (_bad_zero_cells, "0 cells"),
    "zero_genes": (_bad_zero_genes, "0 genes"),
    "missing": (_bad_missing, "does not exist"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_input_raises_and_leaves_the_store_as_it_was(kind, demo_store, helpers, tmp_path):
    writer, reason = BAD[kind]
    path = tmp_path / f"input_{kind}.h5ad"  # the file name does not contain the dataset name
    writer(helpers, path)
    good = tmp_path / "good_new.h5ad"
    _counts_file(helpers, good, genes=["BRANDNEW1", "SYN00001"])
    before = helpers.store_snapshot(demo_store)
    name = f"bad_{kind}"
    with pytest.raises(UserError) as info:
        demo_store.ingest([DatasetEntry(name, str(path))], log=_quiet)
    assert f"dataset {name}" in str(info.value)
    assert reason in str(info.value)
    helpers.assert_same_snapshot(before, helpers.store_snapshot(demo_store))
    # a bad file next to a good one: nothing at all is written
    with pytest.raises(UserError, match=name):
        demo_store.ingest(
            [DatasetEntry("good_new", str(good)), DatasetEntry(name, str(path))], log=_quiet
        )
    helpers.assert_same_snapshot(before, helpers.store_snapshot(demo_store))
    # and the store still works afterwards
    demo_store.ingest([DatasetEntry("good_new", str(good))], log=_quiet)
    assert [r.name for r in demo_store.datasets()][-1] == "good_new"
    assert "BRANDNEW1" in set(demo_store.genes())


# ---------------------------------------------------------------------------- value types


def _scaled(counts, target):
    return counts / counts.sum(1, keepdims=True) * target


# how a processed version of the counts was made -> the value type ingest must detect
TRANSFORMS = {
    "ln_cp10k": (lambda c: np.log1p(_scaled(c, 1e4)), "lognorm"),
    "ln_cpm": (lambda c: np.log1p(_scaled(c, 1e6)), "lognorm"),
    "log2_cpm": (lambda c: np.log2(1 + _scaled(c, 1e6)), "log2norm"),
    "linear_cpm": (lambda c: _scaled(c, 1e6), "counts"),  # TPM-like: linear, not integer
}


@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_processed_dataset_is_detected_and_reads_back_like_counts(
    transform, tmp_path, helpers, demo_entries, backend
):
    fn, expected_type = TRANSFORMS[transform]
    counts, genes, adata = _file_matrix(helpers, demo_entries[0].path)
    values = fn(counts).astype(np.float32)
    if expected_type == "log2norm":
        assert values.max() > 14, "the fixture must be unambiguous log2 data"
    path = helpers.write_h5ad(
        tmp_path / "processed.h5ad",
        sp.csr_matrix(values),
        genes,
        labels=adata.obs["cell_type"].astype(str),
        obs_names=adata.obs_names,
    )
    store = open_atlas(tmp_path / f"s.{backend}")
    store.ingest([demo_entries[0], DatasetEntry("processed", str(path))], log=_quiet)
    assert store.dataset(demo_entries[0].name).value_type == "counts"
    assert store.dataset("processed").value_type == expected_type
    X_counts = _normalized(store, demo_entries[0].name)
    X_proc = _normalized(store, "processed")
    np.testing.assert_allclose(X_proc.toarray(), X_counts.toarray(), rtol=1e-4, atol=1e-4)
    # a mixed read (one value type per row) normalises each row by its own type
    ids = np.concatenate(
        [store.dataset("processed").joinids[:3], store.dataset(demo_entries[0].name).joinids[:3]]
    )
    types = np.array([expected_type] * 3 + ["counts"] * 3, dtype=object)
    mixed = normalized_rows(store, ids, types).toarray()
    np.testing.assert_allclose(mixed[:3], mixed[3:], rtol=1e-4, atol=1e-4)


def test_declared_value_type_overrides_detection(tmp_path, helpers, backend):
    path = tmp_path / "a.h5ad"
    X = np.log1p(_counts_file(helpers, path) * 1e5)  # natural-log values above log1p(1e6): detected as log2
    helpers.write_h5ad(path, sp.csr_matrix(X), [f"GENE{i}" for i in range(12)])
    store = open_atlas(tmp_path / f"s.{backend}")
    store.ingest([DatasetEntry("a", str(path), value_type="lognorm")], log=_quiet)
    assert store.dataset("a").value_type == "lognorm"


def test_genes_colliding_after_upper_casing_are_summed(tmp_path, helpers, backend):
    X = np.array([[1, 2, 3], [4, 0, 6]], np.float32)
    path = helpers.write_h5ad(tmp_path / "dup.h5ad", X, ["Actb", "ACTB", "Gapdh"])
    store = open_atlas(tmp_path / f"s.{backend}")
    store.ingest([DatasetEntry("dup", str(path))], log=_quiet)
    assert sorted(store.genes()) == ["ACTB", "GAPDH"]
    raw, _ = store.read_dataset("dup")
    cols = _columns(store, ["ACTB", "GAPDH"])
    np.testing.assert_array_equal(raw.toarray()[:, cols], [[3, 3], [4, 6]])


def test_missing_labels_are_stored_as_unknown(tmp_path, helpers, backend):
    X = np.ones((4, 3), np.float32)
    labels = pd.Categorical(["a", None, "b", np.nan])
    path = helpers.write_h5ad(tmp_path / "lab.h5ad", X, ["A", "B", "C"], labels=labels)
    store = open_atlas(tmp_path / f"s.{backend}")
    store.ingest([DatasetEntry("lab", str(path))], log=_quiet)
    assert store.dataset("lab").n_types == 2
    assert store.read_obs("lab")["cell_type"].tolist() == ["a", "unknown", "b", "unknown"]


def test_unlabelled_dataset(tmp_path, helpers, backend):
    path = tmp_path / "u.h5ad"
    _counts_file(helpers, path, labels=False)
    store = open_atlas(tmp_path / f"s.{backend}")
    store.ingest([DatasetEntry("u", str(path))], log=_quiet)
    rec = store.dataset("u")
    assert rec.n_types == 0 and not rec.labelled
    assert set(store.read_obs("u")["cell_type"]) == {"unknown"}


# ---------------------------------------------------------------------------- interrupted ingest


def _crash_after_the_data(monkeypatch, written: list):
    """Let a backend write every block of the dataset, then fail before its commit (the gene
    masks and the registry), as a crash right after the data landed would."""
    from scpretrain_dist.store import soma, zarr_csr

    original = soma.pipelined

    def write_then_crash(items, consume, depth=1):
        original(items, lambda block: (consume(block), written.append(block[3].shape[0])), depth)
        raise RuntimeError("simulated crash after the data was written")

    for module in (soma, zarr_csr):
        monkeypatch.setattr(module, "pipelined", write_then_crash)


@pytest.mark.parametrize("retry", ["same_file", "other_file"])
def test_interrupted_ingest_is_invisible_and_leaves_no_stale_cells(
    retry, tmp_path, helpers, monkeypatch, backend
):
    first = tmp_path / "first.h5ad"
    interrupted = tmp_path / "interrupted.h5ad"
    other = tmp_path / "other.h5ad"
    X_first = _counts_file(helpers, first, n_cells=20, genes=[f"G{i}" for i in range(10)], seed=1)
    X_int = _counts_file(helpers, interrupted, n_cells=30, genes=[f"G{i}" for i in range(5, 25)], seed=2)
    X_other = _counts_file(helpers, other, n_cells=25, genes=[f"G{i}" for i in range(4)], seed=3)
    store = open_atlas(tmp_path / f"s.{backend}")
    store.ingest([DatasetEntry("first", str(first))], log=_quiet)
    records_before = store.datasets()
    genes_before = list(store.genes())

    written: list[int] = []
    with monkeypatch.context() as m:
        _crash_after_the_data(m, written)
        with pytest.raises(RuntimeError, match="simulated crash"):
            store.ingest([DatasetEntry("interrupted", str(interrupted))], log=_quiet)
    assert sum(written) == 30, "the crash came after every cell was written"
    assert store.datasets() == records_before
    assert list(store.genes()) == genes_before
    with pytest.raises(StoreError):
        store.dataset("interrupted")

    if retry == "same_file":
        name, path, X_ref = "interrupted", interrupted, X_int
    else:
        name, path, X_ref = "other", other, X_other
    report = store.ingest([DatasetEntry(name, str(path))], log=_quiet)
    assert report.added == [name]
    assert [r.name for r in store.datasets()] == ["first", name]
    adata = helpers.read_h5ad(path)
    raw, obs = store.read_dataset(name)
    cols = _columns(store, list(adata.var_names))
    np.testing.assert_array_equal(raw.toarray()[:, cols], X_ref)
    assert raw.nnz == np.count_nonzero(X_ref), "no stale values of the interrupted ingest"
    norm = _normalized(store, name)
    np.testing.assert_allclose(norm.toarray()[:, cols], helpers.log1p_cp10k(X_ref), rtol=1e-5, atol=1e-6)
    assert obs["obs_id"].tolist() == [f"{name}:{o}" for o in adata.obs_names]
    # the committed dataset is untouched
    raw_first, _ = store.read_dataset("first")
    np.testing.assert_array_equal(raw_first.toarray()[:, _columns(store, [f"G{i}" for i in range(10)])], X_first)
    assert raw_first.nnz == np.count_nonzero(X_first)


def test_exclusive_refuses_a_second_holder_and_frees_with_its_process(tmp_path):
    import subprocess
    import sys

    from scpretrain_dist.store.files import Busy, exclusive

    lock = tmp_path / "run" / ".lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from scpretrain_dist.store.files import exclusive\n"
         f"with exclusive({str(lock)!r}):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(Busy, match=f"held by pid {holder.pid} on "):
            with exclusive(lock):
                pass
    finally:
        holder.kill()  # as a crash would: nothing is left to clear
        holder.wait()
    with exclusive(lock):
        pass


# ---------------------------------------------------------------------------- both backends


def test_a_pinned_locator_sees_the_atlas_as_it_was(tmp_path, helpers, backend):
    first, second = tmp_path / "first.h5ad", tmp_path / "second.h5ad"
    _counts_file(helpers, first, genes=[f"G{i}" for i in range(8)], seed=1)
    _counts_file(helpers, second, genes=[f"G{i}" for i in range(4, 14)], seed=2)
    store = open_atlas(tmp_path / f"s.{backend}")
    store.ingest([DatasetEntry("first", str(first))], log=_quiet)
    pinned = store.locator.pinned()
    before = pinned.atlas().read_rows(store.dataset("first").joinids).toarray()
    store.ingest([DatasetEntry("second", str(second))], log=_quiet)
    old, new = pinned.atlas(), store.locator.pinned().atlas()
    assert [r.name for r in old.datasets()] == ["first"] and len(old.genes()) == 8
    assert [r.name for r in new.datasets()] == ["first", "second"] and len(new.genes()) == 14
    np.testing.assert_array_equal(old.read_rows(old.dataset("first").joinids).toarray(), before)
    assert pinned.pinned() == pinned  # pinning a pinned locator keeps its version


def test_the_backend_is_found_from_the_uri_or_an_atlas_already_there(tmp_path, helpers):
    from scpretrain_dist.store.soma import SomaAtlas
    from scpretrain_dist.store.zarr_csr import ZarrAtlas

    path = tmp_path / "a.h5ad"
    _counts_file(helpers, path)
    assert isinstance(open_atlas(tmp_path / "new.zarr"), ZarrAtlas)
    assert isinstance(open_atlas(tmp_path / "new"), SomaAtlas)
    open_atlas(tmp_path / "cells", "zarr").ingest([DatasetEntry("a", str(path))], log=_quiet)
    found = open_atlas(tmp_path / "cells")  # auto: a zarr atlas is there
    assert isinstance(found, ZarrAtlas) and [r.name for r in found.datasets()] == ["a"]
    open_atlas(tmp_path / "s.soma").ingest([DatasetEntry("a", str(path))], log=_quiet)
    with pytest.raises(StoreError, match="not a zarr atlas"):
        open_atlas(tmp_path / "s.soma", "zarr").datasets()
    with pytest.raises(StoreError, match="not a SOMA experiment"):
        open_atlas(tmp_path / "cells", "soma").datasets()


def test_annotation_columns_commit_by_their_label(demo_store):
    rec = demo_store.dataset("demo_01")
    n_cells = sum(r.n_cells for r in demo_store.datasets())
    demo_store.add_annotation_columns("m__label", "m__confidence", "m", n_cells, 3)
    assert {"m__label", "m__confidence"} <= set(demo_store.obs_columns())
    lo = rec.joinid_start
    assert not demo_store.annotated("m__label", "m", lo, rec.n_cells).any()
    labels = np.array(["a", "b"] * 5, dtype=object)
    demo_store.write_annotations(lo + 4, "m__label", labels, "m__confidence", np.linspace(0, 1, 10), "m",
                                 np.ones((10, 3), np.float32))
    done = demo_store.annotated("m__label", "m", lo, rec.n_cells)
    assert done[4:14].all() and done.sum() == 10
    # labels without the embedding (a block whose embedding was not asked): not done with it
    demo_store.write_annotations(lo + 20, "m__label", labels, "m__confidence", np.zeros(10), None, None)
    assert demo_store.annotated("m__label", None, lo, rec.n_cells).sum() == 20
    assert demo_store.annotated("m__label", "m", lo, rec.n_cells).sum() == 10
    # the cells' own columns and values are untouched
    assert demo_store.read_obs("demo_01")["obs_id"].str.startswith("demo_01").all()
    demo_store.write_meta("scpretrain.annotations", '{"m": {"model": "x"}}')
    assert demo_store.annotations() == {"m": {"model": "x"}}
