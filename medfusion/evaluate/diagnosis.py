"""Diagnosis metrics with percentile-bootstrap 95 % confidence intervals.

AUROC, AUPRC (average precision), the confusion counts and the Brier score are scikit-learn's;
accuracy, sensitivity (recall of positives), specificity, PPV, NPV and F1 are taken at a probability
threshold (p ≥ t is positive) from those counts; Brier = mean (p − y)² (Brier, Mon Weather Rev 1950); ECE = Σ_b (n_b / n) |mean(y)_b − mean(p)_b|
over 10 equal-width bins (`ece`). ECE is biased upwards on small cohorts (a perfectly calibrated
model's ECE on 100 cases with the shipped model's probabilities has median ≈ 0.10), so it comes with
the distribution it would have if the probabilities were exactly calibrated (outcomes drawn as
Bernoulli(p)) and the share of those draws at least as large as the observed value: a p-value for
"miscalibrated beyond chance".
A metric that is undefined on a sample (e.g. AUROC with one class) is NaN there and bootstrap
resamples where it is undefined are dropped (their count is reported). Below `MIN_CASES` cases no
metric is reported at all (see there).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    multilabel_confusion_matrix,
    roc_auc_score,
)


def ece(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error of binary probabilities: Σ_b (n_b / n) |mean(y)_b − mean(p)_b|.

    The binned estimator of Naeini, Cooper & Hauskrecht (AAAI 2015) as used by Guo et al. ("On
    Calibration of Modern Neural Networks", ICML 2017), applied to the positive-class probability
    against the observed positive rate (not top-label confidence against accuracy). Bins are
    `bins` equal-width intervals [k/bins, (k+1)/bins) of [0, 1], the last one closed; values
    outside [0, 1] fall into the first or last bin.

    Args:
        y: array-like of shape (n,), outcomes 0/1.
        p: array-like of shape (n,), predicted probabilities of the positive class, in [0, 1].
        bins: number of equal-width bins.

    Returns:
        ECE in [0, 1]; 0 is perfectly calibrated. Empty bins contribute nothing; empty input gives
        0.0. Biased upwards on small cohorts (see `ece_calibrated_null`).

    Raises:
        IndexError: `y` and `p` differ in length.
    """
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.mean() * abs(y[m].mean() - p[m].mean())
    return float(total)


def ece_calibrated_null(p: np.ndarray, n_draws: int = 2000, seed: int = 0) -> np.ndarray:
    """ECE values of a perfectly calibrated model with probabilities `p`: outcomes drawn as Bernoulli(p)."""
    p = np.asarray(p, float)
    rng = np.random.default_rng(seed)
    return np.array([ece((rng.random(len(p)) < p).astype(float), p) for _ in range(n_draws)])


def _safe(fn: Callable[[np.ndarray, np.ndarray], float]) -> Callable[[np.ndarray, np.ndarray], float]:
    def inner(y: np.ndarray, p: np.ndarray) -> float:
        if len(np.unique(y)) < 2:
            return float("nan")
        return float(fn(y, p))

    return inner


THRESHOLD_METRICS = ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1")
"""The metrics taken at a probability threshold (Metrics Reloaded's names; `threshold_metrics`)."""


def _rates(tn: ArrayLike, fp: ArrayLike, fn: ArrayLike, tp: ArrayLike) -> dict[str, np.ndarray]:
    """`THRESHOLD_METRICS` from confusion counts (arrays of one shape, one entry per sample or resample):
    the formulas of `threshold_metrics`, NaN where a denominator is 0."""
    tn, fp, fn, tp = (np.asarray(v, float) for v in (tn, fp, fn, tp))
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "accuracy": (tp + tn) / (tp + tn + fp + fn),
            "sensitivity": tp / (tp + fn),
            "specificity": tn / (tn + fp),
            "ppv": tp / (tp + fp),
            "npv": tn / (tn + fn),
            "f1": 2 * tp / (2 * tp + fp + fn),  # the count form: 0 when nothing is found, NaN on no cases
        }


def _confusion(y: np.ndarray, p: np.ndarray, t: float) -> tuple[int, int, int, int]:
    """(TN, FP, FN, TP) with p ≥ `t` called positive: scikit-learn's `confusion_matrix` (labels 0, 1);
    all 0 on empty input."""
    y = np.asarray(y, int)
    if y.size == 0:
        return 0, 0, 0, 0
    tn, fp, fn, tp = confusion_matrix(y, (np.asarray(p) >= t).astype(int), labels=[0, 1]).ravel()
    return int(tn), int(fp), int(fn), int(tp)


def threshold_metrics(y: np.ndarray, p: np.ndarray, t: float) -> dict[str, float]:
    """Confusion-matrix metrics with p ≥ `t` called positive (counts from scikit-learn's
    `confusion_matrix`).

    accuracy = (TP + TN) / n; sensitivity (recall) = TP / (TP + FN); specificity = TN / (TN + FP);
    PPV (precision) = TP / (TP + FP); NPV = TN / (TN + FN); F1 = harmonic mean of sensitivity and
    PPV (van Rijsbergen 1979). Names as in Metrics Reloaded (Maier-Hein et al., Nat Methods 2024).

    Args:
        y: array of shape (n,), outcomes 0/1.
        p: array of shape (n,), predicted probabilities in [0, 1].
        t: the probability threshold.

    Returns:
        The six metrics (`THRESHOLD_METRICS`), each in [0, 1]. A metric whose denominator is 0 is NaN
        (e.g. sensitivity without positives, everything on empty input); F1 is 2TP / (2TP + FP + FN)
        (van Rijsbergen 1979), 0 when positives exist and none is found, NaN only when there is neither.
    """
    return {k: float(v) for k, v in _rates(*_confusion(y, p, t)).items()}


def _bootstrap_threshold_metrics(y: np.ndarray, p: np.ndarray, t: float) -> dict[str, np.ndarray]:
    """`threshold_metrics` of many resamples at once: `y`, `p` of shape (n_boot, n); each metric an
    array of shape (n_boot,). One scikit-learn call (`multilabel_confusion_matrix`, samplewise: each
    row's 2×2 counts) instead of one per resample."""
    mcm = multilabel_confusion_matrix(np.asarray(y, int), (np.asarray(p) >= t).astype(int), samplewise=True)
    return _rates(mcm[:, 0, 0], mcm[:, 0, 1], mcm[:, 1, 0], mcm[:, 1, 1])


def confusion_counts(y: np.ndarray, p: np.ndarray, t: float) -> dict[str, int]:
    """TP, FP, TN, FN with p ≥ `t` called positive (`y`: outcomes 0/1, `p`: probabilities, shape (n,);
    scikit-learn's `confusion_matrix`). Counts, not estimates: reported on any number of cases."""
    tn, fp, fn, tp = _confusion(y, p, t)
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn}


def brier(y: np.ndarray, p: np.ndarray) -> float:
    """Brier score, mean (p − y)² over the cases (Brier, Mon Weather Rev 1950), scikit-learn's
    `brier_score_loss` with 1 the positive class: 0 is perfect, 0.25 is a constant 0.5.

    Args:
        y: array of shape (n,), outcomes 0/1 (one class only is allowed).
        p: array of shape (n,), probabilities of the positive class, in [0, 1].

    Raises:
        ValueError: a probability outside [0, 1], an outcome other than 0/1, or no cases.
    """
    return float(brier_score_loss(np.asarray(y, int), np.asarray(p, float), pos_label=1))


def calibration_in_the_large(y: np.ndarray, p: np.ndarray) -> float:
    """Mean probability minus the observed rate: > 0 the model over-predicts on average, < 0 under
    (the first level of the calibration hierarchy, Van Calster et al., J Clin Epidemiol 2016)."""
    return float(np.mean(p) - np.mean(y))


def logistic_on_logit(y: np.ndarray, z: np.ndarray) -> tuple[float, float]:
    """Slope and intercept of the unpenalised logistic regression of the outcome `y` on the logit `z`,
    by Newton's method (two parameters; scikit-learn's solver takes ≈ 0.1 s a fit, too slow inside a
    2 000-draw bootstrap — the test checks the two agree). NaN when the outcome or the logit does not
    vary, or when the logit separates 0/1 outcomes (every positive's logit ≥ every negative's, or ≤): no
    finite fit exists then, and Newton's iterate would stop at an arbitrary large slope (86 on the 7 demo
    patients) instead of failing."""
    yy = np.asarray(y, float)
    z = np.asarray(z, float)
    if np.ptp(z) == 0 or np.ptp(yy) == 0:
        return float("nan"), float("nan")
    if np.isin(yy, (0.0, 1.0)).all():
        pos, neg = z[yy == 1], z[yy == 0]
        if pos.min() >= neg.max() or pos.max() <= neg.min():
            return float("nan"), float("nan")
    x = np.column_stack([np.ones_like(z), z])
    beta = np.array([0.0, 1.0])
    for _ in range(50):
        m = 1 / (1 + np.exp(-(x @ beta)))
        w = m * (1 - m)
        step = np.linalg.solve(x.T @ (x * w[:, None]) + 1e-12 * np.eye(2), x.T @ (yy - m))
        beta = beta + step
        if not np.all(np.isfinite(beta)) or abs(beta[1]) > 1e3:
            return float("nan"), float("nan")
        if np.max(np.abs(step)) < 1e-10:
            break
    return float(beta[1]), float(beta[0])


def calibration_slope(y: np.ndarray, p: np.ndarray) -> float:
    """Slope of the logistic regression of the outcome on logit(p) (Cox 1958): 1 when the spread of the
    probabilities is right, < 1 when they are too extreme, > 1 when too timid."""
    q = np.clip(np.asarray(p, float), 1e-7, 1 - 1e-7)
    return logistic_on_logit(y, np.log(q / (1 - q)))[0]


MIN_CASES = 3
"""The fewest cases any metric is reported for. n cases have C(2n − 1, n) distinct bootstrap resamples
(the multisets of n draws from n cases): 3 for n = 2, so the 2.5th and 97.5th percentiles are drawn from three
values and the interval is degenerate (an AUROC of 1.000, 95 % CI 1.000 to 1.000, from 2 cases);
n = 3 gives 10."""


def refusal(n: int) -> str | None:
    """Why no metric is reported on `n` cases (None when there are enough: n ≥ `MIN_CASES`)."""
    return None if n >= MIN_CASES else f"needs at least {MIN_CASES} cases, has {n}"


# What `medfusion evaluate` prints and lists first in metrics_summary.json (plus the threshold ones in the PDF)
HEADLINE = ("auroc", "auprc", "brier", "ece", "calibration_in_the_large", "calibration_slope")


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "auroc": _safe(roc_auc_score),
    "auprc": _safe(average_precision_score),
    "brier": brier,
    "ece": ece,
    "calibration_in_the_large": calibration_in_the_large,
    "calibration_slope": _safe(calibration_slope),
}


def diagnosis_metrics(
    y: np.ndarray, p: np.ndarray, thresholds: dict[str, float], n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Point values and 95 % CIs of every metric; threshold metrics at each named threshold.

    CIs are the 2.5th and 97.5th percentiles of `n_boot` bootstrap resamples of the cases (drawn
    with a generator seeded with `seed`); resamples where a metric is undefined (NaN) are dropped and
    counted in ``bootstrap_undefined``.

    Args:
        y: array-like of shape (n,), outcomes 0/1.
        p: array-like of shape (n,), predicted probabilities of the positive class, in [0, 1].
        thresholds: name → probability threshold; each adds ``<metric>@<name>`` entries.
        n_boot: bootstrap resamples.
        seed: seed of the bootstrap and of the ECE null draws.

    Returns:
        ``n``, ``n_positive``, ``thresholds``, ``confusion`` (`confusion_counts` per threshold name),
        and per metric a dict of ``value``, ``ci_low``,
        ``ci_high`` (None where undefined, e.g. AUROC with one class) and ``bootstrap_undefined``.
        ``ece`` also carries ``calibrated_null`` (median, 95th percentile and p-value of the ECE of
        exactly calibrated outcomes, `ece_calibrated_null`). With fewer than `MIN_CASES` cases every
        metric is refused: value and CI None, and ``refused`` says how many cases it needs.
    """
    y = np.asarray(y, int)
    p = np.asarray(p, float)
    if (why := refusal(len(y))) is not None:
        names = [*METRICS, *(f"{k}@{t}" for t in thresholds for k in THRESHOLD_METRICS)]
        none = {"value": None, "ci_low": None, "ci_high": None, "bootstrap_undefined": 0, "refused": why}
        return {
            "n": int(len(y)),
            "n_positive": int(y.sum()),
            "thresholds": thresholds,
            "confusion": {name: confusion_counts(y, p, t) for name, t in thresholds.items()},
        } | {k: dict(none) for k in names}

    point: dict[str, float] = {k: f(y, p) for k, f in METRICS.items()}
    for name, t in thresholds.items():
        point.update({f"{k}@{name}": v for k, v in threshold_metrics(y, p, t).items()})
    rng = np.random.default_rng(seed)
    idx = np.array([rng.integers(0, len(y), len(y)) for _ in range(n_boot)]).reshape(n_boot, len(y))
    boots: dict[str, np.ndarray] = {k: np.array([f(y[i], p[i]) for i in idx]) for k, f in METRICS.items()}
    for name, t in thresholds.items():
        rates = _bootstrap_threshold_metrics(y[idx], p[idx], t) if n_boot else {}
        boots.update({f"{k}@{name}": rates.get(k, np.array([])) for k in THRESHOLD_METRICS})
    result: dict[str, Any] = {
        "n": int(len(y)),
        "n_positive": int(y.sum()),
        "thresholds": thresholds,
        "confusion": {name: confusion_counts(y, p, t) for name, t in thresholds.items()},
    }
    for k, v in point.items():
        b = np.asarray(boots[k])
        ok = b[~np.isnan(b)]
        lo, hi = np.percentile(ok, [2.5, 97.5]) if len(ok) else (np.nan, np.nan)
        result[k] = {
            "value": None if np.isnan(v) else v,
            "ci_low": None if np.isnan(lo) else float(lo),
            "ci_high": None if np.isnan(hi) else float(hi),
            "bootstrap_undefined": int(len(b) - len(ok)),
        }
    null = ece_calibrated_null(p, max(200, n_boot), seed)
    result["ece"]["calibrated_null"] = {
        "median": float(np.median(null)),
        "p95": float(np.percentile(null, 95)),
        "p_value": float(np.mean(null >= point["ece"])),
    }
    return result
