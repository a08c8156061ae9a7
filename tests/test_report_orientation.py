"""Report figures are drawn from the geometry, not the storage order (#27: RAS NIfTI was mirrored)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medfusion.io.nifti import read_nifti, write_nifti
from medfusion.io.volume import LabelMap, Volume
from medfusion.report import figures


def _patient() -> tuple[Volume, np.ndarray]:
    """An LPS-stored CT (as DICOM gives it) with a lesion at the patient's left, posterior, superior."""
    shape = (12, 20, 24)  # z, y, x
    ct = np.full(shape, -1000.0, np.float32)
    ct[2:10, 3:17, 3:21] = 30.0
    labels = np.zeros(shape, np.int16)
    labels[7:9, 12:15, 16:19] = 1  # x index high = patient left; y high = posterior; z high = superior
    return Volume(ct, (0.8, 0.9, 2.5), (-9.6, -9.0, -15.0), np.eye(3), "CT"), labels


def _restore(vol: Volume, labels: np.ndarray, flips: tuple[bool, bool, bool]) -> tuple[Volume, np.ndarray]:
    """The same patient stored in another voxel order (each of i, j, k reversed or not)."""
    arr, lab = vol.array, labels
    direction = vol.direction.copy()
    corner = np.zeros(3)
    for axis, flip in enumerate(flips):
        if flip:
            arr = np.flip(arr, axis=2 - axis)
            lab = np.flip(lab, axis=2 - axis)
            direction[:, axis] *= -1
            corner[axis] = vol.size_xyz[axis] - 1
    origin = vol.index_to_world(corner)[0]
    return Volume(
        np.ascontiguousarray(arr), vol.spacing, tuple(origin), direction, "CT"
    ), np.ascontiguousarray(lab)


@pytest.mark.parametrize(
    "flips", [(True, True, False), (True, False, True), (False, True, True), (True, True, True)]
)
def test_display_is_the_same_whatever_the_storage_order(
    tmp_path: Path, flips: tuple[bool, bool, bool]
) -> None:
    ref, ref_labels = _patient()
    other, other_labels = _restore(ref, ref_labels, flips)
    # through a NIfTI file, as a user hands it over (RAS order on disk for flips (True, True, False))
    back = read_nifti(write_nifti(other, tmp_path / "ct.nii.gz"), modality="CT")
    grids = [figures.DisplayGrid.of(v) for v in (ref, back)]
    turned = [g.turn(v.array) for g, v in zip(grids, (ref, back), strict=True)]
    labs = [g.turn(lab) for g, lab in zip(grids, (ref_labels, other_labels), strict=True)]
    assert np.array_equal(turned[0], turned[1])
    assert np.array_equal(labs[0], labs[1])
    assert np.allclose(grids[0].spacing, grids[1].spacing)
    assert np.allclose(grids[0].origin, grids[1].origin, atol=1e-4)
    c = (8, 13, 17)
    for a, b in zip(figures.display_planes(labs[0], c), figures.display_planes(labs[1], c), strict=True):
        assert np.array_equal(a, b)


def test_radiological_convention_puts_patient_left_on_image_right() -> None:
    vol, labels = _patient()
    rev, rev_labels = _restore(vol, labels, (True, True, False))
    grid = figures.DisplayGrid.of(rev)
    axial, coronal, sagittal = figures.display_planes(grid.turn(rev_labels), (8, 13, 17))
    nx = axial.shape[1]
    rows, cols = np.nonzero(axial)
    assert cols.mean() > nx / 2  # patient left → image right (letter "L" on the right edge)
    assert rows.mean() > axial.shape[0] / 2  # posterior → image bottom ("P")
    rows_c, _ = np.nonzero(coronal)
    assert rows_c.mean() < coronal.shape[0] / 2  # superior → image top ("S")
    _, cols_s = np.nonzero(sagittal)
    assert cols_s.mean() > sagittal.shape[1] / 2  # posterior → image right on the sagittal ("P")
    assert grid.position_mm(0, 8) == pytest.approx(-15.0 + 8 * 2.5)  # z of the axial slice shown
    assert figures.VIEW_LETTERS[0] == ("R", "L", "A", "P")


def test_figures_render_with_markers() -> None:
    vol, labels = _patient()
    lab = LabelMap.on(vol.grid, labels)
    png = figures.triplanar(vol, vol.with_array(vol.array + 1000.0, "MR"), lab, ["background", "tumour_core"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    png = figures.registration_check(vol, vol.with_array(vol.array + 1000.0, "MR"), lab, used=False)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_figures_refuse_a_label_map_off_the_ct_grid() -> None:
    vol, labels = _patient()
    flipped = LabelMap(labels[:, :, ::-1].copy(), vol.spacing, vol.origin, np.diag([-1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="not the CT's"):
        figures.triplanar(vol, None, flipped, ["background", "tumour_core"])
    with pytest.raises(ValueError, match="not the CT's"):
        figures.key_image(vol, flipped, ["background", "tumour_core"])
