"""Intensity preparation: CT windows scaled to [0, 1]; MR robust z-score inside the head mask."""

from __future__ import annotations

import numpy as np


def ct_windows(hu: np.ndarray, windows: list[list[float]]) -> np.ndarray:
    """One channel per (low, high) HU window, clipped and scaled to [0, 1]."""
    out = np.empty((len(windows), *hu.shape), np.float32)
    for c, (lo, hi) in enumerate(windows):
        out[c] = (np.clip(hu, lo, hi) - lo) / (hi - lo)
    return out


def mr_robust_z(mr: np.ndarray, mask: np.ndarray, percentiles: list[float]) -> np.ndarray:
    """(x − median) / (spread / 2) inside the mask, spread = p_high − p_low; clipped to ±5. 0 outside.

    A percentile spread instead of the standard deviation keeps the scale stable against the bias
    field and bright enhancing lesions.
    """
    vals = mr[mask] if np.any(mask) else mr.ravel()
    lo, med, hi = np.percentile(vals, [percentiles[0], 50.0, percentiles[1]])
    scale = max(float(hi - lo) / 2.0, 1e-6)
    z = np.clip((mr - med) / scale, -5.0, 5.0).astype(np.float32)
    z[~mask] = 0.0
    return z
