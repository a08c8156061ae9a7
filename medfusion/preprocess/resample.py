"""The model grid, and the resampling calls preprocessing makes (all through `Volume.resample_to`).

Resampling itself lives in `io/volume.py` (`Volume.resample_to`, `LabelMap.resample_to`); this module
only says which grid the model sees.
"""

from __future__ import annotations

import numpy as np

from medfusion.io.volume import Grid, LabelMap, Volume


def model_grid(ct: Volume | Grid, spacing_mm: float | list[float], size: list[int] | tuple[int, ...]) -> Grid:
    """The model's grid: `size` (x, y, z) voxels of `spacing_mm` (one value or x, y, z; mm), with the
    CT's direction and centred on the CT's centre.

    Raises:
        ValueError: a spacing that is not positive.
    """
    grid = ct if isinstance(ct, Grid) else ct.grid
    return grid.centred_grid(spacing_mm, size)


def resample(
    vol: Volume,
    reference: Volume | Grid,
    matrix: np.ndarray | None = None,
    label: bool = False,
    default: float | None = None,
) -> Volume:
    """`vol` on `reference`'s grid: `Volume.resample_to` (kept for callers written before it).

    Args:
        vol: the image; with `label` True it is read as class indices (nearest-neighbour, integer
            type kept), otherwise linear into float32.
        reference: the output grid (or a volume standing for it).
        matrix: 4×4 LPS matrix mapping reference points to `vol` points (ITK); None: identity.
        default: value outside `vol` (images: None → its minimum; labels: 0).
    """
    if label:
        return LabelMap.of(vol).resample_to(reference, matrix, default=default)
    return vol.resample_to(reference, matrix, default=default)
