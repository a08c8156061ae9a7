"""Threshold metrics against scikit-learn's definitions (F1 in count form: 0 when nothing is found)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score

from medfusion.evaluate.diagnosis import threshold_metrics


def test_f1_is_the_count_form_as_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 20))
        y, p, t = rng.integers(0, 2, n), rng.random(n), float(rng.random())
        ours = threshold_metrics(y, p, t)["f1"]
        ref = f1_score(y, p >= t, zero_division=np.nan)
        assert (np.isnan(ours) and np.isnan(ref)) or abs(ours - ref) < 1e-12
    assert threshold_metrics(np.array([1, 0]), np.array([0.1, 0.2]), 0.5)["f1"] == 0.0
