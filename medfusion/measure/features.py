"""The diagnosis's measurement features: what it reads off a label map beside the network's own score —
the size of the main lesion's tumour core, how far its oedema reaches, whether anything calcified,
volumes and lesion count. Lesions are those of measure/lesions.py (`label_lesions`, the one
definition, also read by the run's measurements, the report and the SR).

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

from medfusion.measure.lesions import class_roles, feret_diameter_mm, label_lesions

FEATURES = (
    "lesion_present",
    "core_diameter_mm",  # the Feret diameter of the main lesion's core + calcification
    "oedema_radius_ratio",  # cube root of the main lesion's volume over its core's: 1 when no oedema
    "calcification_present",
    "log_core_ml",  # log(1 + mL) of core + calcification over all lesions
    "log_oedema_ml",  # log(1 + mL) of the rest of all lesions
    "lesion_count",
)

# the lesion definition, the Feret diameter and the class roles live in measure/lesions.py
__all__ = ["FEATURES", "class_roles", "feret_diameter_mm", "grid_spacing_zyx", "lesion_features"]


def lesion_features(labels: np.ndarray, spacing_zyx: tuple[float, ...], class_names: list[str]) -> np.ndarray:
    """The `FEATURES` of an integer label map, float32 of shape (7,).

    The lesions are `measure.lesions.label_lesions`' — the ones the run's measurements, the report and
    the SR count (two tumours whose oedema touches are two lesions); the **main lesion** is the one with
    the most core + calcification voxels, and its core diameter and oedema ratio come from it alone.

    Args:
        labels: (z, y, x) class indices of `class_names` ("tumour_core", else 1, is the core).
        spacing_zyx: the grid's spacing in array order, mm (`Grid.spacing_zyx`; the model grid's at
            training and at inference).
        class_names: the label map's classes.

    Returns:
        lesion_present (0/1), core_diameter_mm (mm, ≥ 0), oedema_radius_ratio (≥ 1; 1 without a
        lesion), calcification_present (0/1, in any lesion), log_core_ml and log_oedema_ml (log(1 + mL),
        over all lesions), lesion_count (≥ 0). Without a lesion: zeros and a ratio of 1.

    Examples:
        >>> lab = np.zeros((8, 8, 8), np.uint8); lab[2:6, 2:6, 2:6] = 2; lab[3:5, 3:5, 3:5] = 1
        >>> f = lesion_features(lab, (1.0, 1.0, 1.0), ["background", "tumour_core", "oedema"])
        >>> [round(float(v), 2) for v in f]
        [1.0, 1.73, 2.0, 0.0, 0.01, 0.05, 1.0]
    """
    _, calc_k = class_roles(class_names)
    out = np.zeros(len(FEATURES), np.float32)
    found = label_lesions(labels, class_names, spacing_zyx)
    if len(found.ids) == 0:  # nothing found: zeros, and a ratio of 1 (no oedema around no core)
        out[FEATURES.index("oedema_radius_ratio")] = 1.0
        return out
    comp = found.components
    ml = float(np.prod(spacing_zyx)) / 1000.0
    sizes = np.bincount(comp.ravel(), minlength=len(found.solid_voxels))
    main = int(found.ids[0])
    box = found.boxes()[main - 1]  # the main lesion's bounding box
    assert box is not None
    n_lesion = int(sizes[found.ids].sum())
    n_solid = int(found.solid_voxels[found.ids].sum())
    calcified = calc_k is not None and bool(np.any((comp > 0) & (labels == calc_k)))
    out[:] = [
        1.0,
        feret_diameter_mm(found.solid[box] & (comp[box] == main), spacing_zyx),
        (sizes[main] / max(int(found.solid_voxels[main]), 1)) ** (1.0 / 3.0),
        float(calcified),
        np.log1p(n_solid * ml),
        np.log1p(float(n_lesion - n_solid) * ml),
        float(len(found.ids)),
    ]
    return out


def grid_spacing_zyx(target_spacing_mm: float | list[float]) -> tuple[float, float, float]:
    """The model grid's spacing in array order (z, y, x), mm, from `preprocess.target_spacing_mm`
    (one value, or x, y, z)."""
    s = np.broadcast_to(np.asarray(target_spacing_mm, float), (3,))
    return float(s[2]), float(s[1]), float(s[0])
