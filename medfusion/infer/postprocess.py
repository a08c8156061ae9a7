"""Label-map clean-up after the argmax.

`drop_lesions_without_core`: every connected lesion (26-connected voxels of any foreground class)
that holds no tumour-core voxel is set to background. Oedema surrounds a tumour and calcification
sits inside one, so an oedema or calcification island with no core is a false positive by
construction. On the 0.4.0 test cohort the network left 1-60 voxels (median 0.05 ml) of
oedema in 17 of the 18 lesion-free patients; each turns a case with nothing to find into an oedema
Dice of 0.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def drop_lesions_without_core(labels: np.ndarray, core: int = 1) -> tuple[np.ndarray, int]:
    """`labels` with the core-less lesions removed, and how many voxels were removed."""
    lesion = labels > 0
    if not lesion.any():
        return labels, 0
    comp, n = ndimage.label(lesion, structure=np.ones((3, 3, 3), bool))
    has_core = np.zeros(n + 1, bool)
    has_core[np.unique(comp[labels == core])] = True
    has_core[0] = True  # background stays as it is
    drop = ~has_core[comp]
    if not drop.any():
        return labels, 0
    out = labels.copy()
    out[drop] = 0
    return out, int(drop.sum())


def postprocess_labels(labels: np.ndarray, class_names: list[str], lesions_need_core: bool) -> np.ndarray:
    """Apply the configured clean-up where the package's classes say what a tumour core is."""
    if lesions_need_core and "tumour_core" in class_names:
        labels, _ = drop_lesions_without_core(labels, class_names.index("tumour_core"))
    return labels
