"""Resampling between grids (SimpleITK): MR onto the CT, CT grid onto the model grid, and back."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from medfusion.io.volume import Volume


def model_grid(ct: Volume, spacing_mm: float | list[float], size: list[int] | tuple[int, ...]) -> Volume:
    """A grid of `size` (x, y, z) voxels of `spacing_mm` (one value or x, y, z), axis-aligned with the
    CT and centred on the CT's centre."""
    size_xyz = np.asarray(size, dtype=int)
    spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=float), (3,))
    if np.any(spacing <= 0):
        msg = f"target spacing must be positive, got {spacing_mm}"
        raise ValueError(msg)
    centre_idx = (np.asarray(ct.size_xyz, float) - 1) / 2.0
    centre = ct.index_to_world(centre_idx[None])[0]
    half = ct.direction @ (spacing * (size_xyz - 1) / 2.0)
    return Volume(
        np.zeros(tuple(size_xyz[::-1]), np.float32),
        (float(spacing[0]), float(spacing[1]), float(spacing[2])),
        tuple(centre - half),
        ct.direction.copy(),
        "GRID",
    )


def resample(
    vol: Volume,
    reference: Volume,
    matrix: np.ndarray | None = None,
    label: bool = False,
    default: float | None = None,
) -> Volume:
    """`vol` sampled on `reference`'s grid; `matrix` maps reference points to `vol` points (ITK).

    Labels use nearest-neighbour and keep their integer type; images use linear interpolation.
    """
    tx = sitk.AffineTransform(3)
    if matrix is not None:
        tx.SetMatrix(np.asarray(matrix[:3, :3], float).ravel().tolist())
        tx.SetTranslation(np.asarray(matrix[:3, 3], float).tolist())
    src = vol.to_sitk()
    ref = reference.to_sitk()
    if label:
        out = sitk.Resample(src, ref, tx, sitk.sitkNearestNeighbor, 0, src.GetPixelID())
    else:
        fill = float(default) if default is not None else float(np.min(vol.array))
        out = sitk.Resample(
            sitk.Cast(src, sitk.sitkFloat32), ref, tx, sitk.sitkLinear, fill, sitk.sitkFloat32
        )
    return Volume.from_sitk(out, vol.modality, dict(vol.meta))


def probabilities_to_grid(probs: np.ndarray, source: Volume, target: Volume) -> np.ndarray:
    """(C, z, y, x) class probabilities on `source`'s grid → (C, z', y', x') on `target`'s grid (linear)."""
    out = np.empty((probs.shape[0], *target.shape), np.float32)
    for c in range(probs.shape[0]):
        out[c] = resample(
            source.with_array(probs[c].astype(np.float32)), target, default=1.0 if c == 0 else 0.0
        ).array
    return out
