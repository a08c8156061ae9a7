"""The one lesion definition (measure/lesions.py) and the findings measured on it."""

from __future__ import annotations

import numpy as np
import pytest

from medfusion.io.volume import Volume
from medfusion.measure.features import FEATURES, lesion_features
from medfusion.measure.lesions import bidimensional_mm, find_lesions, label_lesions
from medfusion.run.measure import measure

NAMES = ["background", "tumour_core", "oedema", "calcification"]


def _two_touching() -> Volume:
    """Two cores whose oedema touches: one lesion (26-connected foreground with core)."""
    lab = np.zeros((20, 40, 60), np.int16)
    lab[5:15, 10:30, 5:30] = 2
    lab[8:12, 15:25, 10:18] = 1
    lab[5:15, 10:30, 30:55] = 2
    lab[8:12, 15:25, 40:50] = 1
    return Volume(lab, (1.0, 1.0, 2.0))


def test_touching_lesions_are_two_findings_and_one_region() -> None:
    """Two cores whose oedema touches: two lesions in the findings (each voxel to its nearest core),
    one region for the diagnosis's fitted measurement term; the largest core diameter agrees."""
    vol = _two_touching()
    m = measure(vol, NAMES)
    f = lesion_features(vol.array, tuple(vol.spacing[::-1]), NAMES)
    assert m.lesion_count == 2 and int(f[FEATURES.index("lesion_count")]) == 1
    # each core's own Feret diameter (10 × 10 and 8 × 10 voxels in plane, 4 slices of 2 mm), largest
    # first, not the pair's 40 mm span
    assert m.lesion_diameters_mm == [
        pytest.approx(np.sqrt(9**2 + 9**2 + 6**2), abs=0.05),
        pytest.approx(np.sqrt(7**2 + 9**2 + 6**2), abs=0.05),
    ]
    volumes = [les.volumes_ml["oedema"] for les in m.lesions]
    assert sum(volumes) == pytest.approx(m.volumes_ml["oedema"], abs=1e-3) and min(volumes) > 0


def test_separate_lesions_get_one_row_each_largest_first() -> None:
    lab = np.zeros((20, 40, 60), np.int16)
    lab[4:8, 5:10, 5:10] = 1  # small, at low x (patient right in LPS)
    lab[10:18, 20:35, 40:56] = 1  # large, at high x (patient left)
    lab[2, 2, 58] = 2  # oedema without core: not a lesion
    vol = Volume(lab, (1.0, 1.0, 2.0))
    comp, ids = label_lesions(lab, NAMES)
    assert len(ids) == 2
    lesions = find_lesions(vol, NAMES)
    assert [les.number for les in lesions] == [1, 2]
    assert lesions[0].volumes_ml["tumour_core"] > lesions[1].volumes_ml["tumour_core"]
    assert lesions[0].side == "left" and lesions[1].side == "right"
    assert lesions[0].axial_diameters_mm[0] >= lesions[0].axial_diameters_mm[1] > 0


def test_ct_density_and_mr_enhancement() -> None:
    lab = np.zeros((10, 30, 30), np.int16)
    lab[3:7, 10:20, 10:20] = 1
    lab[5, 14:16, 14:16] = 3  # a calcification inside the core: not part of the core's density
    ct = np.full(lab.shape, 30.0, np.float32)
    ct[lab == 1] = 60.0
    ct[lab == 3] = 600.0
    mr = np.full(lab.shape, 100.0, np.float32)
    mr[lab == 1] = 250.0
    vol = Volume(lab, (1.0, 1.0, 1.0))
    (lesion,) = find_lesions(vol, NAMES, ct=vol.with_array(ct, "CT"), mr=vol.with_array(mr, "MR"))
    assert lesion.ct_core_hu == pytest.approx(60.0)
    assert lesion.mr_enhancement_ratio == pytest.approx(2.5, abs=0.05)
    with pytest.raises(ValueError, match="not on the label map's grid"):
        find_lesions(vol, NAMES, ct=Volume(np.zeros((2, 2, 2)), modality="CT"))


def test_bidimensional_diameters_of_a_rectangle() -> None:
    mask = np.zeros((40, 40), bool)
    mask[10:14, 5:35] = True  # 30 × 4 voxels at 0.5 mm
    d1, d2 = bidimensional_mm(mask, (0.5, 0.5))
    assert d1 == pytest.approx(np.hypot(29 * 0.5, 3 * 0.5), abs=1e-6)
    assert 1.5 <= d2 < 4.0 < d1  # the extent across the longest (diagonal) diameter


def test_no_lesion() -> None:
    vol = Volume(np.zeros((4, 5, 6), np.int16))
    m = measure(vol, NAMES)
    assert m.lesion_count == 0 and m.largest_diameter_mm == 0.0 and m.lesions == []
