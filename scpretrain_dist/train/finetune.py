"""Supervised fine-tuning of the classifier, from a pretrained encoder or from scratch."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from scpretrain_dist.config import FinetuneConfig, ModelConfig
from scpretrain_dist.data.normalize import keep_columns, normalize_rows
from scpretrain_dist.model.networks import (
    CellTypeClassifier,
    GeneModel,
    GeneModelCheck,
    SparseBatch,
    known_type_score,
)
from scpretrain_dist.runtime import intra_op_threads


def _rows(X, idx=None):
    """Rows of a dense array or a CSR matrix as the encoder's input (CSR -> SparseBatch, so the
    first layer costs O(non-zeros) rather than O(genes) per cell)."""
    if sp.issparse(X):
        sub = X[idx] if idx is not None else X
        return SparseBatch.from_csr(sp.csr_matrix(sub, dtype=np.float32))
    sub = X[idx] if idx is not None else X
    return torch.from_numpy(np.asarray(sub, np.float32))


def _dropout(x, p: float):
    """Each measured value zeroed with probability p, the rest scaled by 1/(1-p): augmentation
    that mimics the sampling dropout of scRNA-seq (a cell measured again loses other genes)."""
    if p <= 0:
        return x
    if isinstance(x, SparseBatch):
        keep = (torch.rand_like(x.values) >= p).to(x.values.dtype) / (1 - p)
        return dataclasses.replace(x, values=x.values * keep)
    return F.dropout(x, p, training=True)


class _ReverseGradient(torch.autograd.Function):
    """Identity forward, gradient times -scale backward (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.scale * grad, None


def reverse_gradient(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return _ReverseGradient.apply(x, scale)


class SemiSupervised:
    """scNym's semi-supervised objective (Kimmel & Kelley 2021) for one fine-tuning run: each
    step adds a batch of unlabelled query cells to the labelled batch.

    - MixMatch: the query cells' labels are guessed (the mean prediction over two augmentations,
      input dropout), sharpened at ``sharpen_temperature``; reference and query cells are mixed
      with a partner drawn from both (mixup, weight max(l, 1 - l) on the cell itself, l ~ Beta);
      cross-entropy on mixed reference cells, squared error on mixed query cells. The encoder's
      first layer is linear, so mixing its pre-activations is mixing the cells' expression,
      sparse inputs included.
    - Domain adversary: an MLP tells reference from query embeddings; its gradient reaches the
      encoder reversed, pushing the embedding to hide which dataset a cell came from.
    Both unsupervised weights ramp up (sigmoid schedule) over ``ssl_rampup_epochs``.

    Against collapse (unweighted, a small query population, e.g. dendritic cells, was pulled onto
    monocytes): each reference cell weighs as its type does in supervised fine-tuning
    (``class_weight``); the guesses are moved from the prior the network was fitted to
    (``prior``) towards ``query_prior``, the query's type mix estimated by EM on the supervised
    model's calls, by the factor (query_prior / prior) ** ``ssl_align_strength`` (distribution
    alignment, Berthelot et al. 2020, softened); guesses less confident than
    ``ssl_min_confidence`` add no consistency loss (scNym's pseudo-label confidence threshold)."""

    def __init__(self, model: CellTypeClassifier, unlabelled, n_types: int, cfg: FinetuneConfig, rng,
                 weight: torch.Tensor | None = None, prior: np.ndarray | None = None,
                 query_prior: np.ndarray | None = None):
        self.model, self.cfg, self.rng, self.n_types = model, cfg, rng, n_types
        self.X = sp.csr_matrix(unlabelled, dtype=np.float32) if sp.issparse(unlabelled) else np.asarray(unlabelled, np.float32)
        if self.X.shape[0] == 0:
            raise ValueError("semi-supervised fine-tuning needs unlabelled cells; the query has none")
        dim = model.hidden.in_features
        self.discriminator = torch.nn.Sequential(torch.nn.Linear(dim, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
        self.augment = cfg.input_dropout or cfg.ssl_augment_dropout
        self.weight = weight
        # guess multiplier: the query's estimated type mix over the prior the model was fitted to
        self.align = torch.ones(n_types)
        if query_prior is not None and prior is not None:
            prior = np.asarray(prior, np.float64)
            ratio = np.where(prior > 0, np.asarray(query_prior, np.float64) / np.where(prior > 0, prior, 1.0), 0.0)
            ratio = ratio ** cfg.ssl_align_strength  # 1: full alignment; below it a softer one
            self.align = torch.tensor(ratio, dtype=torch.float32)

    def ramp(self, epoch: int) -> float:
        if self.cfg.ssl_rampup_epochs <= 0:
            return 1.0
        t = min(epoch / self.cfg.ssl_rampup_epochs, 1.0)
        return float(np.exp(-5.0 * (1.0 - t) ** 2))

    def loss(self, xb, yb: torch.Tensor, epoch: int) -> torch.Tensor:
        cfg, model = self.cfg, self.model
        ub = _rows(self.X, self.rng.choice(self.X.shape[0], size=len(yb), replace=self.X.shape[0] < len(yb)))
        with torch.no_grad():  # guessed labels: the mean over two augmentations, aligned, sharpened
            guess = sum(torch.softmax(model(_dropout(ub, self.augment)), 1) for _ in range(2)) / 2
            guess = guess * self.align
            guess = guess / guess.sum(1, keepdim=True).clamp_min(1e-12)
            confident = (guess.max(1).values >= cfg.ssl_min_confidence).float()
            guess = guess ** (1.0 / cfg.sharpen_temperature)
            guess = guess / guess.sum(1, keepdim=True).clamp_min(1e-12)
        hx = model.encoder(_dropout(xb, self.augment))
        hu = model.encoder(_dropout(ub, self.augment))
        h = torch.cat([hx, hu])
        target = torch.cat([F.one_hot(yb, self.n_types).float(), guess])
        lam = float(self.rng.beta(cfg.mixup_alpha, cfg.mixup_alpha)) if cfg.mixup_alpha > 0 else 1.0
        lam = max(lam, 1.0 - lam)
        perm = torch.from_numpy(self.rng.permutation(len(h)))
        logits = model.classify(lam * h + (1 - lam) * h[perm])
        mixed = lam * target + (1 - lam) * target[perm]
        n = len(yb)
        # each reference cell weighs as its type does in supervised fine-tuning (class_weight), a
        # weight per cell, never per target entry: a rare type's weight on the guessed part of a
        # mixed target would pull every query cell that type's way (a collapse onto it)
        w = self.weight[yb] if self.weight is not None else torch.ones(n)
        supervised = (w * -(mixed[:n] * F.log_softmax(logits[:n], 1)).sum(1)).sum() / w.sum()
        consistency = (((torch.softmax(logits[n:], 1) - mixed[n:]) ** 2).sum(1) * confident).mean()
        ramp = self.ramp(epoch)
        loss = supervised + cfg.unsup_weight * ramp * consistency
        if cfg.domain_weight > 0:
            emb = torch.sigmoid(h)  # the un-mixed embeddings of both batches
            domain = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(len(hu), dtype=torch.long)])
            loss = loss + cfg.domain_weight * ramp * F.cross_entropy(self.discriminator(reverse_gradient(emb)), domain)
        return loss


@dataclass
class GuardVerdict:
    """Whether a semi-supervised model is kept or the supervised one is used instead, and why;
    decided without a query label (see :func:`semi_supervised_guard`)."""

    fallback: bool
    reason: str
    val_accuracy_supervised: float
    val_accuracy_semi: float
    confident_cells: int  # query cells the supervised model calls with calibrated confidence >= the setting
    agreement: float  # share of those the semi-supervised model calls the same (nan: none)
    worst_type: int  # the type whose confident cells it keeps least (-1: none counted)
    worst_retention: float  # the share of that type's confident cells it keeps (nan: none counted)
    # total variation distance of each model's mix of calls from the query's EM-estimated mix
    mix_distance_supervised: float = float("nan")
    mix_distance_semi: float = float("nan")

    def row(self) -> dict:
        """The verdict as report columns."""
        return {"ssl_fallback": self.fallback, "ssl_guard": self.reason,
                "ssl_val_accuracy_supervised": self.val_accuracy_supervised,
                "ssl_val_accuracy_semi": self.val_accuracy_semi, "ssl_confident_cells": self.confident_cells,
                "ssl_agreement": self.agreement, "ssl_worst_retention": self.worst_retention,
                "ssl_mix_distance_supervised": self.mix_distance_supervised,
                "ssl_mix_distance_semi": self.mix_distance_semi}


@dataclass
class FinetuneResult:
    model: CellTypeClassifier
    best_epoch: int
    best_val_accuracy: float
    epochs_run: int
    n_pretrained_genes: int
    history: list[float] = field(default_factory=list)  # validation accuracy per epoch
    val_losses: list[float] = field(default_factory=list)  # validation cross-entropy per epoch
    snapshots: list[dict] = field(default_factory=list)  # the best epochs' weights, when averaged
    temperature: float = 1.0  # softmax temperature fitted on the validation cells
    prior: np.ndarray | None = None  # the class prior the probabilities were fitted to (``training_prior``)
    reject_threshold: float = float("-inf")  # the ``reject_score`` below which a cell is unassigned
    guard: GuardVerdict | None = None  # semi-supervised runs: the guard's verdict (see ``finetune_semi_supervised``)


def mix_margin(cfg: FinetuneConfig, n_types: int, n_cells: int) -> float:
    """How much further from the query's estimated type mix the semi-supervised calls may be than
    the supervised ones: ``ssl_guard_mix_shift``, or less on a large query, the most that a mix of
    ``n_types`` types counted on ``n_cells`` cells strays from its expectation by chance (mean
    total variation, at most sqrt((k - 1) / (2 pi n)), reached by an even mix). A drift beyond
    that noise is the model's, not the sample's."""
    return min(cfg.ssl_guard_mix_shift, math.sqrt(max(n_types - 1, 0) / (2 * math.pi * max(n_cells, 1))))


def semi_supervised_guard(val_accuracy_supervised: float, val_accuracy_semi: float,
                          supervised_proba: np.ndarray, semi_calls: np.ndarray, cfg: FinetuneConfig,
                          classes=None, query_prior: np.ndarray | None = None) -> GuardVerdict:
    """Keep the semi-supervised model unless, judged without query labels, it (1) lost more than
    ``ssl_guard_val_drop`` accuracy on the reference's validation cells, or (2) moved most of a
    population away: among the query cells the supervised model calls confidently (calibrated
    probability >= ``ssl_guard_confidence``), a type with at least ``ssl_guard_min_cells`` of
    them of which it keeps less than ``ssl_guard_retention``, (3) it agrees with fewer than
    ``ssl_guard_agreement`` of all those cells, or (4) its mix of calls strays further from the
    query's EM-estimated type mix than the supervised model's does, by more than
    :func:`mix_margin` (total variation: the share of cells that would have to change type;
    adapting to the query should bring the calls nearer its mix, not move a population on its
    own). ``supervised_proba``: the supervised model's
    calibrated query probabilities; ``semi_calls``: the semi-supervised calls; ``query_prior``:
    the query's type mix estimated by EM (``adapt_to_label_shift``), where given: a type it puts
    at fewer than ``ssl_guard_min_cells`` cells is no population to keep (the supervised model's
    calls of it are the reference's bias that the semi-supervised model is there to undo)."""
    name = (lambda t: str(classes[t])) if classes is not None else (lambda t: f"type {t}")
    sup_calls = supervised_proba.argmax(1)
    confident = supervised_proba.max(1) >= cfg.ssl_guard_confidence
    n = int(confident.sum())
    agreement = float((semi_calls[confident] == sup_calls[confident]).mean()) if n else float("nan")
    worst, worst_keep = -1, float("nan")
    expected = None if query_prior is None else np.asarray(query_prior) * len(sup_calls)
    for t in np.unique(sup_calls[confident]):
        mine = confident & (sup_calls == t)
        if mine.sum() < cfg.ssl_guard_min_cells or (expected is not None and expected[t] < cfg.ssl_guard_min_cells):
            continue
        keep = float((semi_calls[mine] == t).mean())
        if worst < 0 or keep < worst_keep:
            worst, worst_keep = int(t), keep
    d_sup = d_semi = float("nan")
    if query_prior is not None:
        k = supervised_proba.shape[1]
        target = np.asarray(query_prior, np.float64)
        d_sup = 0.5 * float(np.abs(np.bincount(sup_calls, minlength=k) / len(sup_calls) - target).sum())
        d_semi = 0.5 * float(np.abs(np.bincount(semi_calls, minlength=k) / len(semi_calls) - target).sum())
    reason = "kept"
    if val_accuracy_semi < val_accuracy_supervised - cfg.ssl_guard_val_drop:
        reason = (f"reference validation accuracy fell from {val_accuracy_supervised:.3f} (supervised) to "
                  f"{val_accuracy_semi:.3f}")
    elif worst >= 0 and worst_keep < cfg.ssl_guard_retention:
        kept = confident & (sup_calls == worst)
        reason = (f"of the {int(kept.sum())} query cells the supervised model calls {name(worst)} confidently, "
                  f"the semi-supervised one keeps {worst_keep:.0%} (a population pulled onto another type)")
    elif n and agreement < cfg.ssl_guard_agreement:
        reason = f"it agrees on {agreement:.0%} of the {n} query cells the supervised model calls confidently"
    elif d_semi > d_sup + (margin := mix_margin(cfg, supervised_proba.shape[1], len(sup_calls))):
        reason = (f"its calls' type mix is {d_semi:.3f} from the query's estimated mix (total variation), the "
                  f"supervised model's {d_sup:.3f}: more than the {margin:.3f} allowed on {len(sup_calls)} cells")
    return GuardVerdict(reason != "kept", reason, float(val_accuracy_supervised), float(val_accuracy_semi), n,
                        agreement, worst, worst_keep, d_sup, d_semi)


def finetune_semi_supervised(
    X_train, y_train, X_val, y_val, n_types: int, cfg: FinetuneConfig, model_cfg: ModelConfig, seed: int,
    pretrained: dict | None, unlabelled, supervised: FinetuneResult | None = None, classes=None,
) -> FinetuneResult:
    """Fine-tune semi-supervised on ``unlabelled`` (scNym, :class:`SemiSupervised`), then check
    the model against the supervised one of the same cells and seed (``supervised``, fine-tuned
    here when not given) with :func:`semi_supervised_guard`; when the guard fails, the
    supervised model is returned (``guard.fallback``) and a warning says why."""
    if supervised is None:
        supervised = finetune(X_train, y_train, X_val, y_val, n_types, cfg, model_cfg, seed, pretrained)
    # the supervised model's calibrated query probabilities, adapted by EM to the query's type mix
    # (a type the query lacks gets none); their mean is that mix
    sup_proba = predict_proba(supervised.model, unlabelled, calibrated=True)
    adapted = adapt_to_label_shift(sup_proba, supervised.prior)
    query_prior = adapted.mean(0) if cfg.ssl_align_strength > 0 else None
    semi = finetune(X_train, y_train, X_val, y_val, n_types, cfg, model_cfg, seed, pretrained, unlabelled=unlabelled,
                    query_prior=query_prior)
    if not cfg.ssl_guard:
        return semi
    yv = np.asarray(y_val)

    def val_accuracy(model) -> float:
        return float((predict_logits(model, X_val).argmax(1) == yv).mean()) if len(yv) else 0.0

    verdict = semi_supervised_guard(val_accuracy(supervised.model), val_accuracy(semi.model),
                                    sup_proba, predict_logits(semi.model, unlabelled).argmax(1), cfg, classes,
                                    adapted.mean(0))
    if verdict.fallback:
        logging.getLogger("scpretrain").warning(
            f"semi-supervised fine-tuning (seed {seed}) fell back to the supervised model: {verdict.reason}")
        return dataclasses.replace(supervised, guard=verdict)
    return dataclasses.replace(semi, guard=verdict)


def gene_panel(X, y: np.ndarray, n: int) -> np.ndarray | None:
    """The ``n`` genes that best tell the types of log1p(CP10k) cells ``X`` apart (a boolean mask
    over its columns): scanpy's t-test of each type against the rest (``rank_genes_groups``),
    then each type's next best gene in turn until ``n`` are chosen. A type of one cell has no
    test and picks none. None (every gene) when ``n`` is 0 or not fewer than the genes, or fewer
    than two types have two cells."""
    if n <= 0 or n >= X.shape[1]:
        return None
    import warnings

    import anndata as ad
    import pandas as pd
    from scanpy.tools import rank_genes_groups

    y = np.asarray(y)
    data = ad.AnnData(sp.csr_matrix(X, dtype=np.float32) if sp.issparse(X) else np.asarray(X, np.float32))
    data.obs["type"] = pd.Categorical(y.astype(str))
    data.uns["log1p"] = {"base": None}  # natural log, as normalize_rows writes
    counts = data.obs["type"].value_counts()
    groups = [str(g) for g in counts.index if counts[g] >= 2]
    if len(groups) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scanpy's notes on fragmented frames and one-cell types
        rank_genes_groups(data, "type", groups=groups, reference="rest", method="t-test", n_genes=X.shape[1],
                          use_raw=False)
    ranked = np.stack([data.uns["rank_genes_groups"]["names"][g].astype(int) for g in groups], axis=1)
    keep, chosen = np.zeros(X.shape[1], bool), 0
    for row in ranked:  # each type's next best gene in turn
        for gene in row:
            chosen += not keep[gene]
            keep[gene] = True
            if chosen == n:
                return keep
    return keep


def over_genes(X, mask: np.ndarray | None):
    """Log1p(CP10k) cells ``X`` renormalised over the genes of ``mask``, the others zeroed: the
    input of a model that reads only those genes (``CellTypeClassifier.gene_mask``), as the
    annotator normalises a cell over the model's genes. ``X`` itself when ``mask`` is None."""
    if mask is None:
        return X
    if sp.issparse(X):
        genes = np.arange(X.shape[1])
        X = keep_columns(X, np.where(mask > 0, genes, -1), X.shape[1])
    else:
        X = np.asarray(X, np.float32) * mask
    return normalize_rows(X, "lognorm", copy=False)


def gene_index(genes: np.ndarray, pretrained_genes: np.ndarray, pretrained_mask: np.ndarray | None = None) -> np.ndarray:
    """Row of each input gene in the pretrained encoder, or -1 when the pretraining data never
    measured it (those genes start random)."""
    where = {g: i for i, g in enumerate(pretrained_genes)}
    idx = np.array([where.get(str(g).upper(), -1) for g in genes], dtype=np.int64)
    if pretrained_mask is not None:
        idx[(idx >= 0) & ~pretrained_mask[np.maximum(idx, 0)]] = -1
    return idx


def _fused() -> dict:
    """torch's fused Adam kernel (CPU and CUDA) where this build has it: the same update, about
    ten times faster on CPU for a genes x 200 encoder than the per-tensor loop."""
    import inspect

    return {"fused": True} if "fused" in inspect.signature(torch.optim.Adam).parameters else {}


def epoch_batches(n: int, batch_size: int, min_steps: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch's mini-batches: shuffled passes over the n cells until at least ``min_steps``
    batches (a pass ends with a smaller batch rather than mixing passes)."""
    batches: list[np.ndarray] = []
    while True:
        order = rng.permutation(n)
        batches += [order[i : i + batch_size] for i in range(0, n, batch_size)]
        if len(batches) >= min_steps or n == 0:
            return batches


def finetune(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    n_types: int,
    cfg: FinetuneConfig,
    model_cfg: ModelConfig,
    seed: int,
    pretrained: dict | None = None,
    unlabelled=None,
    query_prior: np.ndarray | None = None,
) -> FinetuneResult:
    """Adam at ``cfg.lr``; early stopping on validation accuracy, keeping the best epoch (among
    epochs of equal validation accuracy, the one of lowest validation loss).

    ``pretrained``: {"weight", "bias", "gene_index"} to start the encoder from (else random).
    ``unlabelled``: cells of the query (same genes, no labels) to fine-tune semi-supervised on,
    as scNym does: see :class:`SemiSupervised`; ``query_prior``: their estimated type mix, which
    the guessed labels are aligned to.
    """
    with intra_op_threads(cfg.threads):
        return _finetune(X_train, y_train, X_val, y_val, n_types, cfg, model_cfg, seed, pretrained, unlabelled,
                         query_prior)


def _finetune(X_train, y_train, X_val, y_val, n_types: int, cfg: FinetuneConfig, model_cfg: ModelConfig,
              seed: int, pretrained: dict | None, unlabelled, query_prior: np.ndarray | None) -> FinetuneResult:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = CellTypeClassifier(X_train.shape[1], n_types, model_cfg.embedding_dim, model_cfg.hidden_dim)
    n_pre = 0
    if pretrained is not None:
        n_pre = model.load_pretrained_encoder(pretrained["weight"], pretrained["bias"], pretrained["gene_index"])
    # a panel of the genes that tell the types apart: every cell renormalised over it (as the
    # annotator does a model's genes); the other genes' first-layer rows are zero and stay so
    # (their inputs are zero: no gradient, and Adam never moves a parameter whose gradient is
    # always zero)
    keep = gene_panel(X_train, y_train, cfg.gene_panel)
    if keep is not None:
        with torch.no_grad():
            model.encoder.weight[torch.from_numpy(~keep)] = 0.0
        X_train, X_val = over_genes(X_train, keep), over_genes(X_val, keep)
        unlabelled = None if unlabelled is None else over_genes(unlabelled, keep)
    model.gene_mask = keep
    head = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
    # the smaller encoder rate protects pretrained weights; a random encoder trains at ``lr``
    enc_lr = (cfg.encoder_lr or cfg.lr) if pretrained is not None else cfg.lr
    weighting = cfg.class_weight if unlabelled is None or cfg.ssl_class_weight else "none"
    weight = class_weights(y_train, n_types, weighting)
    semi = None
    if unlabelled is not None:
        semi = SemiSupervised(model, unlabelled, n_types, cfg, rng, weight, training_prior(y_train, n_types, weighting),
                              query_prior)
    groups = [{"params": list(model.encoder.parameters()), "lr": enc_lr}, {"params": head, "lr": cfg.lr}]
    if semi is not None:
        groups.append({"params": list(semi.discriminator.parameters()), "lr": cfg.lr})
    opt = torch.optim.Adam(groups, **_fused())
    if sp.issparse(X_train):
        X_train = sp.csr_matrix(X_train, dtype=np.float32)
    yt = torch.from_numpy(np.asarray(y_train, np.int64))
    Xv, yv = _rows(X_val), torch.from_numpy(np.asarray(y_val, np.int64))
    best_acc, best_loss, best_epoch, best_state, history, losses = -1.0, np.inf, 0, None, [], []
    top: list[tuple[float, float, int, dict]] = []  # the best ``cfg.snapshots`` epochs by (accuracy, -loss)
    epoch = 0
    for epoch in range(cfg.max_epochs):
        model.train()
        for idx in epoch_batches(len(yt), cfg.batch_size, cfg.min_steps_per_epoch, rng):
            opt.zero_grad(set_to_none=True)
            if semi is None:
                loss = F.cross_entropy(model(_dropout(_rows(X_train, idx), cfg.input_dropout)), yt[idx], weight=weight)
            else:
                loss = semi.loss(_rows(X_train, idx), yt[idx], epoch)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            logits = model(Xv)
            acc = (logits.argmax(1) == yv).float().mean().item() if len(yv) else 0.0
            loss = F.cross_entropy(logits, yv).item() if len(yv) else 0.0
        history.append(acc)
        losses.append(loss)
        if cfg.snapshots > 1 and (len(top) < cfg.snapshots or (acc, -loss) > top[-1][:2]):
            top = sorted(top + [(acc, -loss, epoch, copy.deepcopy(model.state_dict()))],
                         key=lambda t: t[:2], reverse=True)[: cfg.snapshots]
        if acc > best_acc:
            best_acc, best_loss, best_epoch, best_state = acc, loss, epoch, copy.deepcopy(model.state_dict())
        elif acc == best_acc and loss < best_loss:
            # a small validation set ties often: keep the tied epoch whose probabilities fit
            # better; patience still counts from the last gain in accuracy
            best_loss, best_state = loss, copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= cfg.patience:
            break
    if cfg.snapshots > 1 and len(top) > 1:
        # the mean of the best epochs' weights (one model; their average generalises and ranks
        # better than any one of them, as in stochastic weight averaging)
        best_state = {k: torch.stack([t[3][k].float() for t in top]).mean(0).to(best_state[k].dtype)
                      for k in best_state}
    model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():
        val_logits = model.classify(model.encoder(Xv))  # the network's own
        if cfg.gene_model:
            fit_gene_model(model, X_train, y_train, Xv, val_logits, np.asarray(y_val), n_types)
        pooled_logits = model.pool(Xv, val_logits).numpy()
    # the softmax temperature that makes validation probabilities fit best (calibrated
    # confidence; it never changes a call) and the unknown-cell rejection threshold, chosen on
    # the same validation cells and kept on the model for the annotator: of the pooled calls,
    # and of the network's alone (for cells the gene model is left out of)
    model.reject_score = cfg.reject_score

    def calibrate(logits: np.ndarray) -> tuple[float, float]:
        t = fit_temperature(logits, np.asarray(y_val)) if len(yv) else 1.0
        return t, rejection_threshold(known_type_score(logits, t, cfg.reject_score), cfg.reject_rate)

    model.network_temperature, model.network_reject_threshold = calibrate(val_logits.numpy())
    model.temperature, model.reject_threshold = (calibrate(pooled_logits) if model.pooled else
                                                 (model.network_temperature, model.network_reject_threshold))
    model.unassigned = cfg.unassigned
    return FinetuneResult(model, best_epoch, best_acc, epoch + 1, n_pre, history, losses,
                          [t[3] for t in top], model.temperature, training_prior(y_train, n_types, weighting),
                          model.reject_threshold)


# the gene model's weight in the pool, chosen among these on the validation cells
GENE_MODEL_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


def linear_gene_model(X_train, y_train: np.ndarray, n_types: int, tol: float = 1e-4) -> GeneModel:
    """CellTypist's kind of model of log1p(CP10k) cells ``X_train``: each gene scaled to unit
    variance and capped 10 standard deviations above its mean, one L2 logistic regression
    (C = 1) per type against the rest. Fitted on the uncentred scaled genes (sparse): a shift
    of a feature moves only the fitted intercept, so the optimum is the centred one's. A type
    without training cells gets a decision value of -30."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    y_train = np.asarray(y_train)
    X = sp.csr_matrix(X_train, dtype=np.float64)
    scaler = StandardScaler(with_mean=False).fit(X)  # its scale of a constant gene is 1
    inv, cap = 1.0 / scaler.scale_, GeneModel.CAP + scaler.mean_ / scaler.scale_
    Z = scaler.transform(X).tocsr()
    Z.data = np.minimum(Z.data, cap[Z.indices])
    coef, intercept = np.zeros((X.shape[1], n_types)), np.full(n_types, -30.0)
    for c in np.unique(y_train):
        fit = LogisticRegression(C=1.0, max_iter=1000, tol=tol).fit(Z, (y_train == c).astype(int))
        coef[:, c], intercept[c] = fit.coef_[0], fit.intercept_[0]
    return GeneModel(inv, cap, coef, intercept)


@torch.no_grad()
def fit_gene_model(model: CellTypeClassifier, X_train, y_train: np.ndarray, Xv, val_logits: torch.Tensor,
                   y_val: np.ndarray, n_types: int) -> None:
    """Pool a fine-tuned ``model`` with :func:`linear_gene_model` of its training cells, which
    reads genes the 200-unit embedding keeps little of (such as a gene that only a type of one
    or two training cells shows). The pooling weight is the one of ``GENE_MODEL_WEIGHTS`` whose
    pooled probabilities fit the validation cells (``Xv``, the network's input; ``val_logits``,
    the network's logits of them) best, by log loss; 0 leaves the network as it is. With fewer
    than two types to fit or no validation cells to choose by, the model stays as it is. The
    share of validation cells both models call alike is kept: other cells are called with the
    gene model only where they agree about as often (:meth:`CellTypeClassifier.check_gene_model`)."""
    from scipy.special import log_softmax

    if len(np.unique(y_train)) < 2 or len(y_val) == 0:
        return
    gm = linear_gene_model(X_train, y_train, n_types)
    z = val_logits.double().numpy()
    log_sig = F.logsigmoid(gm(Xv)).double().numpy()
    rows = np.arange(len(y_val))
    loss = [-log_softmax((1 - w) * z + w * log_sig, axis=1)[rows, y_val].mean() for w in GENE_MODEL_WEIGHTS]
    weight = GENE_MODEL_WEIGHTS[int(np.argmin(loss))]
    if weight > 0:
        model.gene_model, model.gene_model_weight = gm, weight
        model.gene_model_agreement = float((z.argmax(1) == log_sig.argmax(1)).mean())
        model.gene_model_val_cells = len(y_val)


def class_weights(y: np.ndarray, n_types: int, how: str) -> torch.Tensor | None:
    """Per-class cross-entropy weights from the classes' shares of the training cells: None for
    "none"; 1/sqrt(share) for "sqrt"; 1/share for "balanced"; scaled so that the mean weight over
    the training cells is 1 (the loss keeps its scale). A class with no training cell gets 0."""
    if how == "none":
        return None
    if how not in ("sqrt", "balanced"):
        raise ValueError(f"finetune.class_weight={how!r}; choose none, sqrt or balanced")
    counts = np.bincount(np.asarray(y, np.int64), minlength=n_types).astype(np.float64)
    share = counts / max(counts.sum(), 1)
    w = np.zeros(n_types)
    seen = counts > 0
    w[seen] = share[seen] ** (-0.5 if how == "sqrt" else -1.0)
    w /= max((w * share).sum(), 1e-12)
    return torch.tensor(w, dtype=torch.float32)


def training_prior(y: np.ndarray, n_types: int, how: str = "none") -> np.ndarray:
    """The class prior a network's probabilities are fitted to: the classes' shares of the
    training cells, times their cross-entropy weights (``class_weights``), normalised. A
    label-shift correction must start from this, not from the plain shares ("balanced": uniform
    over the classes seen)."""
    counts = np.bincount(np.asarray(y, np.int64), minlength=n_types).astype(np.float64)
    share = counts / max(counts.sum(), 1)
    w = class_weights(y, n_types, how)
    prior = share if w is None else share * w.numpy().astype(np.float64)
    return prior / max(prior.sum(), 1e-12)


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 minimising the cross-entropy of
    softmax(logits / T) on held-out cells, searched over log T in [log 1/20, log 20]."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    z, rows = np.asarray(logits, np.float64), np.arange(len(y))
    best = minimize_scalar(lambda log_t: -log_softmax(z / np.exp(log_t), axis=1)[rows, y].mean(),
                           bounds=(np.log(1 / 20), np.log(20)), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(best.x))


def rejection_threshold(val_scores: np.ndarray, rate: float) -> float:
    """The score below which at most ``rate`` of the validation cells fall (a cell is rejected
    when its score is strictly below it); -inf (nothing rejected) for rate 0 or no validation
    cells."""
    c = np.asarray(val_scores, np.float64)
    if rate <= 0 or c.size == 0:
        return float("-inf")
    return float(np.quantile(c, rate, method="lower"))


@torch.no_grad()
def predict_logits(model: CellTypeClassifier, X: np.ndarray, batch: int = 4096) -> np.ndarray:
    """The logits of cells ``X``, one set of cells (a dataset): with a gene model, pooled when
    :meth:`~CellTypeClassifier.check_gene_model` passes on all of them."""
    return predict_checked(model, X, batch)[0]


@torch.no_grad()
def predict_checked(model: CellTypeClassifier, X: np.ndarray, batch: int = 4096) -> tuple[np.ndarray, GeneModelCheck | None]:
    """:func:`predict_logits`, and the gene model's check (None: the model has none)."""
    model.eval()
    X = over_genes(X, getattr(model, "gene_mask", None))
    logits, decision = [], []
    for i in range(0, X.shape[0], batch):
        x = _rows(X, slice(i, i + batch))
        logits.append(model.classify(model.encoder(x)))
        if model.pooled:
            decision.append(model.gene_model(x))
    if not logits:
        return np.zeros((0, model.out.out_features), np.float32), None
    logits, check = model.called(torch.cat(logits), torch.cat(decision) if decision else None)
    return logits.numpy(), check


def predict_proba(model: CellTypeClassifier, X: np.ndarray, batch: int = 4096, calibrated: bool = False) -> np.ndarray:
    """Class probabilities; ``calibrated``: the logits divided by the temperature fitted for the
    calls as they were made (:meth:`~CellTypeClassifier.calibration`, :func:`fit_temperature`)."""
    from scipy.special import softmax

    logits, check = predict_checked(model, X, batch)
    return softmax(logits / (model.calibration(check)[0] if calibrated else 1.0), axis=1)


def adapt_to_label_shift(proba: np.ndarray, train_prior: np.ndarray, iters: int = 200, tol: float = 1e-6) -> np.ndarray:
    """Re-weight predicted probabilities to the query's class proportions, estimated by EM on
    the unlabelled query itself (Saerens, Latinne & Decaestecker 2002): a reference whose cell
    type mix differs from the query's (label shift) otherwise biases every call towards the
    reference's common types. Uses no query label."""
    prior = np.asarray(train_prior, float)
    prior = np.where(prior > 0, prior, 1e-12)
    w = prior.copy()
    q = proba
    for _ in range(iters):
        q = proba * (w / prior)
        q /= np.maximum(q.sum(1, keepdims=True), 1e-300)
        new = q.mean(0)
        if np.abs(new - w).max() < tol:
            break
        w = new
    return q
