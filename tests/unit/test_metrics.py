"""Classification metrics and the stratified, capped train/val/test splits."""

from __future__ import annotations

import numpy as np
import pytest

from scpretrain_dist.evaluate.metrics import METRICS, class_auprc, classification_metrics
from scpretrain_dist.evaluate.splits import split_cells


def _one_hot(y, n):
    p = np.zeros((len(y), n))
    p[np.arange(len(y)), y] = 1.0
    return p


def test_perfect_predictions_score_one_everywhere():
    y = np.array([0, 1, 2, 0, 1, 2, 2, 1, 0, 0])
    m = classification_metrics(y, _one_hot(y, 3))
    assert set(m) == set(METRICS)
    for name in METRICS:
        assert m[name] == pytest.approx(1.0), name


def test_wrong_predictions_score_below_one():
    y = np.array([0, 1, 2, 0, 1, 2])
    pred = np.array([1, 1, 2, 0, 1, 0])
    m = classification_metrics(y, _one_hot(pred, 3))
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["kappa"] < 1.0 and m["macro_f1"] < 1.0 and m["macro_auroc"] < 1.0


def test_a_class_absent_from_the_test_cells_is_skipped():
    y = np.array([0, 1, 0, 1, 0, 1, 3, 3])  # class 2 never occurs
    proba = _one_hot(y, 4) * 0.9 + 0.025
    m = classification_metrics(y, proba)
    for name in METRICS:
        assert np.isfinite(m[name]), name
        assert m[name] == pytest.approx(1.0), name  # not dragged down by the absent class


def test_constant_predictions_have_zero_kappa():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    proba = np.tile([0.6, 0.3, 0.1], (200, 1))
    m = classification_metrics(y, proba)
    assert m["kappa"] == pytest.approx(0.0, abs=1e-9)
    assert m["accuracy"] == pytest.approx(np.mean(y == 0))
    # constant scores carry no ranking information
    assert m["macro_auroc"] == pytest.approx(0.5)


@pytest.mark.filterwarnings("ignore")
def test_single_class_test_set_does_not_fail():
    y = np.zeros(5, dtype=int)
    m = classification_metrics(y, _one_hot(y, 2))
    assert m["accuracy"] == 1.0
    assert np.isnan(m["macro_auroc"])  # no negatives: AUROC undefined, reported as NaN


def test_a_class_with_one_test_cell_scores_one_over_that_cells_rank():
    y = np.array([0, 0, 0, 0, 1, 2, 2, 2])
    proba = np.full((8, 3), 0.1)
    proba[:, 1] = [0.9, 0.8, 0.1, 0.1, 0.7, 0.1, 0.1, 0.1]  # class 1's one cell ranked third
    per = class_auprc(y, proba)
    assert set(per) == {0, 1, 2} and per[1] == pytest.approx(1 / 3)
    assert classification_metrics(y, proba)["macro_auprc"] == pytest.approx(np.mean(list(per.values())))


# ---------------------------------------------------------------------------- splits

SIZES = [300, 120, 50, 20, 10]


def _labels(seed=0):
    y = np.repeat(np.arange(len(SIZES)), SIZES)
    return np.random.default_rng(seed).permutation(y)


@pytest.mark.parametrize("cap", [1000, 300, 100])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_sizes_disjoint_and_stratified(cap, seed):
    y = _labels(seed)
    n = len(y)
    s = split_cells(y, seed, train_frac=0.6, val_frac=0.1, train_cap=cap)
    n_test, n_val = round(0.3 * n), round(0.1 * n)
    assert len(s.test) == n_test
    assert len(s.val) == n_val
    assert len(s.train) == min(cap, n - n_test - n_val)
    parts = [s.train, s.val, s.test]
    allpos = np.concatenate(parts)
    assert len(np.unique(allpos)) == len(allpos), "splits are disjoint"
    assert allpos.min() >= 0 and allpos.max() < n
    for part in parts:
        assert np.all(np.diff(part) > 0)
    for c, size in enumerate(SIZES):
        if size >= 10:
            assert (y[s.train] == c).any(), f"class {c} ({size} cells) missing from train"
        # the test set keeps each class's share (stratified), within one or two cells
        assert abs((y[s.test] == c).sum() - 0.3 * size) <= 2


def test_split_is_deterministic_by_seed():
    y = _labels()
    a, b, c = split_cells(y, 7), split_cells(y, 7), split_cells(y, 8)
    for part in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(a, part), getattr(b, part))
    assert not np.array_equal(a.test, c.test)


def test_split_with_string_labels():
    y = np.array(["b", "a", "c"] * 40)
    s = split_cells(y, 0)
    assert len(s.test) == 36 and len(s.val) == 12 and len(s.train) == 72
    assert set(y[s.train]) == {"a", "b", "c"}


def test_temperature_scaling_recovers_the_temperature_and_calibrates():
    from scpretrain_dist.evaluate.metrics import expected_calibration_error
    from scpretrain_dist.train.finetune import fit_temperature

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, (20000, 5))
    true_t = 2.5  # labels drawn from softmax(logits / 2.5): the raw softmax is overconfident
    p = np.exp(logits / true_t - (logits / true_t).max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = (p.cumsum(1) > rng.random((len(p), 1))).argmax(1)
    t = fit_temperature(logits, y)
    assert t == pytest.approx(true_t, rel=0.05)
    raw = np.exp(logits - logits.max(1, keepdims=True))
    raw /= raw.sum(1, keepdims=True)
    scaled = np.exp(logits / t - (logits / t).max(1, keepdims=True))
    scaled /= scaled.sum(1, keepdims=True)
    assert expected_calibration_error(y, raw) > 0.05
    assert expected_calibration_error(y, scaled) < 0.01
    assert (scaled.argmax(1) == raw.argmax(1)).all()  # a temperature never changes a call
