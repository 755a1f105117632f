"""Encoder, multi-task heads, one pretraining step, encoder transfer and fine-tuning."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scpretrain_dist.config import FinetuneConfig, ModelConfig
from scpretrain_dist.model import (
    CellTypeClassifier,
    Encoder,
    MultiTaskHeads,
    PretrainModel,
    SparseBatch,
    networks,
)
from scpretrain_dist.model.networks import confidence_log_odds, known_type_score
from scpretrain_dist.train.finetune import (
    finetune,
    gene_index,
    predict_logits,
    predict_proba,
    rejection_threshold,
)
from scpretrain_dist.train.steps import pretrain_step


def _random_csr(n, g, density=0.2, seed=0):
    rng = np.random.default_rng(seed)
    X = sp.random(n, g, density=density, format="csr", random_state=seed, dtype=np.float32)
    X.data = rng.uniform(0.5, 4.0, X.nnz).astype(np.float32)
    X = X.tolil()
    X[3, :] = 0  # an empty cell
    X[n - 1, :] = 0  # and a trailing one (an empty last bag)
    return X.tocsr()


@pytest.mark.parametrize("product", ["sparse", "dense"])
def test_sparse_input_equals_dense_input(product, monkeypatch):
    # a training step multiplies a sparse batch as per-value sums or, above a density, densified
    monkeypatch.setattr(networks, "DENSE_BATCH_DENSITY", 2.0 if product == "sparse" else 0.0)
    torch.manual_seed(0)
    enc = Encoder(50, 16)
    X = _random_csr(20, 50)
    sparse = SparseBatch.from_csr(X)
    assert len(sparse) == 20
    dense = torch.from_numpy(X.toarray())
    with torch.no_grad():
        out_s, out_d = enc(sparse), enc(dense)
        assert out_s.shape == (20, 16)
        torch.testing.assert_close(out_s, out_d, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(enc.embed(sparse), torch.sigmoid(out_d), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_s[3], enc.bias)  # an empty cell is just the bias
        torch.testing.assert_close(out_s[-1], enc.bias)
    # the gradients agree too: the weight's in a training step
    enc.zero_grad()
    out = enc(sparse)
    torch.testing.assert_close(out, out_d, rtol=1e-5, atol=1e-5)
    out.pow(2).sum().backward()
    g_sparse = enc.weight.grad.clone()
    enc.zero_grad()
    enc(dense).pow(2).sum().backward()
    torch.testing.assert_close(g_sparse, enc.weight.grad, rtol=1e-4, atol=1e-5)
    # and the values' (saliency): the dense input's gradient at the measured entries
    sparse.values.requires_grad_(True)
    enc(sparse).pow(2).sum().backward()
    dense.requires_grad_(True)
    enc(dense).pow(2).sum().backward()
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    torch.testing.assert_close(sparse.values.grad, dense.grad[rows, X.indices], rtol=1e-4, atol=1e-5)


KS = [[3, 2], [4, 1], [2, 2]]  # (datasets x partitions)


@pytest.mark.parametrize("layout", ["block", "padded"])
@pytest.mark.parametrize("activation", ["none", "sigmoid"])
def test_heads_mask_logits_to_the_cells_own_dataset(activation, layout):
    torch.manual_seed(0)
    heads = MultiTaskHeads(KS, dim=8, activation=activation, layout=layout)
    assert heads.n_partitions == 2
    z = torch.randn(12, 8)
    didx = torch.tensor([0, 2] * 6)  # dataset 1 absent from the batch
    out = heads(z, didx)
    ks = np.array(KS)
    labels = torch.tensor([[k % 2, 1] for k in range(12)])
    for p, part in enumerate(out):
        starts = np.concatenate([[0], np.cumsum(ks[:, p])])
        w = heads.weights[p].detach()
        targets = part.targets(labels[:, p])
        for i, d in enumerate(didx.tolist()):
            row = part.logits[i]
            finite = torch.isfinite(row)
            assert int(finite.sum()) == ks[d, p]  # exactly the cell's own dataset's clusters
            lo = int(part.first_column[i])
            assert finite[lo : lo + ks[d, p]].all()
            # column first_column + c is the logit of the cell's cluster c
            own = w[starts[d] : starts[d + 1]]
            expect = z[i] @ own[:, :8].T + own[:, 8]
            if activation == "sigmoid":
                expect = torch.sigmoid(expect)
            torch.testing.assert_close(row[lo : lo + ks[d, p]], expect, rtol=1e-5, atol=1e-6)
            assert int(targets[i]) == lo + int(labels[i, p])


def test_head_layouts_give_the_same_loss_and_gradients():
    torch.manual_seed(0)
    ks = [[5, 2], [3, 3], [7, 1], [2, 2]]
    z = torch.randn(20, 8)
    didx = torch.tensor([0, 1, 3] * 6 + [0, 3])
    labels = torch.stack([torch.tensor(np.random.default_rng(0).integers(0, 2, 20)),
                          torch.zeros(20, dtype=torch.int64)], 1)
    grads, losses = {}, {}
    for layout in ("block", "padded"):
        torch.manual_seed(1)
        heads = MultiTaskHeads(ks, dim=8, layout=layout)
        out = heads(z, didx)
        loss = sum(torch.nn.functional.cross_entropy(o.logits, o.targets(labels[:, p])) for p, o in enumerate(out))
        loss.backward()
        losses[layout] = loss.detach()
        grads[layout] = [w.grad.clone() for w in heads.weights]
    torch.testing.assert_close(losses["block"], losses["padded"])
    for a, b in zip(grads["block"], grads["padded"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # dataset 2 is absent: its rows get no gradient in either layout
    assert torch.equal(grads["block"][0][8:15], torch.zeros(7, 9))


def test_heads_refuse_unknown_activation():
    with pytest.raises(ValueError, match="relu"):
        MultiTaskHeads(KS, dim=8, activation="relu")


def test_pretrain_step_leaves_other_datasets_heads_alone():
    torch.manual_seed(0)
    ks = [[3, 2], [4, 3]]
    model = PretrainModel(n_genes=30, ks=ks, dim=16)
    X = _random_csr(16, 30, density=0.3, seed=1)
    didx = torch.zeros(16, dtype=torch.int64)  # dataset 0 only
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(np.stack([rng.integers(0, 3, 16), rng.integers(0, 2, 16)], 1))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = pretrain_step(model, SparseBatch.from_csr(X), didx, labels, opt)
    assert torch.isfinite(loss.total)
    assert len(loss.per_partition) == 2 and 0.0 <= loss.accuracy <= 1.0
    after = model.state_dict()
    for p, (k0, _k1) in enumerate(zip(*ks)):
        w0, w1 = before[f"heads.weights.{p}"], after[f"heads.weights.{p}"]
        # dataset 1's rows: bit-for-bit unchanged; dataset 0's rows (weights and bias): trained
        assert torch.equal(w0[k0:], w1[k0:])
        assert not torch.equal(w0[:k0, :-1], w1[:k0, :-1])
        assert not torch.equal(w0[:k0, -1], w1[:k0, -1])
        assert torch.isfinite(w1).all()
    assert not torch.equal(before["encoder.weight"], after["encoder.weight"])


def test_pretrain_loss_decreases_over_steps():
    torch.manual_seed(0)
    model = PretrainModel(n_genes=30, ks=[[3], [2]], dim=16)
    X = _random_csr(40, 30, density=0.4, seed=2)
    didx = torch.tensor([0, 1] * 20)
    labels = torch.from_numpy(np.random.default_rng(1).integers(0, 2, (40, 1)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = SparseBatch.from_csr(X)
    losses = [pretrain_step(model, batch, didx, labels, opt).total.item() for _ in range(30)]
    assert losses[-1] < losses[0]


def test_load_pretrained_encoder_copies_found_genes_only():
    torch.manual_seed(0)
    clf = CellTypeClassifier(n_genes=6, n_types=3, dim=8, hidden=5)
    weight = np.random.default_rng(0).normal(size=(10, 8)).astype(np.float32)
    bias = np.arange(8, dtype=np.float32)
    gidx = np.array([3, -1, 0, 9, -1, 5])
    before = clf.encoder.weight.detach().clone()
    n = clf.load_pretrained_encoder(weight, bias, gidx)
    assert n == 4
    w = clf.encoder.weight.detach()
    for i, j in enumerate(gidx):
        if j >= 0:
            np.testing.assert_array_equal(w[i].numpy(), weight[j])
        else:
            assert torch.equal(w[i], before[i])
    np.testing.assert_array_equal(clf.encoder.bias.detach().numpy(), bias)
    assert clf.encoder.weight.requires_grad


def test_gene_index_is_case_insensitive_and_honours_the_mask():
    pretrained = np.array(["CD3E", "ACTB", "GAPDH", "MT1"], dtype=object)
    genes = np.array(["actb", "Gapdh", "CD3E", "xyz", "Mt1"], dtype=object)
    np.testing.assert_array_equal(gene_index(genes, pretrained), [1, 2, 0, -1, 3])
    mask = np.array([True, False, True, False])  # ACTB and MT1 were never measured in pretraining
    np.testing.assert_array_equal(gene_index(genes, pretrained, mask), [-1, 2, 0, -1, -1])
    assert gene_index(genes, pretrained).dtype == np.int64


def _separable(n, n_genes=24, n_types=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % n_types
    X = rng.uniform(0, 0.3, (n, n_genes)).astype(np.float32)
    block = n_genes // n_types
    for t in range(n_types):
        X[y == t, t * block : (t + 1) * block] += 3.0
    return X, y


def test_finetune_learns_an_easy_problem():
    X_train, y_train = _separable(150, seed=0)
    X_val, y_val = _separable(60, seed=1)
    cfg = FinetuneConfig(lr=2e-3, max_epochs=10, patience=3, batch_size=32)
    res = finetune(X_train, y_train, X_val, y_val, 3, cfg, ModelConfig(), seed=0)
    assert res.best_val_accuracy > 0.9
    assert res.best_val_accuracy == max(res.history)
    assert res.history[res.best_epoch] == res.best_val_accuracy
    assert res.epochs_run == len(res.history) <= cfg.max_epochs
    assert res.n_pretrained_genes == 0
    proba = predict_proba(res.model, X_val)
    assert proba.shape == (60, 3)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)
    assert res.temperature > 0 and res.model.temperature == res.temperature
    hot = predict_proba(res.model, X_val, calibrated=True)
    assert (hot.argmax(1) == proba.argmax(1)).all()
    # the returned model is the best epoch's
    assert (proba.argmax(1) == y_val).mean() == pytest.approx(res.best_val_accuracy)


@pytest.mark.parametrize("rate,score", [(0.0, "energy"), (0.01, "energy"), (0.2, "energy"), (0.2, "confidence")])
def test_finetune_stores_a_threshold_that_rejects_at_most_the_rate_of_validation_cells(rate, score):
    X_train, y_train = _separable(150, seed=0)
    X_val, y_val = _separable(200, seed=1)
    X_val = X_val + np.random.default_rng(5).normal(0, 1.5, X_val.shape).astype(np.float32)  # some doubtful cells
    cfg = FinetuneConfig(lr=2e-3, max_epochs=6, patience=3, batch_size=32, reject_rate=rate, unassigned="unknown",
                         reject_score=score)
    res = finetune(X_train, y_train, X_val, y_val, 3, cfg, ModelConfig(), seed=0)
    scores = known_type_score(predict_logits(res.model, X_val), res.temperature, score)
    rejected = (scores < res.reject_threshold).mean()
    assert res.model.reject_threshold == res.reject_threshold and res.model.unassigned == "unknown"
    assert res.model.reject_score == score
    if rate == 0:
        assert res.reject_threshold == -np.inf
    else:
        assert rate - 0.01 <= rejected <= rate
        assert np.isfinite(res.reject_threshold)


def test_rejection_threshold_and_confidence_log_odds():
    c = np.linspace(0.3, 1.0, 1000)
    t = rejection_threshold(c, 0.05)
    assert (c < t).sum() == 49  # at most 5%: the 50th smallest is the threshold itself, kept
    assert rejection_threshold(c, 0.0) == -np.inf and rejection_threshold(np.zeros(0), 0.1) == -np.inf
    z = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [60.0, 10.0, 0.0], [50.0, 10.0, 0.0]])
    p = np.exp(2) / (np.exp(2) + 2)
    np.testing.assert_allclose(confidence_log_odds(z)[:2], [np.log(p / (1 - p)), np.log(0.5)])
    # confident cells stay ordered where their probabilities have rounded to 1
    assert confidence_log_odds(z)[2] > confidence_log_odds(z)[3] > 30
    assert confidence_log_odds(z, temperature=100.0)[0] < confidence_log_odds(z)[0]
    # energy: T log sum exp(z / T), high for a cell with a large logit whatever the others
    np.testing.assert_allclose(known_type_score(z, 1.0, "energy")[1], np.log(3))
    np.testing.assert_allclose(known_type_score(z, 2.0, "energy")[0], 2 * np.log(np.exp(1) + 2))
    assert known_type_score(z, 1.0, "energy")[2] > known_type_score(z, 1.0, "energy")[3]
    np.testing.assert_array_equal(known_type_score(z, 1.0, "confidence"), confidence_log_odds(z))
    with pytest.raises(ValueError, match="energy or confidence"):
        known_type_score(z, 1.0, "entropy")


def test_finetune_breaks_accuracy_ties_by_validation_loss():
    """An easy problem reaches full validation accuracy early and stays there: the model kept is
    the tied epoch of lowest validation loss, not the first to reach it."""
    X_train, y_train = _separable(150, seed=0)
    X_val, y_val = _separable(60, seed=1)
    cfg = FinetuneConfig(lr=2e-3, max_epochs=40, patience=8, batch_size=32)
    res = finetune(X_train, y_train, X_val, y_val, 3, cfg, ModelConfig(), seed=0)
    tied = [e for e, a in enumerate(res.history) if a == res.best_val_accuracy]
    assert len(tied) > 1 and res.best_epoch == tied[0]
    best = min(tied, key=lambda e: res.val_losses[e])
    assert best > tied[0]  # the loss kept falling after accuracy stopped rising
    proba = predict_proba(res.model, X_val)
    loss = -np.log(proba[np.arange(len(y_val)), y_val]).mean()
    assert loss == pytest.approx(res.val_losses[best], rel=1e-4)


def test_finetune_from_a_pretrained_encoder_counts_transferred_genes():
    X_train, y_train = _separable(60, seed=0)
    X_val, y_val = _separable(30, seed=1)
    emb = ModelConfig(embedding_dim=16, hidden_dim=8)
    weight = np.random.default_rng(0).normal(0, 0.1, (30, 16)).astype(np.float32)
    gidx = np.where(np.arange(24) % 2 == 0, np.arange(24), -1)
    cfg = FinetuneConfig(lr=1e-2, max_epochs=3, patience=2, batch_size=32)
    res = finetune(
        X_train, y_train, X_val, y_val, 3, cfg, emb, seed=0,
        pretrained={"weight": weight, "bias": np.zeros(16, np.float32), "gene_index": gidx},
    )
    assert res.n_pretrained_genes == 12
    assert res.model.encoder.weight.shape == (24, 16)


def test_finetune_snapshots_average_the_best_epochs_weights():
    X_train, y_train = _separable(150, seed=0)
    X_val, y_val = _separable(60, seed=1)
    cfg = FinetuneConfig(lr=2e-3, max_epochs=30, patience=8, batch_size=32, snapshots=4)
    res = finetune(X_train, y_train, X_val, y_val, 3, cfg, ModelConfig(), seed=0)
    assert len(res.snapshots) == 4
    # the kept epochs are the four best by (accuracy, -loss)
    ranked = sorted(range(len(res.history)), key=lambda e: (res.history[e], -res.val_losses[e]), reverse=True)
    kept_losses = sorted(res.val_losses[e] for e in ranked[:4])
    assert all(res.history[e] == res.best_val_accuracy for e in ranked[:1])
    assert len(kept_losses) == 4
    for name, value in res.model.state_dict().items():
        mean = torch.stack([s[name] for s in res.snapshots]).mean(0)
        torch.testing.assert_close(value, mean)
    # the snapshots differ (distinct epochs), so the mean is none of them
    w = [s["encoder.weight"] for s in res.snapshots]
    assert not torch.equal(w[0], w[1])
    single = finetune(X_train, y_train, X_val, y_val, 3, FinetuneConfig(lr=2e-3, max_epochs=30, patience=8,
                                                                         batch_size=32), ModelConfig(), seed=0)
    assert single.snapshots == []


def test_input_dropout_zeros_a_fraction_of_values_and_keeps_the_mean():
    import scipy.sparse as sp

    from scpretrain_dist.model.networks import SparseBatch
    from scpretrain_dist.train.finetune import _dropout

    X = sp.random(200, 500, density=0.2, format="csr", random_state=0, dtype=np.float32)
    X.data[:] = 1.0
    b = SparseBatch.from_csr(X)
    assert _dropout(b, 0.0) is b
    torch.manual_seed(0)
    d = _dropout(b, 0.25)
    zeroed = (d.values == 0).float().mean().item()
    assert 0.23 < zeroed < 0.27
    assert d.values.mean().item() == pytest.approx(1.0, abs=0.02)
    assert torch.equal(d.indices, b.indices) and torch.all(b.values == 1.0)  # the input is untouched


def test_gradient_reversal_is_identity_forward_and_negated_backward():
    from scpretrain_dist.train.finetune import reverse_gradient

    x = torch.randn(5, 3, requires_grad=True)
    y = reverse_gradient(x, 0.5)
    torch.testing.assert_close(y, x)
    (y * torch.arange(3.0)).sum().backward()
    torch.testing.assert_close(x.grad, -0.5 * torch.arange(3.0).expand(5, 3))


@pytest.mark.parametrize("class_weight", ["none", "balanced"])
def test_semi_supervised_finetune_adapts_to_a_shifted_query(monkeypatch, class_weight):
    """Reference and query share types but the query's expression is shifted (a batch effect on
    other genes): the domain adversary and MixMatch train on both, and the model still labels
    the query; its discriminator is trained (its weights move); with class weights too (each
    reference cell weighted by its type's weight)."""
    from scpretrain_dist.train.finetune import SemiSupervised

    X_train, y_train = _separable(150, seed=0)
    X_val, y_val = _separable(60, seed=1)
    X_query, y_query = _separable(120, seed=2)
    X_query[:, :4] += 2.0  # batch effect
    cfg = FinetuneConfig(lr=2e-3, max_epochs=12, patience=6, batch_size=32, ssl_rampup_epochs=3,
                         class_weight=class_weight)
    made = []
    orig = SemiSupervised.__init__

    def spy(self, *a, **k):
        orig(self, *a, **k)
        made.append((self, [p.detach().clone() for p in self.discriminator.parameters()]))

    monkeypatch.setattr(SemiSupervised, "__init__", spy)
    res = finetune(X_train, y_train, X_val, y_val, 3, cfg, ModelConfig(), seed=0, unlabelled=X_query)
    assert len(made) == 1
    semi, before = made[0]
    assert any(not torch.equal(b, a) for b, a in zip(before, semi.discriminator.parameters()))
    assert semi.ramp(0) < 0.01 and semi.ramp(3) == 1.0
    assert (predict_proba(res.model, X_query).argmax(1) == y_query).mean() > 0.9
    with pytest.raises(ValueError, match="unlabelled"):
        finetune(X_train, y_train, X_val, y_val, 3, cfg, ModelConfig(), seed=0, unlabelled=X_query[:0])


def test_class_weights_scale_rare_classes_up_and_keep_the_mean_weight():
    from scpretrain_dist.train.finetune import class_weights

    y = np.array([0] * 80 + [1] * 20)  # class 2 has no training cell
    assert class_weights(y, 3, "none") is None
    for how, power in (("sqrt", 0.5), ("balanced", 1.0)):
        w = class_weights(y, 3, how).numpy()
        assert w[2] == 0
        assert w[1] / w[0] == pytest.approx(4.0**power, rel=1e-5)
        assert (w[y]).mean() == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="class_weight"):
        class_weights(y, 3, "inverse")


def test_training_prior_is_the_class_weighted_share_of_the_training_cells():
    """What a label-shift correction starts from: plain shares without weights, uniform over the
    classes seen with "balanced", shares^(1/2) with "sqrt"."""
    from scpretrain_dist.train.finetune import training_prior

    y = np.array([0] * 64 + [1] * 16)  # class 2 has no training cell
    np.testing.assert_allclose(training_prior(y, 3), [0.8, 0.2, 0.0])
    np.testing.assert_allclose(training_prior(y, 3, "balanced"), [0.5, 0.5, 0.0])
    np.testing.assert_allclose(training_prior(y, 3, "sqrt"), [2 / 3, 1 / 3, 0.0])


def test_balanced_class_weights_raise_the_probability_of_a_rare_overlapping_class():
    rng = np.random.default_rng(0)

    def cells(n_common, n_rare):  # two overlapping classes; the rare one shifted a little
        x = np.vstack([rng.normal(0, 1, (n_common, 5)), rng.normal(0.8, 1, (n_rare, 5))]).astype(np.float32)
        return x, np.array([0] * n_common + [1] * n_rare)

    X_train, y_train = cells(450, 50)
    X_val, y_val = cells(90, 10)
    X_test, _ = cells(900, 100)
    rare = {}
    for how in ("none", "balanced"):
        cfg = FinetuneConfig(lr=5e-3, max_epochs=30, patience=30, batch_size=50, class_weight=how)
        res = finetune(X_train, y_train, X_val, y_val, 2, cfg, ModelConfig(embedding_dim=16, hidden_dim=8), seed=0)
        rare[how] = predict_proba(res.model, X_test)[:, 1].mean()
    # unweighted, the rare class gets about its 10% share; weighted 9:1, about half
    assert rare["none"] < 0.2 and rare["balanced"] > rare["none"] + 0.15
