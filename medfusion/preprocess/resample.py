"""The model grid: which grid the model sees.

Resampling itself lives in `io/volume.py` (`Volume.resample_to`, `LabelMap.resample_to`, the one
entry point); preprocessing calls it there.
"""

from __future__ import annotations

from medfusion.io.volume import Grid, Volume


def model_grid(ct: Volume | Grid, spacing_mm: float | list[float], size: list[int] | tuple[int, ...]) -> Grid:
    """The model's grid: `size` (x, y, z) voxels of `spacing_mm` (one value or x, y, z; mm), with the
    CT's direction and centred on the CT's centre.

    Raises:
        ValueError: a spacing that is not positive.
    """
    grid = ct if isinstance(ct, Grid) else ct.grid
    return grid.centred_grid(spacing_mm, size)
