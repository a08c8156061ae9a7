"""Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017): the one fit
that training (on its validation split) and `medfusion calibrate --method temperature` (on a labelled
run) both use."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

# the temperatures searched: a probability never sharpened more than 4× nor flattened more than 8× in
# logit; a fit at a bound says the logits carry no usable signal (or perfect separation)
T_MIN, T_MAX = 0.25, 8.0


def _nll(scale: float, z: np.ndarray, y: np.ndarray) -> float:
    """Mean binary negative log-likelihood (nats) of sigmoid(scale · z) for outcomes y, computed
    stably as y · log(1 + e^(−s)) + (1 − y) · log(1 + e^s), s = scale · z."""
    s = scale * z
    return float(np.mean(y * np.logaddexp(0.0, -s) + (1.0 - y) * np.logaddexp(0.0, s)))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-score temperature T minimising the negative log-likelihood of sigmoid(z / T).

    The NLL is convex in 1/T (a logistic loss in the single scale β = 1/T, no intercept), so a bounded
    Brent search over β (`scipy.optimize.minimize_scalar`, method "bounded", tolerance 1e-6 in β) finds
    its minimum on [1 / T_MAX, 1 / T_MIN]; an optimum outside the range gives a T next to the bound.
    Dividing logits by a positive T changes neither their ranking (AUROC) nor the segmentation.

    Args:
        logits: array of shape (n_cases, n_scores), the uncalibrated logits z (finite).
        labels: array of the same shape, outcomes in [0, 1] (0/1 labels).

    Returns:
        float32 array of shape (n_scores,), temperatures in [T_MIN, T_MAX] = [0.25, 8].

    Raises:
        ValueError: the shapes differ, are not 2-D, there are no cases, or a logit is not finite.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> z = rng.normal(0, 2, 4000)
        >>> y = (rng.random(4000) < 1 / (1 + np.exp(-z))).astype(float)
        >>> t = fit_temperature(3 * z[:, None], y[:, None])  # logits 3x too confident
        >>> bool(2.6 < t[0] < 3.4)
        True
    """
    z_all = np.asarray(logits, dtype=np.float64)
    y_all = np.asarray(labels, dtype=np.float64)
    if z_all.ndim != 2 or z_all.shape != y_all.shape:
        msg = (
            f"fit_temperature: logits {z_all.shape} and labels {y_all.shape} must both be (n_cases, n_scores)"
        )
        raise ValueError(msg)
    if len(z_all) == 0:
        msg = "fit_temperature: no cases to fit a temperature on"
        raise ValueError(msg)
    if not np.isfinite(z_all).all():
        msg = "fit_temperature: the logits hold NaN or infinite values"
        raise ValueError(msg)
    temps = []
    for s in range(z_all.shape[1]):
        res = minimize_scalar(
            _nll,
            bounds=(1.0 / T_MAX, 1.0 / T_MIN),
            args=(z_all[:, s], y_all[:, s]),
            method="bounded",
            options={"xatol": 1e-6},
        )
        temps.append(1.0 / float(res.x))
    return np.asarray(temps, np.float32)
