"""Label-map clean-up after the argmax.

`drop_lesions_without_core`: every foreground region (26-connected voxels of any foreground class)
that holds no tumour-core voxel is set to background: step 1 of the one lesion definition
(`measure.lesions.lesion_regions`; its entry point `measure.lesions.label_lesions` then splits each
region with core between its separate cores), so the voxels dropped here are exactly those in no
lesion. Oedema surrounds a tumour and calcification sits inside one, so an oedema or calcification
island with no core is a false positive by construction. On the 0.4.0 test cohort the network left
1-60 voxels (median 0.05 ml) of oedema in 17 of the 18 lesion-free patients; each turns a case with
nothing to find into an oedema Dice of 0.
"""

from __future__ import annotations

import numpy as np

from medfusion.measure.lesions import lesion_regions


def drop_lesions_without_core(labels: np.ndarray, core: int = 1) -> tuple[np.ndarray, int]:
    """`labels` (z, y, x class indices) with the foreground regions that hold no voxel of class `core`
    set to background (`measure.lesions.lesion_regions`: step 1 of the lesion definition, whose
    entry point is `measure.lesions.label_lesions`), and how many voxels were removed. The input is not changed; it is returned as is when nothing is removed."""
    lesion = labels > 0
    if not lesion.any():
        return labels, 0
    comp, with_core = lesion_regions(labels, core)
    keep = np.zeros(int(comp.max()) + 1, bool)
    keep[with_core] = True
    keep[0] = True  # background stays as it is
    drop = ~keep[comp]
    if not drop.any():
        return labels, 0
    out = labels.copy()
    out[drop] = 0
    return out, int(drop.sum())


def postprocess_labels(labels: np.ndarray, class_names: list[str], lesions_need_core: bool) -> np.ndarray:
    """Apply the configured clean-up where the package's classes say what a tumour core is: with
    `lesions_need_core` and a "tumour_core" class, `drop_lesions_without_core`; else `labels` as is.

    Args:
        labels: integer label map (z, y, x), values indexing `class_names` (0 background).
        class_names: the package's classes, background first.
        lesions_need_core: whether a lesion without a tumour-core voxel becomes background.

    Returns:
        A label map of the same shape and dtype (a copy when anything was dropped, else `labels`).
    """
    if lesions_need_core and "tumour_core" in class_names:
        labels, _ = drop_lesions_without_core(labels, class_names.index("tumour_core"))
    return labels
