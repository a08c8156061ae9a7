"""Intensity preparation: CT windows scaled to [0, 1]; the CT body and MR head thresholds and masks;
MR robust z-score inside the head mask."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

CT_BODY_HU = -500.0
"""A CT voxel is body (not air) above this many HU: medfusion's one CT body/air threshold (registration's
CT head mask, `ct_body_mask`; air is ≈ −1000 HU, fat ≈ −100 HU, so −500 HU splits them with margin)."""

MR_HEAD_FRACTION = 0.1
"""An MR voxel is head (not air) above this fraction of the image's 99th percentile (`mr_head_threshold`)."""


def mr_head_threshold(mr: np.ndarray) -> float:
    """The MR intensity above which a voxel is head rather than air: `MR_HEAD_FRACTION` (10 %) of the
    99th percentile of `mr` (any shape, arbitrary MR units). medfusion's one MR head/air threshold, used
    by registration's head mask and by the normalisation's mask (`mr_head_mask`).

    A fraction of a high percentile, not Otsu: Otsu splits a T1 image's bright tissues from the rest and
    loses the skull and the CSF inside the scalp; the percentile ignores a few hot voxels.

    Examples:
        >>> mr_head_threshold(np.arange(101.0))
        9.9
    """
    return MR_HEAD_FRACTION * float(np.percentile(mr, 99))


def mr_head_mask(mr: np.ndarray) -> np.ndarray:
    """Boolean mask of `mr` (any shape), True above `mr_head_threshold` (compared in float64)."""
    return mr > np.float64(mr_head_threshold(mr))


def ct_body_mask(hu: np.ndarray) -> np.ndarray:
    """The body of a CT: voxels above `CT_BODY_HU` (−500 HU), the largest connected component (face
    connectivity, `scipy.ndimage.label`) with its holes filled (`scipy.ndimage.binary_fill_holes`), so
    that a head rest, the table or a detached blanket apart from the body is left out.

    Args:
        hu: a 3D CT array (z, y, x) in Hounsfield units, any spacing (callers subsample it first).

    Returns:
        A boolean array of `hu`'s shape; all False when no voxel is above the threshold.

    Used by the domain guard's CT facts (`models/domain.ct_facts`) and the lesions' midline and head
    centre (`measure/lesions.find_lesions`). Registration's working-image head mask uses the same
    threshold (`CT_BODY_HU`) in SimpleITK (`preprocess/registration.head_mask`).

    Examples:
        >>> hu = np.full((1, 1, 7), -1000.0); hu[0, 0, [1, 2, 3, 5]] = 40.0
        >>> ct_body_mask(hu).astype(int).ravel().tolist()
        [0, 1, 1, 1, 0, 0, 0]
    """
    comp, n = ndimage.label(np.asarray(hu) > CT_BODY_HU)
    if n == 0:
        return np.zeros(np.shape(hu), bool)
    sizes = np.bincount(comp.ravel())
    sizes[0] = 0
    return np.asarray(ndimage.binary_fill_holes(comp == int(sizes.argmax())), bool)


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
