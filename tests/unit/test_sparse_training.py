"""Sparse (row) gradients: the encoder and heads touch only the rows a batch uses, lazy Adam
against torch's Adam, and the gradient all-reduce of the touched rows over real gloo ranks."""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.multiprocessing as mp

from scpretrain_dist.model import Encoder, PretrainModel, SparseBatch, networks
from scpretrain_dist.train import optim
from scpretrain_dist.train.optim import LazyAdam, coalesced_rows
from scpretrain_dist.train.parallel import (
    GeneRowExchange,
    RowGradSync,
    broadcast_parameters,
    shard_by_gene,
)
from scpretrain_dist.train.steps import pretrain_step


def _csr(n, g, density, seed, absent=()):
    rng = np.random.default_rng(seed)
    X = sp.random(n, g, density=density, format="csr", random_state=seed, dtype=np.float32)
    X.data = rng.uniform(0.5, 3.0, X.nnz).astype(np.float32)
    X = X.tolil()
    for j in absent:
        X[:, j] = 0
    return X.tocsr()


def _full_csr(n, g, seed):
    """Every gene present in at least one cell."""
    X = _csr(n, g, 0.3, seed).tolil()
    for j in range(g):
        X[j % n, j] = 1.0 + j / g
    return X.tocsr()


def test_sparse_batch_gathers_the_distinct_genes():
    X = _csr(12, 40, 0.1, 0, absent=(0, 5, 39))
    b = SparseBatch.from_csr(X)
    expect = np.unique(X.indices)
    np.testing.assert_array_equal(b.genes.numpy(), expect)
    np.testing.assert_array_equal(b.genes[b.local_indices].numpy(), X.indices)
    # without the precomputed fields the batch computes the same
    bare = SparseBatch(b.indices, b.offsets, b.values)
    g, loc = bare.gathered()
    assert torch.equal(g, b.genes) and torch.equal(loc, b.local_indices)


@pytest.mark.parametrize("product", ["sparse", "dense"])
def test_encoder_sparse_gradient_covers_only_present_genes(product, monkeypatch):
    # the encoder multiplies a batch as sparse values or, above a density, as a dense matrix
    monkeypatch.setattr(networks, "DENSE_BATCH_DENSITY", 2.0 if product == "sparse" else 0.0)
    torch.manual_seed(0)
    absent = (0, 7, 19, 29)
    X = _csr(16, 30, 0.3, 1, absent=absent)
    dense_enc = Encoder(30, 8)
    sparse_enc = Encoder(30, 8, sparse_grad=True)
    sparse_enc.load_state_dict(dense_enc.state_dict())
    batch = SparseBatch.from_csr(X)
    out_d, out_s = dense_enc(batch), sparse_enc(batch)
    torch.testing.assert_close(out_s, out_d, rtol=1e-6, atol=1e-6)
    out_d.pow(2).sum().backward()
    out_s.pow(2).sum().backward()
    g = sparse_enc.weight.grad
    assert g.is_sparse
    # its rows are distinct and sorted: taken as coalesced without a copy
    c = coalesced_rows(g)
    assert c.is_coalesced() and c._values().data_ptr() == g._values().data_ptr()
    g = g.coalesce()
    rows = set(g.indices()[0].tolist())
    assert rows == set(np.unique(X.indices).tolist())
    assert not rows & set(absent)
    torch.testing.assert_close(g.to_dense(), dense_enc.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse_enc.bias.grad, dense_enc.bias.grad)


def test_lazy_adam_on_dense_gradients_is_torch_adam():
    torch.manual_seed(0)
    a = torch.nn.Linear(6, 4)
    b = torch.nn.Linear(6, 4)
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.Adam(a.parameters(), lr=1e-2, foreach=False)
    opt_b = LazyAdam(b.parameters(), lr=1e-2)
    for step in range(5):
        x = torch.randn(10, 6, generator=torch.Generator().manual_seed(step))
        for m, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


KS = [[3, 2, 2], [4, 3, 2], [2, 2, 2]]


def _labels(didx: torch.Tensor, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    ks = np.asarray(KS)[didx.numpy()]
    return torch.from_numpy((rng.random(ks.shape) * ks).astype(np.int64))


def _pair(n_genes=30, lr=1e-2):
    """A sparse-gradient model with lazy Adam and an identical dense one with torch's Adam."""
    torch.manual_seed(0)
    dense = PretrainModel(n_genes, KS, dim=8)
    sparse = PretrainModel(n_genes, KS, dim=8, sparse_grad=True)
    sparse.load_state_dict(dense.state_dict())
    return (dense, torch.optim.Adam(dense.parameters(), lr=lr, foreach=False),
            sparse, LazyAdam(sparse.parameters(), lr=lr))


def test_heads_of_absent_datasets_get_no_update_and_keep_their_adam_state():
    _, _, model, opt = _pair()
    # step 1 touches every dataset, so every head has Adam state
    didx = torch.tensor([0, 1, 2] * 4)
    pretrain_step(model, SparseBatch.from_csr(_csr(12, 30, 0.3, 1)), didx, _labels(didx, 1), opt)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = {k: {s: t.clone() for s, t in opt.state[p].items() if torch.is_tensor(t)}
             for k, p in model.named_parameters()}
    # step 2: datasets 0 and 2 only
    didx = torch.tensor([0, 2] * 6)
    pretrain_step(model, SparseBatch.from_csr(_csr(12, 30, 0.3, 2)), didx, _labels(didx, 2), opt)
    for p in range(3):
        name = f"heads.weights.{p}"
        lo, hi = KS[0][p], KS[0][p] + KS[1][p]  # dataset 1's rows
        w = dict(model.named_parameters())[name].detach()
        assert torch.equal(w[lo:hi], params[name][lo:hi])
        assert not torch.equal(w[:lo], params[name][:lo]) and not torch.equal(w[hi:], params[name][hi:])
        st = opt.state[dict(model.named_parameters())[name]]
        for key in ("exp_avg", "exp_avg_sq", "row_step"):
            assert torch.equal(st[key][lo:hi], state[name][key][lo:hi]), key
        assert st["row_step"][lo:hi].eq(1).all() and st["row_step"][:lo].eq(2).all()


@pytest.mark.parametrize("product", ["sparse", "dense"])
def test_sparse_step_matches_dense_adam_on_a_first_step_with_absent_genes(product, monkeypatch):
    monkeypatch.setattr(networks, "DENSE_BATCH_DENSITY", 2.0 if product == "sparse" else 0.0)
    dense, opt_d, sparse, opt_s = _pair()
    X = _csr(12, 30, 0.3, 3, absent=(2, 11, 17))
    didx = torch.tensor([0, 2] * 6)  # dataset 1 absent too
    lab = _labels(didx, 3)
    ld = pretrain_step(dense, SparseBatch.from_csr(X), didx, lab, opt_d)
    ls = pretrain_step(sparse, SparseBatch.from_csr(X), didx, lab, opt_s)
    assert ld.total.item() == pytest.approx(ls.total.item(), rel=1e-6)
    # from zero moments, dense Adam leaves untouched rows in place too: everything agrees
    for (name, a), b in zip(dense.named_parameters(), sparse.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("product", ["sparse", "dense"])
def test_sparse_steps_match_dense_adam_while_every_row_is_touched(product, monkeypatch):
    monkeypatch.setattr(networks, "DENSE_BATCH_DENSITY", 2.0 if product == "sparse" else 0.0)
    dense, opt_d, sparse, opt_s = _pair()
    didx = torch.tensor([0, 1, 2] * 10)
    for step in range(6):
        X = _full_csr(30, 30, seed=step)
        lab = _labels(didx, step)
        pretrain_step(dense, SparseBatch.from_csr(X), didx, lab, opt_d)
        pretrain_step(sparse, SparseBatch.from_csr(X), didx, lab, opt_s)
    for (name, a), b in zip(dense.named_parameters(), sparse.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_coalesced_rows_marks_sorted_distinct_rows_and_sums_the_others():
    values = torch.arange(8.0).view(4, 2)
    sorted_rows = torch.sparse_coo_tensor(torch.tensor([[1, 3, 4, 9]]), values, (10, 2), check_invariants=True)
    assert not sorted_rows.is_coalesced()
    out = coalesced_rows(sorted_rows)
    assert out.is_coalesced() and torch.equal(out.to_dense(), sorted_rows.to_dense())
    for rows in ([3, 1, 4, 9], [1, 3, 3, 9]):  # unsorted, repeated: really coalesced
        g = torch.sparse_coo_tensor(torch.tensor([rows]), values, (10, 2), check_invariants=True)
        out = coalesced_rows(g)
        assert out.is_coalesced() and torch.equal(out.to_dense(), g.to_dense())
        assert torch.equal(out.indices()[0], torch.unique(torch.tensor(rows)))


def test_sparse_adam_in_chunks_equals_one_pass(monkeypatch):
    """The step updates rows chunk by chunk; the numbers do not depend on the chunk size."""
    torch.manual_seed(0)
    start = torch.randn(50, 6)
    runs = []
    for chunk in (7, 10_000):
        monkeypatch.setattr(optim, "SPARSE_CHUNK_ROWS", chunk)
        p = torch.nn.Parameter(start.clone())
        opt = LazyAdam([p], lr=1e-2)
        rng = np.random.default_rng(0)
        for _ in range(5):
            rows = torch.from_numpy(np.sort(rng.choice(50, size=int(rng.integers(20, 45)), replace=False)))
            values = torch.from_numpy(rng.standard_normal((len(rows), 6)).astype(np.float32))
            p.grad = torch.sparse_coo_tensor(rows[None], values, p.shape, check_invariants=True)
            opt.step()
        runs.append((p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}))
    (p7, s7), (p1, s1) = runs
    assert not torch.equal(p7, start)
    assert torch.equal(p7, p1)
    for key in ("exp_avg", "exp_avg_sq", "row_step"):
        assert torch.equal(s7[key], s1[key]), key


def test_lazy_adam_keeps_an_absent_gene_where_dense_adam_drifts():
    """The documented deviation: after a gene was seen, dense Adam keeps moving it along its
    momentum on batches without it; lazy Adam leaves it in place."""
    dense, opt_d, sparse, opt_s = _pair()
    didx = torch.tensor([0, 1, 2] * 4)
    X1, X2 = _full_csr(12, 30, seed=0), _csr(12, 30, 0.3, 5, absent=(4,))
    for X, s in ((X1, 0), (X2, 1)):
        pretrain_step(dense, SparseBatch.from_csr(X), didx, _labels(didx, s), opt_d)
        if s == 1:
            before = sparse.encoder.weight.detach()[4].clone()
        pretrain_step(sparse, SparseBatch.from_csr(X), didx, _labels(didx, s), opt_s)
    assert torch.equal(sparse.encoder.weight.detach()[4], before)
    assert not torch.allclose(dense.encoder.weight.detach()[4], before)


# --------------------------------------------------------------------- 2 real gloo ranks
def _rank_batches(rank):
    didx = torch.tensor([0, 1, 0, 1, 0, 1]) if rank == 0 else torch.tensor([2, 2, 0, 2, 2, 0])
    X = _csr(6, 40, 0.25, 10 + rank, absent=(3, 30, 31) if rank == 0 else (3, 5))
    return X, didx, _labels(didx, 20 + rank)


def _run_ranks(fn, *args) -> None:
    """``fn(rank, 2, *args)`` on two processes forked from a server that imported torch (with
    the part its optimizers import on first use) and this module once: spawned, each rank would
    import them again, seconds of CPU apiece."""
    multiprocessing.set_forkserver_preload(["torch", "torch._dynamo", __name__])
    mp.start_processes(fn, args=(2, *args), nprocs=2, join=True, start_method="forkserver")


def _exit_without_finalizing():
    """A worker that did its work and wrote its results leaves at once: now and then gloo's
    threads aborted the process (SIGABRT, "terminate called without an active exception")
    while the interpreter shut down, after everything had passed."""
    os._exit(0)


def _worker(rank, world, init_file, out_dir, wire="float32"):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # different on purpose: the broadcast must align them
        model = PretrainModel(40, KS, dim=8, sparse_grad=True)
        broadcast_parameters(model)
        sync = RowGradSync(model, [model.encoder.weight, *model.heads.weights], wire_dtype=getattr(torch, wire))
        X, didx, lab = _rank_batches(rank)
        inner_loss = model.loss(model(SparseBatch.from_csr(X), didx), lab)
        inner_loss.total.backward()
        sync()
        torch.save({"state": model.state_dict(),
                    "grads": {k: (p.grad.to_dense() if p.grad.is_sparse else p.grad) for k, p in model.named_parameters()},
                    "rows": [p.grad.coalesce().indices()[0] for p in sync.sparse]},
                   f"{out_dir}/rank{rank}.pt")
        opt = LazyAdam(model.parameters(), lr=1e-2)
        for _step in range(3):
            X, didx, lab = _rank_batches(rank)
            pretrain_step(model, SparseBatch.from_csr(X), didx, lab, opt, sync_gradients=sync)
        torch.save(model.state_dict(), f"{out_dir}/final{rank}.pt")
        # both ranks past their last collective before either tears gloo down: a rank that
        # destroyed its group while the other's gloo threads still ran aborted now and then
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _exit_without_finalizing()


@pytest.mark.parametrize("wire", ["float32", "bfloat16"])
def test_row_grad_sync_over_two_gloo_ranks_averages_the_touched_rows(tmp_path, wire):
    _run_ranks(_worker, str(tmp_path / "init"), str(tmp_path), wire)
    # bfloat16 keeps 8 significant bits of each rank's gradient and of their sum
    tol = {"rtol": 1e-5, "atol": 1e-6} if wire == "float32" else {"rtol": 2e-2, "atol": 1e-4}
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    # reference: rank 0's initial model, gradient of the mean of the two ranks' losses
    ref = PretrainModel(40, KS, dim=8)
    ref.load_state_dict(r0["state"])
    total = 0
    for rank in (0, 1):
        X, didx, lab = _rank_batches(rank)
        total = total + ref.loss(ref(SparseBatch.from_csr(X), didx), lab).total / 2
    total.backward()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(r0["grads"][name], p.grad, **tol, msg=name)
        assert torch.equal(r1["grads"][name], r0["grads"][name]), name  # the same on both ranks
    exact = [torch.allclose(r0["grads"][name], p.grad, rtol=1e-5, atol=1e-6) for name, p in ref.named_parameters()]
    assert all(exact) == (wire == "float32")  # bfloat16 did travel: its rounding shows
    # exactly the rows some rank touched were sent (gene 3 is in neither batch)
    present = set(_rank_batches(0)[0].indices.tolist()) | set(_rank_batches(1)[0].indices.tolist())
    assert set(r0["rows"][0].tolist()) == present and 3 not in present
    assert torch.equal(r0["rows"][1], torch.arange(sum(k[0] for k in KS)))  # all 3 datasets
    # replicas stay identical after optimizer steps
    f0, f1 = torch.load(tmp_path / "final0.pt"), torch.load(tmp_path / "final1.pt")
    for k in f0:
        assert torch.equal(f0[k], f1[k]), k


def _combined(rank, world):
    """Both ranks' batches (rank order) over ``rank``'s genes, as GeneShardedCells makes them."""
    X = sp.vstack([_rank_batches(r)[0] for r in range(world)]).tocsr()
    X = X.multiply(np.arange(X.shape[1]) % world == rank).tocsr()
    X.eliminate_zeros()
    batch = SparseBatch.from_csr(X)
    batch.cells_per_rank = tuple(_rank_batches(r)[0].shape[0] for r in range(world))
    return batch


def _sharded_worker(rank, world, init_file, out_dir, source):
    """``source``: "gather" (the exchange all-gathers the ranks' batches) or "local" (each
    rank is handed every rank's batch over its genes, no batch travels)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)
        model = PretrainModel(40, KS, dim=8, sparse_grad=True)
        broadcast_parameters(model)
        exchange = GeneRowExchange(40, rank, world)
        shard_by_gene(model.encoder, exchange)
        sync = RowGradSync(model, list(model.heads.weights), skip=(model.encoder.weight,))

        def batch():
            X, didx, lab = _rank_batches(rank)
            return (SparseBatch.from_csr(X) if source == "gather" else _combined(rank, world)), didx, lab

        x, didx, lab = batch()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        model.loss(model(x, didx), lab).total.backward()
        sync()
        grads = {k: (p.grad.to_dense() if p.grad.is_sparse else p.grad) for k, p in model.named_parameters()}
        rows = model.encoder.weight.grad.coalesce().indices()[0]
        opt = LazyAdam(model.parameters(), lr=1e-2)
        for _step in range(3):
            pretrain_step(model, *batch(), opt, sync_gradients=sync)
        exchange.assemble(model.encoder.weight)
        torch.save({"state": state, "grads": grads, "rows": rows, "final": model.state_dict()},
                   f"{out_dir}/{source}{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _exit_without_finalizing()


def test_gene_sharded_encoder_over_two_gloo_ranks_gives_the_mean_gradient(tmp_path):
    """Each rank forms the mean gradient of its own genes' rows only; the heads and bias are
    averaged as before; after steps the assembled weights match a replicated encoder's (up to
    float rounding) and are equal on both ranks; handing each rank the combined batches gives
    the same numbers as gathering them."""
    for source in ("gather", "local"):
        _run_ranks(_sharded_worker, str(tmp_path / f"init_{source}"), str(tmp_path), source)
    _run_ranks(_worker, str(tmp_path / "init_rep"), str(tmp_path))
    r = [torch.load(tmp_path / f"gather{k}.pt") for k in (0, 1)]
    ref = PretrainModel(40, KS, dim=8)
    ref.load_state_dict(r[0]["state"])
    total = 0
    for rank in (0, 1):
        X, didx, lab = _rank_batches(rank)
        total = total + ref.loss(ref(SparseBatch.from_csr(X), didx), lab).total / 2
    total.backward()
    present = set(_rank_batches(0)[0].indices.tolist()) | set(_rank_batches(1)[0].indices.tolist())
    for k in (0, 1):
        assert set(r[k]["rows"].tolist()) == {g for g in present if g % 2 == k}  # its own genes only
    grad_w = r[0]["grads"]["encoder.weight"] + r[1]["grads"]["encoder.weight"]
    torch.testing.assert_close(grad_w, ref.encoder.weight.grad, rtol=1e-5, atol=1e-6)
    for name, p in ref.named_parameters():
        if name != "encoder.weight":
            torch.testing.assert_close(r[0]["grads"][name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
            assert torch.equal(r[1]["grads"][name], r[0]["grads"][name]), name
    replicated = torch.load(tmp_path / "final0.pt")
    local = [torch.load(tmp_path / f"local{k}.pt") for k in (0, 1)]
    for key, value in r[0]["final"].items():
        assert torch.equal(r[1]["final"][key], value), key  # the replicas agree after assembly
        assert torch.equal(local[0]["final"][key], value) and torch.equal(local[1]["final"][key], value), key
        torch.testing.assert_close(value, replicated[key], rtol=1e-5, atol=1e-6, msg=key)
    assert not torch.equal(r[0]["final"]["encoder.weight"], r[0]["state"]["encoder.weight"])


def test_a_batch_of_every_ranks_cells_needs_a_sharded_encoder():
    enc = Encoder(40, 8, sparse_grad=True)
    with pytest.raises(ValueError, match="needs an encoder sharded by gene"):
        enc(_combined(0, 2))


def test_encoder_sharding_and_sync_dtype_are_checked_when_the_config_is_built():
    from scpretrain_dist.config import ConfigError, PretrainConfig

    assert PretrainConfig(encoder_sharding="none").encoder_sharding == "none"
    with pytest.raises(ConfigError, match="pretrain.encoder_sharding = 'rows': use one of genes, none"):
        PretrainConfig(encoder_sharding="rows")
    with pytest.raises(ConfigError, match="pretrain.gradient_sync_dtype = 'float16': use one of float32, bfloat16"):
        PretrainConfig(gradient_sync_dtype="float16")
