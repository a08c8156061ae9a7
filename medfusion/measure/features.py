"""The diagnosis's measurement features: what it reads off a label map beside the network's own score —
the size of the largest tumour core, how far its oedema reaches, whether anything calcified, volumes
and lesion count. Lesions are those of measure/lesions.py (the one definition).

Why: these are the quantities a radiologist reads off a segmented tumour (size and perifocal oedema as
in RANO-style reporting, calcification as a sign of a slow-growing lesion), and the segmentation is the
part of the network that is measured and good (test Dice 0.80-0.89); the score head's learnt summary of
lesion-window features ranked cases worse than a logistic regression on these few numbers did on the
training cohort (cross-validated AUROC 0.92 with the note logit, against 0.85 for 0.5.0 on the test
cohort). The regression is fitted on the training cases' reference label maps (train/diagnosis.py,
`fit_measure_model`) and applied to the predicted label map at inference, on the model grid both times.

In the synthetic cohort these are exactly the image facts the diagnosis is drawn from
(docs/synthetic-data.md), so the gain they bring here is an upper bound on what to expect from real data.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from medfusion.measure.lesions import class_roles, feret_diameter_mm, label_lesions

FEATURES = (
    "lesion_present",
    "core_diameter_mm",  # largest core (with its calcification) of the lesion with the most core
    "oedema_radius_ratio",  # cube root of that lesion's volume over its core's: 1 when no oedema
    "calcification_present",
    "log_core_ml",  # log(1 + mL) over all lesions
    "log_oedema_ml",
    "lesion_count",
)

# the lesion definition, the Feret diameter and the class roles live in measure/lesions.py
__all__ = ["FEATURES", "class_roles", "feret_diameter_mm", "grid_spacing_zyx", "lesion_features"]


def lesion_features(labels: np.ndarray, spacing_zyx: tuple[float, ...], class_names: list[str]) -> np.ndarray:
    """The `FEATURES` of an integer label map (z, y, x), as float32.

    A lesion is a 26-connected group of foreground voxels holding at least one core voxel; the others
    (oedema or calcification with no core) are ignored, as post-processing removes them.

    Examples:
        >>> lab = np.zeros((8, 8, 8), np.uint8); lab[2:6, 2:6, 2:6] = 2; lab[3:5, 3:5, 3:5] = 1
        >>> f = lesion_features(lab, (1.0, 1.0, 1.0), ["background", "tumour_core", "oedema"])
        >>> [round(float(v), 2) for v in f]
        [1.0, 1.73, 2.0, 0.0, 0.01, 0.05, 1.0]
    """
    core_k, calc_k = class_roles(class_names)
    out = np.zeros(len(FEATURES), np.float32)
    comp, with_core = label_lesions(labels, class_names)
    n = int(comp.max())
    is_core = labels == core_k
    if len(with_core) == 0:  # nothing found: zeros, and a ratio of 1 (no oedema around no core)
        out[FEATURES.index("oedema_radius_ratio")] = 1.0
        return out
    calc = np.zeros_like(is_core) if calc_k is None else labels == calc_k
    solid = is_core | calc
    ml = float(np.prod(spacing_zyx)) / 1000.0
    sizes = np.bincount(comp.ravel(), minlength=n + 1)
    solid_sizes = np.bincount(comp[solid], minlength=n + 1)
    main = int(with_core[np.argmax(solid_sizes[with_core])])
    lesion = np.zeros(n + 1, bool)
    lesion[with_core] = True
    box = ndimage.find_objects(comp, max_label=main)[main - 1]  # the main lesion's bounding box
    n_solid = int(solid_sizes[lesion].sum())
    out[:] = [
        1.0,
        feret_diameter_mm(solid[box] & (comp[box] == main), spacing_zyx),
        (sizes[main] / max(int(solid_sizes[main]), 1)) ** (1.0 / 3.0),
        float(bool(lesion[comp[calc]].any())),
        np.log1p(n_solid * ml),
        np.log1p(float(sizes[lesion].sum() - n_solid) * ml),
        float(len(with_core)),
    ]
    return out


def grid_spacing_zyx(target_spacing_mm: float | list[float]) -> tuple[float, float, float]:
    """The model grid's spacing in array order (z, y, x) from `preprocess.target_spacing_mm` (x, y, z)."""
    s = np.broadcast_to(np.asarray(target_spacing_mm, float), (3,))
    return float(s[2]), float(s[1]), float(s[0])
