"""CT (Hounsfield units) and MR (T1 post-contrast-like, arbitrary units) appearance of the phantom."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

from medfusion.io.volume import Volume
from medfusion.synth.phantom import HeadPhantom, Tissue

# Mean HU per tissue; bone and calcification are drawn per patient within their ranges.
CT_HU = {
    Tissue.AIR: -1000.0,
    Tissue.FAT: -90.0,
    Tissue.CSF: 8.0,
    Tissue.GREY: 38.0,
    Tissue.WHITE: 28.0,
    Tissue.VENTRICLE: 8.0,
    Tissue.SINUS: -950.0,
    Tissue.CORE: 36.0,  # subtly different from white matter
    Tissue.NECROSIS: 22.0,
    Tissue.OEDEMA: 20.0,
}
MR_T1C = {
    Tissue.AIR: 0.0,
    Tissue.FAT: 900.0,
    Tissue.BONE_CORTEX: 40.0,
    Tissue.BONE_DIPLOE: 520.0,
    Tissue.CSF: 140.0,
    Tissue.GREY: 430.0,
    Tissue.WHITE: 640.0,
    Tissue.VENTRICLE: 140.0,
    Tissue.SINUS: 0.0,
    Tissue.CORE: 560.0,
    Tissue.NECROSIS: 180.0,
    Tissue.OEDEMA: 330.0,
    Tissue.CALCIFICATION: 60.0,
}
ENHANCING_RIM = 1150.0


def grid_points(vol: Volume, k0: int = 0, k1: int | None = None) -> np.ndarray:
    """LPS points of every voxel of slices `k0`…`k1` − 1 (all by default), in the array's (k, j, i)
    order, as an (N, 3) float64 array."""
    nz, ny, nx = vol.shape
    k, j, i = np.meshgrid(
        np.arange(k0, nz if k1 is None else k1), np.arange(ny), np.arange(nx), indexing="ij"
    )
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1).astype(np.float64)
    return vol.index_to_world(ijk)


def slabs(vol: Volume, voxels: int = 2_000_000) -> list[tuple[int, int]]:
    """Slice ranges (k0, k1) of about `voxels` voxels each, so that per-voxel float64 point arrays
    stay small whatever the matrix (a 512 × 512 × 300 CT would need 1.9 GB at once)."""
    nz, ny, nx = vol.shape
    step = max(1, voxels // (ny * nx))
    return [(k, min(nz, k + step)) for k in range(0, nz, step)]


def render_ct(head: HeadPhantom, tissue: np.ndarray, grid: Volume, rng: np.random.Generator) -> np.ndarray:
    """A CT in HU (float32, the shape of `tissue` (z, y, x) on `grid`): each tissue's HU (`CT_HU`; bone
    and calcification drawn per patient), a ≈ 0.6 mm Gaussian scanner blur and noise of σ 4 HU, clipped
    to [-1024, 3071]."""
    hu = np.zeros(tissue.shape, np.float32)
    for t, v in CT_HU.items():
        hu[tissue == t] = v
    hu[tissue == Tissue.BONE_CORTEX] = rng.uniform(1200, 1500)
    hu[tissue == Tissue.BONE_DIPLOE] = rng.uniform(700, 900)
    calc = tissue == Tissue.CALCIFICATION
    hu[calc] = rng.uniform(300, 1000)
    sigma_vox = [0.6 * 1.0 / s for s in grid.spacing[::-1]]  # ≈0.6 mm scanner blur
    hu = ndimage.gaussian_filter(hu, sigma=[max(0.4, s) for s in sigma_vox])
    hu += rng.normal(0.0, 4.0, hu.shape).astype(np.float32)  # float64 draws: 8 bytes a voxel, briefly
    return np.clip(hu, -1024, 3071).astype(np.float32)


def render_mr(
    head: HeadPhantom,
    tissue: np.ndarray,
    rim: np.ndarray,
    grid: Volume,
    to_phantom: Callable[[np.ndarray], np.ndarray],
    rng: np.random.Generator,
) -> np.ndarray:
    """T1c-like image; `to_phantom` maps the grid's LPS points into the phantom (CT) frame, for the bias field."""
    sig = np.zeros(tissue.shape, np.float32)
    scale = rng.uniform(0.8, 1.25)
    for t, v in MR_T1C.items():
        sig[tissue == t] = v * scale
    sig[rim & (tissue == Tissue.CORE)] = ENHANCING_RIM * scale
    sig = ndimage.gaussian_filter(sig, sigma=0.5)
    # smooth multiplicative bias field, ±~20 %
    c = rng.normal(0, 1, 6) * 0.08
    for k0, k1 in slabs(grid):
        p = to_phantom(grid_points(grid, k0, k1)).reshape(k1 - k0, *tissue.shape[1:], 3) / 100.0
        bias = np.exp(
            c[0] * p[..., 0]
            + c[1] * p[..., 1]
            + c[2] * p[..., 2]
            + c[3] * p[..., 0] * p[..., 1]
            + c[4] * p[..., 2] ** 2
            + c[5] * p[..., 0] ** 2
        )
        sig[k0:k1] *= bias.astype(np.float32)
    noise = 18.0 * scale
    re = sig + rng.normal(0, noise, sig.shape)
    im = rng.normal(0, noise, sig.shape)
    return np.sqrt(re**2 + im**2).astype(np.float32)  # Rician magnitude
