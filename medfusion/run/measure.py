"""Measurements on a predicted label map for scores.json and the report: per-class volumes (mL) and
the lesions (measure/lesions.py, the one lesion definition) with their findings."""

from __future__ import annotations

import numpy as np

from medfusion.io.volume import Volume
from medfusion.measure.lesions import find_lesions
from medfusion.run.result import Measurements


def measure(
    labels: Volume,
    class_names: list[str],
    *,
    ct: Volume | None = None,
    mr: Volume | None = None,
) -> Measurements:
    """Volumes per class (mL) and the lesions of `labels` (`measure.lesions.find_lesions`, the lesions
    the diagnosis's features and evaluation count too).

    Args:
        labels: (z, y, x) class indices of `class_names` on the CT's grid (any orientation).
        class_names: the label map's classes, background first.
        ct: the CT on the same grid (HU): adds each core's CT density and places the midline.
        mr: an MR on the same grid: adds each core's enhancement ratio.

    Returns:
        scores.json's `Measurements`: ``volumes_ml`` {class: mL}, ``lesion_count``,
        ``largest_diameter_mm`` (the longest core diameter of all lesions, 0.0 when there is none),
        ``lesion_diameters_mm`` (longest core diameter per lesion, largest core first, mm) and
        ``lesions`` (each lesion's findings, `measure.lesions.Lesion`).

    Raises:
        ValueError: `ct` or `mr` is not on the grid of `labels`.
    """
    arr = labels.array
    vml = labels.voxel_volume_ml
    counts = np.bincount(arr.ravel().astype(np.int64), minlength=len(class_names))
    volumes = {name: round(float(counts[k]) * vml, 3) for k, name in enumerate(class_names) if k > 0}
    lesions = find_lesions(labels, class_names, ct=ct, mr=mr)
    diameters = [lesion.core_diameter_mm for lesion in lesions]
    return Measurements(
        volumes_ml=volumes,
        lesion_count=len(lesions),
        largest_diameter_mm=max(diameters) if diameters else 0.0,
        lesion_diameters_mm=diameters,
        lesions=lesions,
    )
