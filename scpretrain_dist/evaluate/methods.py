"""The methods every evaluation compares, on identical cells: each takes training, validation
and test cells and returns class probabilities for the test cells.

- ``scpretrain``: the pretrained encoder fine-tuned with the classifier head;
- ``no_pretrain``: the same network from a random start;
- ``logreg``: logistic regression on log-normalised expression (what CellTypist does);
- ``{emb,pca}_{rf,logreg,svm}``: random forest, logistic regression and linear SVM on the frozen
  pretrained embedding vs on PCA(200) fitted on the training cells (the paper's Fig. 4);
- ``scpretrain_ssl`` (transfer only): the pretrained network fine-tuned semi-supervised on the
  unlabelled query as well (scNym's MixMatch and domain adversary), guarded: the supervised
  ``scpretrain`` model instead when it fails a check made without query labels;
- ``celltypist``: CellTypist itself (``celltypist.train`` and ``celltypist.annotate``, defaults,
  best match), where it is installed (the ``bench`` extra): the tool ``logreg`` stands in for.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from scpretrain_dist.config import ConfigError

NETWORKS = ("scpretrain", "no_pretrain")
EXPRESSION = ("logreg",)
CLASSIFIERS = ("rf", "logreg", "svm")
FEATURE_METHODS = tuple(f"{space}_{c}" for space in ("emb", "pca") for c in CLASSIFIERS)
# Methods that also learn from the unlabelled query cells (transductive): the transfer protocol
# only, where the query is another dataset; leave-datasets-out targets have no such query.
SEMI_SUPERVISED = ("scpretrain_ssl",)
# Methods whose outputs are probabilities fitted by likelihood, which label-shift EM needs: a
# forest's vote shares (often exactly 0) and an SVM's softmaxed margins mislead it.
SHIFT_METHODS = NETWORKS + EXPRESSION + tuple(m for m in FEATURE_METHODS if m.endswith("_logreg")) + SEMI_SUPERVISED
# Published tools run on the same cells, when their package is installed (the bench extra, which
# keeps them from constraining the core's dependencies). CellTypist's probabilities are per-class
# one-vs-rest sigmoids, not a distribution over types, so label-shift EM does not apply to them.
PEERS = ("celltypist",)
CELLTYPIST_P_THRES = 0.5  # celltypist.annotate's default p_thres (probability match mode)
ALL_METHODS = NETWORKS + EXPRESSION + FEATURE_METHODS + SEMI_SUPERVISED + PEERS
NEEDS_ENCODER = ("scpretrain",) + tuple(m for m in FEATURE_METHODS if m.startswith("emb_")) + SEMI_SUPERVISED


@dataclass
class Cells:
    """Cells of one split in the input gene space (CSR of log1p(CP10k)) with integer labels."""

    X: sp.csr_matrix
    y: np.ndarray


@dataclass
class Fitted:
    proba: np.ndarray  # test cells x n_types
    extra: dict = field(default_factory=dict)
    model: object = None
    prior: np.ndarray | None = None  # the class prior the probabilities follow (None: the training shares)
    logits: np.ndarray | None = None  # the networks' test logits (before any temperature)
    # the method's own rule for an unknown cell: the ``unknown_scores`` score (``reject_score``)
    # below which it calls a cell unassigned; None: it has none
    reject_threshold: float | None = None
    temperature: float = 1.0
    reject_score: str = "confidence"


def check_methods(methods, setting: str = "evaluate.methods") -> None:
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise ConfigError(f"{setting} names unknown method(s) {unknown}; choose from {', '.join(ALL_METHODS)}")


def peer_installed(method: str) -> bool:
    return importlib.util.find_spec(method) is not None


def missing_peers(methods) -> list[str]:
    """The peer tools among ``methods`` whose package this environment lacks."""
    return [m for m in methods if m in PEERS and not peer_installed(m)]


def runnable_methods(methods, has_encoder: bool, has_query: bool) -> list[str]:
    """``methods`` less those that cannot run here: the ones needing a pretrained encoder when
    there is none, the semi-supervised ones without an unlabelled query, and the peer tools not
    installed (the pipeline has already said which it dropped)."""
    missing = set(missing_peers(methods))
    return [m for m in methods if (has_encoder or m not in NEEDS_ENCODER)
            and (has_query or m not in SEMI_SUPERVISED) and m not in missing]


def _full_proba(clf, X, n_types: int) -> np.ndarray:
    out = np.zeros((X.shape[0], n_types))
    if hasattr(clf, "predict_proba"):
        out[:, clf.classes_] = clf.predict_proba(X)
    else:  # linear SVM: softmax of decision values as a score for the ranking metrics
        d = clf.decision_function(X)
        d = d[:, None] if d.ndim == 1 else d
        if d.shape[1] == 1:  # two classes: one decision value for the second
            d = np.hstack([-d, d])
        e = np.exp(d - d.max(1, keepdims=True))
        out[:, clf.classes_] = e / e.sum(1, keepdims=True)
    return out


def classifier(name: str, seed: int):
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    if name == "rf":
        return RandomForestClassifier(n_estimators=200, random_state=seed, n_jobs=1)
    if name == "logreg":
        return LogisticRegression(max_iter=1000, C=1.0)
    if name == "svm":
        return LinearSVC(C=1.0, max_iter=5000, random_state=seed)
    raise ValueError(f"unknown classifier {name!r}")


def embed(encoder: dict, gene_idx: np.ndarray, X: sp.csr_matrix) -> np.ndarray:
    """The frozen pretrained embedding sigmoid(x W + b) of cells in an input gene space whose
    gene i is row ``gene_idx[i]`` of the encoder (-1: not pretrained, contributes nothing)."""
    W = np.asarray(encoder["weight"], np.float32)
    rows = np.zeros((len(gene_idx), W.shape[1]), np.float32)
    found = gene_idx >= 0
    rows[found] = W[gene_idx[found]]
    h = np.asarray(sp.csr_matrix(X, dtype=np.float32) @ rows) + np.asarray(encoder["bias"], np.float32)
    return 1.0 / (1.0 + np.exp(-h))


def pca_features(train: sp.csr_matrix, *others: sp.csr_matrix, n_components: int = 200, seed: int = 0):
    """PCA fitted on the training cells only (centred, via truncated SVD of the dense block),
    applied to every split."""
    from sklearn.decomposition import PCA

    n = min(n_components, train.shape[0] - 1, train.shape[1])
    pca = PCA(n_components=max(n, 1), random_state=seed, svd_solver="randomized" if n < 0.8 * min(train.shape) else "full")
    dense = np.asarray(train.todense(), np.float32)
    return [pca.fit_transform(dense)] + [pca.transform(np.asarray(o.todense(), np.float32)) for o in others]


def run_method(
    method: str,
    train: Cells,
    val: Cells,
    test: Cells,
    n_types: int,
    seed: int,
    cfg,
    encoder: dict | None = None,
    gene_idx: np.ndarray | None = None,
    features: dict | None = None,
    unlabelled: sp.csr_matrix | None = None,
    classes: np.ndarray | None = None,
) -> Fitted:
    """Fit ``method`` on train (validation cells only for the networks' early stopping) and
    return test probabilities. ``features`` caches embeddings/PCA per split across methods;
    ``unlabelled``: the query's cells, for the semi-supervised methods (their labels unused);
    ``scpretrain_ssl`` falls back to the supervised model when its guard fails
    (``finetune_semi_supervised``; the row's ``ssl_fallback`` says so; ``classes`` names the
    types in what it says)."""
    from scpretrain_dist.train.finetune import finetune, finetune_semi_supervised, predict_checked

    features = features if features is not None else {}
    if method in NETWORKS + SEMI_SUPERVISED:
        init = None
        if method in ("scpretrain", "scpretrain_ssl"):
            init = {**encoder, "gene_index": gene_idx}
        if method in SEMI_SUPERVISED:
            if unlabelled is None:
                raise ValueError(f"{method} fine-tunes on an unlabelled query too; it runs in the transfer protocol only")
            # guarded by the supervised scpretrain model of the same cells and seed (reused when it ran)
            res = finetune_semi_supervised(train.X, train.y, val.X, val.y, n_types, cfg.finetune, cfg.model, seed, init,
                                           unlabelled, supervised=features.get("scpretrain"), classes=classes)
        else:
            res = finetune(train.X, train.y, val.X, val.y, n_types, cfg.finetune, cfg.model, seed, init)
            if method == "scpretrain":
                features["scpretrain"] = res
        from scipy.special import softmax

        from scpretrain_dist.evaluate.metrics import expected_calibration_error as ece

        # the test cells are one dataset: a pooled gene model is checked on them, as annotate does
        logits, check = predict_checked(res.model, test.X)
        temperature, threshold = res.model.calibration(check)
        proba, calibrated = softmax(logits, axis=1), softmax(logits / temperature, axis=1)
        # the metrics score the plain softmax (the method as published); the calibrated
        # confidence is what the registered annotator reports
        return Fitted(proba, {"best_epoch": res.best_epoch, "epochs_run": res.epochs_run,
                              "n_pretrained_genes": res.n_pretrained_genes, "temperature": temperature,
                              "gene_model_weight": res.model.gene_model_weight if check and check.used else 0.0,
                              **({"gene_model_agreement": check.agreement, "gene_model_reference": check.reference}
                                 if check else {}),
                              "ece": ece(test.y, proba), "ece_calibrated": ece(test.y, calibrated),
                              **(res.guard.row() if res.guard is not None else {})}, res.model,
                      res.prior, logits, threshold, temperature, res.model.reject_score)
    if method == "logreg":
        clf = classifier("logreg", seed).fit(train.X, train.y)
        return Fitted(_full_proba(clf, test.X, n_types))
    if method == "celltypist":
        return _celltypist(train, test, n_types)
    space, name = method.split("_", 1)
    if space not in features:
        if space == "emb":
            features[space] = (embed(encoder, gene_idx, train.X), embed(encoder, gene_idx, test.X))
        else:
            features[space] = tuple(pca_features(train.X, test.X, seed=seed))
    Ftr, Fte = features[space]
    clf = classifier(name, seed).fit(Ftr, train.y)
    return Fitted(_full_proba(clf, Fte, n_types), {"n_features": int(Ftr.shape[1])})


def _celltypist(train: Cells, test: Cells, n_types: int) -> Fitted:
    """CellTypist as its users run it: ``celltypist.train`` with its defaults (genes scaled,
    one-vs-rest logistic regression) on the training cells, ``celltypist.annotate`` (best match)
    on the test cells; both get log1p(CP10k), the input CellTypist checks for. The scores are
    CellTypist's probability matrix (per-type sigmoids of the decision values)."""
    import anndata
    import celltypist

    logging.getLogger("celltypist").setLevel(logging.WARNING)
    genes = np.array([f"g{i}" for i in range(train.X.shape[1])])
    model = celltypist.train(train.X, labels=train.y.astype(str), genes=genes, n_jobs=1)
    query = anndata.AnnData(sp.csr_matrix(test.X, dtype=np.float32))
    query.var_names = genes
    query.obs_names = [f"c{i}" for i in range(test.X.shape[0])]
    result = celltypist.annotate(query, model=model, majority_voting=False)
    scores = result.probability_matrix
    proba = np.zeros((test.X.shape[0], n_types))
    proba[:, scores.columns.astype(int)] = scores.to_numpy()
    # its probability match mode calls a cell Unassigned when no type passes p_thres (0.5)
    return Fitted(proba, {"n_features": int(len(model.features))}, reject_threshold=CELLTYPIST_P_THRES)


def unknown_scores(fit: Fitted) -> dict[str, np.ndarray]:
    """Per test cell, scores that are high for a type the method knows: ``confidence`` (the
    largest probability; for the networks the log-odds of the calibrated one) and, for the
    networks, ``max_logit`` and ``energy`` (T log sum exp(logits / T)); the annotator rejects on
    the one its model names (``Fitted.reject_score``)."""
    from scpretrain_dist.model.networks import known_type_score

    if fit.logits is None:
        return {"confidence": fit.proba.max(1)}
    z, t = np.asarray(fit.logits, np.float64), fit.temperature
    return {"confidence": known_type_score(z, t, "confidence"), "max_logit": z.max(1),
            "energy": known_type_score(z, t, "energy")}
