"""Threshold metrics and the Brier score from scikit-learn (`confusion_matrix`, `brier_score_loss`),
equal to the count formulas they replaced (F1 in count form: 0 when nothing is found)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from medfusion.evaluate.diagnosis import (
    _bootstrap_threshold_metrics,
    brier,
    confusion_counts,
    diagnosis_metrics,
    threshold_metrics,
)


def _by_hand(y: np.ndarray, p: np.ndarray, t: float) -> dict[str, float]:
    """The counting implementation medfusion had before #29, kept here as the oracle."""
    yhat = p >= t
    tp = float(np.sum(yhat & (y == 1)))
    tn = float(np.sum(~yhat & (y == 0)))
    fp = float(np.sum(yhat & (y == 0)))
    fn = float(np.sum(~yhat & (y == 1)))

    def div(a: float, b: float) -> float:
        return a / b if b else float("nan")

    return {
        "accuracy": div(tp + tn, len(y)),
        "sensitivity": div(tp, tp + fn),
        "specificity": div(tn, tn + fp),
        "ppv": div(tp, tp + fp),
        "npv": div(tn, tn + fn),
        "f1": div(2 * tp, 2 * tp + fp + fn),
    }


def _same(a: float, b: float) -> bool:
    return (np.isnan(a) and np.isnan(b)) or abs(a - b) < 1e-12


def test_threshold_metrics_equal_the_count_formulas() -> None:
    rng = np.random.default_rng(0)
    cases = [(rng.integers(0, 2, n), rng.random(n), float(rng.random())) for n in rng.integers(1, 20, 200)]
    cases += [(np.zeros(4, int), rng.random(4), 0.5), (np.ones(4, int), rng.random(4), 0.5)]
    cases += [(np.array([], int), np.array([]), 0.5)]
    for y, p, t in cases:
        ours, ref = threshold_metrics(y, p, t), _by_hand(y, p, t)
        assert list(ours) == list(ref)
        assert all(_same(ours[k], ref[k]) for k in ref), (y, p, t, ours, ref)
        counts = confusion_counts(y, p, t)
        assert counts["tp"] + counts["fn"] == int((y == 1).sum())
        assert counts["fp"] == int(((p >= t) & (y == 0)).sum())


def test_f1_is_the_count_form_as_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 20))
        y, p, t = rng.integers(0, 2, n), rng.random(n), float(rng.random())
        ours = threshold_metrics(y, p, t)["f1"]
        ref = f1_score(y, p >= t, zero_division=np.nan)
        assert (np.isnan(ours) and np.isnan(ref)) or abs(ours - ref) < 1e-12
    assert threshold_metrics(np.array([1, 0]), np.array([0.1, 0.2]), 0.5)["f1"] == 0.0


def test_bootstrap_batch_equals_one_resample_at_a_time() -> None:
    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 2, 12), rng.random(12)
    idx = rng.integers(0, 12, (50, 12))
    idx[0] = np.flatnonzero(y == 0)[0]  # a resample without positives: sensitivity NaN
    batch = _bootstrap_threshold_metrics(y[idx], p[idx], 0.4)
    for r, i in enumerate(idx):
        one = threshold_metrics(y[i], p[i], 0.4)
        assert all(_same(float(batch[k][r]), one[k]) for k in one)


def test_brier_is_the_mean_squared_difference() -> None:
    y, p = np.array([0, 1, 1, 0]), np.array([0.1, 0.8, 0.4, 0.0])
    assert brier(y, p) == pytest.approx(np.mean((p - y) ** 2), abs=1e-15)
    assert brier(np.zeros(3, int), np.array([0.1, 0.2, 0.3])) == pytest.approx(0.14 / 3)
    assert brier(np.ones(3, int), np.array([0.1, 0.2, 0.3])) == pytest.approx(1.94 / 3)
    with pytest.raises(ValueError):
        brier(y, p * 2)


def test_diagnosis_metrics_unchanged_by_the_move_to_scikit_learn() -> None:
    """Values and 95 % CIs recorded with the hand-written implementation (before #29), same example."""
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 30)
    p = np.clip(0.5 * y + rng.random(30) * 0.6, 0, 1)
    d = diagnosis_metrics(y, p, {"model": 0.5, "screen": 0.3, "strict": 0.8}, n_boot=300, seed=3)
    before = {
        "brier": (0.07844243787248767, 0.047927059901179805, 0.10904856863445732),
        "auroc": (0.9955555555555555, 0.9725207390648567, 1.0),
        "sensitivity@strict": (0.5333333333333333, 0.26666666666666666, 0.8),
        "npv@strict": (0.6818181818181818, 0.4782608695652174, 0.8636363636363636),
        "f1@model": (0.967741935483871, 0.88, 1.0),
        "specificity@screen": (0.4666666666666667, 0.19045454545454546, 0.739204545454545),
        "accuracy@strict": (0.7666666666666667, 0.6, 0.9),
        "ppv@strict": (1.0, 1.0, 1.0),
    }
    for k, (value, lo, hi) in before.items():
        got = (d[k]["value"], d[k]["ci_low"], d[k]["ci_high"])
        assert got == pytest.approx((value, lo, hi), rel=1e-12, abs=1e-15), k
    assert d["confusion"]["strict"] == {"tp": 8, "fp": 0, "tn": 15, "fn": 7}
    assert d["confusion"]["screen"] == {"tp": 15, "fp": 8, "tn": 7, "fn": 0}
