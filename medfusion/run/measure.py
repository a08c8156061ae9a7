"""Measurements on a label map: per-class volumes (mL), lesion count, largest diameter (mm)."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from medfusion.io.volume import Volume
from medfusion.models.measures import feret_diameter_mm


def largest_diameter_mm(mask: np.ndarray, vol: Volume, max_points: int = 3000) -> float:
    """Largest distance (mm) between two voxel centres of `mask` (max Feret diameter; 0 if empty)."""
    return feret_diameter_mm(mask, tuple(vol.spacing[::-1]), max_points)


def measure(labels: Volume, class_names: list[str], lesion_class: int = 1) -> dict[str, Any]:
    """Volumes per class in mL; connected components (26-connectivity) of the lesion class."""
    arr = labels.array
    vml = labels.voxel_volume_ml
    counts = np.bincount(arr.ravel().astype(np.int64), minlength=len(class_names))
    volumes = {name: round(float(counts[k]) * vml, 3) for k, name in enumerate(class_names) if k > 0}
    comp, n = ndimage.label(arr == lesion_class, structure=np.ones((3, 3, 3)))
    diameters = []
    if n:
        sizes = np.bincount(comp.ravel())[1:]
        for k in np.argsort(sizes)[::-1][:5]:
            diameters.append(round(largest_diameter_mm(comp == k + 1, labels), 1))
    return {
        "volumes_ml": volumes,
        "lesion_count": int(n),
        "largest_diameter_mm": max(diameters) if diameters else 0.0,
        "lesion_diameters_mm": diameters,
    }
